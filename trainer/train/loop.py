"""The per-worker training loop that Ray Train's TorchTrainer runs on every rank.

- Parallelism (`parallel.py`): FSDP2 on GPUs and DDP over gloo on CPUs by default
  (`execution.parallelism`).
- Optimizer: AdamW; weight decay on parameters with two or more dimensions (the projection
  matrices, embedding and LM head), none on the RMSNorm gains.
- Batch: the global batch in sequences is fixed; each rank accumulates
  globalBatch / (world x microBatch) micro-batches. The loss of a step is the sum of token
  losses over the whole global batch divided by its number of label tokens, whatever the world
  size (each rank scales by world / global tokens because DDP and FSDP average gradients).
- Checkpoints (`checkpoint.py`) every intervalSteps and at the end; on start the latest
  committed checkpoint of this output is loaded and the run continues exactly.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenmill.layout import join
from tokenmill.store import CheckpointStore, Progress, open_store, write_progress
from tokenmill.trainer.data.packing import IGNORE_INDEX
from tokenmill.trainer.data.sampler import MixtureSampler
from tokenmill.trainer.model import build_model, flops_per_token, mfu
from tokenmill.trainer.train import checkpoint as ckpt
from tokenmill.trainer.train.parallel import (
    core,
    forward_precision,
    gradient_sync,
    host_group,
    parallelize,
    uses_fsdp,
)
from tokenmill.trainer.train.prepare import Prepared, prepare

LOG_EVERY_ENV = "TOKENMILL_TRAIN_LOG_EVERY"
"""Log a metrics line every this many steps (default: about 25 lines per stage, and at least
every `MAX_LOG_INTERVAL` steps)."""
MAX_LOG_INTERVAL = 100
METRICS_NAME = "train_metrics.jsonl"
"""Per-logged-step metrics under `<output>/_run/`, rewritten by rank 0 at every log line."""


class LearningRateSchedule:
    """Multiplier of the peak LR: linear warm-up from 0, then linear/cosine decay to the floor at the last step."""

    def __init__(self, warmup_steps: int, total_steps: int, decay: str, floor: float) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.decay = str(decay)
        self.floor = float(floor)

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.floor + (1.0 - self.floor) * shape


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _all_reduce(value: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum a host tensor over the ranks on `group` (a process group that serves CPU tensors)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, group=group)
    return value


def _log(rank: int, text: str) -> None:
    # Written to the stream rather than print()ed: Ray Train patches print() on its workers to
    # also log each line, which would reach the driver twice.
    if rank == 0:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; `config`: the run spec ("doc"), the driver's plan fingerprint, log_every."""
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    job = prepare(config["doc"])
    if job.plan.fingerprint() != config["fingerprint"]:
        raise RuntimeError("this worker planned a different mixture than the driver (data changed under the run?)")
    if torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    run(job, rank, world, device, log_every=int(config.get("log_every") or 0))


