"""The reconciler's decision: pure, from what is observed to what should be done.

`decide(observation, config)` takes a resource as the API server stores it, the RayJobs it
owns, the states of its inputs and what the object store says, and returns the status the
resource should have, the actions that bring the world there and the events that tell the
story. It does no I/O, so the same observation always gives the same decision; the
controller performs the actions and patches the status.

Some observations cost object-store reads (input URIs, progress, committed outputs). The
decision names the ones it needs in `Decision.needs`; the controller reads them and decides
again.

The lifecycle of an attempt (status.attempts counts RayJobs created; status.attemptHistory
records how each ended; the resource fails when more attempts than spec.backoffLimit have
failed or were lost):

    inputs ready ──► write <output>/_run/spec.json, create RayJob <kind>-<name>-<N>
                       │ jobDeploymentStatus Initializing/Queued ─► phase Pending
                       │ Running                                 ─► phase Running (+ progress)
                       │ Complete, jobStatus SUCCEEDED, outputs  ─► Succeeded (sticky)
                       │ Complete without outputs or not         ─► record Failed; delete RayJob N,
                       │   SUCCEEDED, or Failed                     wait until gone, back off, N+1;
                       │                                            or Failed (sticky)
                       │ exit code 78 (workload not built)       ─► Failed at once (WorkloadNotBuilt)
                       │ RayJob vanished (a person, a TTL)        ─► record Lost (counts), then as above
                       └ spec.suspend ─► delete the RayJob, record Stopped, keep outputs; clearing it
                                         starts N+1

Restart safety: the attempt is the highest of status.attempts and the attempt labels of the
RayJobs found, and a RayJob's name is a function of (kind, name, attempt), so a decision made
twice (a crash between creating a RayJob and writing the status) adopts the RayJob instead of
creating a second one. Failures are counted from the history, so deleting old RayJobs loses
nothing; a missing current RayJob is confirmed by a fresh listing before it counts as lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from tokenmill.api.common import MUTABLE_AFTER_START
from tokenmill.api.problems import Problem
from tokenmill.api.resources import KINDS, AnyResource, references
from tokenmill.layout import dataset_uri, run_spec_uri
from tokenmill.operator import naming, rayjob
from tokenmill.operator.conditions import (
    ACTION_FAILED,
    FAILED,
    FALSE,
    INPUTS_READY,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    TRUE,
    VALID,
    Conditions,
    find,
    is_true,
    parse_time,
    rfc3339,
)
from tokenmill.operator.config import OperatorConfig
from tokenmill.operator.status import InputState, OutputCheck, RayJobView, UriCheck, progress_text
from tokenmill.resolve import UnresolvedInput, resolve_spec, run_spec
from tokenmill.workloads import NOT_BUILT_EXIT_CODE

# Observations that cost object-store reads, requested through Decision.needs.
NEED_URI_CHECKS = "uri_checks"
NEED_PROGRESS = "progress"
NEED_OUTPUTS = "outputs"
NEED_PREVIOUS_RUN = "previous_run"
NEED_RAYJOBS = "rayjobs"  # an authoritative listing of the resource's RayJobs, not the watch cache

# Attempt results that count against spec.backoffLimit.
FAILED_RESULTS = frozenset({"Failed", "Lost"})

# Spec fields that do not change what an attempt produces (the fields the CRD lets change on a
# started resource): a run spec that differs only in these continues the same run (same
# generation in the store's producer records), so a retry, a resume after a suspension or a
# new queue or deadline keeps the shards and checkpoints already committed.
RUN_NEUTRAL_FIELDS = MUTABLE_AFTER_START

NORMAL, WARNING = "Normal", "Warning"


# ---- what the controller observes ---------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    body: Mapping[str, Any]
    """The resource as the API server stores it (metadata, spec, status)."""
    resource: AnyResource | None
    """The typed resource; None when the stored object does not parse."""
    problems: Sequence[Problem]
    """Parse problems, or semantic problems of a parsed resource."""
    output: str | None
    """The resource's output prefix; None when it has no spec.output.uri and no default store."""
    rayjobs: Sequence[RayJobView]
    """RayJobs labelled for this resource and owned by its uid."""
    inputs: Mapping[tuple[str, str], InputState]
    """States of the resources it refers to, by (kind, name)."""
    now: datetime
    uri_checks: Sequence[UriCheck] | None = None
    progress: Any = None
    progress_read: bool = False
    output_check: OutputCheck | None = None
    previous_run: Mapping[str, Any] | None = None
    """The run spec the previous attempt ran from (<output>/_run/spec.json), when read."""
    previous_run_read: bool = False
    rayjobs_listed: bool = False
    """Whether `rayjobs` comes from a listing made for this decision (not only the watch cache)."""
    readers: Sequence[str] = ()
    """Unfinished resources that read this one's output (kind/name), for deletion."""


