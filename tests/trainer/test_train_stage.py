"""The TrainingStage workload end to end on CPU: real Ray Train, two gloo workers, tiny model."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.processes import kill_training_after_checkpoint
from tokenmill.layout import hf_export_uri, token_cache_uri
from tokenmill.store import CheckpointStore, open_dataset, open_store, read_progress, write_run_spec
from tokenmill.trainer.data.cache import bucket_uri
from tokenmill.trainer.data.midtrain import ALL_LENGTHS
from tokenmill.trainer.train import workload
from tokenmill.trainer.train.loop import read_history
from tokenmill.workloads import PHASE_SUCCEEDED

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_data", REPO / "examples" / "train-only" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)

SEQ = 64
BATCH = 8
STEPS = 12


@pytest.fixture(scope="module")
def docs_uri(tmp_path_factory) -> str:
    target = tmp_path_factory.mktemp("data") / "docs"
    make_data.write(target, 400)
    return target.as_uri()


def stage_spec(docs: str, **overrides: Any) -> dict[str, Any]:
    spec = {
        "stage": "pretrain",
        "model": {"config": "tiny"},
        "tokenizer": "byte",
        "datasets": [{"uri": docs, "name": "docs", "weight": 1.0, "epochs": 4}],
        "sequenceLength": SEQ,
        "optimization": {
            "globalBatchSequences": BATCH, "microBatchSequences": 2, "peakLearningRate": 3e-3,
            "warmupSteps": 2, "decay": "linear", "minLearningRateRatio": 0.1,
            "totalTokens": STEPS * BATCH * SEQ,
        },
        "checkpoint": {"intervalSteps": 4, "keepLast": 2},
        "execution": {"precision": "fp32", "seed": 7},
        "ray": {"workers": {"replicas": 2, "gpusPerWorker": 0}},
    }
    for key, value in overrides.items():
        spec[key] = value
    return spec


def write_spec(output: str, spec: dict[str, Any], name: str = "pretrain", attempt: int = 1) -> str:
    document = {"runSpecVersion": 1, "kind": "TrainingStage", "metadata": {"name": name},
                "attempt": attempt, "output": output, "spec": spec}
    return write_run_spec(output, document)


@pytest.fixture(scope="module")
def reference_run(ray_cluster, docs_uri, tmp_path_factory) -> tuple[str, list[float]]:
    """The default spec trained without interruption (DDP on CPU): its output and losses."""
    output = tmp_path_factory.mktemp("reference").as_uri()
    assert workload.run(write_spec(output, stage_spec(docs_uri))) == 0
    return output, [row["loss"] for row in read_history(output)]


def checkpoint_chunks(output: str, step: int, key: str) -> int:
    """How many pieces the distributed checkpoint stores tensor `key` in."""
    import torch.distributed.checkpoint as dcp

    directory = CheckpointStore.for_output(output).uri_for(step).removeprefix("file://")
    return len(dcp.FileSystemReader(directory).read_metadata().state_dict_metadata[key].chunks)


def test_pretrain_resume_and_hf_export(reference_run, docs_uri, tmp_path, capfd) -> None:
    full, losses = reference_run
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    final = read_progress(full)
    assert final.phase == PHASE_SUCCEEDED and final.metrics["step"] == STEPS  # the last figures stay
    assert CheckpointStore.for_output(full).steps() == [8, 12]  # keepLast 2
    state = CheckpointStore.for_output(full).read_state(12)
    assert state["tokens_seen"] == STEPS * BATCH * SEQ and len(state["rng"]) == 2
    # The data was tokenized once into the token cache in the store, one shard per input shard.
    cache = open_dataset(bucket_uri(token_cache_uri(full, "docs", "byte", SEQ), ALL_LENGTHS))
    assert [s.shard for s in cache.shards] == [s.shard for s in open_dataset(docs_uri).shards]
    assert cache.schema.name == "token_sequences" and cache.manifest.summary.rows > 0

    # Killed from outside once checkpoint 4 is committed: the rerun resumes from the last
    # committed checkpoint and trains exactly as the uninterrupted run did.
    broken = (tmp_path / "broken").as_uri()
    latest = kill_training_after_checkpoint(write_spec(broken, stage_spec(docs_uri)), broken, 4,
                                            tmp_path / "killed.log")
    assert 4 <= latest < STEPS
    assert read_progress(broken).phase != PHASE_SUCCEEDED
    capfd.readouterr()
    assert workload.run(write_spec(broken, stage_spec(docs_uri), attempt=2)) == 0
    resumed = [row["loss"] for row in read_history(broken)]
    assert resumed == pytest.approx(losses, abs=1e-6, rel=0)
    assert re.search(rf"resumed from \S+ \(step {latest}, ", capfd.readouterr().out)

    # DDP keeps whole replicas: each tensor is stored once, in one piece.
    assert checkpoint_chunks(full, 12, "model.embed.weight") == 1

    # The export loads in transformers and generates.
    transformers = pytest.importorskip("transformers")
    hf_dir = Path(hf_export_uri(full).removeprefix("file://"))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert type(model).__name__ == "Phi3ForCausalLM"
    inputs = tokenizer("The sun was", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 12
    assert isinstance(tokenizer.decode(out[0]), str)


def test_fsdp2_shards_the_checkpoint_and_resumes_like_ddp(reference_run, docs_uri, tmp_path) -> None:
    _, ddp_losses = reference_run
    spec = stage_spec(docs_uri, execution={"precision": "fp32", "seed": 7, "parallelism": "fsdp"})
    output = (tmp_path / "fsdp").as_uri()
    latest = kill_training_after_checkpoint(write_spec(output, spec), output, 4, tmp_path / "killed.log")
    assert 4 <= latest < STEPS
    # Each of the two ranks saved its own shard of every parameter and of its optimizer state.
    assert checkpoint_chunks(output, 4, "model.embed.weight") == 2
    assert workload.run(write_spec(output, spec, attempt=2)) == 0
    losses = [row["loss"] for row in read_history(output)]
    # The same training as DDP, up to the order of floating-point reductions.
    assert losses == pytest.approx(ddp_losses, rel=1e-4)
    assert open_store(hf_export_uri(output)).read_json("config.json")["torch_dtype"] == "float32"

    # bf16 mixed precision: compute in bf16, fp32 master weights; the curve stays close to fp32's.
    mixed = (tmp_path / "fsdp-bf16").as_uri()
    assert workload.run(write_spec(mixed, {**spec, "execution": {**spec["execution"], "precision": "bf16"}})) == 0
    bf16_losses = [row["loss"] for row in read_history(mixed)]
    assert bf16_losses == pytest.approx(ddp_losses, rel=3e-2)
    # ...and it really computed in bf16: a silently ignored bf16 would match fp32 to about 1e-6,
    # while bf16 rounding moves this curve by about 6e-4 relative at its largest.
    gap = max(abs(mixed_loss - loss) / loss for mixed_loss, loss in zip(bf16_losses, ddp_losses))
    assert gap > 2e-4


def train_worker_pids() -> list[int]:
    """Processes of Ray Train workers on this machine (their title starts ray::RayTrainWorker)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::RayTrainWorker"):
            pids.append(int(cmdline.parent.name))
    return pids


