"""The SyntheticDataJob's engine actor with `CALLS_PER_ACTOR` shards in hand, as Ray Data
drives it (that many calls at once): the shards' workflows run at once and take turns on the
engine, so one shard's requests are in the engine while another works between its calls or
commits; the engine is never entered by two threads at once; each shard's rows, statistics,
samples sent and cache records are those of a serial run; a failed commit fails its own shard
(no Ray: the worker is driven from threads directly)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.trainer.synth_fixtures import PROBLEMS, spec, write_seeds, write_spec
from tokenmill.layout import dataset_uri
from tokenmill.store import CHAT_SAMPLES, DatasetWriter, StoreError, open_store, read_run_spec, shard_name
from tokenmill.store.dataset_reader import read_verified_shard
from tokenmill.store.schemas import GENERATIONS
from tokenmill.trainer.generate.cache import RequestCache, generations_uri
from tokenmill.trainer.synth import workload

WAIT_SECONDS = 120.0  # generous: the condition normally holds within milliseconds
WORKFLOW = [  # several engine calls per shard: the answers, then critiques and revisions
    {"type": "agreementFilter", "agreementFilter": {"samples": 4, "minAgreement": 0.0, "maxAgreement": 1.0}},
    {"type": "selfRevision", "selfRevision": {"rounds": 2, "rubric": ["reasoning", "factual accuracy"]}},
]


def new_worker(root, questions=PROBLEMS[:8]) -> workload.ShardWorker:
    seeds = write_seeds((root / "seeds").as_uri(), questions)
    output = (root / "out").as_uri()
    write_spec(output, spec(seeds, workflow=WORKFLOW))
    return workload.ShardWorker(workload.prepare(read_run_spec(output)).job)


@pytest.fixture
def worker(tmp_path) -> workload.ShardWorker:
    return new_worker(tmp_path)


def shard_of(requests, shards: list[list[str]]) -> int:
    """Which shard's seeds an engine call's prompts come from."""
    text = repr([request.messages for request in requests])
    [number] = {n for n, questions in enumerate(shards) if any(q in text for q in questions)}
    return number


def test_a_shard_commits_while_the_next_shards_requests_are_in_flight(worker):
    shards = [PROBLEMS[:4], PROBLEMS[4:8]]
    seeds = {seed["question"]: seed for seed in workload.read_seeds(worker.job.spec)}
    calls: list[int] = []  # the shard of each engine call, in order
    committing, next_asked = threading.Event(), threading.Event()
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
            committing.set()
            events.append(f"shard 1 asked while shard 0 committed: {next_asked.wait(WAIT_SECONDS)}")
        return stage(number, table, **kwargs)

    def commit_noting(staged):
        events.append(f"commit {staged.shard}")
        return commit(staged)

    def run_shard(number, part):
        if number == 1:  # the next shard begins only once shard 0 is committing
            assert committing.wait(WAIT_SECONDS)
        return worker.run_shard(number, part)

    engine.generate, writer.stage, writer.commit = generate_noting, stage_holding, commit_noting
    with ThreadPoolExecutor(max_workers=workload.CALLS_PER_ACTOR) as pool:
        results = list(pool.map(run_shard, [0, 1], [[seeds[q] for q in part] for part in shards]))

    assert events[0] == "shard 1 asked while shard 0 committed: True"
    assert sorted(events[1:]) == [f"commit {shard_name(0)}", f"commit {shard_name(1)}"]  # in either order
    assert [result["shard"] for result in results] == [0, 1]
    assert [result["stats"]["seeds"] for result in results] == [4, 4]
    committed = DatasetWriter(dataset_uri(worker.job.output), CHAT_SAMPLES, producer=worker.job.producer).committed()
    assert sorted(committed) == [shard_name(0), shard_name(1)]
    store = open_store(worker.job.output)
    assert all(store.exists(workload.shard_stats_key(n)) for n in (0, 1))


def test_only_the_last_shard_in_hand_waits_for_the_request_cache(worker):
    """A shard that commits while another is in hand leaves the request cache to the
    background committer; the last one commits every pending answer before it is reported."""
    seeds = workload.read_seeds(worker.job.spec)
    cache, stage = worker.engine.cache, worker.writer.stage
    first_returned = threading.Event()
    flushes: list[bool] = []  # per flush: had shard 0 returned?
    flush = cache.flush

    def flush_noting():
        flushes.append(first_returned.is_set())
        return flush()

    def stage_holding(number, table, **kwargs):
        if number == 1:  # shard 1 stays in hand until shard 0 has returned
            assert first_returned.wait(WAIT_SECONDS)
        return stage(number, table, **kwargs)

    def run_shard(number, part):
        result = worker.run_shard(number, part)
        if number == 0:
            first_returned.set()
        return result

    cache.flush, worker.writer.stage = flush_noting, stage_holding
    with ThreadPoolExecutor(max_workers=workload.CALLS_PER_ACTOR) as pool:
        results = list(pool.map(run_shard, [0, 1], [seeds[:4], seeds[4:8]]))

    assert [result["stats"]["seeds"] for result in results] == [4, 4]
    assert flushes and all(flushes)  # shard 0 returned without waiting for the cache
    committed = DatasetWriter(generations_uri(worker.job.output), GENERATIONS).committed()
    assert sum(info.rows for info in committed.values()) == worker.engine.attempted > 0  # every answer on record


class Interleaving:
    """Drives a worker's shards so they interleave on the engine: the first shard to use the
    engine is held after its first call (between two of its engine calls) until another shard
    is in the engine; that one stays in the engine until the held shard asked for the engine
    again (its call then waits for the engine, or enters it too if nothing stops it). Notes
    the shard of every call and the most threads ever inside the engine at once."""

    def __init__(self, worker: workload.ShardWorker, shards: list[list[str]]) -> None:
        self.shards = shards
        self.calls: list[int] = []
        self.state = threading.Condition()
        self.inside: set[int] = set()  # threads in the engine now
        self.most_inside = 0
        self.shard_of_thread: dict[int, int] = {}  # each shard's own thread (its workflow's)
        self.first: int | None = None  # the first shard to call the engine
        self.held = 0
        self.other_entered_while_held = False
        self.first_asked_again = False  # the held shard, released, asked for the engine again
        self.first_entered_again = False
        self.first_waited_or_entered = False
        engine, cache, loop = worker.engine.engine, worker.engine.cache, worker.engine_loop
        generate, commit_soon, submit = engine.generate, cache.commit_soon, loop.submit

        def generate_noting(requests):
            me, shard = threading.get_ident(), shard_of(requests, shards)
            with self.state:
                self.calls.append(shard)
                self.inside.add(me)
                self.most_inside = max(self.most_inside, len(self.inside))
                self.state.notify_all()
                if self.first is None:
                    self.first = shard
                elif shard == self.first and self.held == 2:
                    self.first_entered_again = True
                elif shard != self.first and self.held == 1:  # the held shard is between its calls
                    self.other_entered_while_held = True
                    self.state.notify_all()
                    self.state.wait_for(lambda: self.first_asked_again, WAIT_SECONDS)
                    deadline = time.monotonic() + WAIT_SECONDS
                    while not (loop.waiting() or self.first_entered_again) and time.monotonic() < deadline:
                        self.state.wait(0.01)  # until its call waits for the engine, or is in it too
                    self.first_waited_or_entered = bool(loop.waiting() or self.first_entered_again)
            try:
                return generate(requests)
            finally:
                with self.state:
                    self.inside.discard(me)

        def commit_soon_holding():  # after each engine call, on the shard's own thread
            with self.state:
                if self.shard_of_thread.get(threading.get_ident()) == self.first and self.held == 0:
                    self.held = 1
                    self.state.wait_for(lambda: self.other_entered_while_held, WAIT_SECONDS)
                    self.held = 2
            return commit_soon()

        def submit_noting(ticket, call):  # a shard's call, before it waits for the engine
            shard = shard_of([output.request for output in call.outputs], shards)
            with self.state:
                self.shard_of_thread[threading.get_ident()] = shard
                if shard == self.first and self.held == 2:
                    self.first_asked_again = True
                    self.state.notify_all()
            return submit(ticket, call)

        engine.generate, cache.commit_soon, loop.submit = generate_noting, commit_soon_holding, submit_noting

    def run(self, worker: workload.ShardWorker, parts: list[list[dict]]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=workload.CALLS_PER_ACTOR) as pool:
            return list(pool.map(worker.run_shard, range(len(parts)), parts))


def test_a_shard_uses_the_engine_while_another_is_between_its_calls_and_never_two_at_once(worker):
    shards = [PROBLEMS[:4], PROBLEMS[4:8]]
    seeds = {seed["question"]: seed for seed in workload.read_seeds(worker.job.spec)}
    interleaving = Interleaving(worker, shards)
    results = interleaving.run(worker, [[seeds[q] for q in part] for part in shards])

    assert interleaving.other_entered_while_held  # the other shard's requests went to the engine...
    assert interleaving.first_asked_again and interleaving.first_waited_or_entered
    assert interleaving.most_inside == 1  # ...but never while another call was in it
    first_shard = interleaving.calls[0]
    later = interleaving.calls[interleaving.calls.index(1 - first_shard):]
    assert first_shard in later  # the held shard called the engine again after the other one did
    assert [result["stats"]["seeds"] for result in results] == [4, 4]


def committed_rows(worker: workload.ShardWorker) -> dict[str, list[dict]]:
    writer = DatasetWriter(dataset_uri(worker.job.output), CHAT_SAMPLES, producer=worker.job.producer)
    return {name: read_verified_shard(writer.store, info).to_pylist() for name, info in writer.committed().items()}


def cache_records(worker: workload.ShardWorker) -> dict[str, dict]:
    cache = RequestCache(generations_uri(worker.job.output)).load()
    assert not cache.failures
    return {key: completion.to_dict() for key, completion in cache.completions.items()}


def test_interleaved_shards_give_what_one_shard_after_another_gives(tmp_path):
    shards = [PROBLEMS[:3], PROBLEMS[3:6], PROBLEMS[6:8]]
    serial, interleaved = new_worker(tmp_path / "serial"), new_worker(tmp_path / "interleaved")
    seeds = {seed["question"]: seed for seed in workload.read_seeds(serial.job.spec)}
    parts = [[seeds[q] for q in part] for part in shards]
    one_by_one = [serial.run_shard(number, part) for number, part in enumerate(parts)]
    interleaving = Interleaving(interleaved, shards)
    at_once = interleaving.run(interleaved, parts)

    assert interleaving.other_entered_while_held and interleaving.most_inside == 1
    assert interleaving.calls != sorted(interleaving.calls)  # the shards' calls did interleave
    for ours, theirs in zip(at_once, one_by_one, strict=True):
        # the statistics and the samples each shard sent (its own, not the actor's in the meantime)
        assert {k: v for k, v in ours.items() if k != "generation"} == \
               {k: v for k, v in theirs.items() if k != "generation"}
    for worker in (serial, interleaved):
        store = open_store(worker.job.output)
        assert [store.read_json(workload.shard_stats_key(n))["sent"] for n in range(3)] == \
               [result["sent"] for result in one_by_one]
        assert sum(result["sent"] for result in one_by_one) == worker.engine.attempted > 0
    # the actor's generation counts, taken by whichever shard reported, add up to its engine's
    assert sum(result["generation"]["ok"] for result in at_once) == interleaved.engine.attempted
    assert committed_rows(interleaved) == committed_rows(serial)  # rows and their provenance
    assert len(committed_rows(serial)) == 3
    assert cache_records(interleaved) == cache_records(serial)


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


@pytest.mark.slow
def test_a_torch_engine_serves_interleaved_shards_from_the_engines_thread_as_a_serial_run(tmp_path):
    """The actor's engine thread with a real torch model: every model call is made on it, and
    shards in hand at once get the samples, rows and statistics one shard after another gets."""
    from dataclasses import replace

    from tests.trainer.generate_fixtures import TINY_GEN
    from tokenmill.trainer.model import build_model
    from tokenmill.trainer.model.hf import export_hf

    config = replace(TINY_GEN, max_position_embeddings=1024)  # room for the critique prompt
    export_hf(build_model(config, seed=0).eval(), config, tmp_path / "hf", dtype="float32")
    generator = {"engine": "torch", "model": {"uri": (tmp_path / "hf").as_uri()},
                 "sampling": {"temperature": 1.0, "maxTokens": 8, "seed": 3}}
    workflow = [{"type": "agreementFilter", "agreementFilter": {"samples": 2, "minAgreement": 0.0, "maxAgreement": 1.0}}]

    def torch_worker(root) -> workload.ShardWorker:
        seeds = write_seeds((root / "seeds").as_uri(), PROBLEMS[:6])
        output = (root / "out").as_uri()
        write_spec(output, spec(seeds, workflow=workflow, generator=generator))
        return workload.ShardWorker(workload.prepare(read_run_spec(output)).job)

    serial, interleaved = torch_worker(tmp_path / "serial"), torch_worker(tmp_path / "interleaved")
    threads: set[str] = set()
    model, generate = interleaved.engine.engine, interleaved.engine.engine.generate

    def generate_noting(requests):
        threads.add(threading.current_thread().name)
        return generate(requests)

    model.generate = generate_noting
    seeds = workload.read_seeds(serial.job.spec)
    parts = [seeds[0:2], seeds[2:4], seeds[4:6]]
    one_by_one = [serial.run_shard(number, part) for number, part in enumerate(parts)]
    with ThreadPoolExecutor(max_workers=workload.CALLS_PER_ACTOR) as pool:
        at_once = list(pool.map(interleaved.run_shard, range(3), parts))

    assert threads == {"engine"}
    for ours, theirs in zip(at_once, one_by_one, strict=True):
        assert {k: v for k, v in ours.items() if k != "generation"} == \
               {k: v for k, v in theirs.items() if k != "generation"}
    assert interleaved.engine.attempted == serial.engine.attempted == 6 * 2
    assert committed_rows(interleaved) == committed_rows(serial)
    assert cache_records(interleaved) == cache_records(serial)
    for worker in (serial, interleaved):
        worker.close()
