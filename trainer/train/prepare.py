"""Everything a TrainingStage checks and loads before any compute: model, positions, data, plan.

The driver calls `prepare(doc, build_caches=True)` before Ray Train starts, so bad input fails
first: it checks the model and every dataset's manifest (missing, empty, wrong schema), then
builds each dataset's token cache in the store (tokenized and packed on Ray, see
`trainer.data.stage`) and plans the mixture. Every training worker calls `prepare(doc)`, which
opens the committed caches (checking they match the data) and plans again; the plan fingerprint
is checked against the driver's, so no large arrays travel through Ray. Errors are
`TrainingInputError` with a message naming the field.

Data: committed datasets with the `documents` schema (text) or the `token_sequences` schema
(already tokenized, one document per row) become packed sequences: documents separated by
end-of-text, attention kept inside documents (see `trainer.data.packing`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.api.training import TrainingStageSpec
from tokenmill.model_configs import ModelConfig, get_model_config
from tokenmill.store import CheckpointStore, ManifestNotFoundError, StoreError, open_dataset
from tokenmill.trainer.data.cache import INPUT_SCHEMAS
from tokenmill.trainer.data.loader import MicroBatchIterator
from tokenmill.trainer.data.midtrain import dataset_buckets, plan_for_stage
from tokenmill.trainer.data.plan import MixtureError, MixturePlan
from tokenmill.trainer.data.sources import TokenCacheSource
from tokenmill.trainer.data.stage import (
    Sizes,
    StageDataset,
    build_stage_caches,
    filter_report,
    open_stage_sources,
    stage_tokens,
)
from tokenmill.trainer.tokenizer import Tokenizer, get_tokenizer

BUILT_STAGES = ("pretrain", "midtrain", "sft", "dpo")
_STEP_DIR = re.compile(r"^(?P<base>.+)/step-(?P<step>\d{8,})/?$")


class TrainingInputError(ValueError):
    """Input that cannot be trained on; raised before any compute is spent."""


@dataclass(frozen=True)
class ModelSetup:
    config: ModelConfig
    rope_theta: float
    max_positions: int
    tokenizer_name: str
    parent_uri: str | None = None
    """Committed checkpoint whose model weights initialise this stage (midtrain)."""

    def to_state(self) -> dict[str, Any]:
        """What a checkpoint records so a child stage can rebuild the same network."""
        return {
            "config": self.config.name,
            "rope_theta": self.rope_theta,
            "max_positions": self.max_positions,
            "tokenizer": self.tokenizer_name,
        }


@dataclass
class Prepared:
    doc: dict[str, Any]
    spec: TrainingStageSpec
    output: str
    model: ModelSetup
    tokenizer: Tokenizer
    plan: MixturePlan
    sources: dict[str, Any] = field(repr=False)
    dataset_names: list[str] = field(default_factory=list)
    iterator: type = MicroBatchIterator
    """The micro-batch iterator over `sources` (sft: labels on assistant tokens only)."""
    notes: list[str] = field(default_factory=list)
    """Lines for the driver log (sample and pair counts)."""
    reference_uri: str | None = None
    """dpo: the frozen reference model's committed checkpoint."""


def parse_spec(doc: Mapping[str, Any]) -> TrainingStageSpec:
    try:
        return TrainingStageSpec.model_validate(doc["spec"])
    except Exception as error:  # pydantic's message lists every field
        raise TrainingInputError(f"the run spec is not a valid TrainingStage spec: {error}") from error


def split_checkpoint_uri(uri: str) -> tuple[CheckpointStore, int]:
    """`<output>/checkpoints/step-NNNNNNNN` as its checkpoint store and step."""
    match = _STEP_DIR.match(uri)
    if not match:
        raise TrainingInputError(
            f"model.parent {uri!r} is not a checkpoint directory (<output>/checkpoints/step-NNNNNNNN)"
        )
    return CheckpointStore(match.group("base")), int(match.group("step"))


