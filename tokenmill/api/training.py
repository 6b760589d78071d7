"""TrainingStage: one of pretrain, midtrain, sft, dpo over a weighted mixture of datasets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tokenmill.api.base import ApiModel
from tokenmill.api.common import EXACTLY_ONE_OF_REF_URI, CommonSpec, ModelSource, ObjectRef
from tokenmill.api.fields import Fraction, ShortText, StoreUri
from tokenmill.api.kinds import KindDescriptor, Resource, always

Stage = Literal["pretrain", "midtrain", "sft", "dpo"]
ORGANIC_MIN_TOKENS = 8_192
"""Midtraining's new organic data: documents over 8K tokens (RECIPE.md)."""
SYNTHETIC_MIN_TOKENS = 4_096
"""Midtraining's new synthetic data: samples over 4K tokens (RECIPE.md)."""


class MixtureComponent(ApiModel):
    """One dataset of the mixture with its share of tokens and its repeat limit."""

    cel_rules = (EXACTLY_ONE_OF_REF_URI,)

    ref: ObjectRef | None = None
    """The resource whose output dataset to read."""
    uri: StoreUri | None = None
    """A committed dataset prefix."""
    name: ShortText | None = None
    """Name in metrics and reports; defaults to the ref's name or the URI's last segment."""
    weight: float = Field(gt=0.0)
    """Relative share of the stage's tokens; shares are weight / sum of weights."""
    epochs: float = Field(default=1.0, gt=0.0, le=1000.0)
    """Most times this dataset may be repeated; its share must fit in unique tokens x epochs."""
    unique_tokens: int | None = Field(default=None, ge=1)
    """Declared unique tokens, for planning before the data exists; the committed manifest wins at run time."""
    role: Literal["new", "replay"] = "new"
    """midtrain: new long-context data or replay of pretraining data."""
    min_document_tokens: int | None = Field(default=None, ge=0, le=1_048_576)
    """Only documents of at least this many tokens are trained on (0 keeps all). Default: for
    new data in midtrain, 4096 from a SyntheticDataJob and 8192 otherwise (the report's
    synthetic samples over 4K and organic samples over 8K); 0 everywhere else."""


class LongDocumentBoost(ApiModel):
    """Up-weights documents at least minTokens long (midtraining's long-context data)."""

    min_tokens: int = Field(ge=1)
    """Documents with at least this many tokens are boosted."""
    factor: float = Field(gt=1.0, le=100.0)
    """Sampling weight multiplier."""


class ModelSpec(ApiModel):
    """The network to train: a named architecture from scratch, or a parent's checkpoint."""

    cel_rules = (
        {"rule": "has(self.config) != has(self.parent)", "message": "set exactly one of config or parent"},
    )

    config: ShortText | None = None
    """Architecture name (phi-4, tiny, ...) to initialise from scratch."""
    parent: ModelSource | None = None
    """Checkpoint to continue from: a TrainingStage's final checkpoint or a URI."""


class Optimization(ApiModel):
    """AdamW with linear warm-up, decay to a floor, and a constant global batch."""

    cel_rules = (
        {
            "rule": "self.globalBatchSequences % self.microBatchSequences == 0",
            "message": "globalBatchSequences must be a multiple of microBatchSequences",
        },
    )

    global_batch_sequences: int = Field(ge=1)
    """Sequences per optimizer step, held constant across world sizes by gradient accumulation."""
    micro_batch_sequences: int = Field(default=1, ge=1)
    """Sequences per device per forward pass."""
    peak_learning_rate: float = Field(gt=0.0, le=1.0)
    """Learning rate after warm-up."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up steps from zero."""
    decay: Literal["linear", "cosine", "constant"] = "linear"
    """Schedule after warm-up, down to peak x minLearningRateRatio at the last step."""
    min_learning_rate_ratio: Fraction = 0.0
    """Floor of the schedule as a fraction of the peak."""
    weight_decay: float = Field(default=0.1, ge=0.0, le=1.0)
    """Decoupled weight decay, applied to weight matrices only (not to normalisation gains)."""
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    """AdamW beta1."""
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    """AdamW beta2."""
    epsilon: float = Field(default=1e-8, gt=0.0)
    """AdamW epsilon."""
    gradient_clip: float = Field(default=1.0, ge=0.0)
    """Global gradient-norm clip; 0 disables it."""
    total_tokens: int = Field(ge=1)
    """Tokens the stage trains on; steps = totalTokens / (globalBatchSequences x sequenceLength)."""


class DpoSpec(ApiModel):
    """Direct preference optimisation against a frozen reference model."""

    beta: float = Field(default=0.1, gt=0.0, le=10.0)
    """Inverse temperature of the DPO loss."""
    chosen_nll_weight: float = Field(default=0.0, ge=0.0, le=100.0)
    """Weight of the chosen completion's negative log-likelihood per token added to the DPO loss (RPO); 0: plain DPO."""
    reference_model: ModelSource
    """The frozen reference policy, usually the SFT stage."""


