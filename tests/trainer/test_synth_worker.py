"""The SyntheticDataJob's engine actor with two shards in hand, as Ray Data drives it
(`CALLS_PER_ACTOR` calls at once): the next shard's requests are in flight while a shard
commits, the engine serves one shard at a time, shards commit in order, and a failed commit
fails its own shard (no Ray: the worker is driven from threads directly)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.trainer.synth_fixtures import PROBLEMS, spec, write_seeds, write_spec
from tokenmill.layout import dataset_uri
from tokenmill.store import CHAT_SAMPLES, DatasetWriter, StoreError, open_store, read_run_spec, shard_name
from tokenmill.trainer.synth import workload

WAIT_SECONDS = 120.0  # generous: the condition normally holds within milliseconds


@pytest.fixture
def worker(tmp_path) -> workload.ShardWorker:
    seeds = write_seeds((tmp_path / "seeds").as_uri(), PROBLEMS[:8])
    output = (tmp_path / "out").as_uri()
    write_spec(output, spec(seeds, workflow=[
        {"type": "agreementFilter", "agreementFilter": {"samples": 4, "minAgreement": 0.0, "maxAgreement": 1.0}}]))
    return workload.ShardWorker(workload.prepare(read_run_spec(output)).job)


def shard_of(requests, shards: list[list[str]]) -> int:
    """Which shard's seeds an engine call's prompts come from."""
    text = repr([request.messages for request in requests])
    [number] = {n for n, questions in enumerate(shards) if any(q in text for q in questions)}
    return number


def test_a_shard_commits_while_the_next_shards_requests_are_in_flight(worker):
    shards = [PROBLEMS[:4], PROBLEMS[4:8]]
    seeds = {seed["question"]: seed for seed in workload.read_seeds(worker.job.spec)}
    calls: list[int] = []  # the shard of each engine call, in order
    next_asked = threading.Event()
    events: list[str] = []
    engine, writer = worker.engine.engine, worker.writer
    generate, stage, commit = engine.generate, writer.stage, writer.commit

    def generate_noting(requests):
        calls.append(shard_of(requests, shards))
        if calls[-1] == 1:
            next_asked.set()
        return generate(requests)

    def stage_holding(number, table, **kwargs):
        if number == 0:  # shard 0's data is written only once shard 1 asked the engine
            events.append(f"shard 1 asked while shard 0 committed: {next_asked.wait(WAIT_SECONDS)}")
        return stage(number, table, **kwargs)

    def commit_noting(staged):
        events.append(f"commit {staged.shard}")
        return commit(staged)

    engine.generate, writer.stage, writer.commit = generate_noting, stage_holding, commit_noting
    with ThreadPoolExecutor(max_workers=workload.CALLS_PER_ACTOR) as pool:
        results = list(pool.map(worker.run_shard, [0, 1], [[seeds[q] for q in part] for part in shards]))

    assert events == ["shard 1 asked while shard 0 committed: True", f"commit {shard_name(0)}",
                      f"commit {shard_name(1)}"]
    assert calls == sorted(calls)  # one shard's requests at a time: none of shard 0's after shard 1's began
    assert [result["shard"] for result in results] == [0, 1]
    assert [result["stats"]["seeds"] for result in results] == [4, 4]
    committed = DatasetWriter(dataset_uri(worker.job.output), CHAT_SAMPLES, producer=worker.job.producer).committed()
    assert sorted(committed) == [shard_name(0), shard_name(1)]
    store = open_store(worker.job.output)
    assert all(store.exists(workload.shard_stats_key(n)) for n in (0, 1))


def test_a_failed_commit_fails_its_shard_and_leaves_the_next_one_committing(worker):
    seeds = workload.read_seeds(worker.job.spec)
    stage = worker.writer.stage

    def stage_failing(number, table, **kwargs):
        if number == 0:
            raise StoreError("the store refused the upload")
        return stage(number, table, **kwargs)

    worker.writer.stage = stage_failing
    with ThreadPoolExecutor(max_workers=workload.CALLS_PER_ACTOR) as pool:
        first, second = pool.submit(worker.run_shard, 0, seeds[:4]), pool.submit(worker.run_shard, 1, seeds[4:8])
        with pytest.raises(StoreError, match="refused the upload"):
            first.result()
        assert second.result()["stats"]["seeds"] == 4
    committed = DatasetWriter(dataset_uri(worker.job.output), CHAT_SAMPLES, producer=worker.job.producer).committed()
    assert sorted(committed) == [shard_name(1)]  # shard 0 is not done: a retry writes it


def resource(failure_budget: dict | None) -> dict:
    body = {"seeds": [{"uri": "s3://bucket/seeds/"}], "output": {"uri": "s3://bucket/out/"},
            "workflow": [{"type": "agreementFilter", "agreementFilter": {}}], "generator": {"engine": "scripted"}}
    if failure_budget is not None:
        body["failureBudget"] = failure_budget
    return {"apiVersion": "tokenmill.dev/v1alpha1", "kind": "SyntheticDataJob", "metadata": {"name": "synth"},
            "spec": body}


def test_a_bad_failure_budget_is_refused_naming_its_field():
    from tokenmill.api.loader import parse_resource

    parsed, problems = parse_resource(resource({"maxFailures": -1, "maxFraction": 1.5}), file="synth.yaml")
    assert parsed is None
    assert sorted((problem.path, problem.found) for problem in problems) == [
        ("spec.failureBudget.maxFailures", -1), ("spec.failureBudget.maxFraction", 1.5)]
    assert all(str(problem).startswith("synth.yaml: SyntheticDataJob/synth: spec.failureBudget.") for problem in problems)


def test_each_engine_actor_fails_the_job_past_the_specs_failure_budget(tmp_path):
    from tokenmill.api.loader import parse_resource

    default, _ = parse_resource(resource(None))
    assert (default.spec.failure_budget.max_failures, default.spec.failure_budget.max_fraction) == (16, 0.01)
    seeds = write_seeds((tmp_path / "seeds").as_uri(), PROBLEMS[:4])
    output = (tmp_path / "out").as_uri()
    write_spec(output, spec(seeds, failureBudget={"maxFailures": 2, "maxFraction": 0.1}))
    worker = workload.ShardWorker(workload.prepare(read_run_spec(output)).job)
    assert not worker.engine.budget.exceeded(failures=3, attempted=10)  # 2 + 10% of 10
    assert worker.engine.budget.exceeded(failures=4, attempted=10)
    assert not worker.engine.budget.exceeded(failures=12, attempted=100)
