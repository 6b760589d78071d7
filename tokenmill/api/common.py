"""Types every kind shares: references, inputs, output, Ray placement, sampling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tokenmill.api.base import ApiModel
from tokenmill.api.placement import PodExtras
from tokenmill.api.fields import (
    ImageName,
    LabelKey,
    LabelValue,
    Quantity,
    QueueName,
    ResourceName,
    SecretName,
    ShortText,
    StoreUri,
)

# The registered kinds (tokenmill.api.resources.KINDS); a test keeps the two in step.
KindName = Literal["CorpusFilter", "SyntheticDataJob", "TrainingStage", "PTSJob"]

# Spec fields (wire paths below spec) a user may change after the first attempt started: they
# change how the resource is run, retried, queued and cleaned up, never what it produces or where.
MUTABLE_AFTER_START = frozenset({
    "suspend", "backoffLimit", "ray.queueName", "ray.activeDeadlineSeconds", "ray.preRunningDeadlineSeconds",
    "ray.ttlSecondsAfterFinished", "output.deletePolicy",
})

EXACTLY_ONE_OF_REF_URI = {
    "rule": "has(self.ref) != has(self.uri)",
    "message": "set exactly one of ref (another tokenmill resource) or uri (a committed dataset)",
}


class ObjectRef(ApiModel):
    """A tokenmill resource in the same namespace whose committed output this resource reads."""

    kind: KindName
    """Kind of the referenced resource."""
    name: ResourceName
    """Name of the referenced resource (metadata.name), in the same namespace."""


class DataSource(ApiModel):
    """A dataset: another resource's output (ref) or a committed dataset at a URI."""

    cel_rules = (EXACTLY_ONE_OF_REF_URI,)

    ref: ObjectRef | None = None
    """The resource whose output dataset to read; it must reach phase Succeeded first."""
    uri: StoreUri | None = None
    """A dataset prefix holding a committed _manifest.json (s3://bucket/prefix or file:///path)."""


class NamedDataSource(DataSource):
    """A dataset with a short name used in statistics and reports."""

    name: ShortText
    """Name used in statistics, metrics and reports (for example a benchmark's name)."""


class ModelSource(ApiModel):
    """A model checkpoint: a TrainingStage's final checkpoint (ref) or a checkpoint or HF export at a URI."""

    cel_rules = (
        {
            "rule": "has(self.ref) != has(self.uri)",
            "message": "set exactly one of ref (a TrainingStage) or uri (a checkpoint or Hugging Face export)",
        },
    )

    ref: ObjectRef | None = None
    """The TrainingStage whose final checkpoint to use; it must reach phase Succeeded first."""
    uri: StoreUri | None = None
    """A checkpoint prefix with a commit marker, or a Hugging Face export directory."""


class SecretRef(ApiModel):
    """A Secret in the resource's namespace; its keys become environment variables of the workload."""

    name: SecretName
    """Name of the Secret. Its keys (for example AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) are
    exposed to the workload as environment variables; values never appear in specs or status."""


class SecretKeyRef(ApiModel):
    """One key of a Secret in the resource's namespace."""

    name: SecretName
    """Name of the Secret."""
    key: ShortText
    """Key within the Secret."""


class OutputSpec(ApiModel):
    """Where the resource writes everything it produces."""

    uri: StoreUri | None = None
    """Output prefix (s3://bucket/prefix or file:///path). Defaults to the operator's store
    followed by <namespace>/<kind>/<name>, or the local runner's store followed by <kind>/<name>."""
    credentials_secret: SecretRef | None = None
    """Secret with object-store credentials; defaults to the operator's configured Secret."""
    delete_policy: Literal["Retain", "Delete"] = "Retain"
    """Retain keeps the outputs when the resource is deleted; Delete removes them."""


class Toleration(ApiModel):
    """A Kubernetes toleration for the Ray pods."""

    cel_rules = (
        {
            "rule": "self.operator != 'Exists' || !has(self.value)",
            "message": "value must be empty when operator is Exists",
        },
    )

    key: LabelKey | None = None
    """Taint key the toleration applies to; empty with operator Exists tolerates everything."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists matches any value; Equal matches value."""
    value: LabelValue | None = None
    """Taint value to match when operator is Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: int | None = Field(default=None, ge=0)
    """For NoExecute: how long the pod stays bound after the taint appears."""


class HeadGroup(ApiModel):
    """The Ray head pod (runs the driver; no GPUs by default)."""

    cpus: Quantity = "4"
    """CPU request and limit of the head pod."""
    memory: Quantity = "16Gi"
    """Memory request and limit of the head pod."""


class WorkerGroup(ApiModel):
    """The Ray worker pods that run the workload's tasks and training workers."""

    replicas: int = Field(default=1, ge=1, le=1024)
    """Number of worker pods."""
    gpus_per_worker: int = Field(default=8, ge=0, le=16)
    """nvidia.com/gpu per worker pod; 0 runs on CPUs only."""
    cpus_per_worker: Quantity = "96"
    """CPU request and limit of each worker pod."""
    memory_per_worker: Quantity = "1600Gi"
    """Memory request and limit of each worker pod."""
    shared_memory: Quantity = "256Gi"
    """Size of /dev/shm (an in-memory emptyDir), used by NCCL and the Ray object store."""


class RaySpec(ApiModel):
    """How the workload's Ray cluster is placed and bounded. Omitted fields take the operator's defaults."""

    image: ImageName | None = None
    """Ray worker image (CUDA, torch, vLLM, tokenmill); defaults to the operator's configured image."""
    head: HeadGroup = Field(default_factory=HeadGroup)
    """The head pod."""
    workers: WorkerGroup = Field(default_factory=WorkerGroup)
    """The worker group."""
    node_selector: dict[LabelKey, LabelValue] | None = Field(default=None, max_length=32)
    """Node labels the Ray pods must match; defaults to the operator's GPU node pool selector."""
    tolerations: list[Toleration] | None = Field(default=None, max_length=32)
    """Tolerations for the Ray pods; defaults to the operator's GPU node pool tolerations."""
    queue_name: QueueName | None = None
    """Kueue LocalQueue to submit the RayJob to (sets the kueue.x-k8s.io/queue-name label)."""
    active_deadline_seconds: int | None = Field(default=None, ge=60)
    """Fails an attempt that runs longer than this (RayJob activeDeadlineSeconds)."""
    pre_running_deadline_seconds: int = Field(default=1800, ge=60)
    """Fails an attempt whose Ray cluster is not running within this time (image pulls, no GPUs)."""
    ttl_seconds_after_finished: int = Field(default=3600, ge=0)
    """How long a finished RayJob is kept before deletion."""
    pod: PodExtras | None = None
    """Additions to every Ray pod over the operator's defaults (RDMA/EFA devices, NCCL env, volumes, Kueue topology)."""


class SamplingParams(ApiModel):
    """Decoding parameters for generation."""

    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    """Softmax temperature; 0 decodes greedily."""
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    max_tokens: int = Field(default=2048, ge=1, le=131072)
    """Most tokens generated per completion."""
    seed: int | None = Field(default=None, ge=0)
    """Base seed; each request derives its own, so reruns reproduce."""


class CommonSpec(ApiModel):
    """Fields every kind has."""

    ray: RaySpec = Field(default_factory=RaySpec)
    """Ray cluster placement, resources and deadlines."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """Where outputs, checkpoints, logs and run records go."""
    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Attempts after the first before the resource fails; each retry resumes from the store."""
    suspend: bool = False
    """True deletes the running RayJob and keeps the outputs; false again resumes."""
