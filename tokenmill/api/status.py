"""The status subresource shared by the four kinds (Kubernetes API conventions)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from tokenmill.api.base import ApiModel
from tokenmill.api.fields import ConditionTypeName, ShortText, StoreUri, Timestamp

# The condition types the operator writes; the schema accepts any well-formed type, so a newer
# operator can add one without a CRD change.
ConditionType = Literal["Valid", "InputsReady", "Running", "Succeeded", "Failed", "Suspended", "ActionFailed"]
Phase = Literal["Pending", "Invalid", "Waiting", "Running", "Suspended", "Succeeded", "Failed"]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]


class Condition(ApiModel):
    """An observation of one aspect of the resource's state."""

    type: ConditionTypeName
    """Valid, InputsReady, Running, Succeeded, Failed, Suspended or ActionFailed (the operator's last
    action, such as creating the RayJob or writing the run spec, failed)."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    """A CamelCase, machine-readable reason for the last transition."""
    message: str = Field(default="", max_length=32768)
    """A human-readable explanation."""
    last_transition_time: Timestamp
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = Field(default=None, ge=0)
    """metadata.generation the condition was computed from."""


OUTPUT_STATS_MAX = 32
"""The most counts `OutputSummary.stats` holds."""
OUTPUT_STAT_NAME = r"^[a-z][A-Za-z0-9]{0,62}$"
"""A count's name in `OutputSummary.stats`: camelCase, as the workloads' statistics name them."""
OutputStatName = Annotated[str, StringConstraints(pattern=OUTPUT_STAT_NAME, max_length=63)]
OutputStatCount = Annotated[int, Field(ge=0, le=2**63 - 1)]


class OutputSummary(ApiModel):
    """What the resource has committed to the object store."""

    uri: StoreUri
    """The output prefix."""
    dataset: StoreUri | None = None
    """The committed dataset prefix, when the resource produces one."""
    shards: int | None = Field(default=None, ge=0)
    """Committed shards."""
    rows: int | None = Field(default=None, ge=0)
    """Committed rows."""
    bytes: int | None = Field(default=None, ge=0)
    """Committed bytes."""
    tokens: int | None = Field(default=None, ge=0)
    """Committed tokens, where counted."""
    stats: dict[OutputStatName, OutputStatCount] | None = Field(default=None, max_length=OUTPUT_STATS_MAX)
    """The workload's headline counts from the dataset manifest's statistics (its top-level
    non-negative integers: a CorpusFilter's kept, bytesIn, bytesOut; a SyntheticDataJob's seeds,
    written, tokensGenerated, requestsSent; a PTSJob's problems, rollouts, pivotalTokens...)."""
    checkpoint: StoreUri | None = None
    """The final committed checkpoint (TrainingStage)."""
    hf_export: StoreUri | None = None
    """The Hugging Face export of the final checkpoint (TrainingStage)."""


class AttemptRecord(ApiModel):
    """How one attempt ended; kept after its RayJob is gone."""

    attempt: int = Field(ge=1)
    """The attempt number."""
    ray_job_name: ShortText | None = None
    """The attempt's RayJob."""
    result: Literal["Succeeded", "Failed", "Stopped", "Lost"]
    """Failed and Lost (the RayJob vanished) count against backoffLimit; Stopped (suspension) does not."""
    reason: str = Field(default="", max_length=1024)
    """The reason, as in the Failed condition."""
    end_time: Timestamp | None = None
    """When the attempt ended (RFC 3339)."""


class ResourceStatus(ApiModel):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation last reconciled."""
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Current conditions, one per type."""
    phase: Phase | None = None
    """Summary of the conditions for display; do not build logic on it."""
    reason: ShortText | None = None
    """Reason of the condition that decides the phase, for display."""
    progress: ShortText | None = None
    """Workload progress for display, such as 42% or step 120/400."""
    attempts: int = Field(default=0, ge=0)
    """RayJobs created so far."""
    ray_job_name: ShortText | None = None
    """The current attempt's RayJob."""
    start_time: Timestamp | None = None
    """When the first attempt started (RFC 3339)."""
    completion_time: Timestamp | None = None
    """When the resource succeeded or finally failed (RFC 3339)."""
    outputs: OutputSummary | None = None
    """The committed outputs."""
    output_uri: StoreUri | None = None
    """The output prefix resolved at the first attempt; deletePolicy Delete removes only this."""
    attempt_history: list[AttemptRecord] = Field(default_factory=list, max_length=1000)
    """Every ended attempt, oldest first; counts failures even after their RayJobs are deleted."""
