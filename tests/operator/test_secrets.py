"""Secrets reach the workload only through the kubelet's Secret references, and nothing a
workload prints reaches a status, an event or a metric unredacted."""

from __future__ import annotations

import base64
import hashlib
import json

from tests.operator.conftest import EVENTS, SECRETS, apply, commit_dataset, condition, corpus, phase_is, rayjobs
from tests.operator.standin import Behaviour
from tokenmill.operator import naming

API_KEY = "sk-live-0123456789abcdefghijklmnopqrstuv"


def secret(name: str, data: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"},
            "data": {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}}


def synthetic(name: str, seeds_uri: str) -> dict:
    return {
        "apiVersion": "tokenmill.dev/v1alpha1", "kind": "SyntheticDataJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "seeds": [{"uri": seeds_uri}], "datasetType": "documents",
            "workflow": [{"type": "rewrite", "rewrite": {"targets": ["exercise"]}}],
            "generator": {"engine": "openai", "endpoint": "https://llm.example.com/v1", "modelName": "teacher",
                          "apiKeySecret": {"name": "teacher-api", "key": "token"}},
            "ray": {"workers": {"replicas": 1, "gpusPerWorker": 0}},
        },
    }


async def test_the_api_key_reaches_the_workload_from_its_secret_key_only(kube, start_operator, standin, store_root,
                                                                         tmp_path):
    commit_dataset(f"{store_root}/seeds")
    await kube.create(SECRETS, secret("teacher-api", {"token": API_KEY, "unrelated": "do-not-pass"}))
    report = tmp_path / "report.jsonl"
    await start_operator(cpu_node_selector={"pool": "cpu"})
    await standin(policy=lambda job: Behaviour(env={"FAKE_REPORT": str(report)}))
    await apply(kube, synthetic("rewrites", f"{store_root}/seeds"))
    await phase_is(kube, "SyntheticDataJob", "rewrites", "Succeeded")
    (line,) = [json.loads(text) for text in report.read_text().splitlines()]
    assert line["api_key_sha256"] == hashlib.sha256(API_KEY.encode()).hexdigest()
    (job,) = rayjobs(kube)
    manifest = json.dumps(job)
    assert API_KEY not in manifest and "unrelated" not in manifest and "envFrom" not in manifest
    pod = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "cpu"}  # the openai engine needs no GPUs


async def test_credentials_in_a_driver_log_never_reach_status_or_events(kube, start_operator, standin, store_root):
    commit_dataset(f"{store_root}/raw")
    leaked = "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
    await start_operator()
    await standin(policy=lambda job: Behaviour(env={"FAKE_PRINT": f"connecting with {leaked} and key {API_KEY}",
                                                     "FAKE_FAIL_AFTER_SHARDS": "1"}))
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}], backoffLimit=0))
    failed = await phase_is(kube, "CorpusFilter", "web", "Failed")
    message = condition(kube, "CorpusFilter", "web", "Failed")["message"]
    assert "exit code 3" in message and "connecting with AWS_SECRET_ACCESS_KEY=<redacted>" in message
    (job,) = rayjobs(kube)
    assert "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY" in job["status"]["message"]  # KubeRay's copy, not ours
    shown = json.dumps(failed) + json.dumps([event for event in kube.list(EVENTS)])
    assert "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY" not in shown and API_KEY not in shown
    assert job["metadata"]["labels"][naming.LABEL_ATTEMPT] == "1"
