"""The chain CorpusFilter -> TrainingStage -> PTSJob on a real cluster with KubeRay.

Skipped unless KUBECONFIG is set. See tests/e2e/README.md for what the cluster needs and the
environment variables. The test uploads the tiny example's datasets to the e2e store, applies
the three resources to a fresh namespace, runs the operator (here; or installed into that
namespace with the Helm chart when TOKENMILL_E2E_OPERATOR=helm; or not at all when
TOKENMILL_E2E_OPERATOR=external says one already runs in the cluster), waits for every status
to succeed, and checks the RayJobs, the outputs and the ownership. The namespace is deleted
at the end (outputs are kept: deletePolicy Retain).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "tokenmill.dev", "v1alpha1"
PLURALS = {"CorpusFilter": "corpusfilters", "TrainingStage": "trainingstages", "PTSJob": "ptsjobs"}
TIMEOUT = float(os.environ.get("TOKENMILL_E2E_TIMEOUT", "3600"))
OPERATOR = os.environ.get("TOKENMILL_E2E_OPERATOR", "local")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"),
                       reason="needs a real Kubernetes cluster with KubeRay: set KUBECONFIG (see tests/e2e/README.md)"),
]


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} must be set for the e2e test (see tests/e2e/README.md)")
    return value


def _resources(store: str, image: str | None) -> list[dict[str, Any]]:
    ray: dict[str, Any] = {"workers": {"replicas": 1, "gpusPerWorker": 0, "cpusPerWorker": "2",
                                       "memoryPerWorker": "4Gi", "sharedMemory": "1Gi"},
                           "head": {"cpus": "1", "memory": "4Gi"},
                           "nodeSelector": {}, "tolerations": [], "activeDeadlineSeconds": int(TIMEOUT),
                           "preRunningDeadlineSeconds": 900}
    if image:
        ray["image"] = image
    meta = lambda name: {"name": name}  # noqa: E731
    return [
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "CorpusFilter", "metadata": meta("web"), "spec": {
            "inputs": [{"name": "web", "uri": f"{store}/inputs/raw"}],
            "languages": {"languages": ["en"], "threshold": 0.5},
            "dedup": {"ngram": 3, "numPermutations": 64, "bands": 16, "jaccardThreshold": 0.9},
            "outliers": {"minChars": 100}, "ray": ray}},
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingStage", "metadata": meta("teacher"), "spec": {
            "stage": "pretrain", "model": {"config": "tiny"},
            "datasets": [{"ref": {"kind": "CorpusFilter", "name": "web"}, "weight": 1.0, "epochs": 4}],
            "sequenceLength": 128,
            "optimization": {"globalBatchSequences": 8, "microBatchSequences": 4, "peakLearningRate": 3.0e-3,
                             "warmupSteps": 10, "totalTokens": 204800},
            "checkpoint": {"intervalSteps": 50, "keepLast": 2}, "execution": {"precision": "fp32"},
            "ray": {**ray, "workers": {**ray["workers"], "replicas": 2, "cpusPerWorker": "1"}}}},
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PTSJob", "metadata": meta("pts"), "spec": {
            "model": {"ref": {"kind": "TrainingStage", "name": "teacher"}},
            "problems": {"uri": f"{store}/inputs/problems"}, "oracle": {"kind": "math"}, "engine": "torch",
            "solutionsPerProblem": 2, "samplesPerEstimate": 16, "maxPivotalTokens": 4,
            "rollout": {"temperature": 1.0, "maxTokens": 32, "seed": 3}, "ray": ray}},
    ]


def _helm_install(namespace: str, store: str, secret: str | None):
    """Install charts/tokenmill into the test's namespace, serving only it; returns the Helm config."""
    import helm_python as helm

    repository, _, tag = _required("TOKENMILL_E2E_OPERATOR_IMAGE").rpartition(":")
    values: dict[str, Any] = {
        "image": {"repository": repository, "tag": tag},
        "watchNamespaces": [namespace],
        "defaults": {"store": store},
        "reconcile": {"resyncSeconds": 10},
        "grafanaDashboard": {"enabled": False},
    }
    if os.environ.get("TOKENMILL_E2E_IMAGE"):
        values["defaults"]["rayImage"] = os.environ["TOKENMILL_E2E_IMAGE"]
    if secret:  # the workloads' Secret, mounted as the operator's own credentials too
        values["defaults"]["credentialsSecret"] = secret
        values["storeCredentialsSecret"] = secret
    release = helm.Config(kubeconfig_path=os.environ["KUBECONFIG"], namespace=namespace)
    # Waits until both replicas are ready (probes pass); installs the CRDs if the cluster has none.
    release.install(REPO / "charts" / "tokenmill", namespace, values, namespace=namespace,
                    wait="watcher", timeout=600)
    return release


