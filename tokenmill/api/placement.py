"""What large multi-node training needs on its pods and tokenmill cannot guess: extra device
resources (RDMA/InfiniBand, EFA), annotations, volumes, environment (NCCL settings), a priority
class and Kueue's topology-aware scheduling request.

`spec.ray.pod` (and the operator's default, TOKENMILL_RAY_POD) is merged into every Ray pod the
operator renders, as a strategic merge would (maps by key, env by name, volumes by name), and
checked: it can add to what tokenmill renders but never replace what tokenmill owns (its
environment, /dev/shm, the container's CPU, memory and GPU resources, its security context).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tokenmill.api.base import ApiModel
from tokenmill.api.fields import DNS1123_SUBDOMAIN, LabelKey, Quantity, ResourceName

# Names tokenmill gives the pods itself: a pod extra may not set them.
RESERVED_ENV_PREFIXES = ("TOKENMILL_", "AWS_", "RAY_")
RESERVED_VOLUMES = frozenset({"dshm"})
RESERVED_MOUNT_PATHS = frozenset({"/dev/shm"})
RESERVED_RESOURCES = frozenset({"cpu", "memory", "nvidia.com/gpu"})
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
MAX_ANNOTATIONS_BYTES = 256 * 1024  # the API server's limit on a pod's annotations
KUEUE_REQUIRED_TOPOLOGY = "kueue.x-k8s.io/podset-required-topology"
KUEUE_PREFERRED_TOPOLOGY = "kueue.x-k8s.io/podset-preferred-topology"


class EnvVar(ApiModel):
    """A plain environment variable (such as an NCCL setting); Secrets are never inlined here."""

    name: str = Field(pattern=ENV_NAME, max_length=256)
    """Variable name; TOKENMILL_*, AWS_* and RAY_* are the operator's own."""
    value: str = Field(default="", max_length=4096)
    """Its value."""

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name.startswith(RESERVED_ENV_PREFIXES):
            raise ValueError(f"{name} is set by the operator ({', '.join(RESERVED_ENV_PREFIXES)}* are reserved)")
        return name


class PersistentVolumeClaimSource(ApiModel):
    """A PersistentVolumeClaim in the resource's namespace."""

    claim_name: ResourceName
    """The claim."""
    read_only: bool = False
    """Mount it read-only."""


class ConfigMapSource(ApiModel):
    """A ConfigMap in the resource's namespace, its keys as files."""

    name: ResourceName
    """The ConfigMap."""


class EmptyDirSource(ApiModel):
    """A scratch directory that lives as long as the pod."""

    medium: Literal["", "Memory"] = ""
    """Memory puts it in RAM (it counts against the memory limit)."""
    size_limit: Quantity | None = None
    """Largest size."""


class Volume(ApiModel):
    """A volume mounted into every Ray container; exactly one source."""

    cel_rules = (
        {
            "rule": "(has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.configMap) ? 1 : 0)"
                    " + (has(self.emptyDir) ? 1 : 0) == 1",
            "message": "set exactly one of persistentVolumeClaim, configMap or emptyDir",
        },
    )

    name: str = Field(pattern=DNS1123_SUBDOMAIN, max_length=63)
    """Volume name (dshm is the operator's /dev/shm)."""
    mount_path: str = Field(pattern=r"^/[^\s]*$", max_length=1024)
    """Where it is mounted in the containers (not /dev/shm)."""
    persistent_volume_claim: PersistentVolumeClaimSource | None = None
    """A PersistentVolumeClaim."""
    config_map: ConfigMapSource | None = None
    """A ConfigMap."""
    empty_dir: EmptyDirSource | None = None
    """A scratch directory."""

    @model_validator(mode="after")
    def _not_reserved(self) -> Volume:
        if self.name in RESERVED_VOLUMES:
            raise ValueError(f"volume name {self.name} is the operator's own")
        if self.mount_path.rstrip("/") in RESERVED_MOUNT_PATHS or ".." in self.mount_path.split("/"):
            raise ValueError(f"mountPath {self.mount_path} is the operator's own or leaves its directory")
        return self


class Topology(ApiModel):
    """Kueue's topology-aware scheduling request for the worker pods (a node label naming a
    topology level, such as a rack or a block of InfiniBand switches)."""

    cel_rules = (
        {"rule": "has(self.required) != has(self.preferred)", "message": "set exactly one of required or preferred"},
    )

    required: LabelKey | None = None
    """Every worker pod in one domain of this level, or none is admitted."""
    preferred: LabelKey | None = None
    """As few domains of this level as Kueue can manage."""


class PodExtras(ApiModel):
    """Additions to every Ray pod (head and workers) over what tokenmill renders."""

    annotations: dict[LabelKey, str] = Field(default_factory=dict, max_length=64)
    """Pod annotations (a CNI's network attachments, for instance)."""
    priority_class_name: str | None = Field(default=None, pattern=DNS1123_SUBDOMAIN, max_length=253)
    """The pods' PriorityClass."""
    extra_resources: dict[LabelKey, Quantity] = Field(default_factory=dict, max_length=16)
    """Device resources per worker container, requested and limited (rdma/ib, vpc.amazonaws.com/efa...)."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Environment of every Ray container (NCCL_IB_HCA, NCCL_SOCKET_IFNAME...)."""
    volumes: list[Volume] = Field(default_factory=list, max_length=16)
    """Volumes mounted into every Ray container."""
    topology: Topology | None = None
    """Kueue topology-aware scheduling of the worker pods."""

    @field_validator("annotations")
    @classmethod
    def _annotations_fit(cls, annotations: dict[str, str]) -> dict[str, str]:
        size = sum(len(key) + len(value) for key, value in annotations.items())
        if size > MAX_ANNOTATIONS_BYTES:
            raise ValueError(f"annotations total {size} bytes; Kubernetes allows {MAX_ANNOTATIONS_BYTES}")
        return annotations

    @field_validator("extra_resources")
    @classmethod
    def _resources_not_reserved(cls, resources: dict[str, str]) -> dict[str, str]:
        taken = sorted(set(resources) & RESERVED_RESOURCES)
        if taken:
            raise ValueError(f"{', '.join(taken)} come from spec.ray.head and spec.ray.workers, not extraResources")
        return resources

    @model_validator(mode="after")
    def _unique_names(self) -> PodExtras:
        for what, names in (("env", [item.name for item in self.env]), ("volumes", [v.name for v in self.volumes]),
                            ("volume mountPaths", [v.mount_path for v in self.volumes])):
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"{what} repeat {', '.join(repeated)}")
        return self

    def merged_over(self, defaults: PodExtras) -> PodExtras:
        """These extras over the operator's defaults: maps by key, env and volumes by name."""
        env = {item.name: item for item in defaults.env} | {item.name: item for item in self.env}
        volumes = {item.name: item for item in defaults.volumes} | {item.name: item for item in self.volumes}
        return PodExtras(
            annotations={**defaults.annotations, **self.annotations},
            priority_class_name=self.priority_class_name or defaults.priority_class_name,
            extra_resources={**defaults.extra_resources, **self.extra_resources},
            env=list(env.values()),
            volumes=list(volumes.values()),
            topology=self.topology or defaults.topology,
        )
