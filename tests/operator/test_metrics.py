"""/metrics scraped over HTTP and parsed with prometheus_client's parser; the probes."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.s3 import free_port
from tests.operator.conftest import apply, commit_dataset, corpus, phase_is
from tests.operator.emulator import _status_response
from tests.operator.standin import Behaviour
from tokenmill.operator import naming


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_count_runs_phases_and_errors(kube, start_operator, standin, store_root):
    commit_dataset(f"{store_root}/raw")
    failed_once = []

    async def fail_first_status_patch(request):  # a 500 from the API server: a reconcile error
        if request.method == "PATCH" and request.path.endswith("/status") and "corpusfilters" in request.path \
                and not failed_once:
            failed_once.append(request.path)
            return _status_response(500, "InternalError", "etcd is having a bad day")
        return None

    kube.faults.append(fail_first_status_patch)
    liveness_port = free_port()
    operator = await start_operator(liveness=f"http://127.0.0.1:{liveness_port}/healthz")

    def policy(job):
        if job["metadata"]["labels"][naming.LABEL_NAME] == "bad":
            return Behaviour(env={"FAKE_FAIL_AFTER_SHARDS": "1"})
        return Behaviour()

    await standin(policy=policy)
    await apply(kube, corpus("good", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}]))
    await apply(kube, corpus("bad", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}], backoffLimit=0))
    await phase_is(kube, "CorpusFilter", "good", "Succeeded")
    await phase_is(kube, "CorpusFilter", "bad", "Failed")

    # The operator counts a finished attempt once the API server confirmed the status write,
    # a moment after the status is visible here: scrape until it has.
    for _ in range(100):
        samples = await scrape(operator.metrics_url)
        if value(samples, "tokenmill_resources", kind="CorpusFilter", phase="Failed") == 1 and \
                value(samples, "tokenmill_resources", kind="CorpusFilter", phase="Succeeded") == 1 and \
                value(samples, "tokenmill_stage_runs_total", kind="CorpusFilter", result="failed") == 1 and \
                value(samples, "tokenmill_stage_runs_total", kind="CorpusFilter", result="succeeded") == 1:
            break
        await asyncio.sleep(0.1)
    assert value(samples, "tokenmill_stage_runs_total", kind="CorpusFilter", result="succeeded") == 1
    assert value(samples, "tokenmill_stage_runs_total", kind="CorpusFilter", result="failed") == 1
    assert value(samples, "tokenmill_stage_runs_total", kind="TrainingStage", result="succeeded") == 0
    assert value(samples, "tokenmill_resources", kind="CorpusFilter", phase="Succeeded") == 1
    assert value(samples, "tokenmill_resources", kind="CorpusFilter", phase="Failed") == 1
    assert value(samples, "tokenmill_resources", kind="PTSJob", phase="Running") == 0
    assert value(samples, "tokenmill_stage_duration_seconds_count", kind="CorpusFilter", result="succeeded") == 1
    assert value(samples, "tokenmill_stage_last_success_timestamp_seconds", kind="CorpusFilter") > 1.7e9
    assert value(samples, "tokenmill_rayjobs_created_total", kind="CorpusFilter") == 2
    assert value(samples, "tokenmill_reconcile_errors_total", kind="CorpusFilter", reason="Api500") == 1
    assert value(samples, "tokenmill_committed_bytes", kind="CorpusFilter") > 0
    assert value(samples, "tokenmill_reconcile_duration_seconds_count") > 0
    # Bounded cardinality: no sample is labelled with a resource's name.
    assert all(dict(labels).keys() <= {"kind", "phase", "result", "reason", "le"} for _, labels in samples)

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{operator.metrics_url}/readyz") as response:
            assert response.status == 200 and (await response.json()) == {"ready": True}
        async with session.get(f"http://127.0.0.1:{liveness_port}/healthz") as response:
            assert response.status == 200
            probe = await response.json()
    assert probe["reconciler"]["started"] is True and probe["reconciler"]["active"] is True