# ---- what the controller does -------------------------------------------------------------


@dataclass(frozen=True)
class WriteRunSpec:
    output: str
    document: dict[str, Any]


@dataclass(frozen=True)
class CreateRayJob:
    manifest: dict[str, Any]
    attempt: int

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]


@dataclass(frozen=True)
class DeleteRayJob:
    name: str


@dataclass(frozen=True)
class DeleteOutputs:
    uri: str


@dataclass(frozen=True)
class SetFinalizer:
    present: bool


Action = WriteRunSpec | CreateRayJob | DeleteRayJob | DeleteOutputs | SetFinalizer


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class AttemptResult:
    """An attempt that ended in this decision, for metrics."""

    kind: str
    result: str  # succeeded | failed
    duration_seconds: float | None


@dataclass
class Decision:
    status: dict[str, Any] | None
    """The whole new status, or None to leave it alone (deletion in progress)."""
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    needs: set[str] = field(default_factory=set)
    requeue_after: float | None = None
    finished: list[AttemptResult] = field(default_factory=list)


# ---- helpers ------------------------------------------------------------------------------


def refs_of(resource: AnyResource) -> list[tuple[str, str]]:
    """(kind, name) of every resource this one reads, in field order, without repeats."""
    seen: list[tuple[str, str]] = []
    for reference in references(resource):
        if reference.ref is not None and (reference.ref.kind, reference.ref.name) not in seen:
            seen.append((reference.ref.kind, reference.ref.name))
    return seen


def input_uris(resource: AnyResource) -> list[tuple[str, str, str]]:
    """(field path, uri, "dataset" | "model") of every input given by URI that must be committed.

    Dataset inputs need a committed _manifest.json; model inputs a checkpoint commit marker or
    a Hugging Face export. Opaque files (such as a language-identification model file) are
    passed to the workload unchecked.
    """
    return [
        (f"{reference.path}.uri", reference.uri, reference.role)
        for reference in references(resource)
        if reference.uri is not None and reference.role in ("dataset", "model")
    ]


