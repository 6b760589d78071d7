"""The operator end to end through kopf, the emulated API server and the KubeRay stand-in."""

from __future__ import annotations

from tests.operator.conftest import (
    apply,
    commit_dataset,
    condition,
    corpus,
    phase_is,
    rayjobs,
    status,
)


async def test_corpus_filter_runs_to_success(kube, start_operator, standin, store_root):
    raw = f"{store_root}/raw"
    commit_dataset(raw)
    await start_operator()
    await standin()
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": raw}]))
    done = await phase_is(kube, "CorpusFilter", "web", "Succeeded", timeout=20)
    assert done["attempts"] == 1
    assert done["outputs"]["rows"] == 12 and done["outputs"]["shards"] == 3
    assert done["outputs"]["dataset"] == f"{store_root}/default/corpusfilters/web/data"
    assert condition(kube, "CorpusFilter", "web", "Succeeded")["status"] == "True"
    (job,) = rayjobs(kube)
    assert job["metadata"]["name"] == "cf-web-1"
    assert status(kube, "CorpusFilter", "web")["rayJobName"] == "cf-web-1"
