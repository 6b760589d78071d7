"""The running reconciler: a cache fed by kopf's watches, a work queue, and the executor.

kopf watches the four kinds and the RayJobs and calls the handlers in `handlers.py`, which
only update the cache and queue the affected resource keys (the resource itself, the owner
of a RayJob, the resources that read a resource whose phase changed). Workers take keys from
the queue one at a time per key, observe (cache + object store), `decide` (pure), act, and
patch the status with optimistic concurrency (the resourceVersion the decision was made
from). A resync re-queues every resource periodically: the object store has no watch, and
a lost event must never leave a resource stuck.

With peering (two replicas), only the replica kopf keeps active reconciles: the gate follows
the same peering object kopf uses and pauses the workers while a peer with a higher priority
is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from tokenmill.api.loader import parse_resource
from tokenmill.api.output_prefix import ClaimedOutput, overlaps
from tokenmill.api.problems import Problem
from tokenmill.api.resources import KINDS, AnyResource
from tokenmill.api.semantic import validate
from tokenmill.operator import conditions, naming, storage
from tokenmill.operator.config import OperatorConfig
from tokenmill.operator.kube import ApiError, Conflict, Kube, NotFound
from tokenmill.operator.metrics import Metrics
from tokenmill.operator.reconcile import (
    NEED_OUTPUTS,
    NEED_PREVIOUS_RUN,
    NEED_PROGRESS,
    NEED_RAYJOBS,
    NEED_URI_CHECKS,
    CreateRayJob,
    Decision,
    DeleteOutputs,
    DeleteRayJob,
    Event,
    Observation,
    SetFinalizer,
    WriteRunSpec,
    decide,
    input_uris,
    recorded_output,
    refs_of,
)
from tokenmill.operator.status import InputState, RayJobView, redact
from tokenmill.resolve import output_uri

log = logging.getLogger("tokenmill.operator")

Key = tuple[str, str, str]  # (namespace, kind, name)


def newer(candidate: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """Whether `candidate` is a newer version than `current`.

    resourceVersions are compared as numbers where both are numeric, as every API server
    backed by etcd writes them; an equal version is the same object (the watch event of a
    write whose response the cache already holds), so it is not newer.
    """
    if current is None:
        return True
    a = (candidate.get("metadata") or {}).get("resourceVersion")
    b = (current.get("metadata") or {}).get("resourceVersion")
    if a is None or b is None:
        return True
    if a == b:
        return False
    try:
        return int(a) > int(b)
    except ValueError:
        return True


def key_of(kind: str, body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return (str(meta.get("namespace") or "default"), kind, str(meta.get("name")))


class Cache:
    """The latest version of every watched object, plus who reads whom."""

    def __init__(self) -> None:
        self.resources: dict[Key, dict[str, Any]] = {}
        self.rayjobs: dict[Key, dict[str, dict[str, Any]]] = {}
        self._parsed: dict[Key, tuple[Any, AnyResource | None, list[Problem]]] = {}
        self._reads: dict[Key, set[Key]] = {}
        self._readers: dict[Key, set[Key]] = {}
        self._outputs: dict[Key, tuple[Mapping[str, Any], str | None, str | None]] = {}

    def put_resource(self, key: Key, body: Mapping[str, Any]) -> bool:
        """Store `body` unless an equal or newer version is cached; returns whether stored."""
        if not newer(body, self.resources.get(key)):
            return False
        # Cached bodies are read-only for the operator (decisions build new dicts), and kopf
        # hands over freshly decoded JSON, so a shallow copy is enough.
        self.resources[key] = dict(body)
        self._index_reads(key)
        return True

    def drop_resource(self, key: Key) -> None:
        self.resources.pop(key, None)
        self._parsed.pop(key, None)
        self._outputs.pop(key, None)
        for target in self._reads.pop(key, set()):
            self._readers.get(target, set()).discard(key)

    def parsed(self, key: Key) -> tuple[AnyResource | None, list[Problem]]:
        body = self.resources.get(key)
        if body is None:
            return None, [Problem("the resource is gone")]
        version = _parse_key(body)
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        document = {k: v for k, v in body.items() if k != "status"}  # status is ours, not input
        resource, problems = parse_resource(document)
        self._parsed[key] = (version, resource, problems)
        return resource, problems

    def output(self, key: Key, store: str | None) -> str | None:
        """Where the resource writes: as recorded at its first attempt, else as its spec and `store` say."""
        body = self.resources[key]
        cached = self._outputs.get(key)
        if cached is not None and cached[0] is body and cached[1] == store:  # a new version is a new dict
            return cached[2]
        output = recorded_output(body)  # where the first attempt wrote stays where outputs are
        resource = self.parsed(key)[0]
        if output is None and resource is not None:
            if resource.spec.output.uri:
                output = resource.spec.output.uri
            elif store:
                output = output_uri(resource, store)
        self._outputs[key] = (body, store, output)
        return output

    def readers(self, key: Key) -> set[Key]:
        return set(self._readers.get(key, ()))

    def _index_reads(self, key: Key) -> None:
        """Who reads whom, from the spec's typed references (a spec that does not parse reads nothing)."""
        namespace = key[0]
        resource, _ = self.parsed(key)
        targets: set[Key] = set()
        if resource is not None:
            targets = {(namespace, kind, name) for kind, name in refs_of(resource)}
        for old in self._reads.get(key, set()) - targets:
            self._readers.get(old, set()).discard(key)
        for target in targets:
            self._readers.setdefault(target, set()).add(key)
        self._reads[key] = targets

    def put_rayjob(self, owner: Key, body: Mapping[str, Any]) -> bool:
        name = str((body.get("metadata") or {}).get("name"))
        jobs = self.rayjobs.setdefault(owner, {})
        if not newer(body, jobs.get(name)):
            return False
        jobs[name] = dict(body)
        return True

    def drop_rayjob(self, owner: Key, name: str) -> None:
        jobs = self.rayjobs.get(owner)
        if jobs is not None:
            jobs.pop(name, None)
            if not jobs:
                self.rayjobs.pop(owner, None)

    def replace_rayjobs(self, owner: Key, bodies: Iterable[Mapping[str, Any]]) -> None:
        """Replace what is known of an owner's RayJobs with an authoritative listing."""
        self.rayjobs[owner] = {str(b["metadata"]["name"]): dict(b) for b in bodies}

    def bodies(self) -> list[dict[str, Any]]:
        return list(self.resources.values())