def resolve_model(spec: TrainingStageSpec) -> ModelSetup:
    """The architecture, RoPE base and positions this stage trains; checks the sequence length."""
    parent_uri = None
    if spec.model.config is not None:
        try:
            config = get_model_config(spec.model.config)
        except KeyError as error:
            raise TrainingInputError(f"model.config: {error.args[0]}") from None
        base_theta, base_positions = config.rope_theta, config.max_position_embeddings
        tokenizer_name = spec.tokenizer or config.tokenizer
    else:
        parent = spec.model.parent
        parent_uri = parent.uri if parent is not None else None
        if not parent_uri:
            raise TrainingInputError("model.parent has no resolved uri (the run spec must carry committed URIs)")
        store, step = split_checkpoint_uri(parent_uri)
        try:
            state = store.read_state(step)
        except StoreError as error:
            raise TrainingInputError(f"model.parent {parent_uri}: no committed checkpoint ({error})") from None
        saved = state.get("model") or {}
        try:
            config = get_model_config(saved["config"])
        except KeyError as error:
            raise TrainingInputError(f"model.parent {parent_uri}: unknown model config ({error})") from None
        base_theta = float(saved.get("rope_theta", config.rope_theta))
        base_positions = int(saved.get("max_positions", config.max_position_embeddings))
        tokenizer_name = spec.tokenizer or saved.get("tokenizer") or config.tokenizer
    try:
        tokenizer = get_tokenizer(tokenizer_name)
    except KeyError as error:
        raise TrainingInputError(f"tokenizer: {error.args[0]}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise TrainingInputError(
            f"tokenizer {tokenizer_name!r} has {tokenizer.vocab_size} ids but model {config.name!r} "
            f"only {config.vocab_size} embeddings"
        )
    rope_theta = float(spec.rope_base) if spec.rope_base is not None else base_theta
    if spec.sequence_length > base_positions and rope_theta == base_theta:
        raise TrainingInputError(
            f"sequenceLength {spec.sequence_length} is beyond the {base_positions} positions "
            f"model {config.name!r} was trained for, without a RoPE change: set ropeBase above "
            f"{base_theta:g} (midtraining uses 250000 for 16384) or lower sequenceLength"
        )
    max_positions = max(base_positions, spec.sequence_length)
    return ModelSetup(config, rope_theta, max_positions, tokenizer_name, parent_uri)


def dataset_names(spec: TrainingStageSpec) -> list[str]:
    """Each component's name: its `name`, else the last meaningful URI segment; made unique."""
    names: list[str] = []
    for index, dataset in enumerate(spec.datasets):
        name = dataset.name
        if not name:
            segments = [s for s in (dataset.uri or "").rstrip("/").split("/") if s]
            while len(segments) > 1 and segments[-1] == "data":
                segments.pop()
            name = segments[-1] if segments else f"dataset-{index}"
            name = name.removeprefix("file:")
        candidate, suffix = name, 2
        while candidate in names:
            candidate, suffix = f"{name}-{suffix}", suffix + 1
        names.append(candidate)
    return names


def check_dataset(uri: str | None, where: str) -> None:
    """A committed, non-empty dataset of a schema pretrain and midtrain read."""
    if not uri:
        raise TrainingInputError(f"{where}: no resolved uri (the run spec must carry committed URIs)")
    try:
        dataset = open_dataset(uri)
    except ManifestNotFoundError:
        raise TrainingInputError(f"{where}: no committed dataset at {uri} (its _manifest.json is missing)") from None
    except StoreError as error:
        raise TrainingInputError(f"{where}: cannot open dataset {uri}: {error}") from None
    if dataset.schema.name not in INPUT_SCHEMAS:
        raise TrainingInputError(
            f"{where}: dataset {uri} has schema {dataset.schema.name!r}; pretrain and midtrain read "
            f"{' or '.join(repr(name) for name in INPUT_SCHEMAS)}"
        )
    if dataset.manifest.summary.rows == 0:
        raise TrainingInputError(f"{where}: dataset {uri} is empty (its manifest lists no rows)")


def stage_datasets(spec: TrainingStageSpec, names: Sequence[str]) -> list[StageDataset]:
    """The stage's datasets with their length buckets, each checked in the store."""
    datasets = []
    for index, (dataset, name) in enumerate(zip(spec.datasets, names)):
        check_dataset(dataset.uri, f"datasets[{index}] ({name})")
        datasets.append(StageDataset(name, str(dataset.uri), dataset_buckets(spec, dataset)))
    return datasets


