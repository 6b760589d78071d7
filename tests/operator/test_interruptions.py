"""Suspension, and the operator stopped at any point: never a second RayJob for an attempt."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from tests.operator.conftest import (
    EVENTS,
    KINDS,
    RAYJOBS,
    apply,
    commit_dataset,
    condition,
    corpus,
    eventually,
    phase_is,
    rayjobs,
    status,
)
from tests.operator.standin import Behaviour
from tokenmill.store import open_store


def reconciles(operator) -> float:
    """How many reconciliations the operator has finished (its own histogram's count)."""
    for family in operator.controller.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "tokenmill_reconcile_duration_seconds_count":
                return sample.value
    return 0.0


def committed_shards(store_root: str) -> list[str]:
    data = open_store(f"{store_root}/default/corpusfilters/web/data")
    return sorted(info.key for info in data.list("_commits"))


async def test_suspend_deletes_the_rayjob_and_resume_continues(kube, start_operator, standin, store_root, tmp_path):
    commit_dataset(f"{store_root}/raw")
    hold, report = tmp_path / "release", tmp_path / "report.jsonl"
    await start_operator()
    runner = await standin(policy=lambda job: Behaviour(env={"FAKE_HOLD_FILE": str(hold), "FAKE_REPORT": str(report)}))
    # backoffLimit 0: an attempt stopped by a suspension must not count as a failure.
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}], backoffLimit=0))
    await phase_is(kube, "CorpusFilter", "web", "Running")
    await eventually(lambda: committed_shards(store_root) == ["_commits/part-000000.json"])

    await kube.patch(KINDS["CorpusFilter"], "default", "web", {"spec": {"suspend": True}})
    suspended = await phase_is(kube, "CorpusFilter", "web", "Suspended")
    assert suspended["attempts"] == 1
    assert condition(kube, "CorpusFilter", "web", "Suspended")["status"] == "True"
    assert condition(kube, "CorpusFilter", "web", "Running")["reason"] == "Suspended"
    await eventually(lambda: rayjobs(kube) == [])
    await eventually(lambda: runner.runs["cf-web-1"].outcome == "deleted")
    assert committed_shards(store_root) == ["_commits/part-000000.json"]  # outputs are kept

    hold.touch()
    await kube.patch(KINDS["CorpusFilter"], "default", "web", {"spec": {"suspend": False}})
    done = await phase_is(kube, "CorpusFilter", "web", "Succeeded")
    assert done["attempts"] == 2 and done["rayJobName"] == "cf-web-2"
    assert condition(kube, "CorpusFilter", "web", "Suspended")["status"] == "False"
    lines = report.read_text().splitlines()
    assert len(lines) == 1 and '"skipped": [0]' in lines[0]  # attempt 2 resumed after shard 0


async def test_operator_killed_and_restarted_mid_run(kube, start_operator, standin, store_root, tmp_path):
    commit_dataset(f"{store_root}/raw")
    hold = tmp_path / "release"
    first = await start_operator()
    await standin(policy=lambda job: Behaviour(env={"FAKE_HOLD_FILE": str(hold)}))
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}]))
    await phase_is(kube, "CorpusFilter", "web", "Running")
    await first.kill()

    second = await start_operator()
    # The restarted operator has decided at least twice (its first look and a resync).
    await eventually(lambda: reconciles(second) >= 2, message="the restarted operator never reconciled")
    assert [job["metadata"]["name"] for job in rayjobs(kube)] == ["cf-web-1"]
    assert status(kube, "CorpusFilter", "web")["phase"] == "Running"
    # It decided from full caches: no flip back to Pending, no event about re-creating anything.
    phases = [(body.get("status") or {}).get("phase") for body in kube.objects[
        (KINDS["CorpusFilter"].key, "default", "web")].history]
    assert "Pending" not in phases[phases.index("Running"):]
    assert [event["reason"] for event in kube.list(EVENTS) if event["reason"].startswith("Attempt")] == [
        "AttemptStarted"]
    await second.kill()

    hold.touch()  # the attempt finishes while no operator runs
    await eventually(lambda: rayjobs(kube)[0].get("status", {}).get("jobDeploymentStatus") == "Complete")
    assert status(kube, "CorpusFilter", "web")["phase"] == "Running"
    await start_operator()
    done = await phase_is(kube, "CorpusFilter", "web", "Succeeded")
    assert done["attempts"] == 1
    assert [job["metadata"]["name"] for job in rayjobs(kube)] == ["cf-web-1"]


