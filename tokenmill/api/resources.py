"""The four kinds as whole Kubernetes objects (apiVersion, kind, metadata, spec, status)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from tokenmill.api.base import ApiModel
from tokenmill.api.common import CommonSpec
from tokenmill.api.corpus import CorpusFilterSpec
from tokenmill.api.fields import LabelKey, ResourceName
from tokenmill.api.pts import PTSJobSpec
from tokenmill.api.status import ResourceStatus
from tokenmill.api.synthetic import SyntheticDataJobSpec
from tokenmill.api.training import TrainingStageSpec

GROUP = "tokenmill.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "tokenmill"


class ObjectMeta(BaseModel):
    """The parts of metadata tokenmill reads; everything else the API server sets is accepted and ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    name: ResourceName
    namespace: ResourceName | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[LabelKey, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Resource(ApiModel):
    """Fields common to the four kinds' objects."""

    api_version: Literal["tokenmill.dev/v1alpha1"]
    metadata: ObjectMeta
    status: ResourceStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.metadata.name)  # type: ignore[attr-defined]


class CorpusFilter(Resource):
    kind: Literal["CorpusFilter"]
    spec: CorpusFilterSpec


class SyntheticDataJob(Resource):
    kind: Literal["SyntheticDataJob"]
    spec: SyntheticDataJobSpec


class TrainingStage(Resource):
    kind: Literal["TrainingStage"]
    spec: TrainingStageSpec


class PTSJob(Resource):
    kind: Literal["PTSJob"]
    spec: PTSJobSpec


AnyResource = CorpusFilter | SyntheticDataJob | TrainingStage | PTSJob


@dataclass(frozen=True)
class KindInfo:
    """How a kind is named and served."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    resource_model: type[Resource]
    spec_model: type[CommonSpec]
    extra_columns: tuple[dict[str, Any], ...] = ()

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def cli_name(self) -> str:
        """Name of the workload entrypoint's sub-command: `python -m tokenmill.trainer <cli_name>`."""
        return {
            "CorpusFilter": "corpus-filter",
            "SyntheticDataJob": "synthetic-data",
            "TrainingStage": "training-stage",
            "PTSJob": "pts",
        }[self.kind]


KINDS: dict[str, KindInfo] = {
    info.kind: info
    for info in (
        KindInfo("CorpusFilter", "corpusfilters", ("cf",), CorpusFilter, CorpusFilterSpec),
        KindInfo("SyntheticDataJob", "syntheticdatajobs", ("sdj",), SyntheticDataJob, SyntheticDataJobSpec),
        KindInfo(
            "TrainingStage",
            "trainingstages",
            ("ts", "stage"),
            TrainingStage,
            TrainingStageSpec,
            ({"name": "Stage", "type": "string", "jsonPath": ".spec.stage"},),
        ),
        KindInfo("PTSJob", "ptsjobs", ("pts",), PTSJob, PTSJobSpec),
    )
}
