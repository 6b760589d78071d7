"""SyntheticDataJob: seeds and a teacher model in, a synthetic dataset out."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tokenmill.api.base import ApiModel
from tokenmill.api.common import CommonSpec, DataSource, ModelSource, SamplingParams, SecretKeyRef
from tokenmill.api.fields import Endpoint, Fraction, LongText, PositiveFraction, ShortText
from tokenmill.api.kinds import KindDescriptor, Resource

StepType = Literal[
    "seedSelection", "agreementFilter", "rewrite", "selfRevision", "instructionReversal", "multiTurn", "executionCheck",
    "judge",
]
STEP_TYPES: tuple[str, ...] = StepType.__args__  # type: ignore[attr-defined]

STEPS_AFTER_MULTI_TURN = frozenset({"judge", "multiTurn"})
"""The only steps that may follow multiTurn: the others work on the first question and would
leave the conversation as it is."""


def misplaced_after_multi_turn(step_types: list[str], index: int) -> bool:
    """Whether the step at `index` comes after a multiTurn it may not follow."""
    return step_types[index] not in STEPS_AFTER_MULTI_TURN and "multiTurn" in step_types[:index]


# Dataset types whose rows are documents or questions (a pretraining corpus or seeds).
DOCUMENT_TYPES = frozenset({"documents", "qa", "math", "code"})
# The OpenAI-compatible endpoint's key (generator.apiKeySecret), given to the workload from the
# Secret by the kubelet: its value never appears in a spec or status.
GENERATOR_API_KEY_ENV = "TOKENMILL_GENERATOR_API_KEY"


class SeedSelection(ApiModel):
    """Splits seed documents into passages, scores each for educational value and reasoning
    content with the generator, tags its complexity, and keeps the top fraction."""

    keep_fraction: PositiveFraction = 0.5
    """Share of passages kept, by the sum of their two scores."""
    passage_words: int = Field(default=200, ge=8, le=4096)
    """Words per passage."""


class AgreementFilter(ApiModel):
    """Samples several answers per question; drops questions all or none agree on."""

    cel_rules = (
        {"rule": "self.minAgreement < self.maxAgreement", "message": "minAgreement must be less than maxAgreement"},
    )

    samples: int = Field(default=8, ge=2, le=128)
    """Independent answers sampled per question."""
    min_agreement: Fraction = 0.0
    """A question is kept only when the plurality answer's share is above this (none agree below)."""
    max_agreement: Fraction = 1.0
    """A question is kept only when the plurality answer's share is below this (all agree at 1.0)."""


class Rewrite(ApiModel):
    """Turns a seed into exercises, discussions or structured reasoning tasks with multi-step prompts."""

    targets: list[Literal["exercise", "discussion", "structured-reasoning", "qa"]] = Field(
        default_factory=lambda: ["exercise"], min_length=1, max_length=4
    )
    """Forms to rewrite each seed into."""
    instructions: LongText | None = None
    """Extra instructions appended to the rewrite prompts."""


class SelfRevision(ApiModel):
    """The model critiques its draft against a rubric and revises it."""

    rounds: int = Field(default=2, ge=1, le=10)
    """Critique-and-revise rounds."""
    rubric: list[ShortText] = Field(default_factory=lambda: ["reasoning", "factual accuracy"], min_length=1, max_length=16)
    """Criteria the critique scores."""


class InstructionReversal(ApiModel):
    """Writes the instruction a snippet answers, regenerates the snippet, keeps pairs that match."""

    similarity_threshold: PositiveFraction = 0.8
    """Keep the pair when similarity(original, regenerated) is at least this."""
    metric: Literal["token-jaccard", "char-ngram"] = "char-ngram"
    """Similarity measure between the original and the regenerated snippet."""


