"""Inputs: refs wait for their resource to succeed, fail with it, and URIs wait for a commit."""

from __future__ import annotations

from tests.operator.conftest import (
    apply,
    commit_dataset,
    condition,
    corpus,
    eventually,
    phase_is,
    rayjobs,
    ref,
    stage,
    status,
)
from tests.operator.standin import Behaviour
from tokenmill.operator import naming


async def test_failed_input_fails_the_reader(kube, start_operator, standin, store_root):
    commit_dataset(f"{store_root}/raw")
    await start_operator()
    fails = lambda job: Behaviour(env={"FAKE_FAIL_AFTER_SHARDS": "1"})  # noqa: E731
    await standin(policy=fails)
    await apply(kube, stage("pretrain", datasets=[{**ref("CorpusFilter", "web"), "weight": 1.0,
                                                   "uniqueTokens": 100000}]))
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}], backoffLimit=0))
    waiting = await phase_is(kube, "TrainingStage", "pretrain", "Waiting")
    assert waiting["attempts"] == 0
    await phase_is(kube, "CorpusFilter", "web", "Failed")
    failed = await phase_is(kube, "TrainingStage", "pretrain", "Failed")
    assert failed["reason"] == "InputFailed"
    inputs = condition(kube, "TrainingStage", "pretrain", "InputsReady")
    assert inputs["reason"] == "InputFailed" and "CorpusFilter/web failed (AppFailed)" in inputs["message"]
    assert rayjobs(kube, "ts-") == []


async def test_waiting_names_the_input_and_its_phase(kube, start_operator, standin, store_root, tmp_path):
    commit_dataset(f"{store_root}/raw")
    hold = tmp_path / "release"
    await start_operator()
    await standin(policy=lambda job: Behaviour(env={"FAKE_HOLD_FILE": str(hold)}))
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}]))
    await apply(kube, stage("pretrain", datasets=[{**ref("CorpusFilter", "web"), "weight": 1.0,
                                                   "uniqueTokens": 100000}]))
    await phase_is(kube, "CorpusFilter", "web", "Running")
    await eventually(lambda: "waiting for CorpusFilter/web (phase Running)" in
                     condition(kube, "TrainingStage", "pretrain", "InputsReady").get("message", ""))
    running = await eventually(lambda: status(kube, "CorpusFilter", "web").get("progress"))
    assert "shards" in running
    hold.touch()
    await phase_is(kube, "TrainingStage", "pretrain", "Succeeded")


async def test_uri_input_waits_for_a_committed_manifest(kube, start_operator, standin, store_root):
    await start_operator()
    await standin()
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/later"}]))
    await phase_is(kube, "CorpusFilter", "web", "Waiting")
    message = condition(kube, "CorpusFilter", "web", "InputsReady")["message"]
    assert message.startswith("waiting for spec.inputs[0].uri:") and "_manifest.json" in message
    assert rayjobs(kube) == []
    commit_dataset(f"{store_root}/later")  # the store sends no events: the resync notices
    done = await phase_is(kube, "CorpusFilter", "web", "Succeeded")
    assert done["attempts"] == 1
    (job,) = rayjobs(kube)
    assert job["metadata"]["labels"][naming.LABEL_ATTEMPT] == "1"
