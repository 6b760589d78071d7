"""A smaller variant of examples/tiny for the resume and operator tests: a scripted-teacher
SyntheticDataJob and a pretraining stage with checkpoints (the tiny recipe's seed and
evaluation data), plus its evaluation.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tokenmill.store import open_store

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny"
RECIPE = """\
apiVersion: tokenmill.dev/v1alpha1
kind: SyntheticDataJob
metadata: {name: exercises}
spec:
  seeds: [{uri: "file:data/seeds"}]
  datasetType: documents
  workflow: [{type: rewrite, rewrite: {targets: [exercise, discussion]}}]
  generator: {engine: scripted}
  seed: 8
  ray: {workers: {replicas: 1, gpusPerWorker: 0, cpusPerWorker: "1"}}
---
apiVersion: tokenmill.dev/v1alpha1
kind: TrainingStage
metadata: {name: pretrain}
spec:
  stage: pretrain
  model: {config: tiny}
  datasets: [{ref: {kind: SyntheticDataJob, name: exercises}, weight: 1, epochs: 4}]
  sequenceLength: 64
  optimization: {globalBatchSequences: 4, microBatchSequences: 4, peakLearningRate: 0.003, warmupSteps: 2,
                 totalTokens: 6144}
  checkpoint: {intervalSteps: 4, keepLast: 1}
  execution: {precision: fp32, seed: 5}
  ray: {workers: {replicas: 1, gpusPerWorker: 0}}
"""
EVALUATION = {"problems": "file:data/eval", "oracle": "math", "models": {"pretrain": "TrainingStage/pretrain"},
              "samples": 2, "temperature": 1.0, "maxTokens": 16, "seed": 0}
STAGES = ("syntheticdatajobs/exercises", "trainingstages/pretrain")


def write_variant(folder: Path) -> Path:
    (folder / "data").mkdir(parents=True)
    for name in ("seeds", "eval"):
        shutil.copytree(TINY / "data" / name, folder / "data" / name)
    (folder / "recipe.yaml").write_text(RECIPE)
    (folder / "evaluation.json").write_text(json.dumps(EVALUATION))
    return folder


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    return write_variant(tmp_path / "recipe")


def committed_outputs(root: str, prefix: str = "") -> dict:
    """What a run committed, without times: the dataset's shard checksums, the checkpoints, the losses."""
    store = open_store(root)
    manifest = store.read_json(f"{prefix}syntheticdatajobs/exercises/data/_manifest.json")
    history = store.read_bytes(f"{prefix}trainingstages/pretrain/_run/train_metrics.jsonl").decode().splitlines()
    return {
        "shards": [(s["shard"], s["rows"], s["sha256"]) for s in manifest["shards"]],
        "checkpoints": store.list_dirs(f"{prefix}trainingstages/pretrain/checkpoints"),
        "losses": [(row["step"], round(row["loss"], 5)) for row in map(json.loads, history)],
    }



