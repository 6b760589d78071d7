"""Training against the S3 server: checkpoints, resume, midtraining from a parent and the export, all through S3."""

from __future__ import annotations

import re

import pytest

from tests.fixtures.processes import kill_training_after_checkpoint
from tests.trainer.test_train_stage import BATCH, SEQ, stage_spec, write_spec
from tokenmill.layout import hf_export_uri
from tokenmill.store import CheckpointStore, open_store, read_progress
from tokenmill.trainer.train import workload
from tokenmill.trainer.train.loop import read_history
from tokenmill.workloads import PHASE_SUCCEEDED

STEPS = 6


@pytest.fixture
def ray_with_s3_environment(s3_bucket):
    """A Ray started after the bucket's endpoint and credentials are in the environment, so workers inherit them."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    yield s3_bucket
    ray.shutdown()


def test_checkpoints_resume_and_export_on_s3(ray_with_s3_environment, tmp_path, capfd):
    from tests.trainer.test_train_stage import make_data

    bucket = ray_with_s3_environment
    docs = tmp_path / "docs"
    make_data.write(docs, 200)
    output = f"{bucket.uri}/runs/pretrain"
    spec = stage_spec(docs.as_uri(), checkpoint={"intervalSteps": 2, "keepLast": 2})
    spec["optimization"]["totalTokens"] = STEPS * BATCH * SEQ

    # killed from outside once the first checkpoint is committed
    latest = kill_training_after_checkpoint(write_spec(output, spec), output, 2, tmp_path / "killed.log")
    checkpoints = CheckpointStore.for_output(output)
    assert 2 <= latest < STEPS and checkpoints.latest().uri.startswith("s3://")

    capfd.readouterr()
    assert workload.run(write_spec(output, spec, attempt=2)) == 0
    assert re.search(rf"resumed from s3://\S+ \(step {latest}, ", capfd.readouterr().out)
    assert checkpoints.steps() == [STEPS - 2, STEPS]
    assert checkpoints.read_state(STEPS)["tokens_seen"] == STEPS * BATCH * SEQ
    assert len(read_history(output)) == STEPS
    assert open_store(hf_export_uri(output)).exists("config.json")
    assert read_progress(output).phase == PHASE_SUCCEEDED

    # Midtraining continues from the S3 checkpoint with a longer context and a larger RoPE base.
    midtrain_output = f"{bucket.uri}/runs/midtrain"
    parent = checkpoints.latest().uri
    midtrain = stage_spec(
        docs.as_uri(), stage="midtrain", model={"parent": {"uri": parent}}, sequenceLength=2 * SEQ * 4,
        ropeBase=250000.0, checkpoint={"intervalSteps": 2, "keepLast": 1},
    )
    # New long-context data and replay of the pretraining data (30/70); the test's documents are
    # short, so the length filter (tested elsewhere) is lowered.
    midtrain["datasets"] = [{**midtrain["datasets"][0], "minDocumentTokens": 1},
                            {**midtrain["datasets"][0], "name": "replay", "role": "replay"}]
    midtrain["optimization"] = {**spec["optimization"], "peakLearningRate": 3e-4, "globalBatchSequences": 4,
                                "totalTokens": 2 * 4 * 2 * SEQ * 4}
    assert workload.run(write_spec(midtrain_output, midtrain, name="midtrain")) == 0
    history = read_history(midtrain_output)
    assert len(history) == 2
    assert history[0]["loss"] < read_history(output)[0]["loss"], "midtraining must start from the trained parent"
    config = open_store(hf_export_uri(midtrain_output)).read_json("config.json")
    assert config["rope_theta"] == 250000.0 and config["max_position_embeddings"] == 2 * SEQ * 4
