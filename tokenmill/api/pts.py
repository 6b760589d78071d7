"""PTSJob: Pivotal Token Search over a model's solutions, producing DPO preference pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tokenmill.api.base import ApiModel
from tokenmill.api.common import CommonSpec, DataSource, ModelSource, SamplingParams
from tokenmill.api.fields import Fraction
from tokenmill.api.kinds import KindDescriptor, Resource, always


class Oracle(ApiModel):
    """Decides whether a completed solution is correct."""

    kind: Literal["math", "code", "multiple-choice"]
    """math compares normalised final answers; code runs unit tests in a sandboxed subprocess;
    multiple-choice compares the chosen option."""
    timeout_seconds: int = Field(default=10, ge=1, le=600)
    """code: wall-clock limit per test run."""
    memory_mb: int = Field(default=1024, ge=64, le=65536)
    """code: address-space limit per test run."""


class QueryFilter(ApiModel):
    """Only questions whose estimated p(success) lies in [minSuccess, maxSuccess] are searched."""

    cel_rules = (
        {"rule": "self.minSuccess <= self.maxSuccess", "message": "minSuccess must be at most maxSuccess"},
    )

    min_success: Fraction = 0.2
    """Lower bound of p(success | question)."""
    max_success: Fraction = 0.8
    """Upper bound of p(success | question)."""


class PTSJobSpec(CommonSpec):
    """Finds pivotal tokens in a model's solutions and writes chosen/rejected token pairs."""

    model: ModelSource
    """The policy to search (usually the SFT stage)."""
    problems: DataSource
    """Problems with ground truth (fields prompt and answer, or tests for code)."""
    oracle: Oracle
    """How a solution is checked."""
    engine: Literal["vllm", "torch"] = "vllm"
    """Rollout engine: vllm on GPUs, torch for tiny models."""
    solutions_per_problem: int = Field(default=4, ge=1, le=256)
    """Sampled solutions searched per problem."""
    samples_per_estimate: int = Field(default=64, ge=2, le=4096)
    """Rollouts N per p(success | prefix) estimate (standard error ~ 0.5/sqrt(N))."""
    p_gap: float = Field(default=0.2, gt=0.0, lt=1.0)
    """A token is pivotal when it changes p(success) by at least this."""
    query_filter: QueryFilter = Field(default_factory=QueryFilter)
    """Which questions are worth searching."""
    max_pivotal_tokens: int = Field(default=8, ge=1, le=1024)
    """Most pivotal tokens kept per solution."""
    rollout: SamplingParams = Field(default_factory=SamplingParams)
    """Sampling for solutions and rollouts."""
    seed: int = Field(default=0, ge=0)
    """Seed of sampling."""


class PTSJob(Resource):
    kind: Literal["PTSJob"]
    spec: PTSJobSpec


DESCRIPTOR = KindDescriptor(
    kind="PTSJob",
    plural="ptsjobs",
    short_names=("pts",),
    prefix="pts",
    cli_name="pts",
    workload_module="tokenmill.trainer.pts.workload",
    output="dataset",
    resource_model=PTSJob,
    spec_model=PTSJobSpec,
    dataset_fields=("spec.problems",),
    model_fields=("spec.model",),
    needs_gpus=always,
    dataset_types=lambda spec: frozenset({"preference"}),
)
