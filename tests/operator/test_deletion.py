"""Deletion: owner references take the RayJobs; outputs stay unless deletePolicy is Delete,
and only then does the resource carry a finalizer."""

from __future__ import annotations

from tests.operator.conftest import (
    KINDS,
    apply,
    commit_dataset,
    corpus,
    eventually,
    get,
    phase_is,
    rayjobs,
)
from tokenmill.operator import naming
from tokenmill.store import open_store


def output_keys(uri: str) -> list[str]:
    return [info.key for info in open_store(uri).list("")]


async def test_retained_outputs_outlive_the_resource(kube, start_operator, standin, store_root):
    commit_dataset(f"{store_root}/raw")
    await start_operator()
    await standin()
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}]))
    done = await phase_is(kube, "CorpusFilter", "web", "Succeeded")
    assert naming.FINALIZER not in (get(kube, "CorpusFilter", "web")["metadata"].get("finalizers") or [])
    (job,) = rayjobs(kube)
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "CorpusFilter" and owner["controller"] and owner["uid"] == get(kube, "CorpusFilter", "web")["metadata"]["uid"]

    await kube.delete(KINDS["CorpusFilter"], "default", "web")
    assert get(kube, "CorpusFilter", "web") is None  # no finalizer: gone at once
    assert rayjobs(kube) == []  # garbage-collected through the owner reference
    assert "data/_manifest.json" in output_keys(done["outputs"]["uri"])


async def test_delete_policy_removes_outputs_then_the_finalizer(kube, start_operator, standin, store_root):
    commit_dataset(f"{store_root}/raw")
    await start_operator()
    await standin()
    document = corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}])
    document["spec"]["output"] = {"deletePolicy": "Delete"}
    await apply(kube, document)
    await eventually(lambda: naming.FINALIZER in (get(kube, "CorpusFilter", "web")["metadata"].get("finalizers") or []))
    done = await phase_is(kube, "CorpusFilter", "web", "Succeeded")
    output = done["outputs"]["uri"]
    assert "data/_manifest.json" in output_keys(output)

    await kube.delete(KINDS["CorpusFilter"], "default", "web")
    await eventually(lambda: get(kube, "CorpusFilter", "web") is None)
    assert output_keys(output) == []
    assert rayjobs(kube) == []
    assert output_keys(f"{store_root}/raw")  # only the resource's own prefix went


async def test_switching_the_policy_adds_and_removes_the_finalizer(kube, start_operator, store_root):
    await start_operator()
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/never"}]))
    await phase_is(kube, "CorpusFilter", "web", "Waiting")
    assert not get(kube, "CorpusFilter", "web")["metadata"].get("finalizers")
    await kube.patch(KINDS["CorpusFilter"], "default", "web", {"spec": {"output": {"deletePolicy": "Delete"}}})
    await eventually(lambda: get(kube, "CorpusFilter", "web")["metadata"].get("finalizers") == [naming.FINALIZER])
    await kube.patch(KINDS["CorpusFilter"], "default", "web", {"spec": {"output": {"deletePolicy": "Retain"}}})
    await eventually(lambda: not get(kube, "CorpusFilter", "web")["metadata"].get("finalizers"))


async def test_an_output_another_resource_still_reads_is_kept_until_it_is_done(kube, start_operator, standin,
                                                                              store_root, tmp_path):
    from tests.operator.conftest import condition, ref, stage
    from tests.operator.standin import Behaviour

    commit_dataset(f"{store_root}/raw")
    hold = tmp_path / "release"
    await start_operator()
    await standin(policy=lambda job: Behaviour(env={"FAKE_HOLD_FILE": str(hold)}
                                               if job["metadata"]["labels"][naming.LABEL_KIND] == "TrainingStage"
                                               else {}))
    document = corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}])
    document["spec"]["output"] = {"deletePolicy": "Delete"}
    await apply(kube, document)
    done = await phase_is(kube, "CorpusFilter", "web", "Succeeded")
    await apply(kube, stage("pretrain", datasets=[{**ref("CorpusFilter", "web"), "weight": 1.0,
                                                   "uniqueTokens": 100000}]))
    await phase_is(kube, "TrainingStage", "pretrain", "Running")

    await kube.delete(KINDS["CorpusFilter"], "default", "web")
    blocked = await eventually(lambda: condition(kube, "CorpusFilter", "web", "ActionFailed").get("reason")
                               == "OutputInUse" and condition(kube, "CorpusFilter", "web", "ActionFailed"))
    assert "TrainingStage/pretrain" in blocked["message"]
    assert "data/_manifest.json" in output_keys(done["outputs"]["uri"])  # still there for the reader

    hold.touch()
    await phase_is(kube, "TrainingStage", "pretrain", "Succeeded")
    await eventually(lambda: get(kube, "CorpusFilter", "web") is None)
    assert output_keys(done["outputs"]["uri"]) == []
