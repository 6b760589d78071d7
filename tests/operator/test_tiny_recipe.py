"""The same recipe folder applied to a cluster (kopf operator, Kubernetes emulator, KubeRay
stand-in running the real entrypoints) commits the same outputs as `tokenmill run`.

The recipe is the smaller variant of examples/tiny the resume test uses (a scripted-teacher
SyntheticDataJob feeding a pretraining stage with checkpoints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.operator.conftest import apply, phase_is
from tests.runner.tiny_variant import committed_outputs, write_variant
from tokenmill.api.recipe import absolute_uri


def cluster_documents(folder: Path) -> list[dict]:
    """The recipe's resources as `kubectl apply` sends them: relative file: URIs made absolute
    (the cluster has no recipe folder), namespace default."""
    documents = []
    for document in yaml.safe_load_all((folder / "recipe.yaml").read_text()):
        document["metadata"]["namespace"] = "default"
        for seed in document["spec"].get("seeds", []):
            if "uri" in seed:
                seed["uri"] = absolute_uri(seed["uri"], folder)
        documents.append(document)
    return documents


@pytest.mark.slow
async def test_the_tiny_recipe_through_the_operator_matches_the_local_run(kube, start_operator, standin, store_root,
                                                                          tmp_path):
    folder = write_variant(tmp_path / "recipe")
    local = tmp_path / "local"
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    done = subprocess.run([sys.executable, "-m", "tokenmill.cli", "run", str(folder), "--store", local.as_uri()],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    await start_operator()
    await standin(command=[sys.executable, "-m", "tokenmill.trainer"])
    for document in cluster_documents(folder):
        await apply(kube, document)
    synthetic = await phase_is(kube, "SyntheticDataJob", "exercises", "Succeeded", timeout=300)
    trained = await phase_is(kube, "TrainingStage", "pretrain", "Succeeded", timeout=300)

    prefix = synthetic["outputs"]["uri"].removeprefix(store_root).strip("/").removesuffix("syntheticdatajobs/exercises")
    assert trained["outputs"]["uri"] == f"{store_root}/{prefix}trainingstages/pretrain"
    assert committed_outputs(store_root, prefix) == committed_outputs(local.as_uri())
