"""Read-only views of what the operator observes: RayJobs, inputs, progress, committed outputs.

KubeRay reports a RayJob's lifecycle in `status.jobDeploymentStatus` (Initializing, Running,
Complete, Failed, Suspending, Suspended, Retrying, Waiting) with `status.reason`
(AppFailed, DeadlineExceeded, PreRunningDeadlineExceeded, SubmissionFailed, ValidationFailed,
...) and `status.message`. `jobStatus` (the Ray job's own state) alone is not enough: a job
whose cluster never came up, or that hit a deadline, has no terminal jobStatus, so the
operator decides from the deployment status; but Complete alone is not success either: a
Ray job that was STOPPED also ends Complete, so success needs jobStatus SUCCEEDED too.

KubeRay copies the tail of the driver's log into `status.message`; the view redacts
credential-like values and caps its length before anything reaches a status, an event or
a log line.
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
JOB_SUCCEEDED = "SUCCEEDED"
QUEUED_STATES = frozenset({"Suspended", "Suspending"})
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
_EXIT_CODE = re.compile(r"exit(?:ed)? (?:with )?code (-?\d+)")
MAX_MESSAGE = 2048
REDACTED = "<redacted>"

# Values that look like credentials, as they appear in logs: key=value pairs with a secret-like
# name, bearer tokens, URL userinfo, AWS access key ids and provider API keys.
_SECRET_PATTERNS = (
    re.compile(r"(?i)\b([\w.-]*(?:secret|token|passw(?:or)?d|passwd|api[_-]?key|apikey|credentials?|"
               r"private[_-]?key|access[_-]?key(?:[_-]?id)?|authorization)[\"']?\s*[=:]\s*[\"']?)([^\s\"',;]+)"),
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?i)([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_-]{16,}\b"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}\b"),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),
)


def redact(text: str, *, limit: int = MAX_MESSAGE) -> str:
    """`text` with credential-like values replaced and cut to its last `limit` characters
    (a driver log's tail holds the error)."""
    out = text
    out = _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)} {REDACTED}", out)
    out = _SECRET_PATTERNS[0].sub(lambda m: m.group(1) + REDACTED, out)
    out = _SECRET_PATTERNS[2].sub(lambda m: f"{m.group(1)}{REDACTED}@", out)
    for pattern in _SECRET_PATTERNS[3:]:
        out = pattern.sub(REDACTED, out)
    if len(out) > limit:
        out = "…" + out[-(limit - 1):]
    return out


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
    job_status: str = ""
    """The Ray job's own state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""

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
            message=redact(str(status.get("message") or "")),
            deleting=bool(meta.get("deletionTimestamp")),
            start_time=status.get("startTime"),
            end_time=status.get("endTime"),
            created=meta.get("creationTimestamp"),
            job_status=str(status.get("jobStatus") or ""),
        )

    @property
    def complete(self) -> bool:
        """Whether the Ray job succeeded: deployment Complete *and* jobStatus SUCCEEDED."""
        return self.deployment_status == COMPLETE and self.job_status == JOB_SUCCEEDED

    @property
    def failed(self) -> bool:
        """Failed, or Complete with a Ray job that did not succeed (STOPPED, FAILED)."""
        return self.deployment_status == FAILED or (self.deployment_status == COMPLETE and not self.complete)

    @property
    def finished(self) -> bool:
        return self.deployment_status in (COMPLETE, FAILED)

    @property
    def exit_code(self) -> int | None:
        """The entrypoint's exit status when KubeRay's message reports one."""
        match = _EXIT_CODE.search(self.message)
        return int(match.group(1)) if match else None

    @property
    def running(self) -> bool:
        return self.deployment_status == RUNNING

    @property
    def queued(self) -> bool:
        return self.deployment_status in QUEUED_STATES

    @property
    def failure_reason(self) -> str:
        """KubeRay's reason as a condition reason (CamelCase), or a generic one."""
        if self.deployment_status == COMPLETE and not self.complete:
            state = self.job_status.title() if self.job_status.isalpha() else "Unknown"
            return f"Job{state}"  # JobStopped, JobFailed, JobUnknown
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
