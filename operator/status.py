"""Read-only views of what the operator observes: RayJobs, inputs, progress, committed outputs.

KubeRay reports a RayJob's lifecycle in `status.jobDeploymentStatus` (Initializing, Running,
Complete, Failed, Suspending, Suspended, Retrying, Waiting) with `status.reason`
(AppFailed, DeadlineExceeded, PreRunningDeadlineExceeded, SubmissionFailed, ValidationFailed,
...) and `status.message`. `jobStatus` (the Ray job's own state) alone is not enough: a job
whose cluster never came up, or that hit a deadline, has no terminal jobStatus, so the
operator decides from the deployment status.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenmill.api.status import OutputSummary
from tokenmill.operator import conditions, naming

COMPLETE = "Complete"
FAILED = "Failed"
RUNNING = "Running"
QUEUED_STATES = frozenset({"Suspended", "Suspending"})
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class RayJobView:
    """The parts of a RayJob the reconciler decides on."""

    name: str
    attempt: int
    owner_uid: str | None
    deployment_status: str
    reason: str
    message: str
    deleting: bool
    start_time: str | None
    end_time: str | None
    created: str | None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> RayJobView | None:
        """None for a RayJob without a valid attempt label (not one of ours)."""
        meta = body.get("metadata") or {}
        labels = meta.get("labels") or {}
        try:
            attempt = int(labels.get(naming.LABEL_ATTEMPT, ""))
        except ValueError:
            return None
        if attempt < 1:
            return None
        owners = [ref for ref in meta.get("ownerReferences") or () if ref.get("controller")]
        status = body.get("status") or {}
        return cls(
            name=str(meta.get("name", "")),
            attempt=attempt,
            owner_uid=owners[0].get("uid") if owners else None,
            deployment_status=str(status.get("jobDeploymentStatus") or ""),
            reason=str(status.get("reason") or ""),
            message=str(status.get("message") or ""),
            deleting=bool(meta.get("deletionTimestamp")),
            start_time=status.get("startTime"),
            end_time=status.get("endTime"),
            created=meta.get("creationTimestamp"),
        )

    @property
    def complete(self) -> bool:
        return self.deployment_status == COMPLETE

    @property
    def failed(self) -> bool:
        return self.deployment_status == FAILED

    @property
    def finished(self) -> bool:
        return self.complete or self.failed

    @property
    def running(self) -> bool:
        return self.deployment_status == RUNNING

    @property
    def queued(self) -> bool:
        return self.deployment_status in QUEUED_STATES

    @property
    def failure_reason(self) -> str:
        """KubeRay's reason as a condition reason (CamelCase), or a generic one."""
        return self.reason if self.reason and _REASON.match(self.reason) else "RayJobFailed"


@dataclass(frozen=True)
class InputState:
    """A referenced resource as this resource sees it."""

    kind: str
    name: str
    exists: bool
    phase: str | None = None
    succeeded: bool = False
    failed: bool = False
    reason: str = ""
    outputs: OutputSummary | None = None

    @classmethod
    def missing(cls, kind: str, name: str) -> InputState:
        return cls(kind, name, exists=False)

    @classmethod
    def from_body(cls, kind: str, name: str, body: Mapping[str, Any]) -> InputState:
        status = body.get("status") or {}
        found = status.get("conditions") or []
        outputs = None
        if isinstance(status.get("outputs"), Mapping):
            try:
                outputs = OutputSummary.model_validate(status["outputs"])
            except ValueError:
                outputs = None
        failed = conditions.is_true(found, conditions.FAILED)
        reason = ""
        if failed:
            reason = str((conditions.find(found, conditions.FAILED) or {}).get("reason", ""))
        return cls(
            kind=kind,
            name=name,
            exists=True,
            phase=status.get("phase"),
            succeeded=conditions.is_true(found, conditions.SUCCEEDED),
            failed=failed,
            reason=reason,
            outputs=outputs,
        )

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class UriCheck:
    """Whether an input given by URI holds committed data."""

    path: str
    uri: str
    ok: bool
    message: str = ""


@dataclass(frozen=True)
class OutputCheck:
    """What an attempt that KubeRay reports Complete has committed."""

    ok: bool
    outputs: OutputSummary | None = None
    message: str = ""


def progress_text(progress: Any) -> str | None:
    """A short display of a workload's progress record (tokenmill.store.Progress)."""
    if progress is None:
        return None
    fraction = getattr(progress, "fraction", None)
    done = getattr(progress, "done", 0) or 0
    total = getattr(progress, "total", None)
    unit = getattr(progress, "unit", "") or ""
    phase = getattr(progress, "phase", "") or ""
    parts = []
    if phase:
        parts.append(phase)
    if fraction is not None:
        parts.append(f"{fraction:.0%} ({_number(done)}/{_number(total)}{' ' + unit if unit else ''})")
    elif done:
        parts.append(f"{_number(done)}{' ' + unit if unit else ''}")
    text = " ".join(parts) or (getattr(progress, "message", "") or "")
    return text[:256] or None


def _number(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.2f}"