class MultiTurn(ApiModel):
    """Extends samples into multi-turn conversations with a revision pass per turn (chat,
    preference); only judge or another multiTurn may follow it."""

    turns: int = Field(default=3, ge=2, le=16)
    """Turns per conversation (user + assistant pairs)."""
    revise_each_turn: bool = True
    """Run a critique-and-revise pass after each assistant turn."""


class ExecutionCheck(ApiModel):
    """Keeps generated code only when it passes its generated tests in a sandbox."""

    timeout_seconds: int = Field(default=10, ge=1, le=600)
    """Wall-clock limit per execution."""
    memory_mb: int = Field(default=1024, ge=64, le=65536)
    """Address-space limit per execution."""


class Judge(ApiModel):
    """Has the generator, as judge, score several candidate responses per question against a
    rubric: the best becomes the solution (chat, qa, math; after multiTurn, the conversation's
    final assistant turn), or the best and the worst a preference pair (preference; after
    multiTurn, of the final assistant turn, the conversation before it being the prompt). A
    response an earlier step wrote is one of the candidates."""

    responses: int = Field(default=4, ge=2, le=64)
    """Candidates judged per question, a response an earlier step wrote included."""
    rubric: list[ShortText] = Field(default_factory=lambda: ["correctness", "reasoning", "clarity"],
                                    min_length=1, max_length=16)
    """Criteria the judge weighs."""
    scale: int = Field(default=10, ge=2, le=100)
    """Scores run from 0 to this (best)."""
    min_margin: float = Field(default=1.0, ge=0, le=100)
    """A pair is written only when the best score exceeds the worst by at least this (preference)."""


def _union_rules(types: tuple[str, ...]) -> tuple[dict[str, str], ...]:
    """Kubernetes-style union: `type` names the one member that must be set."""
    return tuple(
        {
            "rule": f"(self.type == '{name}') == has(self.{name})",
            "message": f"{name} must be set exactly when type is {name}",
        }
        for name in types
    )


class WorkflowStep(ApiModel):
    """One step of the generation workflow; `type` names which of the step fields is set."""

    cel_rules = _union_rules(STEP_TYPES)

    type: StepType
    """The step."""
    seed_selection: SeedSelection | None = None
    """Parameters when type is seedSelection."""
    agreement_filter: AgreementFilter | None = None
    """Parameters when type is agreementFilter."""
    rewrite: Rewrite | None = None
    """Parameters when type is rewrite."""
    self_revision: SelfRevision | None = None
    """Parameters when type is selfRevision."""
    instruction_reversal: InstructionReversal | None = None
    """Parameters when type is instructionReversal."""
    multi_turn: MultiTurn | None = None
    """Parameters when type is multiTurn."""
    execution_check: ExecutionCheck | None = None
    """Parameters when type is executionCheck."""
    judge: Judge | None = None
    """Parameters when type is judge."""


class Generator(ApiModel):
    """The teacher model and the engine that serves it."""

    cel_rules = (
        {
            "rule": "self.engine != 'openai' || (has(self.endpoint) && has(self.apiKeySecret) && has(self.modelName))",
            "message": "engine openai needs endpoint, apiKeySecret and modelName",
        },
        {
            "rule": "self.engine == 'openai' || self.engine == 'scripted' || has(self.model)",
            "message": "engines vllm and torch need model",
        },
    )

    engine: Literal["vllm", "openai", "torch", "scripted"] = "vllm"
    """vllm runs the model on the Ray cluster's GPUs; openai calls an OpenAI-compatible endpoint;
    torch is the built-in engine for tiny models; scripted is a rule-based stand-in teacher for
    offline demos and tests (arithmetic and word problems), not a model."""
    model: ModelSource | None = None
    """The teacher checkpoint or Hugging Face export (vllm, torch)."""
    model_name: ShortText | None = None
    """Model name sent to the endpoint (openai)."""
    endpoint: Endpoint | None = None
    """Base URL of the OpenAI-compatible API (openai)."""
    api_key_secret: SecretKeyRef | None = None
    """Secret key holding the endpoint's API key (openai); never inline."""
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    """Decoding parameters."""
    tensor_parallel_size: int = Field(default=1, ge=1, le=16)
    """GPUs per model replica (vllm)."""
    max_concurrency: int = Field(default=64, ge=1, le=4096)
    """Requests in flight per replica or to the endpoint."""
    mistake_rate: Fraction = 0.2
    """Share of worked solutions in which the scripted stand-in teacher slips (scripted only)."""


