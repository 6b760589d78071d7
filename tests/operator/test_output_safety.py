"""The operator refuses outputs that could destroy data: roots, dot segments, another resource's prefix."""

from __future__ import annotations

from tests.operator import emulator
from tests.operator.conftest import EVENTS, apply, commit_dataset, condition, corpus, phase_is, rayjobs, status


async def test_an_output_nested_in_an_older_resources_output_is_invalid(kube, start_operator, standin, store_root,
                                                                      monkeypatch):
    # Both created within one second (creation times have whole seconds), and the newer one's
    # name sorts first: the one that already wrote its output is the older.
    monkeypatch.setattr(emulator, "now_rfc3339", lambda: "2026-01-01T00:00:00Z")
    commit_dataset(f"{store_root}/raw")
    await start_operator()
    await standin()
    inputs = [{"name": "raw", "uri": f"{store_root}/raw"}]
    await apply(kube, corpus("web", inputs=inputs, output={"uri": f"{store_root}/shared"}))
    await phase_is(kube, "CorpusFilter", "web", "Succeeded")
    await apply(kube, corpus("inner", inputs=inputs, output={"uri": f"{store_root}/shared/inner"}))
    await phase_is(kube, "CorpusFilter", "inner", "Invalid")
    valid = condition(kube, "CorpusFilter", "inner", "Valid")
    assert valid["status"] == "False"
    assert "spec.output.uri" in valid["message"] and "CorpusFilter/web" in valid["message"]
    assert rayjobs(kube, "cf-inner") == []
    assert condition(kube, "CorpusFilter", "web", "Valid")["status"] == "True"


async def test_a_bucket_root_output_is_invalid(kube, start_operator, standin, store_root):
    await start_operator()
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}],
                             output={"uri": "s3://bucket/", "deletePolicy": "Delete"}))
    await phase_is(kube, "CorpusFilter", "web", "Invalid")
    valid = condition(kube, "CorpusFilter", "web", "Valid")
    assert "bucket's root" in valid["message"]
    assert rayjobs(kube) == []


async def test_a_hostile_spec_is_invalid_without_echoing_secrets(kube, start_operator, standin, store_root):
    await start_operator()
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}],
                             output={"credentialsSecret": "AKIAEXAMPLESECRET1"},
                             ray={"head": {"cpus": "-4"}, "queueName": "team queue",
                                  "workers": {"replicas": 1, "gpusPerWorker": 0}}))
    await phase_is(kube, "CorpusFilter", "web", "Invalid")
    message = condition(kube, "CorpusFilter", "web", "Valid")["message"]
    assert "spec.output.credentialsSecret: must name a Secret" in message
    assert "spec.ray.head.cpus: must be a Kubernetes quantity" in message
    assert "spec.ray.queueName: must be a label value" in message
    assert "AKIAEXAMPLESECRET1" not in str(kube.list(EVENTS)) + str(status(kube, "CorpusFilter", "web"))
    assert rayjobs(kube) == []
