"""The TrainingStage workload: `python -m tokenmill.trainer training-stage --spec <uri>`.

The driver reads the run spec, validates it against the model and the committed data, builds
the token caches and plans the mixture (`prepare`), all before any training; then it runs
`loop.train_loop` on Ray Train's `TorchTrainer` (one worker per GPU, or `ray.workers.replicas` CPU workers with gloo).
Our own checkpoints in the store are the source of truth for resuming: every attempt gets a
unique Ray Train run name, so Ray never resumes a run of its own, and when a worker dies Ray
Train restarts the worker group (up to `execution.maxWorkerRestarts` times), whose ranks load
the last committed checkpoint. The last act, after the
final checkpoint and the Hugging Face export are in the store, is the `succeeded` progress.
Stages sft (`sft.py`) and dpo (`dpo.py`) run on the same loop.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from typing import Any

from tokenmill.layout import hf_export_uri
from tokenmill.store import Progress, StoreError, open_store, read_progress, read_run_spec_at, write_progress
from tokenmill.workloads import PHASE_SUCCEEDED

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _error(message: str) -> None:
    print(f"tokenmill training-stage: {message}", file=sys.stderr, flush=True)


def run(spec_uri: str) -> int:
    try:
        doc = read_run_spec_at(spec_uri)
    except StoreError as error:
        _error(f"cannot read the run spec {spec_uri}: {error}")
        return EXIT_BAD_INPUT

    from tokenmill.trainer.train.prepare import TrainingInputError, describe, prepare

    started = time.monotonic()
    try:
        job = prepare(doc, build_caches=True)
    except TrainingInputError as error:
        _error(f"{error}; nothing was trained")
        return EXIT_BAD_INPUT
    print(describe(job), flush=True)
    output = job.output
    write_progress(output, Progress(phase="starting", done=0, total=job.plan.num_steps, unit="steps",
                                    message="starting Ray Train workers"))
    try:
        train(doc, job)
    except Exception as error:  # a failed worker: the next attempt resumes from the last checkpoint
        _error(f"training failed: {error}")
        write_progress(output, Progress(phase="failed", message=str(error)[:500]))
        return EXIT_FAILED
    if not open_store(hf_export_uri(output)).exists("config.json"):
        _error(f"training ended without a Hugging Face export at {hf_export_uri(output)}")
        return EXIT_FAILED
    seconds = time.monotonic() - started
    last = read_progress(output)  # the final step's metrics stay in the record
    write_progress(output, Progress(
        phase=PHASE_SUCCEEDED, done=job.plan.num_steps, total=job.plan.num_steps, unit="steps",
        message=f"trained {job.plan.total_tokens:,} tokens in {seconds:.0f} s; export at {hf_export_uri(output)}",
        metrics=dict(last.metrics) if last else {}))
    return 0


def train(doc: dict[str, Any], job: Any) -> None:
    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tokenmill.trainer.train.loop import LOG_EVERY_ENV, train_loop

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    workers = job.spec.ray.workers
    use_gpu = torch.cuda.is_available() and workers.gpus_per_worker > 0
    if use_gpu:
        scaling = ScalingConfig(num_workers=workers.replicas * workers.gpus_per_worker, use_gpu=True)
    else:
        scaling = ScalingConfig(num_workers=workers.replicas, use_gpu=False, resources_per_worker={"CPU": 1})
    name = doc.get("metadata", {}).get("name") or "training-stage"
    run_name = f"{name}-attempt{doc.get('attempt', 0)}-{uuid.uuid4().hex[:8]}"
    storage = os.environ.get("TOKENMILL_RAY_STORAGE") or os.path.join(tempfile.gettempdir(), "tokenmill-ray-train")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "doc": doc, "fingerprint": job.plan.fingerprint(),
            "log_every": os.environ.get(LOG_EVERY_ENV),
        },
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=job.spec.execution.max_worker_restarts),
        ),
    )
    trainer.fit()
