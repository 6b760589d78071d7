"""The training loop under a process group that serves one device type only, as NCCL does.

On GPUs Ray Train starts NCCL, which reduces CUDA tensors only; a collective over a host tensor
fails there at the first step. A gloo group restricted to CUDA (``cuda:gloo``) fails the same
way on a CPU-only machine ("No backend type associated with device type cpu"), so this test
catches such a collective without a GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tokenmill.store import CheckpointStore, write_run_spec
from tokenmill.trainer.data.stage import build_stage_caches
from tokenmill.trainer.train.loop import StopForTest, read_history, run
from tokenmill.trainer.train.prepare import dataset_names, prepare, stage_datasets

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_data", REPO / "examples" / "train-only" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)

SEQ, BATCH, STEPS = 32, 4, 3


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
def test_the_loop_trains_checkpoints_and_resumes_under_a_cuda_only_group(tmp_path, cuda_only_group) -> None:
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
    write_run_spec(output, doc)
    job = prepare_without_ray(doc)
    with pytest.raises(StopForTest):  # label counts, loss, RNG gather, checkpoint, barrier
        run(job, 0, 1, torch.device("cpu"), stop_after=2)
    assert CheckpointStore.for_output(output).steps() == [2]
    # A fresh start loads that checkpoint (the checkpoint's collectives on load), then exports.
    run(prepare_without_ray(doc), 0, 1, torch.device("cpu"))
    assert [row["step"] for row in read_history(output)] == [1, 2, 3]
    assert CheckpointStore.for_output(output).latest().step == STEPS


def prepare_without_ray(doc):
    from tokenmill.trainer.train.prepare import parse_spec

    spec = parse_spec(doc)
    names = dataset_names(spec)
    build_stage_caches(stage_datasets(spec, names), output=doc["output"], tokenizer="byte", seq_len=SEQ,
                       use_ray=False)
    return prepare(doc)
