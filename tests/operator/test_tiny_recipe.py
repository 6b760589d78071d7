"""The same recipe folder applied to a cluster commits the same outputs as `tokenmill run`:
examples/tiny through the kopf operator, the Kubernetes emulator and the KubeRay stand-in
running the real workload entrypoints, compared with the session's local run of it."""

from __future__ import annotations

import sys

import pytest

from tests.fixtures.tiny_run import RUN_TIMEOUT_S, TINY, TinyRun, committed_outcome, tiny_stages
from tests.operator.conftest import apply, phase_is
from tokenmill.runner.plan import plan_recipe


def cluster_documents() -> list[dict]:
    """examples/tiny as `kubectl apply` sends it: relative file: URIs made absolute (the cluster
    has no recipe folder), namespace default."""
    documents = []
    for resource in plan_recipe(TINY):
        document = resource.model_dump(by_alias=True, exclude_none=True, mode="json")
        document["metadata"]["namespace"] = "default"
        documents.append(document)
    return documents


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
async def test_the_tiny_recipe_through_the_operator_matches_the_local_run(tiny_reference: TinyRun, kube,
                                                                          start_operator, standin, store_root):
    expected = committed_outcome(tiny_reference.uri, evaluation=False)

    await start_operator()
    await standin(command=[sys.executable, "-m", "tokenmill.trainer"])
    for document in cluster_documents():
        await apply(kube, document)
    outputs = {}
    for label, _ in tiny_stages():
        kind, name = label.split("/")
        done = await phase_is(kube, kind, name, "Succeeded", timeout=RUN_TIMEOUT_S)
        outputs[label] = done["outputs"]["uri"]

    first_label, first_path = tiny_stages()[0]
    prefix = outputs[first_label].removeprefix(store_root).strip("/").removesuffix(first_path)
    for label, path in tiny_stages():
        assert outputs[label] == f"{store_root}/{prefix}{path}", label
    assert committed_outcome(store_root, prefix, evaluation=False) == expected