def _parse_key(body: Mapping[str, Any]) -> Any:
    """What parsing a resource depends on: not its status, nor its resourceVersion (which every
    status write changes). A spec change bumps metadata.generation."""
    meta = body.get("metadata") or {}
    return (
        meta.get("uid"), meta.get("generation"), meta.get("namespace"),
        tuple(sorted((meta.get("labels") or {}).items())),
        tuple(sorted((meta.get("annotations") or {}).items())),
        None if meta.get("generation") is not None else repr(body.get("spec")),
    )


def rayjob_owner(body: Mapping[str, Any]) -> Key | None:
    """The (namespace, kind, name) a RayJob of ours was created for, from its labels and owner."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    kind = labels.get(naming.LABEL_KIND)
    if kind not in KINDS:
        return None
    for ref in meta.get("ownerReferences") or ():
        if ref.get("controller") and ref.get("kind") == kind and ref.get("name"):
            return (str(meta.get("namespace") or "default"), kind, str(ref["name"]))
    return None


@dataclass(frozen=True)
class PeeringSettings:
    standalone: bool = True
    name: str = "tokenmill"
    priority: int = 0
    clusterwide: bool = True
    namespaces: tuple[str, ...] = ()


class Controller:
    def __init__(self, config: OperatorConfig, kube: Kube, *, peering: PeeringSettings | None = None,
                 metrics: Metrics | None = None, executor: ThreadPoolExecutor | None = None,
                 instance: str | None = None):
        self.config = config
        self.kube = kube
        self.peering = peering or PeeringSettings()
        self.cache = Cache()
        self.queue: Any = None
        self.metrics = metrics or Metrics(self.cache.bodies)
        self.executor = executor or ThreadPoolExecutor(max_workers=config.api_threads,
                                                       thread_name_prefix="tokenmill-io")
        self.instance = instance or f"tokenmill-operator-{uuid.uuid4().hex[:8]}"
        self.active = self.peering.standalone
        self.started = False
        self.health_server: Any = None  # metrics.HealthServer, started by the kopf start-up handler
        self._gate_known = self.peering.standalone
        self._tasks: list[asyncio.Task[Any]] = []
        self._failures: dict[Key, int] = {}
        self._retry_at: dict[Key, float] = {}
        self._committed_inputs: set[str] = set()
        self._peering_missing_logged = False
        self._resume = asyncio.Event()
        if self.active:
            self._resume.set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        from tokenmill.operator.workqueue import WorkQueue

        self.queue = WorkQueue()
        if self.peering.standalone:
            # Decide nothing before the caches hold every resource and RayJob: a decision made
            # from a half-filled cache would take a running attempt for a lost one.
            await self._relist()
        for number in range(self.config.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"tokenmill-worker-{number}"))
        self._tasks.append(asyncio.create_task(self._resync(), name="tokenmill-resync"))
        if not self.peering.standalone:
            self._tasks.append(asyncio.create_task(self._peering_gate(), name="tokenmill-peering-gate"))
        self.started = True

    async def stop(self) -> None:
        if self.queue is not None:
            self.queue.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.started = False

    @property
    def ready(self) -> bool:
        return self.started and self._gate_known

    # -- what kopf tells us --------------------------------------------------------------

    def resource_event(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = key_of(kind, body)
        previous = self.cache.resources.get(key)
        if event_type == "DELETED":
            readers = self.cache.readers(key)
            self.cache.drop_resource(key)
            for reader in readers:
                self._enqueue(reader)
            return
        if not self.cache.put_resource(key, body):
            return
        self._enqueue(key)
        old_phase = ((previous or {}).get("status") or {}).get("phase")
        new_phase = (body.get("status") or {}).get("phase")
        if previous is None or old_phase != new_phase:
            for reader in self.cache.readers(key):
                self._enqueue(reader)

    def rayjob_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        owner = rayjob_owner(body)
        if owner is None:
            return
        if event_type == "DELETED":
            self.cache.drop_rayjob(owner, str(body["metadata"]["name"]))
        elif not self.cache.put_rayjob(owner, body):
            return  # already known (the response to the operator's own create)
        self._enqueue(owner)

    def _enqueue(self, key: Key) -> None:
        if self.queue is not None:
            self.queue.add(key)
            self.metrics.queue_depth.set(len(self.queue))

    # -- loops ---------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            await self._resume.wait()
            key = await self.queue.get()
            self.metrics.queue_depth.set(len(self.queue))
            try:
                if not self.active:
                    self.queue.add_after(key, 1.0)
                    continue
                with self.metrics.reconcile_duration.time():
                    await self.reconcile(key)
                self._failures.pop(key, None)
                self._retry_at.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # every failure is retried with back-off
                self._retry_later(key, error)
                if isinstance(error, ActionError):
                    await self._record_action_failure(key, error)
            finally:
                self.queue.done(key)

    def _retry_later(self, key: Key, error: BaseException) -> None:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        reason = _error_reason(error)
        self.metrics.reconcile_errors.labels(key[1], reason).inc()
        delay = min(self.config.error_backoff_max_seconds, self.config.error_backoff_seconds * 2 ** (failures - 1))
        log.warning("reconciling %s/%s/%s failed (%s), retrying in %.1fs: %s", key[0], key[1], key[2],
                    reason, delay, redact(str(error)))
        self._retry_at[key] = asyncio.get_running_loop().time() + delay
        self.queue.add_after(key, delay)

    async def _record_action_failure(self, key: Key, error: ActionError) -> None:
        """Show a failed action on the resource: the ActionFailed condition and, when it says
        something new, a Warning event. Never raises: the retry is already scheduled."""
        namespace, kind, name = key
        body = self.cache.resources.get(key)
        if body is None:
            return
        old = body.get("status") or {}
        meta = body.get("metadata") or {}
        found = conditions.Conditions(old.get("conditions"), now=datetime.now(timezone.utc),
                                      generation=meta.get("generation"))
        previous = found.get(conditions.ACTION_FAILED) or {}
        message = error.message
        if previous.get("status") == conditions.TRUE and previous.get("reason") == error.reason \
                and previous.get("message") == message:
            return
        found.set(conditions.ACTION_FAILED, conditions.TRUE, error.reason, message)
        try:
            updated = await self.kube.patch_status(kind, namespace, name, {"conditions": found.to_list()}, None)
        except Exception as patch_error:  # the API server itself may be what fails
            log.warning("could not record the failure on %s/%s/%s: %s", namespace, kind, name,
                        redact(str(patch_error)))
        else:
            self.cache.put_resource(key, updated)  # our own write: its watch event is not news
        self._post_event(body, Event("Warning", error.reason, message))

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            if self.active:
                now = asyncio.get_running_loop().time()
                for key in list(self.cache.resources):
                    if self._retry_at.get(key, 0.0) <= now:  # a failing key keeps its back-off
                        self._enqueue(key)

    async def _peering_gate(self) -> None:
        namespaces: list[str | None] = [None] if self.peering.clusterwide else list(self.peering.namespaces)
        while True:
            try:
                active = True
                for namespace in namespaces:
                    body = await self.kube.get_peering(self.peering.name, namespace)
                    active = active and self._peering_allows(body)
            except NotFound:
                # kopf itself runs without peers when the object is missing; do the same.
                active = True
                if not self._peering_missing_logged:
                    log.warning("peering object %r not found: replicas cannot coordinate (create it, or run "
                                "standalone)", self.peering.name)
                    self._peering_missing_logged = True
            except Exception as error:  # keep the last known state through API hiccups
                active = self.active
                log.warning("cannot read the peering object: %s", error)
            try:
                await self._set_active(active)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("peering: could not take over yet (%s); retrying", error)
            self._gate_known = True
            await asyncio.sleep(self.config.peering_check_seconds)

    def _peering_allows(self, body: Mapping[str, Any]) -> bool:
        now = datetime.now(timezone.utc)
        mine = self.peering.priority
        higher, same = 0, 0
        for info in (body.get("status") or {}).values():
            if not isinstance(info, Mapping):
                continue
            seen = conditions.parse_time(info.get("lastseen"))
            lifetime = float(info.get("lifetime", 60))
            if seen is None or (now - seen).total_seconds() >= lifetime:
                continue
            priority = int(info.get("priority", 0))
            higher += priority > mine
            same += priority == mine
        # kopf pauses for a live higher priority, and pauses everyone on a tie (two peers,
        # this one included, with the same priority).
        return higher == 0 and same <= 1

    async def _set_active(self, active: bool) -> None:
        if active == self.active:
            return
        if active:
            log.info("peering: this replica is active; re-reading the cluster")
            await self._relist()
            self.active = True
            self._resume.set()
            for key in list(self.cache.resources):
                self._enqueue(key)
        else:
            log.info("peering: a peer with a higher priority is active; pausing")
            self.active = False
            self._resume.clear()

    async def _relist(self) -> None:
        """Replace the caches with a fresh listing: while paused, kopf's watches were stopped,
        so objects may have changed or gone unseen."""
        namespaces: list[str | None] = [None] if self.peering.clusterwide else list(self.peering.namespaces)
        resources: dict[Key, dict[str, Any]] = {}
        rayjobs: list[dict[str, Any]] = []
        for namespace in namespaces:
            for kind in KINDS:
                for body in await self.kube.list_resources(kind, namespace):
                    resources[key_of(kind, body)] = body
            rayjobs += await self.kube.list_all_rayjobs(namespace, f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}")
        for key in list(self.cache.resources):
            if key not in resources:
                self.cache.drop_resource(key)
        for key, body in resources.items():
            self.cache.put_resource(key, body)
        self.cache.rayjobs.clear()
        for body in rayjobs:
            owner = rayjob_owner(body)
            if owner is not None:
                self.cache.put_rayjob(owner, body)

    # -- one reconciliation --------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        body = self.cache.resources.get(key)
        if body is None:
            return
        namespace, kind, name = key
        resource, problems = self.cache.parsed(key)
        output = self.cache.output(key, self.config.store)
        if resource is not None:
            problems = validate(resource, self._lookup(namespace), output=output, claimed=self._claimed_outputs(key, output))
        deleting = bool((body.get("metadata") or {}).get("deletionTimestamp"))
        uid = (body.get("metadata") or {}).get("uid")
        jobs = []
        for job_body in (self.cache.rayjobs.get(key) or {}).values():
            view = RayJobView.from_body(job_body)
            if view is not None and view.owner_uid == uid:
                jobs.append(view)
        inputs: dict[tuple[str, str], InputState] = {}
        if resource is not None:
            for ref_kind, ref_name in refs_of(resource):
                other = self.cache.resources.get((namespace, ref_kind, ref_name))
                inputs[(ref_kind, ref_name)] = (InputState.from_body(ref_kind, ref_name, other) if other is not None
                                                else InputState.missing(ref_kind, ref_name))
        observation = Observation(
            body=body, resource=resource, problems=problems, output=output, rayjobs=jobs, inputs=inputs,
            now=datetime.now(timezone.utc), readers=self._active_readers(key) if deleting else (),
        )
        decision = decide(observation, self.config)
        for _ in range(3):
            if not decision.needs:
                break
            observation = await self._observe_more(observation, decision.needs, kind, uid)
            decision = decide(observation, self.config)
        if decision.needs:
            raise RuntimeError(f"the decision still needs {sorted(decision.needs)}")
        await self._execute(key, body, decision)

    def _active_readers(self, key: Key) -> list[str]:
        """Unfinished resources that read `key`'s output: by reference, or by a URI inside it."""
        target = recorded_output(self.cache.resources.get(key) or {})
        found: set[Key] = set(self.cache.readers(key))
        if target is not None:
            for other in list(self.cache.resources):
                if other == key:
                    continue
                parsed = self.cache.parsed(other)[0]
                if parsed is not None and any(uri == target or uri.startswith(target.rstrip("/") + "/")
                                              for _, uri, _ in input_uris(parsed)):
                    found.add(other)
        active = []
        for other in sorted(found):
            other_body = self.cache.resources.get(other) or {}
            found_conditions = (other_body.get("status") or {}).get("conditions")
            finished = (conditions.is_true(found_conditions, conditions.SUCCEEDED)
                        or conditions.is_true(found_conditions, conditions.FAILED))
            if other_body and not finished and not (other_body.get("metadata") or {}).get("deletionTimestamp"):
                active.append(f"{other[1]}/{other[2]}" if other[0] == key[0] else f"{other[1]}/{other[0]}/{other[2]}")
        return active

    def _claimed_outputs(self, key: Key, output: str | None) -> list[ClaimedOutput]:
        """The outputs `output` overlaps among those of resources created before this one (ties by key):
        a newer resource whose output overlaps an older one's is invalid, the older one runs on.
        Creation times have whole seconds: within one, a resource whose attempts already wrote
        to its output is the older."""
        if output is None:
            return []

        def age_rank(other_key: Key, body: dict[str, Any]) -> tuple[str, bool, Key]:
            created = (body.get("metadata") or {}).get("creationTimestamp") or ""
            return created, recorded_output(body) is None, other_key

        rank = age_rank(key, self.cache.resources[key])
        claimed = []
        for other_key, other in self.cache.resources.items():
            if other_key == key or age_rank(other_key, other) >= rank:
                continue
            uri = self.cache.output(other_key, self.config.store)
            if uri is not None and overlaps(output, uri):
                namespace, kind, name = other_key
                claimed.append(ClaimedOutput(f"{kind}/{name}" if namespace == key[0] else f"{namespace}/{kind}/{name}",
                                             uri))
        return claimed

    def _lookup(self, namespace: str) -> Any:
        def lookup(kind: str, name: str) -> AnyResource | None:
            key = (namespace, kind, name)
            if key not in self.cache.resources:
                return None
            return self.cache.parsed(key)[0]

        return lookup

    async def _io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _observe_more(self, obs: Observation, needs: set[str], kind: str, uid: str | None) -> Observation:
        changes: dict[str, Any] = {}
        if NEED_URI_CHECKS in needs and obs.resource is not None:
            checks = []
            for path, uri, what in input_uris(obs.resource):
                if uri in self._committed_inputs:  # committed data never becomes uncommitted
                    checks.append(storage.UriCheck(path, uri, True))
                    continue
                check = await self._io(storage.check_input, path, uri, what)
                if check.ok:
                    self._committed_inputs.add(uri)
                checks.append(check)
            changes["uri_checks"] = checks
        if NEED_PROGRESS in needs and obs.output is not None:
            changes["progress"] = await self._io(storage.read_progress, obs.output)
            changes["progress_read"] = True
        if NEED_OUTPUTS in needs and obs.output is not None:
            changes["output_check"] = await self._io(storage.check_outputs, kind, obs.output, uid)
        if NEED_RAYJOBS in needs:
            namespace = str((obs.body.get("metadata") or {}).get("namespace") or "default")
            name = str((obs.body.get("metadata") or {}).get("name"))
            listing = await self.kube.list_rayjobs(namespace, naming.owner_selector(kind, name))
            ours = [job for job in listing if (RayJobView.from_body(job) or _NO_VIEW).owner_uid == uid]
            self.cache.replace_rayjobs((namespace, kind, name), ours)
            changes["rayjobs"] = [view for view in map(RayJobView.from_body, ours) if view is not None]
            changes["rayjobs_listed"] = True
        if NEED_PREVIOUS_RUN in needs and obs.output is not None:
            changes["previous_run"] = await self._io(storage.read_run_spec, obs.output)
            changes["previous_run_read"] = True
        return dataclasses.replace(obs, **changes)

    async def _execute(self, key: Key, body: Mapping[str, Any], decision: Decision) -> None:
        namespace, kind, name = key
        meta = body.get("metadata") or {}
        version = meta.get("resourceVersion")
        pending_spec: WriteRunSpec | None = None
        for action in decision.actions:
            if isinstance(action, SetFinalizer):
                current = list(meta.get("finalizers") or [])
                wanted = ([*current, naming.FINALIZER] if action.present
                          else [item for item in current if item != naming.FINALIZER])
                try:
                    updated = await self.kube.patch_finalizers(kind, namespace, name, wanted, version)
                except NotFound:
                    self.cache.drop_resource(key)
                    return
                except Conflict:
                    self.queue.add_after(key, 0.2)
                    return
                except Exception as error:
                    raise ActionError("FinalizerUpdateFailed", "updating the finalizers", error) from error
                version = (updated.get("metadata") or {}).get("resourceVersion", version)
                self.cache.put_resource(key, updated)
            elif isinstance(action, WriteRunSpec):
                pending_spec = action  # written once the attempt's RayJob is known not to exist yet
            elif isinstance(action, CreateRayJob):
                try:
                    created = await self._create_rayjob(key, meta.get("uid"), action, pending_spec)
                except ActionError:
                    raise
                except Exception as error:
                    raise ActionError("RayJobCreateFailed", f"creating RayJob {action.name}", error) from error
                pending_spec = None
                if not created:
                    self.queue.add_after(key, 0.2)
                    return
            elif isinstance(action, DeleteRayJob):
                try:
                    await self.kube.delete_rayjob(namespace, action.name)
                except NotFound:
                    pass  # already gone: the goal is reached
                except Exception as error:
                    raise ActionError("RayJobDeleteFailed", f"deleting RayJob {action.name}", error) from error
            elif isinstance(action, DeleteOutputs):
                try:
                    deleted = await self._io(storage.delete_outputs, action.uri)
                except Exception as error:
                    raise ActionError("OutputDeleteFailed", f"deleting the outputs under {action.uri}",
                                      error) from error
                log.info("deleted %d object(s) under %s", deleted, action.uri)
        if pending_spec is not None:
            await self._write_run_spec(pending_spec)

        stored = False
        if decision.status is not None and decision.status != (body.get("status") or {}):
            try:
                updated = await self.kube.patch_status(kind, namespace, name, _status_patch(body.get("status") or {},
                                                                                             decision.status), version)
            except NotFound:
                self.cache.drop_resource(key)
                return
            except Conflict:
                # Decided from a stale view; the newer version is on its way (or re-read now).
                fresh = await self._refresh(key)
                if fresh:
                    self.queue.add(key)
                return
            except ApiError as error:  # such as a 422 from a schema the status does not fit
                raise ActionError("StatusUpdateFailed", "updating the status", error) from error
            self.cache.put_resource(key, updated)
            stored = True
            for reader in self.cache.readers(key):
                self._enqueue(reader)
        if stored:
            for finished in decision.finished:
                self.metrics.attempt_finished(finished.kind, finished.result, finished.duration_seconds)
        for event in decision.events:
            self._post_event(body, event)
        if decision.requeue_after is not None:
            self.queue.add_after(key, decision.requeue_after)
        elif any(job for job in (self.cache.rayjobs.get(key) or {}).values()
                 if (job.get("status") or {}).get("jobDeploymentStatus") == "Running"):
            # Progress lives in the object store, which sends no events: poll while running.
            self.queue.add_after(key, min(self.config.resync_seconds, 30.0))

    async def _refresh(self, key: Key) -> bool:
        namespace, kind, name = key
        try:
            fresh = await self.kube.get_resource(kind, namespace, name)
        except NotFound:
            self.cache.drop_resource(key)
            return False
        self.cache.put_resource(key, fresh)
        return True

    async def _write_run_spec(self, action: WriteRunSpec) -> None:
        try:
            await self._io(storage.write_run_spec, action.output, action.document)
        except Exception as error:
            raise ActionError("RunSpecWriteFailed", f"writing the run spec under {action.output}", error) from error

    async def _create_rayjob(self, key: Key, uid: str | None, action: CreateRayJob,
                             run_spec: WriteRunSpec | None = None) -> bool:
        """Write the run spec and create the attempt's RayJob, unless the RayJob exists (then
        neither: the running attempt keeps the spec it started from); False when the view was
        stale or an earlier attempt is still being stopped."""
        namespace, kind, name = key
        existing = await self.kube.list_rayjobs(namespace, naming.owner_selector(kind, name))
        ours = [job for job in existing if (RayJobView.from_body(job) or _NO_VIEW).owner_uid == uid]
        self.cache.replace_rayjobs(key, ours)
        attempts = [view.attempt for view in map(RayJobView.from_body, ours) if view is not None]
        if action.attempt in attempts:
            log.info("RayJob %s for attempt %d already exists; adopting it", action.name, action.attempt)
            return True
        if any(attempt != action.attempt for attempt in attempts):
            return False  # another attempt exists: decide again from the fresh listing
        if run_spec is not None:
            # The run spec names the current attempt: writers of an older one are fenced from now on.
            await self._write_run_spec(run_spec)
        try:
            created = await self.kube.create_rayjob(namespace, action.manifest)
        except Conflict:
            # The name is taken: by our attempt (a concurrent create) or by a stranger.
            listing = await self.kube.list_rayjobs(namespace, naming.owner_selector(kind, name))
            mine = [job for job in listing if job["metadata"]["name"] == action.name
                    and (RayJobView.from_body(job) or _NO_VIEW).owner_uid == uid]
            if not mine:
                raise RuntimeError(f"RayJob {namespace}/{action.name} exists but does not belong to "
                                   f"{kind}/{name}; delete or rename it") from None
            self.cache.put_rayjob(key, mine[0])
            return True
        self.cache.put_rayjob(key, created)
        self.metrics.rayjobs_created.labels(kind).inc()
        log.info("created RayJob %s/%s (attempt %d)", namespace, action.name, action.attempt)
        return True

    def _post_event(self, body: Mapping[str, Any], event: Event) -> None:
        meta = body.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        now = conditions.rfc3339(datetime.now(timezone.utc))
        payload = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "name": meta.get("name"),
                "namespace": namespace, "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "source": {"component": "tokenmill-operator"},
            "reportingComponent": "tokenmill.dev/operator",
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }

        async def post() -> None:
            try:
                await self.kube.create_event(namespace, payload)
            except Exception as error:  # events are informative; never fail a reconciliation
                log.warning("could not post event %s for %s: %s", event.reason, meta.get("name"), error)

        task = asyncio.create_task(post())
        self._tasks.append(task)
        task.add_done_callback(lambda done: self._tasks.remove(done) if done in self._tasks else None)


_NO_VIEW = RayJobView("", 0, None, "", "", "", False, None, None, None)


class ActionError(Exception):
    """An action of a decision failed; shown on the resource as the ActionFailed condition."""

    def __init__(self, reason: str, doing: str, error: BaseException):
        self.reason = reason
        self.error = error
        self.message = redact(f"{doing} failed: {_describe(error)}", limit=1024)
        super().__init__(self.message)


def _describe(error: BaseException) -> str:
    if isinstance(error, ApiError):
        return str(error)  # "<status> <reason>: <the API server's message>"
    return f"{type(error).__name__}: {error}"


def _status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch turning status `old` into `new` (removed fields become null)."""
    patch: dict[str, Any] = dict(new)
    for field_name in old:
        if field_name not in new:
            patch[field_name] = None
    return patch


def _error_reason(error: BaseException) -> str:
    if isinstance(error, ActionError):
        error = error.error
    if isinstance(error, ApiError):
        return f"Api{error.status}" if error.status else "ApiUnreachable"
    from tokenmill.store import StoreError

    if isinstance(error, StoreError):
        return type(error).__name__
    if isinstance(error, (TimeoutError, asyncio.TimeoutError)):
        return "Timeout"
    return type(error).__name__