def run(job: Prepared, rank: int, world: int, device: torch.device, *, log_every: int = 0) -> None:
    if job.spec.stage == "dpo":
        from tokenmill.trainer.train.dpo import run_dpo

        return run_dpo(job, rank, world, device, log_every=log_every)
    spec, plan, setup = job.spec, job.plan, job.model
    opt, execution = spec.optimization, spec.execution
    torch.manual_seed(execution.seed)
    on_gpu = device.type == "cuda"
    group = host_group()
    fsdp = uses_fsdp(execution.parallelism, device)
    meta_init = fsdp and on_gpu  # each GPU materialises only its own shards
    model = build_model(
        setup.config, setup.rope_theta, "meta" if meta_init else device, max_positions=setup.max_positions,
        activation_checkpointing=execution.activation_checkpointing, seed=None if meta_init else execution.seed,
    )
    if execution.compile:
        for block in model.layers:
            block.compile()
    model = parallelize(model, device, fsdp=fsdp, precision=execution.precision, world=world)
    if meta_init:
        model.to_empty(device=device)
        torch.manual_seed(execution.seed)
        core(model).init_weights()
    autocast = forward_precision(device, fsdp=fsdp, precision=execution.precision)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, opt.weight_decay), lr=opt.peak_learning_rate, betas=(opt.beta1, opt.beta2),
        eps=opt.epsilon, foreach=not on_gpu or None,
    )
    schedule = LearningRateSchedule(opt.warmup_steps, plan.num_steps, opt.decay, opt.min_learning_rate_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    checkpoints = CheckpointStore.for_run(job.doc)  # this run's checkpoints only, fenced by attempt
    latest = checkpoints.latest()
    state: dict[str, Any] | None = None
    if latest is not None:
        state = ckpt.load(checkpoints, latest.step, model, optimizer, group=group)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"], rank, device)
        _log(rank, f"resumed from {latest.uri} (step {latest.step}, {state['tokens_seen']:,} tokens seen)")
    elif setup.parent_uri:
        ckpt.load_model_weights(setup.parent_uri, model, group=group)
        _log(rank, f"initialised the model weights from {setup.parent_uri} (optimizer state starts fresh)")

    tokenizer = job.tokenizer
    batches = job.iterator(  # MicroBatchIterator; sft: labels on assistant tokens only
        MixtureSampler(plan, execution.seed), job.sources, rank=rank, world_size=world,
        micro_batch_size=opt.micro_batch_sequences, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id,
        state=None if state is None else state["sampler"],
    )
    step = 0 if state is None else int(state["step"])
    tokens_seen = 0 if state is None else int(state["tokens_seen"])
    history = _load_history(job.output, step) if rank == 0 else []
    if step != batches.step:
        raise RuntimeError(f"checkpoint step {step} and data position (step {batches.step}) disagree")

    num_steps = plan.num_steps
    log_every = log_every or min(MAX_LOG_INTERVAL, max(1, num_steps // 25))
    flops = flops_per_token(setup.config, plan.seq_len)
    step_tokens = plan.global_batch_size * plan.seq_len
    clip = opt.gradient_clip if opt.gradient_clip > 0 else math.inf
    vocab = setup.config.vocab_size
    _log(rank, f"training {spec.stage}: steps {step}..{num_steps}, world {world} on {device.type}, "
               f"{batches.accumulation_steps} micro-batches of {opt.micro_batch_sequences} per rank and step")
    model.train()
    # The logging window runs across checkpoints, so a resumed run restores it: its first logged
    # figures then equal an uninterrupted run's.
    window_tokens, window_labels = (0, 0.0) if state is None else tuple(state.get("window") or (0, 0.0))
    timed_start, timed_tokens = time.perf_counter(), 0  # throughput: checkpoint time left out
    while step < num_steps:
        micro = [next(batches) for _ in range(batches.accumulation_steps)]
        label_tokens = torch.tensor(float(sum(int((m.labels != IGNORE_INDEX).sum()) for m in micro)))
        global_labels = _all_reduce(label_tokens.clone(), group).item()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for index, batch in enumerate(micro):
            with gradient_sync(model, index == len(micro) - 1):
                with autocast:
                    logits = model(batch.input_ids.to(device), document_ids=batch.doc_ids.to(device))
                token_loss = F.cross_entropy(
                    logits.float().reshape(-1, vocab), batch.labels.to(device).reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="sum",
                )
                (token_loss * (world / global_labels)).backward()
            loss_sum += token_loss.detach().double().cpu()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens
        window_tokens += step_tokens
        timed_tokens += step_tokens
        window_labels += global_labels
        loss = _all_reduce(loss_sum, group).item() / global_labels

        if step % log_every == 0 or step == num_steps:
            if on_gpu:
                torch.cuda.synchronize()
            tokens_per_s = timed_tokens / max(time.perf_counter() - timed_start, 1e-9)
            metrics = {
                "step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_s,
                "mfu": mfu(tokens_per_s, flops, execution.peak_flops_per_device, world),
                "tokens_seen": tokens_seen,
                "trained_token_share": window_labels / max(window_tokens, 1),
            }
            _log(rank, f"step {step}/{num_steps} loss {loss:.4f} lr {lr:.3e} grad_norm {float(grad_norm):.3f} "
                       f"tokens/s {tokens_per_s:,.0f} mfu {metrics['mfu']:.2%}")
            if rank == 0:
                history.append(metrics)
                _save_history(job.output, history)
                write_progress(job.output, Progress(
                    phase="training", done=step, total=num_steps, unit="steps",
                    message=f"step {step}/{num_steps} loss {loss:.4f}", metrics=metrics))
            window_tokens, window_labels = 0, 0.0
            timed_start, timed_tokens = time.perf_counter(), 0

        if step % spec.checkpoint.interval_steps == 0 or step == num_steps:
            saved = {
                "stage": spec.stage, "tokens_seen": tokens_seen, "sampler": batches.state_dict(),
                "scheduler": scheduler.state_dict(), "model": setup.to_state(), "loss": loss,
                "plan": plan.fingerprint(), "window": (window_tokens, window_labels),
            }
            info = ckpt.save(checkpoints, step, model, optimizer, saved, rank, world, spec.checkpoint,
                             device=device, group=group)
            if info:
                _log(rank, f"checkpoint {info} committed")
            timed_start, timed_tokens = time.perf_counter(), 0

    exported = ckpt.export_hf(job, model, rank, device)
    if exported:
        _log(rank, f"exported the Hugging Face model to {exported}")
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)
    _log(rank, f"finished {spec.stage}: {num_steps} steps, {tokens_seen:,} tokens")


def _history_store(output: str):
    return open_store(join(output, "_run"))


def _load_history(output: str, step: int) -> list[dict[str, Any]]:
    store = _history_store(output)
    if not store.exists(METRICS_NAME):
        return []
    lines = store.read_bytes(METRICS_NAME).decode().splitlines()
    return [row for row in map(json.loads, filter(None, lines)) if row["step"] <= step]


def _save_history(output: str, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in history)
    _history_store(output).write_bytes(METRICS_NAME, text.encode())


def read_history(output: str) -> list[dict[str, Any]]:
    """The logged per-step metrics of a stage (for tests and reports)."""
    return _load_history(output, sys.maxsize)