def load_sources(
    spec: TrainingStageSpec, datasets: Sequence[StageDataset], output: str, tokenizer: str, *, build: bool
) -> tuple[dict[str, TokenCacheSource], Sizes]:
    """Sampler sources and sequence counts from the token caches (built first when `build`)."""
    options = {"output": output, "tokenizer": tokenizer, "seq_len": spec.sequence_length}
    try:
        if build:
            build_stage_caches(datasets, use_ray=True, **options)
        sources, sizes = open_stage_sources(datasets, **options)
    except StoreError as error:
        raise TrainingInputError(f"datasets: {error}") from None
    for dataset in datasets:
        counts = sizes[dataset.name]
        if not (sum(counts.values()) if isinstance(counts, dict) else counts):
            raise TrainingInputError(f"datasets ({dataset.name}): dataset {dataset.uri} holds no text to train on")
    return sources, sizes


def prepare(doc: Mapping[str, Any], *, build_caches: bool = False) -> Prepared:
    """Validate the run spec against the model and the committed data; plan the mixture.

    `build_caches` (the driver) builds the token caches; without it (the workers) they must
    already be committed.
    """
    spec = parse_spec(doc)
    if spec.stage not in BUILT_STAGES:
        raise TrainingInputError(f"stage {spec.stage!r} is not built here")
    output = doc.get("output")
    if not output:
        raise TrainingInputError("the run spec has no output URI")
    model = resolve_model(spec)
    tokenizer = get_tokenizer(model.tokenizer_name)
    names = dataset_names(spec)
    extra: dict[str, Any] = {}
    if spec.stage == "sft":
        from tokenmill.trainer.data.chat import ChatMicroBatchIterator
        from tokenmill.trainer.train.sft import SftInputError, describe_sft, sft_sources

        try:
            sources, sizes, counts = sft_sources(spec, names, output, model.tokenizer_name, build=build_caches)
        except SftInputError as error:
            raise TrainingInputError(str(error)) from None
        extra = {"iterator": ChatMicroBatchIterator, "notes": describe_sft(counts)}
    elif spec.stage == "dpo":
        from tokenmill.trainer.train.dpo import DpoInputError, dpo_sources

        try:
            sources, sizes, extra = dpo_sources(spec, names, model, tokenizer)
        except DpoInputError as error:
            raise TrainingInputError(str(error)) from None
    else:
        datasets = stage_datasets(spec, names)
        sources, sizes = load_sources(spec, datasets, output, model.tokenizer_name, build=build_caches)
    try:
        # Pretraining data is weighted by tokens: the plan corrects for padded rows.
        tokens = stage_tokens(sources, sizes) if spec.stage in ("pretrain", "midtrain") else None
        plan = plan_for_stage(spec, sizes, names, tokens)
    except MixtureError as error:
        raise TrainingInputError(f"datasets: {error}") from None
    if plan.num_steps < 1:
        raise TrainingInputError("the stage has no optimizer step (totalTokens below one global batch)")
    return Prepared(dict(doc), spec, output, model, tokenizer, plan, sources, names, **extra)


def describe(prepared: Prepared) -> str:
    """A few lines for the driver log."""
    plan = prepared.plan
    lines = [
        f"model {prepared.model.config.name}: rope base {prepared.model.rope_theta:g}, "
        f"{prepared.model.max_positions} positions, tokenizer {prepared.model.tokenizer_name}",
        f"plan: {plan.num_steps} steps x {plan.global_batch_size} sequences x {plan.seq_len} tokens "
        f"= {plan.total_tokens:,} tokens",
    ]
    lines += prepared.notes
    for source in plan.sources:
        lines.append(
            f"  {source.name}: share {float(source.share):.1%}, {source.num_sequences} unique sequences, "
            f"{source.draws} draws ({source.epochs:.2f} epochs)"
        )
    if prepared.spec.stage in ("pretrain", "midtrain"):
        lines += filter_report(
            stage_datasets(prepared.spec, prepared.dataset_names), output=prepared.output,
            tokenizer=prepared.model.tokenizer_name, seq_len=prepared.spec.sequence_length,
        )
    return "\n".join(lines)
