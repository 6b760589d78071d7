"""The training loop under a process group that serves one device type only, as NCCL does.

On GPUs Ray Train starts NCCL, which reduces CUDA tensors only; a collective over a host tensor
fails there at the first step. A gloo group restricted to CUDA (``cuda:gloo``) fails the same
way on a CPU-only machine ("No backend type associated with device type cpu"), so this test
catches such a collective without a GPU.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.fixtures.processes import kill_after_checkpoint, start_in_session
from tokenmill.store import CheckpointStore, write_run_spec
from tokenmill.trainer.data.stage import build_stage_caches
from tokenmill.trainer.train.loop import read_history, run
from tokenmill.trainer.train.prepare import dataset_names, prepare, stage_datasets

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_data", REPO / "examples" / "train-only" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)

SEQ, BATCH, STEPS = 32, 4, 16
LOOP_PROCESS = Path(__file__).with_name("cuda_only_loop.py")


@pytest.fixture
def cuda_only_group(tmp_path):
    """A one-rank default group whose only backend is for CUDA tensors."""
    assert not dist.is_initialized()
    dist.init_process_group("cuda:gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.ones(1))  # the group really refuses host tensors
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_loop_trains_checkpoints_and_resumes_under_a_cuda_only_group(tmp_path, cuda_only_group, capsys) -> None:
    docs = tmp_path / "docs"
    make_data.write(docs, 60)
    output = (tmp_path / "out").as_uri()
    doc = {
        "runSpecVersion": 1, "kind": "TrainingStage", "metadata": {"name": "collectives"}, "attempt": 1,
        "output": output,
        "spec": {
            "stage": "pretrain", "model": {"config": "tiny"}, "tokenizer": "byte",
            "datasets": [{"uri": docs.as_uri(), "name": "docs", "weight": 1.0, "epochs": 10}],
            "sequenceLength": SEQ,
            "optimization": {"globalBatchSequences": BATCH, "microBatchSequences": 2, "peakLearningRate": 1e-3,
                             "totalTokens": STEPS * BATCH * SEQ},
            "checkpoint": {"intervalSteps": 2},
            "execution": {"precision": "fp32", "parallelism": "ddp"},
            "ray": {"workers": {"replicas": 1, "gpusPerWorker": 0}},
        },
    }
    spec_uri = write_run_spec(output, doc)
    prepare_without_ray(doc)  # the token caches
    # The loop in a process of its own under such a group (label counts, loss, RNG gather,
    # checkpoint), killed from outside once its first checkpoint is committed.
    log = tmp_path / "killed.log"
    process = start_in_session([sys.executable, str(LOOP_PROCESS), spec_uri, str(tmp_path / "loop-rendezvous")], log)
    latest = kill_after_checkpoint(process, output, 2, log)
    assert 2 <= latest < STEPS
    # A fresh start in this process loads that checkpoint (the checkpoint's collectives on load),
    # trains on, checkpoints and exports (the barrier at the end).
    run(prepare(doc), 0, 1, torch.device("cpu"))
    assert re.search(rf"resumed from \S+ \(step {latest}, ", capsys.readouterr().out)
    assert [row["step"] for row in read_history(output)] == list(range(1, STEPS + 1))
    assert CheckpointStore.for_output(output).latest().step == STEPS


def prepare_without_ray(doc):
    from tokenmill.trainer.train.prepare import parse_spec

    spec = parse_spec(doc)
    names = dataset_names(spec)
    build_stage_caches(stage_datasets(spec, names), output=doc["output"], tokenizer="byte", seq_len=SEQ,
                       use_ray=False)
    return prepare(doc)