def same_run(previous: Mapping[str, Any] | None, document: Mapping[str, Any]) -> bool:
    """Whether `document` continues the run of `previous`: the same resource (uid) and the same
    resolved spec apart from RUN_NEUTRAL_FIELDS (a suspension toggles spec.suspend, which bumps
    metadata.generation without changing what the workload computes)."""
    if not previous or not isinstance(previous.get("metadata"), Mapping) or not isinstance(previous.get("spec"), Mapping):
        return False
    if previous["metadata"].get("uid") != document["metadata"].get("uid") or previous.get("kind") != document.get("kind"):
        return False
    if previous.get("output") != document.get("output"):
        return False

    def neutral(spec: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in spec.items():
            path = f"{prefix}{key}"
            if path in RUN_NEUTRAL_FIELDS:
                continue
            holds_neutral = any(field.startswith(f"{path}.") for field in RUN_NEUTRAL_FIELDS)
            out[key] = neutral(value, f"{path}.") if holds_neutral and isinstance(value, Mapping) else value
        return out

    return neutral(previous["spec"]) == neutral(document["spec"])


def retry_delay(config: OperatorConfig, failed_before: int) -> float:
    """Seconds between a failure and the next attempt: base x 2^failures, capped."""
    if config.retry_backoff_seconds <= 0:
        return 0.0
    return min(config.retry_backoff_max_seconds, config.retry_backoff_seconds * 2**failed_before)


def _duration(job: RayJobView, now: datetime) -> float | None:
    start = parse_time(job.start_time) or parse_time(job.created)
    end = parse_time(job.end_time) or now
    if start is None:
        return None
    return max(0.0, (end - start).total_seconds())


def _problems_message(problems: Sequence[Problem]) -> str:
    return "; ".join(str(problem) for problem in problems)


class _Status:
    """The status being decided: a copy of the old one with stamped conditions."""

    def __init__(self, old: Mapping[str, Any], body: Mapping[str, Any], now: datetime):
        meta = body.get("metadata") or {}
        self.old = old
        self.generation = meta.get("generation")
        self.now = now
        self.conditions = Conditions(old.get("conditions"), now=now, generation=self.generation)
        self.fields: dict[str, Any] = {
            key: value
            for key, value in old.items()
            if key not in ("conditions", "observedGeneration", "phase", "reason", "attemptHistory")
        }
        self.phase: str = old.get("phase") or "Pending"
        self.reason: str | None = old.get("reason")
        self.history: dict[int, dict[str, Any]] = {}
        for item in old.get("attemptHistory") or ():
            if isinstance(item, Mapping) and isinstance(item.get("attempt"), int):
                self.history[item["attempt"]] = dict(item)
        # An action failure is cleared by the first decision whose actions all succeed (the
        # status is written only after them).
        if self.conditions.is_true(ACTION_FAILED):
            self.conditions.set(ACTION_FAILED, FALSE, "Recovered", "the last actions succeeded")

    def ended(self, attempt: int) -> Mapping[str, Any] | None:
        return self.history.get(attempt)

    def record(self, attempt: int, name: str, result: str, reason: str, end_time: str) -> bool:
        """Add how `attempt` ended; False when the history already holds it."""
        if attempt in self.history:
            return False
        self.history[attempt] = {"attempt": attempt, "rayJobName": name, "result": result,
                                 "reason": reason[:1024], "endTime": end_time}
        return True

    def failed_count(self) -> int:
        return sum(1 for item in self.history.values() if item.get("result") in FAILED_RESULTS)

    def show(self, phase: str, reason: str) -> None:
        self.phase, self.reason = phase, reason

    def set(self, key: str, value: Any) -> None:
        if value is None:
            self.fields.pop(key, None)
        else:
            self.fields[key] = value

    def stamp(self, key: str) -> None:
        self.fields.setdefault(key, rfc3339(self.now))

    def build(self) -> dict[str, Any]:
        status: dict[str, Any] = {}
        if self.generation is not None:
            status["observedGeneration"] = self.generation
        status["conditions"] = self.conditions.to_list()
        status["phase"] = self.phase
        if self.reason:
            status["reason"] = self.reason
        status.update(self.fields)
        status.setdefault("attempts", 0)
        if self.history:
            status["attemptHistory"] = [self.history[number] for number in sorted(self.history)]
        return status


# ---- the decision -------------------------------------------------------------------------


def decide(obs: Observation, config: OperatorConfig) -> Decision:
    body = obs.body
    meta = body.get("metadata") or {}
    old: Mapping[str, Any] = body.get("status") or {}
    finalizers = list(meta.get("finalizers") or [])

    if meta.get("deletionTimestamp"):
        return _deleting(obs, finalizers)

    st = _Status(old, body, obs.now)
    decision = Decision(status=None)
    resource = obs.resource

    # The finalizer exists only while outputs must be deleted with the resource.
    if resource is not None:
        wanted = resource.spec.output.delete_policy == "Delete"
        if wanted != (naming.FINALIZER in finalizers):
            decision.actions.append(SetFinalizer(wanted))

    if resource is None:
        st.conditions.set(VALID, FALSE, "InvalidSpec", _problems_message(obs.problems))
        st.show("Invalid", "InvalidSpec")
        return _finish(decision, st, old)

    problems = list(obs.problems)
    if obs.output is None:
        problems.append(
            Problem(
                "required: the operator has no default store (TOKENMILL_STORE), so spec.output.uri must be set",
                "spec.output.uri",
                "/".join(resource.key),
            )
        )
    valid = not problems
    if valid:
        st.conditions.set(VALID, TRUE, "SpecValid", "the spec passed semantic validation")
    else:
        st.conditions.set(VALID, FALSE, "InvalidSpec", _problems_message(problems))

    # Terminal states are sticky: a finished resource is never run again (recreate it to rerun).
    conditions = old.get("conditions")
    input_failure = (find(conditions, FAILED) or {}).get("reason") == "InputFailed"
    if is_true(conditions, SUCCEEDED):
        st.show("Succeeded", str((find(conditions, SUCCEEDED) or {}).get("reason") or "Succeeded"))
        return _finish(decision, st, old)
    if is_true(conditions, FAILED) and not (input_failure and int(old.get("attempts") or 0) == 0):
        st.show("Failed", str((find(conditions, FAILED) or {}).get("reason") or "Failed"))
        return _finish(decision, st, old)

    attempts = int(old.get("attempts") or 0)
    jobs = {job.attempt: job for job in obs.rayjobs}
    newest = max(jobs, default=0)
    if newest > attempts:
        # A RayJob exists for an attempt the status does not know: the operator stopped
        # between creating it and writing the status. Adopt it.
        attempts = newest
        st.set("startTime", old.get("startTime") or rfc3339(obs.now))
    st.set("attempts", attempts)
    suspend = resource.spec.suspend
    backoff_limit = resource.spec.backoff_limit

    # Earlier attempts: their end is in the history (a status written before this operator
    # kept one has none: a finished RayJob then failed, since success ends the resource).
    # Their RayJobs are stopped so that no two attempts ever write the same output.
    for number, job in sorted(jobs.items()):
        if number >= attempts:
            continue
        if st.ended(number) is None:
            if job.finished:
                st.record(number, job.name, "Failed", job.failure_reason, job.end_time or rfc3339(obs.now))
            else:
                st.record(number, job.name, "Stopped", "Superseded", rfc3339(obs.now))
        if not job.deleting:
            decision.actions.append(DeleteRayJob(job.name))
    # Earlier attempts the status has no record of (a status restored from a backup, or edited):
    # the store's run record keeps the history too.
    unknown = [number for number in range(1, attempts) if st.ended(number) is None]
    if unknown:
        if not obs.previous_run_read:
            decision.needs.add(NEED_PREVIOUS_RUN)
            return decision
        previous = obs.previous_run or {}
        if (previous.get("metadata") or {}).get("uid") == meta.get("uid"):
            for item in previous.get("attemptHistory") or ():
                if isinstance(item, Mapping) and item.get("attempt") in unknown:
                    st.history[int(item["attempt"])] = dict(item)
    current = jobs.get(attempts) if attempts else None

    if current is not None and current.deleting:
        st.set("rayJobName", current.name)
        if suspend:
            _suspended(st, f"RayJob {current.name} is being deleted; outputs are kept")
        elif st.ended(attempts) is not None:
            _not_running(st, "StoppingAttempt", f"waiting for RayJob {current.name} of attempt {attempts} to be "
                                                "deleted before the next attempt starts")
            st.show("Pending", "StoppingAttempt")
        else:
            _not_running(st, "WaitingForCleanup", f"RayJob {current.name} is being deleted")
            st.show("Pending", "WaitingForCleanup")
        decision.requeue_after = 2.0
        return _finish(decision, st, old)

    if current is not None and current.finished:
        st.set("rayJobName", current.name)
        permanent = False
        if current.complete:
            if obs.output_check is None:
                decision.needs.add(NEED_OUTPUTS)
                return decision
            if obs.output_check.ok:
                return _succeeded(decision, st, old, resource, current, obs)
            failure_reason, failure_message = "OutputMissing", obs.output_check.message
        elif current.exit_code == NOT_BUILT_EXIT_CODE:
            permanent = True
            failure_reason = "WorkloadNotBuilt"
            failure_message = (f"the {resource.kind} workload is not built into the Ray image (exit code "
                               f"{NOT_BUILT_EXIT_CODE}); retrying cannot help")
        else:
            failure_reason = current.failure_reason
            failure_message = current.message or f"RayJob {current.name} failed"
        _attempt_ended(decision, st, resource, attempts, current.name, "Failed", failure_reason, failure_message,
                       current.end_time or rfc3339(obs.now), _duration(current, obs.now))
        if permanent or st.failed_count() > backoff_limit:
            return _failed(decision, st, old, resource, attempts, failure_reason, failure_message)
        # Retries remain. The finished RayJob's Ray cluster lives on (ttlSecondsAfterFinished) and
        # could still write: delete it, and start the next attempt only once it is gone.
        decision.actions.append(DeleteRayJob(current.name))
        if suspend:
            _suspended(st, f"attempt {attempts} failed ({failure_reason}); retrying after spec.suspend is cleared")
            return _finish(decision, st, old)
        _not_running(st, "AttemptFailed", f"attempt {attempts} failed ({failure_reason}): {failure_message}")
        st.show("Pending", "StoppingAttempt")
        decision.requeue_after = 1.0
        return _finish(decision, st, old)

    if current is not None:  # an active attempt
        st.set("rayJobName", current.name)
        if suspend:
            decision.actions.append(DeleteRayJob(current.name))
            st.record(attempts, current.name, "Stopped", "Suspended", rfc3339(obs.now))
            _suspended(st, f"spec.suspend is true: deleted RayJob {current.name}; outputs are kept")
            decision.events.append(Event(NORMAL, "Suspended", f"deleted RayJob {current.name} (attempt {attempts}); outputs are kept"))
            return _finish(decision, st, old)
        if current.running:
            if not obs.progress_read:
                decision.needs.add(NEED_PROGRESS)
                return decision
            st.conditions.set(RUNNING, TRUE, "Running", f"RayJob {current.name} is running (attempt {attempts})")
            st.show("Running", "Running")
            text = progress_text(obs.progress)
            if text:
                st.set("progress", text)
        elif current.queued:
            _not_running(st, "Queued", f"RayJob {current.name} is queued ({current.deployment_status})")
            st.show("Pending", "Queued")
        else:
            state = current.deployment_status or "New"
            _not_running(st, "Initializing", f"RayJob {current.name} is starting ({state})")
            st.show("Pending", "Initializing")
        _keep_open(st)
        return _finish(decision, st, old)

    # No RayJob for the current attempt.
    if attempts == 0:
        if suspend:
            _suspended(st, "spec.suspend is true")
            return _finish(decision, st, old)
        if not valid:
            return _invalid(decision, st, old)
        return _start(decision, st, old, resource, obs, config, 1, "starting")
    ended = st.ended(attempts)
    if ended is None:
        name = str(old.get("rayJobName") or naming.rayjob_name(resource.kind, resource.name, attempts))
        if is_true(conditions, SUSPENDED):
            st.record(attempts, name, "Stopped", "Suspended", rfc3339(obs.now))
        else:
            # The current attempt's RayJob is gone without the operator deleting it (a person, a
            # TTL). Make sure from an authoritative listing, then count it as a failed attempt:
            # recreating it under the same attempt would hide the failure from backoffLimit.
            if not obs.rayjobs_listed:
                decision.needs.add(NEED_RAYJOBS)
                return decision
            message = f"RayJob {name} of attempt {attempts} disappeared before it finished"
            _attempt_ended(decision, st, resource, attempts, name, "Lost", "RayJobLost", message,
                           rfc3339(obs.now), None)
            if st.failed_count() > backoff_limit:
                return _failed(decision, st, old, resource, attempts, "RayJobLost", message)
        ended = st.ended(attempts)
        assert ended is not None
    if suspend:
        _suspended(st, "spec.suspend is true")
        return _finish(decision, st, old)
    if not valid:
        return _invalid(decision, st, old)
    if jobs:  # an earlier attempt's RayJob is still being deleted: never two attempts at once
        _not_running(st, "StoppingAttempt", f"waiting for RayJob {jobs[max(jobs)].name} to be deleted before "
                                            f"attempt {attempts + 1} starts")
        st.show("Pending", "StoppingAttempt")
        decision.requeue_after = 2.0
        return _finish(decision, st, old)
    result, reason = ended.get("result"), str(ended.get("reason") or "")
    if result in FAILED_RESULTS:
        delay = retry_delay(config, st.failed_count() - 1)
        end = parse_time(ended.get("endTime"))
        if end is not None and delay > 0:
            remaining = (end + timedelta(seconds=delay) - obs.now).total_seconds()
            if remaining > 0:
                _not_running(st, "AttemptFailed", f"attempt {attempts} failed ({reason}); the next attempt starts "
                                                  f"after the back-off delay")
                st.show("Pending", "BackoffDelay")
                decision.requeue_after = remaining
                return _finish(decision, st, old)
        why = f"retrying after attempt {attempts} failed ({reason})"
    else:
        why = "resuming after suspension" if reason == "Suspended" else f"continuing after attempt {attempts}"
    return _start(decision, st, old, resource, obs, config, attempts + 1, why)


def _deleting(obs: Observation, finalizers: list[str]) -> Decision:
    decision = Decision(status=None)
    if naming.FINALIZER not in finalizers:
        return decision
    policy = obs.resource.spec.output.delete_policy if obs.resource is not None else "Delete"
    target = recorded_output(obs.body)
    if policy == "Delete" and target is not None:
        alive = [job for job in obs.rayjobs if not job.deleting]
        for job in alive:
            decision.actions.append(DeleteRayJob(job.name))
        if obs.rayjobs:
            decision.requeue_after = 2.0  # delete outputs only once no workload can write to them
            return decision
        if obs.readers:
            # Another resource still reads this output: keep it (and the finalizer) until it is done.
            old: Mapping[str, Any] = obs.body.get("status") or {}
            st = _Status(old, obs.body, obs.now)
            readers = ", ".join(obs.readers)
            st.conditions.set(ACTION_FAILED, TRUE, "OutputInUse",
                              f"not deleting {target} (deletePolicy Delete): {readers} still read(s) it")
            decision.status = st.build()
            before = find(old.get("conditions"), ACTION_FAILED) or {}
            if before.get("reason") != "OutputInUse" or before.get("status") != TRUE:
                decision.events.append(Event(WARNING, "OutputInUse",
                                             f"not deleting {target} yet: {readers} still read(s) it"))
            decision.requeue_after = 10.0
            return decision
        decision.actions.append(DeleteOutputs(target))
        decision.events.append(Event(NORMAL, "OutputsDeleted", f"deleted {target} (deletePolicy Delete)"))
    decision.actions.append(SetFinalizer(False))
    return decision


def recorded_output(body: Mapping[str, Any]) -> str | None:
    """The output a resource's attempts wrote to, as its status recorded it at the first attempt.

    Deletion removes only this: never a prefix computed again from settings that may have
    changed since (the operator's default store). None when no attempt ever started."""
    status = body.get("status") or {}
    uri = status.get("outputUri") or (status.get("outputs") or {}).get("uri")
    return str(uri) if uri else None


def _finish(decision: Decision, st: _Status, old: Mapping[str, Any]) -> Decision:
    decision.status = st.build()
    before = (old.get("phase"), old.get("reason"))
    after = (decision.status.get("phase"), decision.status.get("reason"))
    if before != after and not decision.events:  # an action's own event already tells this step
        warning = after[0] in ("Failed", "Invalid")
        message = _transition_message(decision.status)
        decision.events.append(Event(WARNING if warning else NORMAL, str(after[1] or after[0]), message))
    return decision


def _transition_message(status: Mapping[str, Any]) -> str:
    phase = status.get("phase")
    deciding = {
        "Invalid": VALID, "Waiting": INPUTS_READY, "Running": RUNNING, "Pending": RUNNING,
        "Succeeded": SUCCEEDED, "Failed": FAILED, "Suspended": SUSPENDED,
    }.get(str(phase))
    condition = find(status.get("conditions"), deciding) if deciding else None
    message = (condition or {}).get("message") or ""
    return f"{phase}: {message}" if message else str(phase)


def _not_running(st: _Status, reason: str, message: str) -> None:
    st.conditions.set(RUNNING, FALSE, reason, message)


def _keep_open(st: _Status) -> None:
    if st.conditions.get(SUCCEEDED) is None or not st.conditions.is_true(SUCCEEDED):
        st.conditions.set(SUCCEEDED, FALSE, "NotCompleted", "no attempt has committed its outputs yet")
    if st.conditions.get(FAILED) is None or not st.conditions.is_true(FAILED):
        st.conditions.set(FAILED, FALSE, "NotFailed", "")
    if st.conditions.get(SUSPENDED) is not None:
        st.conditions.set(SUSPENDED, FALSE, "Resumed", "spec.suspend is false")


def _suspended(st: _Status, message: str) -> None:
    st.conditions.set(SUSPENDED, TRUE, "Suspended", message)
    _not_running(st, "Suspended", message)
    st.show("Suspended", "Suspended")


def _invalid(decision: Decision, st: _Status, old: Mapping[str, Any]) -> Decision:
    _not_running(st, "InvalidSpec", "no attempt starts until the spec is valid")
    st.show("Invalid", "InvalidSpec")
    return _finish(decision, st, old)


def _attempt_ended(decision: Decision, st: _Status, resource: AnyResource, attempt: int, name: str, result: str,
                   reason: str, message: str, end_time: str, duration: float | None) -> None:
    """Record how an attempt ended; its event and metric come once, when the history first holds it."""
    if not st.record(attempt, name, result, reason, end_time):
        return
    verb = "was lost" if result == "Lost" else "failed"
    decision.events.append(Event(WARNING, "AttemptLost" if result == "Lost" else "AttemptFailed",
                                 f"attempt {attempt} {verb} ({reason}): {message}"))
    decision.finished.append(AttemptResult(resource.kind, "failed", duration))


def _succeeded(decision: Decision, st: _Status, old: Mapping[str, Any], resource: AnyResource,
               job: RayJobView, obs: Observation) -> Decision:
    check = obs.output_check
    assert check is not None and check.outputs is not None
    outputs = check.outputs.to_wire()
    st.set("outputs", outputs)
    st.set("progress", "100%")
    st.stamp("completionTime")
    st.record(job.attempt, job.name, "Succeeded", "Succeeded", job.end_time or rfc3339(obs.now))
    st.conditions.set(RUNNING, FALSE, "Completed", f"RayJob {job.name} completed")
    st.conditions.set(SUCCEEDED, TRUE, "Succeeded", check.message or f"attempt {job.attempt} committed its outputs")
    st.conditions.set(FAILED, FALSE, "NotFailed", "")
    if st.conditions.get(SUSPENDED) is not None:
        st.conditions.set(SUSPENDED, FALSE, "Completed", "")
    st.show("Succeeded", "Succeeded")
    decision.finished.append(AttemptResult(resource.kind, "succeeded", _duration(job, obs.now)))
    return _finish(decision, st, old)


def _failed(decision: Decision, st: _Status, old: Mapping[str, Any], resource: AnyResource, attempt: int,
            reason: str, message: str) -> Decision:
    limit = resource.spec.backoff_limit
    failed = st.failed_count()
    st.stamp("completionTime")
    st.conditions.set(RUNNING, FALSE, "AttemptFailed", f"attempt {attempt} failed ({reason})")
    tail = ("not retried" if reason == "WorkloadNotBuilt"
            else f"{failed} failed attempt(s), backoffLimit {limit}")
    st.conditions.set(FAILED, TRUE, reason, f"attempt {attempt} failed: {message}; {tail}")
    st.conditions.set(SUCCEEDED, FALSE, "Failed", "")
    st.show("Failed", reason)
    return _finish(decision, st, old)


def _inputs(st: _Status, resource: AnyResource, obs: Observation, attempts: int) -> tuple[bool, dict]:
    """Whether every input is ready; sets InputsReady (and Failed for a failed input)."""
    summaries = {}
    for kind, name in refs_of(resource):
        state = obs.inputs.get((kind, name)) or InputState.missing(kind, name)
        if not state.exists:
            st.conditions.set(INPUTS_READY, FALSE, "WaitingForInput", f"waiting for {state.label}, which does not exist yet")
            st.show("Waiting", "WaitingForInput")
            return False, summaries
        if state.failed and attempts == 0:
            message = f"input {state.label} failed ({state.reason or 'Failed'})"
            st.conditions.set(INPUTS_READY, FALSE, "InputFailed", message)
            st.conditions.set(FAILED, TRUE, "InputFailed", message)
            st.conditions.set(SUCCEEDED, FALSE, "InputFailed", "")
            _not_running(st, "InputFailed", message)
            st.stamp("completionTime")
            st.show("Failed", "InputFailed")
            return False, summaries
        if not state.succeeded:
            st.conditions.set(
                INPUTS_READY, FALSE, "WaitingForInput",
                f"waiting for {state.label} (phase {state.phase or 'Pending'})",
            )
            st.show("Waiting", "WaitingForInput")
            return False, summaries
        if state.outputs is not None:
            summaries[(kind, name)] = state.outputs
    return True, summaries


def _start(decision: Decision, st: _Status, old: Mapping[str, Any], resource: AnyResource, obs: Observation,
           config: OperatorConfig, attempt: int, why: str) -> Decision:
    ready, summaries = _inputs(st, resource, obs, attempt - 1)
    if ready:
        if obs.uri_checks is None and input_uris(resource):
            decision.needs.add(NEED_URI_CHECKS)
            return decision
        missing = [check for check in obs.uri_checks or () if not check.ok]
        if missing:
            first = missing[0]
            st.conditions.set(
                INPUTS_READY, FALSE, "WaitingForInput",
                f"waiting for {first.path}: {first.message or first.uri + ' holds no committed data'}",
            )
            st.show("Waiting", "WaitingForInput")
            ready = False
    if ready:
        try:
            resolved = resolve_spec(resource, summaries)
        except UnresolvedInput as error:
            st.conditions.set(INPUTS_READY, FALSE, "InputIncomplete", str(error))
            st.show("Waiting", "InputIncomplete")
            ready = False
    if not ready:
        if not st.conditions.is_true(FAILED):
            _not_running(st, "WaitingForInput", "no attempt starts until every input is ready")
            _keep_open(st)
        decision.requeue_after = None
        return _finish(decision, st, old)

    assert obs.output is not None
    namespace = (obs.body.get("metadata") or {}).get("namespace") or "default"
    if attempt > 1 and not obs.previous_run_read:
        decision.needs.add(NEED_PREVIOUS_RUN)
        return decision
    document = run_spec(resource, output=obs.output, attempt=attempt, resolved=resolved)
    # The store's run record keeps the attempt history too, beside the status.
    document["attemptHistory"] = [st.history[number] for number in sorted(st.history)]
    if same_run(obs.previous_run, document):
        document["metadata"]["generation"] = obs.previous_run["metadata"]["generation"]  # type: ignore[index]
    spec_uri = run_spec_uri(obs.output)
    manifest = rayjob.render(resource, namespace=namespace, attempt=attempt, spec_uri=spec_uri, config=config)
    name = manifest["metadata"]["name"]
    decision.actions.append(WriteRunSpec(obs.output, document))
    decision.actions.append(CreateRayJob(manifest, attempt))
    decision.events.append(Event(NORMAL, "AttemptStarted", f"{why}: created RayJob {name} (attempt {attempt})"))

    st.set("attempts", attempt)
    st.set("rayJobName", name)
    st.fields.setdefault("outputUri", obs.output)
    st.stamp("startTime")
    st.set("completionTime", None)
    st.conditions.set(INPUTS_READY, TRUE, "InputsReady", "every input is committed")
    _not_running(st, "Initializing", f"RayJob {name} created (attempt {attempt})")
    _keep_open(st)
    st.show("Pending", "Initializing")
    return _finish(decision, st, old)


def expected_dataset(kind: str, output: str) -> str | None:
    """The dataset a kind commits under its output, or None (TrainingStage commits checkpoints)."""
    return dataset_uri(output) if KINDS[kind].output == "dataset" else None