class Budgets(ApiModel):
    """Limits that stop generation early; the output stays committed and consistent."""

    max_samples: int | None = Field(default=None, ge=1)
    """Stop after this many accepted samples."""
    max_generated_tokens: int | None = Field(default=None, ge=1)
    """Stop after the engine has produced this many tokens in total."""


class FailureBudget(ApiModel):
    """Samples the engine may fail on after its own retries, per engine actor: each drops its
    item (counted as generation-failed); past maxFailures plus maxFraction of the samples the
    actor sent, the job stops with the shards finished as its dataset, and the attempt fails."""

    max_failures: int = Field(default=16, ge=0, le=1_000_000_000)
    """Failed samples allowed per engine actor, whatever it sent."""
    max_fraction: Fraction = 0.01
    """Further failed samples allowed per engine actor, as a share of the samples it sent."""


class SyntheticDataJobSpec(CommonSpec):
    """Generates a synthetic dataset from seeds with a teacher model."""

    cel_rules = (
        {"rule": "self.datasetType != 'preference' || self.workflow.exists(s, s.type == 'judge')",
         "message": "datasetType preference needs a judge step in the workflow (it picks each pair's chosen and "
                    "rejected response)"},
    )

    seeds: list[DataSource] = Field(min_length=1, max_length=64)
    """Seed datasets: document excerpts, questions, or question–answer pairs."""
    dataset_type: Literal["documents", "qa", "math", "code", "chat", "preference"] = "qa"
    """Schema and task family of the output: documents for pretraining, chat for SFT, preference pairs for DPO."""
    workflow: list[WorkflowStep] = Field(min_length=1, max_length=32)
    """Steps run in order over each seed."""
    generator: Generator
    """Teacher model and engine."""
    budgets: Budgets = Field(default_factory=Budgets)
    """Early-stop limits."""
    failure_budget: FailureBudget = Field(default_factory=FailureBudget)
    """How many samples the engine may fail on before the job stops."""
    seed: int = Field(default=0, ge=0)
    """Seed for seed selection and sampling."""


class SyntheticDataJob(Resource):
    kind: Literal["SyntheticDataJob"]
    spec: SyntheticDataJobSpec


def _needs_gpus(spec: SyntheticDataJobSpec) -> bool:
    """vllm and torch serve the teacher on the Ray cluster; openai calls an endpoint elsewhere."""
    return spec.generator.engine not in ("openai", "scripted")


def _dataset_types(spec: SyntheticDataJobSpec | None) -> frozenset[str]:
    if spec is None:
        return DOCUMENT_TYPES | {"chat", "preference"}
    produced = spec.dataset_type
    return frozenset({"documents", produced}) if produced in DOCUMENT_TYPES else frozenset({produced})


DESCRIPTOR = KindDescriptor(
    kind="SyntheticDataJob",
    plural="syntheticdatajobs",
    short_names=("sdj",),
    prefix="sdj",
    cli_name="synthetic-data",
    workload_module="tokenmill.trainer.synth.workload",
    output="dataset",
    resource_model=SyntheticDataJob,
    spec_model=SyntheticDataJobSpec,
    dataset_fields=("spec.seeds",),
    model_fields=("spec.generator.model",),
    secret_key_env={"spec.generator.apiKeySecret": GENERATOR_API_KEY_ENV},
    needs_gpus=_needs_gpus,
    dataset_types=_dataset_types,
)
