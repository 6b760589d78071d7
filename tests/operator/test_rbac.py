"""The ClusterRole in rbac/ grants exactly the API calls the operator makes: no more, no less.

Every HTTP request the operator (kopf's client and the reconciler's) sends to the emulated API
server is recorded with its user agent. This test runs a scenario that exercises every kind of
call the operator can make (all four kinds, status conflicts, finalizers, deletion of outputs,
RayJob deletion, events, peering), and adds the calls recorded by every earlier test of the
session. Each call must be granted by a rule, and each rule must have been used; the Helm
chart's ClusterRole must have the same rules.
"""

from __future__ import annotations

import yaml

from tests.conftest import REPO
from tests.helm.chart import only
from tests.helm.chart import render as render_chart
from tests.operator.conftest import (
    KINDS,
    PEERINGS,
    apply,
    commit_dataset,
    corpus,
    eventually,
    get,
    pts,
    phase_is,
    stage,
)
from tests.operator.emulator import _status_response
from tests.operator.rbac import granted, operator_terms
from tokenmill.store import open_store

ROLE = REPO / "rbac" / "operator-clusterrole.yaml"


def synthetic(name: str, seed: str, model: str) -> dict:
    return {
        "apiVersion": "tokenmill.dev/v1alpha1", "kind": "SyntheticDataJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "seeds": [{"uri": seed}], "datasetType": "documents",
            "workflow": [{"type": "rewrite", "rewrite": {"targets": ["exercise"]}}],
            "generator": {"engine": "torch", "model": {"uri": model}},
            "ray": {"workers": {"replicas": 1, "gpusPerWorker": 0}},
        },
    }


async def test_clusterrole_grants_exactly_what_the_operator_uses(kube, start_operator, standin, store_root,
                                                                 recorded_calls):
    commit_dataset(f"{store_root}/raw")
    open_store(f"{store_root}/teacher").write_json("config.json", {"architectures": ["Phi3ForCausalLM"]})
    await kube.create(PEERINGS, {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                 "metadata": {"name": "tokenmill"}})
    conflicted: set[str] = set()

    async def first_status_patch_conflicts(request):  # a concurrent writer: the operator re-reads
        plural = request.path.split("/")[-3] if request.path.endswith("/status") else ""
        if request.method == "PATCH" and plural in {spec.plural for spec in KINDS.values()} and plural not in conflicted:
            conflicted.add(plural)
            return _status_response(409, "Conflict", "the object has been modified")
        return None

    kube.faults.append(first_status_patch_conflicts)
    await start_operator(standalone=False, priority=100)
    await standin()
    documents = [
        corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}]),
        synthetic("rewrites", f"{store_root}/raw", f"{store_root}/teacher"),
        stage("pretrain", datasets=[{"uri": f"{store_root}/raw", "weight": 1.0, "uniqueTokens": 100000}]),
        pts("search", model={"uri": f"{store_root}/teacher"}, problems={"uri": f"{store_root}/raw"}),
    ]
    for document in documents:
        document["spec"]["output"] = {"deletePolicy": "Delete"}
        await apply(kube, document)
    for document in documents:
        await phase_is(kube, document["kind"], document["metadata"]["name"], "Succeeded")
    for document in documents:
        await kube.delete(KINDS[document["kind"]], "default", document["metadata"]["name"])
    for document in documents:
        await eventually(lambda: get(kube, document["kind"], document["metadata"]["name"]) is None)
    assert conflicted == {spec.plural for spec in KINDS.values()}

    rules = yaml.safe_load(ROLE.read_text())
    assert rules["kind"] == "ClusterRole"
    allowed = granted(rules["rules"])
    used = operator_terms([*recorded_calls, *kube.calls])
    assert used - allowed == set(), "calls the ClusterRole does not grant"
    assert allowed - used == set(), "rules the operator never needs"

    # The Helm chart's ClusterRole is the same, rule for rule.
    chart_role, = only(render_chart(), "ClusterRole")
    assert chart_role["rules"] == rules["rules"]
    assert granted(chart_role["rules"]) == used
