"""A TrainingStage through the operator with the real workload: the stand-in runs the RayJob's
entrypoint, `python -m tokenmill.trainer training-stage --spec <uri>`, unchanged (a local Ray in
the subprocess, two CPU workers with gloo)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO
from tests.operator.conftest import apply, phase_is, rayjobs, stage
from tokenmill.store import CheckpointStore

_spec = importlib.util.spec_from_file_location("make_data", REPO / "examples" / "train-only" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)


@pytest.mark.slow
async def test_training_stage_with_the_real_workload(kube, start_operator, standin, store_root, tmp_path):
    docs = tmp_path / "docs"
    make_data.write(docs, 400)
    await start_operator()
    runner = await standin(command=[sys.executable, "-m", "tokenmill.trainer"])
    document = stage("tiny", datasets=[{"uri": docs.as_uri(), "name": "docs", "weight": 1.0, "epochs": 4}],
                     tokenizer="byte", sequenceLength=64,
                     optimization={"globalBatchSequences": 8, "microBatchSequences": 2, "peakLearningRate": 3e-3,
                                   "warmupSteps": 2, "totalTokens": 12 * 8 * 64},
                     checkpoint={"intervalSteps": 4, "keepLast": 2}, execution={"precision": "fp32", "seed": 7})
    await apply(kube, document)
    done = await phase_is(kube, "TrainingStage", "tiny", "Succeeded", timeout=240)
    assert runner.runs["ts-tiny-1"].returncode == 0
    latest = CheckpointStore.for_output(done["outputs"]["uri"]).latest()
    assert latest is not None and done["outputs"]["checkpoint"] == latest.uri and latest.step == 12
    assert done["outputs"]["hfExport"].endswith("/trainingstages/tiny/hf")
    assert [job["metadata"]["name"] for job in rayjobs(kube)] == ["ts-tiny-1"]
