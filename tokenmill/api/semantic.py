"""Semantic validation: rules the CRD schema and CEL cannot express.

One function, used by the operator (Valid=False) and by the local runner and
`tokenmill validate`. `lookup` finds other resources of the recipe or namespace by
(kind, name); a reference it cannot resolve is not an error here (the operator waits
for it, and the recipe loader reports it as missing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenmill.api.common import ModelSource, ObjectRef
from tokenmill.api.corpus import CorpusFilterSpec
from tokenmill.api.output_prefix import ClaimedOutput, dot_segments, output_problem, overlap_message, overlapping
from tokenmill.api.problems import Problem, found
from tokenmill.api.pts import PTSJobSpec
from tokenmill.api.resources import KINDS, AnyResource, SyntheticDataJob, TrainingStage, references
from tokenmill.api.synthetic import DOCUMENT_TYPES, SyntheticDataJobSpec, misplaced_after_multi_turn
from tokenmill.api.training import MixtureComponent, TrainingStageSpec
from tokenmill.mixture import MixtureError, Source, plan_mixture
from tokenmill.model_configs import MODEL_CONFIGS, ModelConfig

Lookup = Callable[[str, str], AnyResource | None]

TOKENIZER_VOCAB = {"phi-4": 100_352, "byte": 320}

PROBLEM_TYPES = {"qa", "math", "code"}


@dataclass(frozen=True)
class Context:
    lookup: Lookup
    local: bool = False
    """True for the local runner, which accepts relative file: URIs."""


def no_lookup(kind: str, name: str) -> None:
    return None


def validate(
    resource: AnyResource,
    lookup: Lookup = no_lookup,
    *,
    local: bool = False,
    output: str | None = None,
    claimed: Sequence[ClaimedOutput] = (),
) -> list[Problem]:
    """Every semantic problem of `resource`, each with its field path, the value found and what is allowed.

    `output` is the resource's resolved output prefix, when known, and `claimed` the outputs of
    other resources it must not equal, contain or lie under.
    """
    context = Context(lookup, local)
    label = "/".join(resource.key)
    problems = _uris(resource, context)
    if output is not None:
        problems += output_overlaps(resource, output, claimed)
    spec = resource.spec
    if isinstance(spec, TrainingStageSpec):
        problems += _training(spec, context)
    elif isinstance(spec, SyntheticDataJobSpec):
        problems += _synthetic(spec, context)
    elif isinstance(spec, PTSJobSpec):
        problems += _pts(spec, context)
    elif isinstance(spec, CorpusFilterSpec):
        problems += _corpus(spec, context)
    return [problem.located(resource=label) for problem in problems]


# ---- references: which kinds can produce which input ----------------------------------


def _dataset_output(kind: str, target: AnyResource | None) -> set[str]:
    """Dataset types a resource of `kind` can produce (narrowed when the resource is known)."""
    descriptor = KINDS[kind]
    if descriptor.output != "dataset":
        return set()
    return set(descriptor.dataset_types(target.spec if target is not None and target.kind == kind else None))


def _check_dataset_ref(
    ref: ObjectRef | None, path: str, wanted: set[str], what: str, context: Context
) -> list[Problem]:
    if ref is None:
        return []
    target = context.lookup(ref.kind, ref.name)
    produced = _dataset_output(ref.kind, target)
    if produced & wanted:
        return []
    producers = sorted(kind for kind in KINDS if _dataset_output(kind, None) & wanted)
    detail = f" (its datasetType is {target.spec.dataset_type})" if isinstance(target, SyntheticDataJob) else ""
    return [
        found(
            f"needs {what}, which {ref.kind}/{ref.name} cannot produce{detail}; allowed producers: "
            f"{', '.join(producers)}",
            f"{path}.ref",
            f"{ref.kind}/{ref.name}",
        )
    ]


def _check_model_ref(source: ModelSource | None, path: str) -> list[Problem]:
    if source is None or source.ref is None or KINDS[source.ref.kind].output == "checkpoint":
        return []
    producers = " or ".join(sorted(kind for kind, descriptor in KINDS.items() if descriptor.output == "checkpoint"))
    return [
        found(
            f"a model comes only from a {producers} (or a checkpoint URI)",
            f"{path}.ref.kind",
            source.ref.kind,
        )
    ]


def _uris(resource: AnyResource, context: Context) -> list[Problem]:
    problems = []
    for reference in references(resource):
        uri = reference.uri
        if uri is None:
            continue
        path = f"{reference.path}.uri"
        relative = uri.startswith("file:") and not uri.startswith("file:///")
        if relative and not context.local:
            problems.append(
                found("relative file: URIs are only for the local runner (tokenmill run, tokenmill validate "
                      "--local); use s3:// or file:///", path, uri)
            )
        elif reference.role == "output" and (reason := output_problem(uri)):
            problems.append(found(reason, path, uri))
        elif not relative and dot_segments(uri):
            problems.append(found("must not contain '.' or '..' segments", path, uri))
    return problems


def output_overlaps(resource: AnyResource, output: str, claimed: Sequence[ClaimedOutput]) -> list[Problem]:
    """A problem when the resource's output equals, contains or lies under another resource's."""
    others = overlapping(output, claimed)
    if not others:
        return []
    path = "spec.output.uri" if resource.spec.output.uri else "spec.output"
    return [Problem(overlap_message(output, others), path)]


# ---- per kind ------------------------------------------------------------------------------


def _corpus(spec: CorpusFilterSpec, context: Context) -> list[Problem]:
    problems = []
    for index, source in enumerate(spec.inputs):
        problems += _check_dataset_ref(source.ref, f"spec.inputs[{index}]", {"documents"}, "documents", context)
    for index, code in enumerate(spec.languages.languages):
        if not (code.isascii() and code.isalpha() and code.islower() and 2 <= len(code) <= 3):
            problems.append(
                found("must be an ISO 639 language code (2 or 3 lower-case letters)", f"spec.languages.languages[{index}]", code)
            )
    if spec.decontamination and spec.decontamination.info_ngram >= spec.decontamination.ngram:
        problems.append(
            found(
                f"must be smaller than decontamination.ngram ({spec.decontamination.ngram})",
                "spec.decontamination.infoNgram",
                spec.decontamination.info_ngram,
            )
        )
    return problems


STEP_DATASET_TYPES = {
    "instructionReversal": {"code"},
    "executionCheck": {"code"},
    "multiTurn": {"chat", "preference"},
}


def _synthetic(spec: SyntheticDataJobSpec, context: Context) -> list[Problem]:
    problems = []
    for index, seed in enumerate(spec.seeds):
        problems += _check_dataset_ref(
            seed.ref, f"spec.seeds[{index}]", DOCUMENT_TYPES, "seed documents or questions", context
        )
    problems += _check_model_ref(spec.generator.model, "spec.generator.model")
    for index, step in enumerate(spec.workflow):
        allowed = STEP_DATASET_TYPES.get(step.type)
        if allowed and spec.dataset_type not in allowed:
            problems.append(
                found(
                    f"step {step.type} needs datasetType {' or '.join(sorted(allowed))}",
                    f"spec.workflow[{index}].type",
                    step.type,
                )
            )
        if misplaced_after_multi_turn([s.type for s in spec.workflow], index):
            problems.append(
                found(
                    "cannot follow multiTurn: it works on the first question and would leave the conversation "
                    "as it is; after multiTurn only judge or another multiTurn",
                    f"spec.workflow[{index}].type",
                    step.type,
                )
            )
    return problems


def _pts(spec: PTSJobSpec, context: Context) -> list[Problem]:
    problems = _check_model_ref(spec.model, "spec.model")
    problems += _check_dataset_ref(spec.problems.ref, "spec.problems", PROBLEM_TYPES, "problems with answers", context)
    target = context.lookup(spec.problems.ref.kind, spec.problems.ref.name) if spec.problems.ref else None
    if isinstance(target, SyntheticDataJob) and spec.oracle.kind == "code" and target.spec.dataset_type != "code":
        problems.append(
            found(
                f"oracle code needs problems with unit tests; {target.name} has datasetType {target.spec.dataset_type}",
                "spec.oracle.kind",
                spec.oracle.kind,
            )
        )
    return problems


STAGE_INPUTS = {
    "pretrain": ({"documents"}, "documents"),
    "midtrain": ({"documents"}, "documents"),
    "sft": ({"chat"}, "chat samples"),
    "dpo": ({"preference"}, "preference pairs"),
}


def _training(spec: TrainingStageSpec, context: Context) -> list[Problem]:
    problems = []
    wanted, what = STAGE_INPUTS[spec.stage]
    for index, component in enumerate(spec.datasets):
        problems += _check_dataset_ref(component.ref, f"spec.datasets[{index}]", wanted, what, context)
    problems += _check_model_ref(spec.model.parent, "spec.model.parent")
    if spec.dpo:
        problems += _check_model_ref(spec.dpo.reference_model, "spec.dpo.referenceModel")

    architecture, positions, rope = _model_shape(spec, context)
    if spec.model.config is not None and architecture is None:
        problems.append(
            found(
                f"unknown model config; known configs: {', '.join(sorted(MODEL_CONFIGS))}",
                "spec.model.config",
                spec.model.config,
            )
        )
    if architecture is not None:
        problems += _tokenizer(spec, architecture)
    if positions is not None and spec.sequence_length > positions:
        new_rope = spec.rope_base
        if new_rope is None or (rope is not None and new_rope <= rope):
            problems.append(
                found(
                    f"exceeds the {positions} positions the model was trained on; raise ropeBase above "
                    f"{rope:g} to extend the context (midtraining uses 250000 for 16384)",
                    "spec.sequenceLength",
                    spec.sequence_length,
                )
            )
    problems += _batch(spec)
    problems += _mixture(spec)
    return problems


def _model_shape(
    spec: TrainingStageSpec, context: Context, seen: frozenset[str] = frozenset()
) -> tuple[ModelConfig | None, int | None, float | None]:
    """(architecture, positions trained on, RoPE base trained with) of the model this stage starts from.

    Unknown (None) when the chain of parents leaves the recipe or loops (cycles are reported elsewhere).
    """
    if spec.model.config is not None:
        config = MODEL_CONFIGS.get(spec.model.config)
        if config is None:
            return None, None, None
        return config, config.max_position_embeddings, config.rope_theta
    parent = spec.model.parent
    if parent is None or parent.ref is None or parent.ref.name in seen:
        return None, None, None
    target = context.lookup("TrainingStage", parent.ref.name)
    if not isinstance(target, TrainingStage):
        return None, None, None
    architecture, positions, rope = _model_shape(target.spec, context, seen | {parent.ref.name})
    if positions is None:
        return architecture, None, None
    return architecture, max(positions, target.spec.sequence_length), target.spec.rope_base or rope


def _tokenizer(spec: TrainingStageSpec, architecture: ModelConfig) -> list[Problem]:
    tokenizer = spec.tokenizer or architecture.tokenizer
    if TOKENIZER_VOCAB[tokenizer] > architecture.vocab_size:
        return [
            found(
                f"tokenizer {tokenizer} has {TOKENIZER_VOCAB[tokenizer]:,} tokens but {architecture.name} embeds "
                f"only {architecture.vocab_size:,}; use tokenizer {architecture.tokenizer}",
                "spec.tokenizer",
                tokenizer,
            )
        ]
    return []


def _batch(spec: TrainingStageSpec) -> list[Problem]:
    problems = []
    workers = spec.ray.workers
    data_parallel = workers.replicas * max(workers.gpus_per_worker, 1)
    optimization = spec.optimization
    per_step = optimization.micro_batch_sequences * data_parallel
    if optimization.global_batch_sequences % per_step:
        problems.append(
            found(
                f"must be a multiple of microBatchSequences x data-parallel workers = "
                f"{optimization.micro_batch_sequences} x {data_parallel} ({workers.replicas} pods x "
                f"{max(workers.gpus_per_worker, 1)} per pod) = {per_step}",
                "spec.optimization.globalBatchSequences",
                optimization.global_batch_sequences,
            )
        )
    tokens_per_step = optimization.global_batch_sequences * spec.sequence_length
    steps = optimization.total_tokens // tokens_per_step
    if steps < 1:
        problems.append(
            found(
                f"is less than one step of {tokens_per_step:,} tokens (globalBatchSequences x sequenceLength)",
                "spec.optimization.totalTokens",
                optimization.total_tokens,
            )
        )
    elif optimization.warmup_steps >= steps:
        problems.append(
            found(f"must be less than the stage's {steps:,} steps", "spec.optimization.warmupSteps", optimization.warmup_steps)
        )
    return problems


def component_name(component: MixtureComponent, index: int) -> str:
    if component.name:
        return component.name
    if component.ref:
        return component.ref.name
    if component.uri:
        return component.uri.rstrip("/").rsplit("/", 1)[-1]
    return f"datasets[{index}]"


def _mixture(spec: TrainingStageSpec) -> list[Problem]:
    sources = [
        Source(component_name(c, i), c.weight, c.epochs, c.unique_tokens) for i, c in enumerate(spec.datasets)
    ]
    try:
        plan_mixture(spec.optimization.total_tokens, sources)
    except MixtureError as error:
        return [found(str(error), f"spec.datasets[{error.index}].epochs", spec.datasets[error.index].epochs)]
    return []

