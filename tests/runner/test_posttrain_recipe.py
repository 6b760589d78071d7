"""Stages sft then dpo through `tokenmill run` with the real training entrypoint
(`python -m tokenmill.trainer training-stage --spec <uri>`), on a tiny model with two CPU workers."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.posttrain_data import one_token_pair, write_chats, write_pairs, write_parent
from tokenmill.store import CheckpointStore, open_store, read_progress
from tokenmill.trainer.train.loop import read_history
from tokenmill.workloads import PHASE_SUCCEEDED

RECIPE = """\
apiVersion: tokenmill.dev/v1alpha1
kind: TrainingStage
metadata: {{name: dpo}}
spec:
  stage: dpo
  model: {{parent: {{ref: {{kind: TrainingStage, name: sft}}}}}}
  dpo: {{beta: 0.5, referenceModel: {{ref: {{kind: TrainingStage, name: sft}}}}}}
  datasets: [{{uri: "file:pairs", name: pts, weight: 1, epochs: 10}}]
  sequenceLength: 64
  optimization: {{globalBatchSequences: 8, microBatchSequences: 4, peakLearningRate: 0.001, totalTokens: 3072}}
  checkpoint: {{intervalSteps: 3, keepLast: 1}}
  execution: {{precision: fp32, seed: 2}}
  ray: {{workers: {{replicas: 2, gpusPerWorker: 0}}}}
---
apiVersion: tokenmill.dev/v1alpha1
kind: TrainingStage
metadata: {{name: sft}}
spec:
  stage: sft
  model: {{parent: {{uri: "{parent}"}}}}
  datasets: [{{uri: "file:chats", name: chats, weight: 1, epochs: 10}}]
  sequenceLength: 64
  sft: {{packing: pack, overLong: drop}}
  optimization: {{globalBatchSequences: 8, microBatchSequences: 4, peakLearningRate: 0.003, totalTokens: 3072}}
  checkpoint: {{intervalSteps: 3, keepLast: 1}}
  execution: {{precision: fp32, seed: 1}}
  ray: {{workers: {{replicas: 2, gpusPerWorker: 0}}}}
"""


@pytest.mark.slow
def test_sft_then_dpo_through_tokenmill_run(write_recipe, tmp_path: Path) -> None:
    parent = write_parent(tmp_path / "pretrain")
    folder = write_recipe(recipe=RECIPE.format(parent=parent))
    write_chats(folder / "chats", 120)
    rng = random.Random(0)
    write_pairs(folder / "pairs", [one_token_pair(i, rng) for i in range(40)])
    store = tmp_path / "store"
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    done = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "run", str(folder), "--store", store.as_uri()],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    sft, dpo = (store / "trainingstages" / name for name in ("sft", "dpo"))
    for output in (sft, dpo):
        assert read_progress(output.as_uri()).phase == PHASE_SUCCEEDED
        assert CheckpointStore.for_output(output.as_uri()).latest().step == 6
        assert open_store((output / "hf").as_uri()).exists("config.json")
    assert "trained_token_share" in read_history(sft.as_uri())[-1]
    last = read_history(dpo.as_uri())[-1]
    assert last["sequences_per_pair"] == 1.0 and last["reward_accuracy"] > 0.9
    # The dpo stage started from sft's final checkpoint, which was also its reference.
    assert open_store((dpo / "reference").as_uri()).read_json("_COMMITTED.json")["reference"].startswith(sft.as_uri())
