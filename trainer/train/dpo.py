"""Stage dpo: direct preference optimisation against a frozen reference, on the training loop's parts.

Before training (`dpo_sources`, driver and workers alike): every dataset must be a committed
`preference_pairs` dataset; its pairs are loaded and checked (`trainer.data.pairs`), and the
reference model (`dpo.referenceModel`) must have the policy's architecture, vocabulary and
tokenizer. The mixture is planned over pairs: a pair counts as one sequence, so a step takes
`globalBatchSequences` pairs and the stage runs totalTokens / (globalBatchSequences x
sequenceLength) steps.

On the workers (`run_dpo`):
1. **Reference log-probs, once.** Unless `<output>/reference/` already holds them for these
   pairs and this reference, every rank runs the reference model over its share of every
   pair, rank 0 writes one array per dataset and the `_COMMITTED.json` marker last. A resumed
   or retried stage reads them back; the reference model is dropped before training starts.
2. **Training.** Each micro-batch is one forward of the policy over its pairs' sequences: a
   one-token pair is its prompt alone, both log-probs coming from the next-token distribution
   after it; other pairs are prompt + chosen and prompt + rejected. The loss is the sigmoid
   DPO loss, -log sigmoid(beta x ((pi_c - ref_c) - (pi_r - ref_r))), plus
   `dpo.chosenNllWeight` x the chosen completion's negative log-likelihood per token (0 by
   default: plain DPO), averaged over the global batch of pairs. Optimizer, schedule, parallelism, checkpoints, exact resume and the
   Hugging Face export are the pretraining loop's.
3. **Metrics**: loss, reward accuracy (share of pairs whose margin is positive), chosen and
   rejected rewards, margin, the chosen completion's NLL per token, and sequences forwarded per pair.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tokenmill.api.training import TrainingStageSpec
from tokenmill.layout import join
from tokenmill.store import CheckpointStore, Progress, StoreError, open_store, write_progress
from tokenmill.trainer.data.loader import MicroBatchIterator
from tokenmill.trainer.data.pairs import (
    PairInputError,
    PairSet,
    describe_pairs,
    dpo_loss,
    load_pairs,
    pair_batch,
    sequence_logps,
)
from tokenmill.trainer.data.sampler import MixtureSampler, rank_block
from tokenmill.trainer.model import build_model
from tokenmill.trainer.tokenizer import Tokenizer
from tokenmill.trainer.train import checkpoint as ckpt
from tokenmill.trainer.train.parallel import core, forward_precision, gradient_sync, host_group, parallelize, uses_fsdp

REFERENCE_DIR = "reference"
REFERENCE_MARKER = "_COMMITTED.json"
REFERENCE_FORMAT = 1


class DpoInputError(ValueError):
    """Input stage dpo cannot train on (the caller turns it into a TrainingInputError)."""


def check_reference(spec: TrainingStageSpec, policy: Any) -> str:
    """The reference checkpoint's URI, after checking it matches the policy's network and tokenizer."""
    from tokenmill.model_configs import get_model_config
    from tokenmill.trainer.train.prepare import TrainingInputError, split_checkpoint_uri

    assert spec.dpo is not None
    uri = spec.dpo.reference_model.uri
    if not uri:
        raise DpoInputError("dpo.referenceModel has no resolved uri (the run spec must carry committed URIs)")
    try:
        store, step = split_checkpoint_uri(uri)
        state = store.read_state(step)
    except (TrainingInputError, StoreError) as error:
        raise DpoInputError(f"dpo.referenceModel {uri}: no committed checkpoint ({error})") from None
    saved = state.get("model") or {}
    try:
        config = get_model_config(saved["config"])
    except KeyError as error:
        raise DpoInputError(f"dpo.referenceModel {uri}: unknown model config ({error})") from None
    tokenizer = saved.get("tokenizer") or config.tokenizer
    if config.vocab_size != policy.config.vocab_size or tokenizer != policy.tokenizer_name:
        raise DpoInputError(
            f"dpo.referenceModel {uri}: tokenizer {tokenizer!r} with a vocabulary of {config.vocab_size}, but the "
            f"policy uses {policy.tokenizer_name!r} with {policy.config.vocab_size}: log-probs of the same ids "
            "would not be comparable"
        )
    if config.name != policy.config.name:
        raise DpoInputError(
            f"dpo.referenceModel {uri}: architecture {config.name!r}, but the policy is {policy.config.name!r}"
        )
    return uri


def dpo_sources(
    spec: TrainingStageSpec, names: Sequence[str], model: Any, tokenizer: Tokenizer
) -> tuple[dict[str, PairSet], dict[str, int], dict[str, Any]]:
    """Every dataset's checked pairs, their counts, and the Prepared extras (notes, reference)."""
    from tokenmill.store import ManifestNotFoundError, SchemaValidationError

    reference = check_reference(spec, model)
    sources: dict[str, PairSet] = {}
    notes = ["pairs per dataset:"]
    for index, (dataset, name) in enumerate(zip(spec.datasets, names)):
        where = f"datasets[{index}] ({name})"
        if not dataset.uri:
            raise DpoInputError(f"{where}: no resolved uri (the run spec must carry committed URIs)")
        try:
            pairs = load_pairs(str(dataset.uri), name, tokenizer, model.config.vocab_size, spec.sequence_length)
        except ManifestNotFoundError:
            raise DpoInputError(
                f"{where}: no committed dataset at {dataset.uri} (its _manifest.json is missing)") from None
        except SchemaValidationError as error:
            raise DpoInputError(f"{where}: stage dpo reads 'preference_pairs': {error}") from None
        except PairInputError as error:
            raise DpoInputError(f"{where}: {error}") from None
        except StoreError as error:
            raise DpoInputError(f"{where}: cannot read dataset {dataset.uri}: {error}") from None
        notes.append(describe_pairs(pairs))
        if not pairs.num_sequences:
            raise DpoInputError(
                f"{where}: dataset {dataset.uri} has no pair to train on ({describe_pairs(pairs).strip()})")
        sources[name] = pairs
    sizes = {name: pairs.num_sequences for name, pairs in sources.items()}
    return sources, sizes, {"notes": notes, "reference_uri": reference}