def test_chain_on_a_real_cluster(tmp_path):
    from kubernetes import client, config

    from tokenmill.store import copy_tree

    store = _required("TOKENMILL_E2E_STORE").rstrip("/")
    secret = os.environ.get("TOKENMILL_E2E_CREDENTIALS_SECRET")
    config.load_kube_config(config_file=os.environ["KUBECONFIG"])
    api = client.ApiClient()
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    if OPERATOR not in ("local", "external", "helm"):
        pytest.fail(f"TOKENMILL_E2E_OPERATOR must be local, external or helm, not {OPERATOR!r}")
    groups = {group.name for group in client.ApisApi(api).get_api_versions().groups}
    if "ray.io" not in groups or (GROUP not in groups and OPERATOR != "helm"):
        pytest.fail("the cluster needs KubeRay and the tokenmill CRDs: "
                    "kubectl apply --server-side -f crds/ (see tests/e2e/README.md)")

    run = uuid.uuid4().hex[:6]
    namespace = f"tokenmill-e2e-{run}"
    store = f"{store}/{run}"
    for name in ("raw", "problems"):
        copy_tree((REPO / "examples" / "tiny" / "data" / name).as_uri(), f"{store}/inputs/{name}",
                  last=("_manifest.json",))
    core.create_namespace({"metadata": {"name": namespace}})
    operator = None
    release = None
    try:
        if secret:  # the workload's store credentials, from this machine's environment
            keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION")
            data = {key: os.environ[key] for key in keys if os.environ.get(key)}
            core.create_namespaced_secret(namespace, {"metadata": {"name": secret}, "stringData": data})
        if OPERATOR == "helm":
            release = _helm_install(namespace, store, secret)
        elif OPERATOR == "local":
            env = {**os.environ, "TOKENMILL_STORE": store, "TOKENMILL_STANDALONE": "true",
                   "TOKENMILL_METRICS_PORT": "0", "TOKENMILL_RESYNC_SECONDS": "10"}
            if secret:
                env["TOKENMILL_CREDENTIALS_SECRET"] = secret
            log = open(tmp_path / "operator.log", "wb")
            operator = subprocess.Popen([sys.executable, "-m", "tokenmill.operator", "--namespace", namespace,
                                         "--liveness", ""], env=env, stdout=log, stderr=log)
        for document in _resources(store, os.environ.get("TOKENMILL_E2E_IMAGE")):
            if secret:
                document["spec"]["output"] = {"credentialsSecret": {"name": secret}}
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[document["kind"]], document)

        deadline = time.monotonic() + TIMEOUT
        phases: dict[str, str] = {}
        while time.monotonic() < deadline:
            phases = {}
            for kind, plural in PLURALS.items():
                for item in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]:
                    phases[f"{kind}/{item['metadata']['name']}"] = (item.get("status") or {}).get("phase", "")
            if any(phase in ("Failed", "Invalid") for phase in phases.values()):
                pytest.fail(f"a resource failed: {phases}")
            if len(phases) == 3 and set(phases.values()) == {"Succeeded"}:
                break
            time.sleep(10)
        else:
            pytest.fail(f"not done after {TIMEOUT:.0f}s: {phases}")

        jobs = custom.list_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs")["items"]
        names = sorted(job["metadata"]["name"] for job in jobs)
        assert names == ["cf-web-1", "pts-pts-1", "ts-teacher-1"], names
        for job in jobs:
            assert job["status"]["jobDeploymentStatus"] == "Complete"
            assert job["metadata"]["ownerReferences"][0]["controller"] is True
        teacher = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "trainingstages", "teacher")
        assert teacher["status"]["outputs"]["checkpoint"].startswith(f"{store}/{namespace}/trainingstages/teacher/")
        pts = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "ptsjobs", "pts")
        assert pts["status"]["outputs"]["dataset"] == f"{store}/{namespace}/ptsjobs/pts/data"
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(60)
        if release is not None:
            release.uninstall(namespace, wait="watcher", timeout=300)
            release.close()
        core.delete_namespace(namespace)
