"""What every kind declares about itself, in one place: `KindDescriptor`.

Each `tokenmill/api/<kind>.py` defines its resource class and its `DESCRIPTOR`; the registry
(`tokenmill.api.resources.KINDS`) collects them. The CRDs, the loader, the operator (RayJob
names, entrypoints, placement, input checks, output checks) and the local runner read a
kind's facts from its descriptor and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from tokenmill.api.base import ApiModel
from tokenmill.api.fields import LabelKey, LabelValue, ResourceName
from tokenmill.api.refs import Reference, Role, declared_fields, walk_spec
from tokenmill.api.status import ResourceStatus

if TYPE_CHECKING:
    from tokenmill.api.common import CommonSpec

GROUP = "tokenmill.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "tokenmill"

OutputType = Literal["dataset", "checkpoint"]
MAX_ANNOTATIONS_BYTES = 256 * 1024
"""The API server's limit on the total size of an object's annotations (keys and values)."""


class ObjectMeta(BaseModel):
    """The parts of metadata tokenmill reads; everything else the API server sets is accepted and ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    name: ResourceName
    namespace: ResourceName | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    annotations: dict[LabelKey, str] = Field(default_factory=dict)

    @field_validator("annotations")
    @classmethod
    def _annotations_fit(cls, annotations: dict[str, str]) -> dict[str, str]:
        size = sum(len(key) + len(value) for key, value in annotations.items())
        if size > MAX_ANNOTATIONS_BYTES:
            raise ValueError(f"annotations total {size:,} bytes; Kubernetes allows at most {MAX_ANNOTATIONS_BYTES:,}")
        return annotations


class Resource(ApiModel):
    """Fields common to every kind's objects."""

    api_version: Literal["tokenmill.dev/v1alpha1"]
    metadata: ObjectMeta
    status: ResourceStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.metadata.name)  # type: ignore[attr-defined]


def always(spec: Any) -> bool:
    return True


def never(spec: Any) -> bool:
    return False


@dataclass(frozen=True)
class KindDescriptor:
    """How a kind is named, served, run, and what its spec reads and writes."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    prefix: str
    """Prefix of its RayJobs' names (`<prefix>-<name>-<attempt>`); short, lower case, unique."""
    cli_name: str
    """Sub-command of the workload entrypoint: `python -m tokenmill.trainer <cli_name> --spec <uri>`."""
    workload_module: str
    """Module whose `run(spec_uri) -> int` implements the workload."""
    output: OutputType
    """What the resource commits: a dataset (`<output>/data/`) or checkpoints (`<output>/checkpoints/`)."""
    resource_model: type[Resource]
    spec_model: type[CommonSpec]
    dataset_fields: tuple[str, ...] = ()
    """Spec fields (paths without list indices) whose sources are datasets with a committed manifest."""
    model_fields: tuple[str, ...] = ()
    """Spec fields whose sources are models: a TrainingStage's final checkpoint, a checkpoint or an HF export."""
    file_fields: tuple[str, ...] = ()
    """Spec fields whose sources are opaque files handed to the workload unchecked."""
    secret_key_env: Mapping[str, str] = field(default_factory=dict)
    """Spec fields holding a Secret key reference -> the environment variable the workload reads it from."""
    needs_gpus: Callable[[Any], bool] = always
    """Whether a resource with this spec needs GPU nodes."""
    dataset_types: Callable[[Any], frozenset[str]] = lambda spec: frozenset()
    """Dataset types (documents, qa, chat, preference, ...) a resource can produce; spec None: any of its kind."""
    extra_columns: tuple[dict[str, Any], ...] = ()
    """Printer columns of the kind's CRD before the common ones."""

    def __post_init__(self) -> None:
        declared = declared_fields(self.spec_model)
        sources = {path for path, what in declared.items() if what == "source"}
        listed = [*self.dataset_fields, *self.model_fields, *self.file_fields]
        if sorted(listed) != sorted(sources):
            raise ValueError(
                f"{self.kind}: the descriptor must say what each source field holds exactly once; "
                f"fields {sorted(sources)}, declared {sorted(listed)}"
            )
        secrets = {path for path, what in declared.items() if what == "secret"}
        unknown = set(self.secret_key_env) - secrets
        if unknown:
            raise ValueError(f"{self.kind}: secret_key_env names fields that hold no Secret: {sorted(unknown)}")

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def roles(self) -> dict[str, Role]:
        roles: dict[str, Role] = {}
        for paths, role in ((self.dataset_fields, "dataset"), (self.model_fields, "model"), (self.file_fields, "file")):
            roles.update(dict.fromkeys(paths, role))  # type: ignore[arg-type]
        return roles

    def references(self, spec: BaseModel) -> Iterator[Reference]:
        """Every reference in `spec` (of this kind), in field order."""
        return walk_spec(spec, self.roles)