class PairIterator(MicroBatchIterator):
    """This rank's micro-batches of pairs as ``[(source index, pair index), ...]``, resumable exactly."""

    def __next__(self) -> list[tuple[int, int]]:  # type: ignore[override]
        if self._index >= self.sampler.total:
            raise StopIteration
        start, stop = rank_block(self._index, self.rank, self.world_size, self.micro_batch_size)
        sources, pairs = self._step_draws(start, stop)
        self._index += self.world_size * self.micro_batch_size
        return [(int(s), int(p)) for s, p in zip(sources, pairs)]


# -- reference log-probs ------------------------------------------------------------------


def reference_key(job: Any) -> str:
    datasets = [[name, pairs.fingerprint, pairs.num_sequences] for name, pairs in job.sources.items()]
    key = {"format": REFERENCE_FORMAT, "reference": job.reference_uri, "tokenizer": job.model.tokenizer_name,
           "seq_len": job.spec.sequence_length, "datasets": datasets}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def read_reference(output: str, key: str, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The committed reference log-probs for `key`, or None."""
    store = open_store(join(output, REFERENCE_DIR))
    if not store.exists(REFERENCE_MARKER) or store.read_json(REFERENCE_MARKER).get("key") != key:
        return None
    return {name: np.load(io.BytesIO(store.read_bytes(f"{name}.npy"))) for name in names}


def write_reference(output: str, key: str, logps: dict[str, np.ndarray], reference_uri: str) -> None:
    store = open_store(join(output, REFERENCE_DIR))
    if store.exists(REFERENCE_MARKER):
        store.delete(REFERENCE_MARKER)
    for name, values in logps.items():
        buffer = io.BytesIO()
        np.save(buffer, values)
        store.write_bytes(f"{name}.npy", buffer.getvalue())
    store.write_json(REFERENCE_MARKER, {"key": key, "reference": reference_uri,
                                        "pairs": {name: int(v.shape[0]) for name, v in logps.items()}})


@torch.no_grad()
def reference_logps(
    job: Any, rank: int, world: int, device: torch.device, group: Any
) -> tuple[dict[str, np.ndarray], int]:
    """log ref(chosen | prompt), log ref(rejected | prompt) of every pair, [pairs, 2] per dataset,
    and the number of sequences the reference ran over, summed over the ranks.

    Each rank takes every world-th pair; the results are gathered on every rank.
    """
    setup, execution = job.model, job.spec.execution
    # On GPUs in bf16 the frozen reference is held in bf16 (DCP casts the checkpoint's fp32 weights).
    dtype = torch.bfloat16 if device.type == "cuda" and execution.precision == "bf16" else torch.float32
    reference = build_model(setup.config, setup.rope_theta, device, dtype=dtype, max_positions=setup.max_positions)
    ckpt.load_model_weights(job.reference_uri, reference, group=group)
    reference.eval()
    autocast = forward_precision(device, fsdp=False, precision=execution.precision)
    chunk = job.spec.optimization.micro_batch_sequences
    result: dict[str, np.ndarray] = {}
    sequences = 0
    for name, pairs in job.sources.items():
        mine = np.arange(rank, pairs.num_sequences, world)
        values = np.zeros((mine.size, 2), dtype=np.float64)
        for start in range(0, mine.size, chunk):
            indices = mine[start : start + chunk]
            batch = pair_batch([(pairs.prompts[i], pairs.chosen[i], pairs.rejected[i]) for i in indices],
                               job.tokenizer.pad_id).to(device)
            sequences += batch.forwards
            values[start : start + indices.size] = sequence_logps(reference, batch, autocast).double().cpu().numpy()
        gathered: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, (mine, values, sequences), group=group)
        else:
            gathered = [(mine, values, sequences)]
        full = np.zeros((pairs.num_sequences, 2), dtype=np.float64)
        for indices, part, _ in gathered:
            full[indices] = part
        result[name] = full
    total_sequences = sequences if world == 1 else sum(int(g[2]) for g in gathered)
    del reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, total_sequences


# -- training -----------------------------------------------------------------------------


def _all_reduce(value: torch.Tensor, group: Any) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, group=group)
    return value


def run_dpo(job: Any, rank: int, world: int, device: torch.device, *, log_every: int = 0) -> None:
    from tokenmill.trainer.train.loop import (
        MAX_LOG_INTERVAL,
        LearningRateSchedule,
        _load_history,
        _log,
        _save_history,
        parameter_groups,
    )

    spec, plan, setup = job.spec, job.plan, job.model
    opt, execution = spec.optimization, spec.execution
    assert spec.dpo is not None
    beta = float(spec.dpo.beta)
    chosen_nll_weight = float(spec.dpo.chosen_nll_weight)
    torch.manual_seed(execution.seed)
    group = host_group()
    names = list(job.sources)

    key = reference_key(job)
    reference = read_reference(job.output, key, names)
    if reference is None:
        started = time.perf_counter()
        reference, sequences = reference_logps(job, rank, world, device, group)
        if rank == 0:
            write_reference(job.output, key, reference, job.reference_uri)
        if dist.is_available() and dist.is_initialized():
            dist.barrier(group=group)
        total = sum(v.shape[0] for v in reference.values())
        _log(rank, f"reference log-probs of {total} pairs computed ({sequences} sequences forwarded) in "
                   f"{time.perf_counter() - started:.1f} s and committed to {join(job.output, REFERENCE_DIR)}")
    else:
        _log(rank, f"reference log-probs read back from {join(job.output, REFERENCE_DIR)}")
    reference_by_source = [torch.from_numpy(reference[name]) for name in plan.names]
    pair_sets = [job.sources[name] for name in plan.names]

    fsdp = uses_fsdp(execution.parallelism, device)
    on_gpu = device.type == "cuda"
    meta_init = fsdp and on_gpu  # each GPU materialises only its own shards; the weights come from the parent
    model = build_model(setup.config, setup.rope_theta, "meta" if meta_init else device,
                        max_positions=setup.max_positions, activation_checkpointing=execution.activation_checkpointing,
                        seed=None if meta_init else execution.seed)
    if execution.compile:
        for block in model.layers:
            block.compile()
    model = parallelize(model, device, fsdp=fsdp, precision=execution.precision, world=world)
    if meta_init:
        model.to_empty(device=device)
        core(model).init_weights()
    autocast = forward_precision(device, fsdp=fsdp, precision=execution.precision)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, opt.weight_decay), lr=opt.peak_learning_rate, betas=(opt.beta1, opt.beta2),
        eps=opt.epsilon, foreach=not on_gpu or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, LearningRateSchedule(opt.warmup_steps, plan.num_steps, opt.decay, opt.min_learning_rate_ratio))

    checkpoints = CheckpointStore.for_run(job.doc)  # this run's checkpoints only, fenced by attempt
    latest = checkpoints.latest()
    state: dict[str, Any] | None = None
    if latest is not None:
        state = ckpt.load(checkpoints, latest.step, model, optimizer, group=group)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"], rank, device)
        _log(rank, f"resumed from {latest.uri} (step {latest.step}, {state['pairs_seen']:,} pairs seen)")
    else:
        ckpt.load_model_weights(str(setup.parent_uri), model, group=group)
        _log(rank, f"initialised the policy from {setup.parent_uri} (optimizer state starts fresh)")

    batches = PairIterator(
        MixtureSampler(plan, execution.seed), job.sources, rank=rank, world_size=world,
        micro_batch_size=opt.micro_batch_sequences, eot_id=job.tokenizer.eot_id, pad_id=job.tokenizer.pad_id,
        state=None if state is None else state["sampler"],
    )
    step = 0 if state is None else int(state["step"])
    pairs_seen = 0 if state is None else int(state["pairs_seen"])
    tokens_seen = 0 if state is None else int(state["tokens_seen"])
    if step != batches.step:
        raise RuntimeError(f"checkpoint step {step} and data position (step {batches.step}) disagree")
    history = _load_history(job.output, step) if rank == 0 else []
    num_steps = plan.num_steps
    log_every = log_every or min(MAX_LOG_INTERVAL, max(1, num_steps // 25))
    clip = opt.gradient_clip if opt.gradient_clip > 0 else math.inf
    global_pairs = plan.global_batch_size
    _log(rank, f"training dpo (beta {beta:g}, chosen NLL weight {chosen_nll_weight:g}): steps {step}..{num_steps}, world {world} on {device.type}, "
               f"{batches.accumulation_steps} micro-batches of {opt.micro_batch_sequences} pairs per rank and step")
    model.train()
    window_start, window_pairs = time.perf_counter(), 0
    while step < num_steps:
        micro = [next(batches) for _ in range(batches.accumulation_steps)]
        # loss, accuracy, chosen reward, rejected reward, margin, sequences forwarded, tokens, chosen NLL per token
        sums = torch.zeros(8, dtype=torch.float64)
        for index, items in enumerate(micro):
            batch = pair_batch(
                [(pair_sets[s].prompts[i], pair_sets[s].chosen[i], pair_sets[s].rejected[i]) for s, i in items],
                job.tokenizer.pad_id).to(device)
            ref = torch.stack([reference_by_source[s][i] for s, i in items]).to(device)
            with gradient_sync(model, index == len(micro) - 1):
                policy = sequence_logps(model, batch, autocast)
                loss, figures = dpo_loss(policy, ref, beta, chosen_nll_weight, batch.lengths())
                (loss.sum() * (world / global_pairs)).backward()
            sums += torch.stack([
                loss.detach().sum(), figures["accuracy"].sum(), figures["chosen_reward"].sum(),
                figures["rejected_reward"].sum(), figures["margin"].sum(),
                torch.tensor(float(batch.forwards)), torch.tensor(float(batch.input_ids.numel())),
                figures["chosen_nll"].sum(),
            ]).double().cpu()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        totals = _all_reduce(sums, group)
        loss_value, accuracy, chosen, rejected, margin = (float(v) / global_pairs for v in totals[:5])
        pairs_seen += global_pairs
        tokens_seen += int(totals[6])
        window_pairs += global_pairs

        if step % log_every == 0 or step == num_steps:
            if on_gpu:
                torch.cuda.synchronize()
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            metrics = {
                "step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                "reward_accuracy": accuracy, "chosen_reward": chosen, "rejected_reward": rejected, "margin": margin,
                "chosen_nll": float(totals[7]) / global_pairs,
                "sequences_per_pair": float(totals[5]) / global_pairs, "pairs_per_s": window_pairs / elapsed,
                "pairs_seen": pairs_seen, "tokens_seen": tokens_seen,
            }
            _log(rank, f"step {step}/{num_steps} loss {loss_value:.4f} reward accuracy {accuracy:.3f} "
                       f"margin {margin:.4f} (chosen {chosen:.4f}, rejected {rejected:.4f}) "
                       f"chosen NLL {metrics['chosen_nll']:.4f} lr {lr:.3e} "
                       f"grad_norm {float(grad_norm):.3f} pairs/s {metrics['pairs_per_s']:,.1f}")
            if rank == 0:
                history.append(metrics)
                _save_history(job.output, history)
                write_progress(job.output, Progress(
                    phase="training", done=step, total=num_steps, unit="steps",
                    message=f"step {step}/{num_steps} loss {loss_value:.4f}", metrics=metrics))
            window_start, window_pairs = time.perf_counter(), 0

        if step % spec.checkpoint.interval_steps == 0 or step == num_steps:
            saved = {
                "stage": spec.stage, "tokens_seen": tokens_seen, "pairs_seen": pairs_seen,
                "sampler": batches.state_dict(), "scheduler": scheduler.state_dict(), "model": setup.to_state(),
                "loss": loss_value, "plan": plan.fingerprint(), "reference": key,
            }
            info = ckpt.save(checkpoints, step, model, optimizer, saved, rank, world, spec.checkpoint,
                             device=device, group=group)
            if info:
                _log(rank, f"checkpoint {info} committed")
            window_start = time.perf_counter()

    exported = ckpt.export_hf(job, model, rank, device)
    if exported:
        _log(rank, f"exported the Hugging Face model to {exported}")
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)
    _log(rank, f"finished dpo: {num_steps} steps, {pairs_seen:,} pairs")