async def test_sigkill_between_creating_the_rayjob_and_writing_status(kube, standin, store_root, tmp_path):
    """The operator process dies (SIGKILL) right after the API server stored its RayJob and before
    it could write the status: the restarted operator adopts the RayJob instead of making another."""
    commit_dataset(f"{store_root}/raw")
    env = {**os.environ, "TOKENMILL_STORE": store_root, "TOKENMILL_STANDALONE": "true",
           "TOKENMILL_METRICS_PORT": "0", "TOKENMILL_RESYNC_SECONDS": "1", "TOKENMILL_RETRY_BACKOFF_SECONDS": "0"}
    command = [sys.executable, "-m", "tokenmill.operator", "--liveness", ""]
    killed = asyncio.Event()
    processes: list[subprocess.Popen] = []

    async def kill_on_first_rayjob(spec, body):
        if spec == RAYJOBS and not killed.is_set():
            os.kill(processes[0].pid, signal.SIGKILL)
            killed.set()

    kube.after_create.append(kill_on_first_rayjob)
    log = open(tmp_path / "operator.log", "wb")
    try:
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
        await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}]))
        await asyncio.wait_for(killed.wait(), 60)
        await asyncio.to_thread(processes[0].wait, 10)
        assert processes[0].returncode == -signal.SIGKILL
        assert [job["metadata"]["name"] for job in rayjobs(kube)] == ["cf-web-1"]
        assert status(kube, "CorpusFilter", "web").get("attempts", 0) == 0  # the status was never written

        kube.after_create.clear()
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
        await standin()
        done = await phase_is(kube, "CorpusFilter", "web", "Succeeded", timeout=90)
        assert done["attempts"] == 1
        assert [job["metadata"]["name"] for job in rayjobs(kube)] == ["cf-web-1"]
        creates = [call for call in kube.calls if call.method == "POST" and call.path.endswith("/rayjobs")]
        assert len(creates) == 1
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                await asyncio.to_thread(process.wait, 20)
        log.close()


async def test_a_rayjob_deleted_by_a_person_counts_as_a_failed_attempt(kube, start_operator, standin, store_root,
                                                                      tmp_path):
    commit_dataset(f"{store_root}/raw")
    hold = tmp_path / "release"
    await start_operator()
    await standin(policy=lambda job: Behaviour(env={"FAKE_HOLD_FILE": str(hold)}))
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}], backoffLimit=1))
    await phase_is(kube, "CorpusFilter", "web", "Running")
    await kube.delete(RAYJOBS, "default", "cf-web-1")  # kubectl delete rayjob, or a TTL
    await eventually(lambda: [job["metadata"]["name"] for job in rayjobs(kube)] == ["cf-web-2"])
    # The status is written right after the RayJob is created: wait for it as well.
    await eventually(lambda: [item["result"] for item in status(kube, "CorpusFilter", "web").get("attemptHistory", [])]
                     == ["Lost"])
    await eventually(lambda: status(kube, "CorpusFilter", "web").get("attempts") == 2)
    await phase_is(kube, "CorpusFilter", "web", "Running")
    await kube.delete(RAYJOBS, "default", "cf-web-2")
    failed = await phase_is(kube, "CorpusFilter", "web", "Failed")
    assert failed["reason"] == "RayJobLost" and failed["attempts"] == 2  # never an attempt 3
    assert [item["result"] for item in failed["attemptHistory"]] == ["Lost", "Lost"]
    assert rayjobs(kube) == []