class SftSpec(ApiModel):
    """How chat samples become training sequences (stage sft)."""

    packing: Literal["pack", "single"] = "pack"
    """pack: whole samples share a sequence, attention kept inside each; single: one sample per sequence."""
    over_long: Literal["truncate", "drop"] = "truncate"
    """A sample longer than the sequence is cut to it or dropped; either way it is counted."""


class CheckpointPolicy(ApiModel):
    """When checkpoints are written and which are kept."""

    interval_steps: int = Field(default=1000, ge=1)
    """Write a distributed checkpoint every this many steps (and at the end)."""
    keep_last: int = Field(default=3, ge=1, le=1000)
    """Keep the newest this many checkpoints."""
    keep_every: int | None = Field(default=None, ge=1)
    """Also keep every checkpoint whose step is a multiple of this."""


class Execution(ApiModel):
    """How the training loop runs on the workers."""

    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16: mixed precision with fp32 master weights and gradient reductions (FSDP2 computes
    in bf16 on any device, DDP under bf16 autocast on GPUs only); fp32: fp32 throughout."""
    parallelism: Literal["auto", "fsdp", "ddp"] = "auto"
    """fsdp: FSDP2, parameters, gradients and optimizer state sharded across workers; ddp: a full
    replica per worker; auto: fsdp on GPUs, ddp on CPUs."""
    compile: bool = False
    """torch.compile each transformer block."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass."""
    peak_flops_per_device: float = Field(default=989e12, gt=0.0)
    """Denominator of MFU: 989e12 is an H100's dense bf16 peak."""
    seed: int = Field(default=0, ge=0)
    """Seed of initialisation and data order."""
    max_worker_restarts: int = Field(default=3, ge=0, le=100)
    """Times Ray Train restarts the training workers within one attempt after one dies (a lost
    node, an out-of-memory kill); each restart resumes from the last committed checkpoint.
    After that the attempt fails and the resource's retries apply."""


class TrainingStageSpec(CommonSpec):
    """Trains or continues a model on a weighted mixture of datasets."""

    cel_rules = (
        {"rule": "self.stage != 'dpo' || has(self.dpo)", "message": "stage dpo needs dpo (beta and referenceModel)"},
        {"rule": "self.stage == 'dpo' || !has(self.dpo)", "message": "dpo is only allowed with stage dpo"},
        {"rule": "self.stage == 'sft' || !has(self.sft)", "message": "sft is only allowed with stage sft"},
        {"rule": "self.stage == 'pretrain' || has(self.model.parent)", "message": "stages midtrain, sft and dpo need model.parent"},
        {
            "rule": "self.stage == 'midtrain' || size(self.longDocumentBoost) == 0",
            "message": "longDocumentBoost is only allowed with stage midtrain",
        },
    )

    stage: Stage
    """pretrain, midtrain (long context), sft, or dpo (preference pairs)."""
    model: ModelSpec
    """What to train."""
    tokenizer: Literal["phi-4", "byte"] | None = None
    """Tokenizer; defaults to the architecture's."""
    datasets: list[MixtureComponent] = Field(min_length=1, max_length=64)
    """The data mixture."""
    long_document_boost: list[LongDocumentBoost] = Field(default_factory=list, max_length=8)
    """midtrain: sampling boosts for long documents (the largest matching factor applies)."""
    sequence_length: int = Field(ge=16, le=131072)
    """Tokens per training sequence."""
    rope_base: float | None = Field(default=None, gt=0.0)
    """RoPE base (theta); defaults to the architecture's or the parent's. Raise it to train past
    the positions the model was trained on (midtraining: 250000 for 16384)."""
    optimization: Optimization
    """Optimizer, schedule and batch."""
    sft: SftSpec | None = None
    """SFT settings (stage sft only; defaults apply when unset)."""
    dpo: DpoSpec | None = None
    """DPO settings (stage dpo only)."""
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    """Checkpointing and retention."""
    execution: Execution = Field(default_factory=Execution)
    """Precision, compilation, activation checkpointing, MFU peak, seed."""

    @model_validator(mode="after")
    def _default_length_filters(self) -> "TrainingStageSpec":
        """Fill in midtraining's length filter while the ref still tells synthetic from organic data."""
        for dataset in self.datasets:
            if dataset.min_document_tokens is None and self.stage == "midtrain" and dataset.role == "new":
                synthetic = dataset.ref is not None and dataset.ref.kind == "SyntheticDataJob"
                dataset.min_document_tokens = SYNTHETIC_MIN_TOKENS if synthetic else ORGANIC_MIN_TOKENS
        return self


class TrainingStage(Resource):
    kind: Literal["TrainingStage"]
    spec: TrainingStageSpec


DESCRIPTOR = KindDescriptor(
    kind="TrainingStage",
    plural="trainingstages",
    short_names=("ts", "stage"),
    prefix="ts",
    cli_name="training-stage",
    workload_module="tokenmill.trainer.train.workload",
    output="checkpoint",
    resource_model=TrainingStage,
    spec_model=TrainingStageSpec,
    dataset_fields=("spec.datasets",),
    model_fields=("spec.model.parent", "spec.dpo.referenceModel"),
    needs_gpus=always,
    extra_columns=({"name": "Stage", "type": "string", "jsonPath": ".spec.stage"},),
)
