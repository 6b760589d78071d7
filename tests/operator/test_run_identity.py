"""A resource never adopts another run's outputs: checkpoints and exports name their producer."""

from __future__ import annotations

import json
from pathlib import Path

from tests.operator.conftest import KINDS, apply, commit_dataset, eventually, get, phase_is, stage
from tests.operator.standin import Behaviour
from tokenmill.layout import hf_export_uri
from tokenmill.outputs import check_outputs
from tokenmill.store import EXPORT_PRODUCER_NAME, CheckpointStore, Producer, open_store, write_run_spec


def run_spec(output: str, uid: str) -> dict:
    return {"kind": "TrainingStage", "metadata": {"name": "pretrain", "uid": uid, "generation": 1},
            "output": output, "attempt": 1, "spec": {}}


def test_the_output_check_ignores_another_resources_checkpoints_and_export(tmp_path: Path) -> None:
    output = (tmp_path / "out").as_uri()
    write_run_spec(output, run_spec(output, "uid-old"))
    with CheckpointStore.for_run(run_spec(output, "uid-old")).staging(30, {}) as directory:
        (directory / "weights.bin").write_bytes(b"w")
    export = open_store(hf_export_uri(output))
    export.write_json(EXPORT_PRODUCER_NAME, Producer("TrainingStage", "pretrain", "uid-old", 1, 1).to_dict())
    export.write_json("config.json", {"model_type": "phi3"})
    assert check_outputs("TrainingStage", output, "uid-old").committed
    report = check_outputs("TrainingStage", output, "uid-new")
    assert not report.committed and "no committed checkpoint" in report.message


async def test_a_stage_recreated_under_the_same_name_does_not_resume_from_the_old_one(
        kube, start_operator, standin, store_root, tmp_path):
    commit_dataset(f"{store_root}/tokens")
    report = tmp_path / "report.jsonl"
    await start_operator()
    await standin(policy=lambda job: Behaviour(env={"FAKE_REPORT": str(report)}))
    document = stage("pretrain", datasets=[{"name": "web", "uri": f"{store_root}/tokens", "weight": 1.0,
                                            "uniqueTokens": 100000}])
    await apply(kube, document)
    first = await phase_is(kube, "TrainingStage", "pretrain", "Succeeded")
    await kube.delete(KINDS["TrainingStage"], "default", "pretrain")  # deletePolicy Retain: outputs stay
    await eventually(lambda: get(kube, "TrainingStage", "pretrain") is None)

    await apply(kube, document)
    second = await phase_is(kube, "TrainingStage", "pretrain", "Succeeded")
    runs = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(run["written"], run["skipped"]) for run in runs] == [([10, 20, 30], []), ([10, 20, 30], [])]
    uid = get(kube, "TrainingStage", "pretrain")["metadata"]["uid"]
    latest = CheckpointStore.for_output(second["outputs"]["uri"]).latest()
    assert latest is not None and latest.producer is not None and latest.producer.uid == uid
    assert first["outputs"]["uri"] == second["outputs"]["uri"]
