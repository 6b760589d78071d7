"""Failed actions are visible: a condition and an event say what failed and why, the action is
retried with a capped back-off, and the resource recovers once the cause is gone."""

from __future__ import annotations

import aiohttp.web
import pytest

from tests.operator.conftest import (
    EVENTS,
    KINDS,
    apply,
    commit_dataset,
    condition,
    corpus,
    eventually,
    get,
    phase_is,
    rayjobs,
)
from tests.store.s3_fault_proxy import Fault, FaultProxy
from tokenmill.operator import naming


def events(kube, name: str) -> list[dict]:
    return [event for event in kube.list(EVENTS) if event["involvedObject"]["name"] == name]


def rayjob_creates(kube) -> int:
    return sum(1 for call in kube.calls if call.method == "POST" and call.path.endswith("/rayjobs"))


async def test_a_rejected_rayjob_is_shown_and_retried(kube, start_operator, standin, store_root):
    commit_dataset(f"{store_root}/raw")

    async def reject_rayjobs(request):
        if request.method == "POST" and request.path.endswith("/rayjobs"):
            return aiohttp.web.json_response({
                "apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Invalid", "code": 422,
                "message": 'RayJob.ray.io "cf-web-1" is invalid: spec.rayClusterSpec: Invalid value: admission '
                           'webhook denied the request'}, status=422)
        return None

    kube.faults.append(reject_rayjobs)
    await start_operator()
    await standin()
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}]))

    failed = await eventually(lambda: condition(kube, "CorpusFilter", "web", "ActionFailed").get("status") == "True"
                              and condition(kube, "CorpusFilter", "web", "ActionFailed"))
    assert failed["reason"] == "RayJobCreateFailed"
    assert "creating RayJob cf-web-1 failed: 422" in failed["message"]
    assert "admission webhook denied the request" in failed["message"]
    warning = await eventually(lambda: [e for e in events(kube, "web") if e["reason"] == "RayJobCreateFailed"])
    assert warning[0]["type"] == "Warning" and "422" in warning[0]["message"]
    await eventually(lambda: rayjob_creates(kube) >= 3)  # retried, not given up
    assert len([e for e in events(kube, "web") if e["reason"] == "RayJobCreateFailed"]) == 1  # said once

    kube.faults.remove(reject_rayjobs)
    await phase_is(kube, "CorpusFilter", "web", "Succeeded")
    recovered = condition(kube, "CorpusFilter", "web", "ActionFailed")
    assert recovered["status"] == "False" and recovered["reason"] == "Recovered"


@pytest.fixture
def store_proxy(s3_bucket, monkeypatch):
    proxy = FaultProxy(s3_bucket.endpoint_url).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
    monkeypatch.setenv("TOKENMILL_STORE_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("TOKENMILL_STORE_RETRY_BASE_S", "0.01")
    try:
        yield proxy
    finally:
        proxy.stop()


async def test_store_access_denied_writing_the_run_spec_is_shown(kube, start_operator, s3_bucket, store_proxy):
    commit_dataset(f"{s3_bucket.uri}/raw")
    store_proxy.add(Fault.error(403, "AccessDenied", "Access Denied"), method="PUT", path_contains="_run/spec.json",
                    times=None)
    await start_operator(store=f"{s3_bucket.uri}/runs")
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{s3_bucket.uri}/raw"}]))

    failed = await eventually(lambda: condition(kube, "CorpusFilter", "web", "ActionFailed").get("status") == "True"
                              and condition(kube, "CorpusFilter", "web", "ActionFailed"))
    assert failed["reason"] == "RunSpecWriteFailed"
    assert "writing the run spec under" in failed["message"] and "AccessDenied" in failed["message"]
    await eventually(lambda: [e for e in events(kube, "web") if e["reason"] == "RunSpecWriteFailed"])
    assert rayjobs(kube) == []  # no attempt starts without its run spec

    store_proxy.clear()
    await eventually(lambda: [job["metadata"]["name"] for job in rayjobs(kube)] == ["cf-web-1"])
    await eventually(lambda: condition(kube, "CorpusFilter", "web", "ActionFailed").get("status") == "False")


async def test_a_deletion_that_cannot_delete_the_outputs_says_why(kube, start_operator, s3_bucket, store_proxy):
    commit_dataset(f"{s3_bucket.uri}/raw")
    await start_operator(store=f"{s3_bucket.uri}/runs")
    document = corpus("web", inputs=[{"name": "raw", "uri": f"{s3_bucket.uri}/raw"}])
    document["spec"]["output"] = {"deletePolicy": "Delete"}
    await apply(kube, document)
    # No workload runs here: the resource only needs to have started an attempt (its output is recorded).
    await eventually(lambda: (get(kube, "CorpusFilter", "web").get("status") or {}).get("outputUri"))

    store_proxy.add(Fault.error(403, "AccessDenied", "Access Denied"), method="POST", query_contains="delete",
                    times=None)
    store_proxy.add(Fault.error(403, "AccessDenied", "Access Denied"), method="DELETE", times=None)
    await kube.delete(KINDS["CorpusFilter"], "default", "web")
    failed = await eventually(lambda: condition(kube, "CorpusFilter", "web", "ActionFailed").get("status") == "True"
                              and condition(kube, "CorpusFilter", "web", "ActionFailed"))
    assert failed["reason"] == "OutputDeleteFailed" and "AccessDenied" in failed["message"]
    assert naming.FINALIZER in get(kube, "CorpusFilter", "web")["metadata"]["finalizers"]
    await eventually(lambda: [e for e in events(kube, "web") if e["reason"] == "OutputDeleteFailed"])

    store_proxy.clear()
    await eventually(lambda: get(kube, "CorpusFilter", "web") is None)


async def test_a_status_the_api_server_refuses_is_told_in_an_event(kube, start_operator, store_root):
    async def refuse_status(request):
        if request.method == "PATCH" and request.path.endswith("/corpusfilters/web/status"):
            return aiohttp.web.json_response({
                "apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Invalid", "code": 422,
                "message": 'CorpusFilter.tokenmill.dev "web" is invalid: status.phase: Unsupported value'}, status=422)
        return None

    kube.faults.append(refuse_status)
    await start_operator()
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/never"}]))
    warning = await eventually(lambda: [e for e in events(kube, "web") if e["reason"] == "StatusUpdateFailed"])
    assert warning[0]["type"] == "Warning" and "422" in warning[0]["message"]
    assert "status.phase: Unsupported value" in warning[0]["message"]
    kube.faults.remove(refuse_status)
    await phase_is(kube, "CorpusFilter", "web", "Waiting")
