"""Test-only KubeRay stand-in: runs RayJobs created in the emulator and reports like KubeRay.

For every RayJob it sees, it writes `status` through the emulator's API code path as
KubeRay's RayJob controller does: `jobDeploymentStatus` Initializing (with jobId,
rayClusterName, startTime), then Running, then Complete (jobStatus SUCCEEDED) or Failed
with a `reason`: AppFailed (non-zero exit), DeadlineExceeded (activeDeadlineSeconds),
PreRunningDeadlineExceeded (never reached Running within preRunningDeadlineSeconds). A
RayJob deleted while running has its job killed, as KubeRay stops the Ray job.

The entrypoint is `python -m tokenmill.trainer <cmd> --spec <uri>`; the stand-in checks
that shape and runs it as a subprocess with its `python -m tokenmill.trainer` prefix
replaced by `command` (the test-only fake workload by default), with the head container's
environment: its `env`, with `valueFrom.secretKeyRef` entries filled from the Secrets as the
kubelet does (a missing key that is not optional fails the attempt), and the keys of the
Secrets in its `envFrom`. In `instant` mode it
runs nothing: it calls `complete(rayjob)` in a thread and reports Complete at once
(for the benchmark).
"""

from __future__ import annotations

import asyncio
import contextlib
import base64
import copy
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.operator.emulator import Emulator, ResourceSpec, now_rfc3339

FAKE_WORKLOAD = Path(__file__).with_name("fake_workload.py")
ENTRYPOINT_PREFIX = ["python", "-m", "tokenmill.trainer"]
SCRUBBED_PREFIXES = ("AWS_", "TOKENMILL_S3_")


class MissingSecretKey(Exception):
    """A container env entry names a Secret key that does not exist (the pod cannot start)."""


@dataclass
class Behaviour:
    env: dict[str, str] = field(default_factory=dict)
    stuck_initializing: bool = False


@dataclass
class Run:
    name: str
    attempt: int
    outcome: str = "running"
    returncode: int | None = None
    seen_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None