def kill_a_worker_after_checkpoint(output: str, step: int, done: threading.Event, killed: list[int]) -> None:
    """SIGKILL one training worker as soon as the checkpoint at `step` is committed."""
    checkpoints = CheckpointStore.for_output(output)
    while not done.is_set():
        latest = checkpoints.latest()
        pids = train_worker_pids()
        if latest is not None and latest.step >= step and pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(latest.step)
            return
        time.sleep(0.01)


def test_a_killed_worker_is_replaced_and_the_run_continues_exactly(ray_cluster, docs_uri, tmp_path, capfd) -> None:
    steps = 40
    spec = stage_spec(docs_uri, optimization={**stage_spec(docs_uri)["optimization"], "totalTokens": steps * BATCH * SEQ})
    reference = (tmp_path / "reference").as_uri()
    assert workload.run(write_spec(reference, spec)) == 0
    expected = [row["loss"] for row in read_history(reference)]
    capfd.readouterr()

    output = (tmp_path / "killed").as_uri()
    done, killed = threading.Event(), []
    killer = threading.Thread(target=kill_a_worker_after_checkpoint, args=(output, 4, done, killed))
    killer.start()
    try:
        code = workload.run(write_spec(output, spec))
    finally:
        done.set()
        killer.join()
    assert killed and killed[0] < steps, "no worker was killed while the run was training"
    assert code == 0  # the same attempt: Ray Train replaced the worker group
    out = capfd.readouterr().out
    assert "resumed from" in out
    assert [row["loss"] for row in read_history(output)] == pytest.approx(expected, abs=1e-6, rel=0)
    assert read_progress(output).phase == PHASE_SUCCEEDED