class KubeRayStandIn:
    def __init__(
        self,
        emulator: Emulator,
        rayjobs: ResourceSpec,
        secrets: ResourceSpec,
        *,
        command: list[str] | None = None,
        policy: Callable[[dict[str, Any]], Behaviour] | None = None,
        deadline_scale: float = 1.0,
        instant: bool = False,
        complete: Callable[[dict[str, Any]], None] | None = None,
        poll_seconds: float = 0.05,
        log_dir: Path | None = None,
    ):
        self.emulator = emulator
        self.rayjobs = rayjobs
        self.secrets = secrets
        self.command = command or [sys.executable, str(FAKE_WORKLOAD)]
        self.policy = policy or (lambda rayjob: Behaviour())
        self.deadline_scale = deadline_scale
        self.instant = instant
        self.complete = complete
        self.poll_seconds = poll_seconds
        self.log_dir = log_dir
        self.runs: dict[str, Run] = {}
        self.seen: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KubeRayStandIn:
        self._loop_task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*(t for t in [self._loop_task, *self._tasks.values()] if t), return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            for stored in self.emulator.peek(self.rayjobs):
                uid = stored["metadata"]["uid"]
                if uid in self.seen or stored["metadata"].get("deletionTimestamp"):
                    continue
                self.seen.add(uid)
                body = copy.deepcopy(stored)
                name = body["metadata"]["name"]
                attempt = int(body["metadata"].get("labels", {}).get("tokenmill.dev/attempt", "0"))
                self.runs[name] = Run(name, attempt)
                self._tasks[uid] = asyncio.create_task(self._run(body))
                self._tasks[uid].add_done_callback(lambda _, run=self.runs[name]: setattr(run, "ended_at", time.monotonic()))
            await asyncio.sleep(self.poll_seconds)

    def _current(self, body: dict[str, Any]) -> dict[str, Any] | None:
        meta = body["metadata"]
        key = (self.rayjobs.key, meta["namespace"], meta["name"])
        stored = self.emulator.objects[key] if key in self.emulator.objects else None
        current = None if stored is None or stored.deleted else stored.raw
        if current is None or current["metadata"]["uid"] != meta["uid"] or current["metadata"].get("deletionTimestamp"):
            return None
        return current

    async def _status(self, body: dict[str, Any], status: dict[str, Any]) -> bool:
        if self._current(body) is None:
            return False
        meta = body["metadata"]
        await self.emulator.patch(self.rayjobs, meta["namespace"], meta["name"], {"status": status},
                                  subresource="status")
        return True

    async def _run(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        run = self.runs[name]
        spec = body.get("spec") or {}
        behaviour = self.policy(body)
        started = time.monotonic()
        cluster = f"{name}-raycluster-{uuid.uuid4().hex[:5]}"
        if not await self._status(body, {"jobDeploymentStatus": "Initializing", "jobId": f"{name}-{uuid.uuid4().hex[:6]}",
                                         "rayClusterName": cluster, "startTime": now_rfc3339()}):
            run.outcome = "deleted"
            return
        pre_running = spec.get("preRunningDeadlineSeconds")
        if behaviour.stuck_initializing:
            limit = (pre_running or 0) * self.deadline_scale
            while time.monotonic() - started < limit:
                if self._current(body) is None:
                    run.outcome = "deleted"
                    return
                await asyncio.sleep(self.poll_seconds)
            run.outcome = "PreRunningDeadlineExceeded"
            await self._status(body, {"jobDeploymentStatus": "Failed", "reason": "PreRunningDeadlineExceeded",
                                      "message": f"the RayJob did not reach Running within {pre_running} seconds",
                                      "endTime": now_rfc3339()})
            return
        if not await self._status(body, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}):
            run.outcome = "deleted"
            return
        if self.instant:
            if self.complete is not None:
                await asyncio.to_thread(self.complete, body)
            run.outcome = "Complete"
            await self._status(body, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
                                      "endTime": now_rfc3339()})
            return
        await self._execute(body, run, behaviour, started)

    async def _execute(self, body: dict[str, Any], run: Run, behaviour: Behaviour, started: float) -> None:
        spec = body["spec"]
        tokens = shlex.split(spec["entrypoint"])
        if tokens[:3] != ENTRYPOINT_PREFIX or len(tokens) != 6 or tokens[4] != "--spec":
            run.outcome = "ValidationFailed"
            await self._status(body, {"jobDeploymentStatus": "Failed", "reason": "ValidationFailed",
                                      "message": f"unexpected entrypoint {spec['entrypoint']!r}",
                                      "endTime": now_rfc3339()})
            return
        command = [*self.command, *tokens[3:]]
        try:
            env = self._environment(body)
        except MissingSecretKey as error:
            run.outcome = "SubmissionFailed"
            await self._status(body, {"jobDeploymentStatus": "Failed", "reason": "SubmissionFailed",
                                      "message": str(error), "endTime": now_rfc3339()})
            return
        env.update(behaviour.env)
        log = open(self.log_dir / f"{run.name}.log", "wb") if self.log_dir else asyncio.subprocess.DEVNULL
        process = await asyncio.create_subprocess_exec(*command, env=env, stdout=log, stderr=log, cwd=str(FAKE_WORKLOAD.parents[2]))
        deadline = spec.get("activeDeadlineSeconds")
        try:
            while process.returncode is None:
                if self._current(body) is None:
                    process.kill()
                    await process.wait()
                    run.outcome = "deleted"
                    return
                if deadline is not None and time.monotonic() - started > deadline * self.deadline_scale:
                    process.kill()
                    await process.wait()
                    run.outcome = "DeadlineExceeded"
                    await self._status(body, {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded",
                                              "message": f"the RayJob ran longer than {deadline} seconds",
                                              "endTime": now_rfc3339()})
                    return
                with contextlib.suppress(TimeoutError):  # still running: check the deadline again
                    await asyncio.wait_for(process.wait(), self.poll_seconds)
        finally:
            if process.returncode is None:
                process.kill()
            if hasattr(log, "close"):
                log.close()
        run.returncode = process.returncode
        if process.returncode == 0:
            run.outcome = "Complete"
            await self._status(body, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
                                      "endTime": now_rfc3339()})
        else:
            run.outcome = "AppFailed"
            await self._status(body, {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
                                      "message": f"Job entrypoint command failed with exit code {process.returncode}, "
                                                 f"last available logs (truncated to 20,000 chars):\n"
                                                 f"{self._log_tail(run)}",
                                      "endTime": now_rfc3339()})

    def _log_tail(self, run: Run) -> str:
        """The end of the driver's output, as KubeRay copies it into the RayJob's message."""
        if self.log_dir is None:
            return ""
        return (self.log_dir / f"{run.name}.log").read_bytes()[-20000:].decode(errors="replace")

    def _environment(self, body: dict[str, Any]) -> dict[str, str]:
        """The head container's environment; the test process's own store credentials are removed
        so that the workload only has what the RayJob gives it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_PREFIXES)}
        head = body["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        namespace = body["metadata"]["namespace"]
        for source in head.get("envFrom") or ():
            secret_name = (source.get("secretRef") or {}).get("name")
            secret = self.emulator.get(self.secrets, namespace, secret_name) if secret_name else None
            for key, value in ((secret or {}).get("data") or {}).items():
                env[key] = base64.b64decode(value).decode()
        for item in head.get("env") or ():
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "valueFrom" in item:  # as the kubelet does: a missing key fails the pod unless optional
                ref = item["valueFrom"]["secretKeyRef"]
                secret = self.emulator.get(self.secrets, namespace, ref["name"])
                data = (secret or {}).get("data") or {}
                if ref["key"] in data:
                    env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
                elif not ref.get("optional"):
                    raise MissingSecretKey(f"secret {ref['name']!r} has no key {ref['key']!r}")
        return env
