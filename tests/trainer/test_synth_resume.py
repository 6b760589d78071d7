"""The SyntheticDataJob against a real endpoint (`tokenmill serve`, through a proxy that counts
every sample it forwards): a run killed from outside and resumed pays for no request twice,
with one engine actor and with two; an engine that fails more samples than the spec's failure
budget allows stops the job with a committed, consistent dataset and says why."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.processes import kill_session, start_in_session, wait_for
from tests.trainer.generate_http import OpenAIFaultProxy, ServeProcess, _Handler
from tests.trainer.synth_fixtures import spec, write_seeds, write_spec
from tokenmill.layout import dataset_uri
from tokenmill.store import (
    DatasetWriter,
    ManifestNotFoundError,
    open_dataset,
    open_store,
    read_manifest,
    read_progress,
    shard_name,
)
from tokenmill.store.schemas import GENERATIONS
from tokenmill.trainer.generate.cache import generations_uri
from tokenmill.trainer.synth import workload
from tokenmill.trainer.synth.workflow import StepStats

pytestmark = pytest.mark.slow  # tokenmill serve, and Ray

MODEL = "tiny"
KEY = "sk-resume-0123456789"
KEY_ENV = "TOKENMILL_GENERATOR_API_KEY"
COMMAND = [sys.executable, "-m", "tokenmill.trainer", "synthetic-data", "--spec"]
FIRST_SNIPPET = 3


class CountingProxy(OpenAIFaultProxy):
    """Forwards to `tokenmill serve` and logs every sample (a request body, which a retry
    repeats) it forwards; `policy(prompt)` may instead hold a request (never answered, never
    forwarded) or reject it with HTTP 400, which the client does not retry."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port, lambda sample, attempt: None, stall_seconds=600.0)
        self.policy: Callable[[str], str | None] = lambda prompt: None
        self.statuses: Counter = Counter()

    def start(self) -> CountingProxy:
        from http.server import ThreadingHTTPServer

        proxy = self

        class Handler(_PolicyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def decide(self, body: bytes) -> tuple[int, int, str | None]:
        sample, attempt, _ = super().decide(body)
        self.bodies = getattr(self, "bodies", {}); self.bodies[sample] = body
        return sample, attempt, self.policy(json.loads(body)["messages"][-1]["content"])

    def forwarded(self) -> Counter:
        """How often each sample reached the server."""
        return Counter(sample for sample, _, outcome, _ in list(self.log) if outcome == "forward")


class _PolicyHandler(_Handler):
    owner: CountingProxy

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        sample, attempt, fault = self.owner.decide(body)
        self.owner.record(sample, attempt, fault or "forward")
        if fault == "hold":
            time.sleep(self.owner.stall_seconds)
            self._reset()
        elif fault == "400":
            self._reply(400, {"error": {"message": "this prompt is refused", "type": "invalid_request_error"}})
        else:
            self._sample = sample
            self._forward(body)

    def send_response_only(self, code: int, message: str | None = None) -> None:
        if self.command == "POST":  # generation requests, not the engine's /models probes
            with self.owner._lock:
                self.owner.statuses[code] += 1
        super().send_response_only(code, message)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.trainer.generate_fixtures import export_tiny

    server = ServeProcess(export_tiny(tmp_path_factory.mktemp("teacher")).as_uri(), name=MODEL, api_key=KEY).wait_ready()
    yield server
    server.stop()


@pytest.fixture
def proxy(served):
    started = CountingProxy(served.port).start()
    yield started
    started.stop()


def openai_generator(url: str) -> dict:
    return {"engine": "openai", "endpoint": url, "modelName": MODEL, "maxConcurrency": 64,
            "apiKeySecret": {"name": "teacher", "key": "api-key"},
            "sampling": {"temperature": 1.0, "maxTokens": 8}}


def cache_rows(output: str) -> list[dict]:
    return open_dataset(generations_uri(output)).read_all().to_pylist()


def committed_cache_rows(output: str) -> int:
    return sum(info.rows for info in DatasetWriter(generations_uri(output), GENERATIONS).committed().values())


def check_consistent(output: str) -> tuple[list[dict], dict]:
    rows = open_dataset(dataset_uri(output)).read_all().to_pylist()
    stats = open_store(output).read_json(workload.STATS_KEY)
    assert stats["steps"][-1]["kept"] == stats["written"] == len(rows) == len({row["id"] for row in rows})
    assert read_manifest(dataset_uri(output)).stats == stats
    return rows, stats


def answering_instructions(shards: int) -> Callable[[str], str | None]:
    """A proxy policy: the requests for an instruction for the snippets (`x = a * b`, 16 a shard)
    of the first `shards` shards asked about are answered, every other request is held. A
    shard's first call asks for its snippets' instructions, so it is answered whole or not at
    all (an engine call's answers go on record when the whole call has returned)."""
    lock, answered = threading.Lock(), set()

    def policy(prompt: str) -> str | None:
        snippet = re.search(r"x = (\d+) \*", prompt)
        if "Task: instruct" not in prompt or snippet is None:
            return "hold"
        shard = (int(snippet.group(1)) - FIRST_SNIPPET) // 16
        with lock:
            if shard in answered or len(answered) < shards:
                answered.add(shard)
                return None
        return "hold"

    return policy


def start_workload(spec_uri: str, log_path: Path, workers: int) -> subprocess.Popen:
    return start_in_session([*COMMAND, spec_uri], log_path, {workload.WORKERS_ENV: str(workers), KEY_ENV: KEY})


@pytest.mark.timeout(1800)  # two runs of the workload, each starting its own Ray
@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_killed_from_outside_resumes_without_repeating_a_request(served, proxy, tmp_path, workers):
    # 16 snippets a shard, one shard more than an actor holds, so with two actors both get one
    questions = [f"x = {a} * {a % 7 + 2}"
                 for a in range(FIRST_SNIPPET, FIRST_SNIPPET + 16 * (workload.CALLS_PER_ACTOR + 1))]
    seeds = write_seeds((tmp_path / "seeds").as_uri(), questions)
    # two calls per shard (instructions for the snippets, then code for the instructions), with
    # prompts short enough for the tiny model's 256-token context
    body = spec(seeds, dataset_type="code", generator=openai_generator(proxy.url), workflow=[
        {"type": "instructionReversal", "instructionReversal": {"similarityThreshold": 0.01,
                                                                "metric": "token-jaccard"}}])
    output = (tmp_path / "out").as_uri()
    served_before = served.metric("tokenmill_generate_requests_total")

    # The endpoint answers the first call (instructions for its shard's 16 snippets) of as many
    # shards as there are actors, and holds every other request (other shards' instructions,
    # the regenerated code): an actor's shards take turns on its engine, so once one of its
    # calls is held, it asks nothing more. Which actors' calls are answered depends on their
    # timing, how many do not. The run is killed once what was answered is committed to the
    # request cache.
    answered_first = 16 * workers
    proxy.policy = answering_instructions(workers)
    process = start_workload(write_spec(output, body), tmp_path / "killed.log", workers)
    try:
        wait_for(lambda: committed_cache_rows(output) >= answered_first, "the first calls' cache commits", process)
    finally:
        kill_session(process)
    log = (tmp_path / "killed.log").read_text(errors="replace")
    assert process.returncode == -signal.SIGKILL, log
    assert committed_cache_rows(output) == answered_first == sum(proxy.forwarded().values()), log
    with pytest.raises(ManifestNotFoundError):
        read_manifest(dataset_uri(output))
    before_kill = set(proxy.forwarded())

    proxy.policy = lambda prompt: None
    resumed = start_workload(write_spec(output, body, attempt=2), tmp_path / "resumed.log", workers)
    try:
        code = resumed.wait(timeout=600)
    finally:
        kill_session(resumed)
    log = (tmp_path / "resumed.log").read_text(errors="replace")
    assert code == 0, log

    forwarded = proxy.forwarded()
    assert all(forwarded[sample] == 1 for sample in before_kill)  # none paid for again after the resume
    keys = [row["key"] for row in cache_rows(output)]
    if workers == 1:
        assert max(forwarded.values()) == 1  # no sample reached the server twice
        assert len(keys) == len(set(keys)) == len(forwarded)  # each paid-for sample on record once
    else:
        # Two actors may ask for the same sample at once (the tiny model often writes the same
        # few tokens, so two snippets' instructions can be the same prompt): each actor's cache
        # holds what it paid for until committed. Such a sample is paid for once per actor.
        assert max(forwarded.values()) <= workers
        assert len(keys) == sum(forwarded.values())  # every answer on record
    # every request that reached the server was answered, and the server counted each once
    assert served.metric("tokenmill_generate_requests_total") - served_before == proxy.statuses[200] == \
        sum(forwarded.values())
    rows, stats = check_consistent(output)
    assert stats["requestsSent"] == sum(forwarded.values()) - answered_first  # the rest came from the cache
    assert stats["seeds"] == len(questions) and stats["steps"][0]["in"] == len(questions)


def test_the_specs_failure_budget_stops_the_job_with_a_committed_dataset(served, proxy, tmp_path, monkeypatch,
                                                                        capfd):
    """`failureBudget: {maxFailures: 0, maxFraction: 0}`: the one sample the endpoint refuses
    stops the job, which the default budget (16 + 1%) would have let finish. The shards
    finished before are the dataset, whole; the shard with the refusal is not in it."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    from tests.fixtures.s3 import free_port
    from tokenmill.api.synthetic import FailureBudget as FailureBudgetSpec
    from tokenmill.trainer.generate.cache import FailureBudget
    from tokenmill.trainer.metrics import serve_workload_metrics

    monkeypatch.setattr(workload, "SEEDS_PER_SHARD", 20)
    monkeypatch.setenv(workload.WORKERS_ENV, "1")
    monkeypatch.setenv(KEY_ENV, KEY)  # before Ray starts, so the engine actors see it
    questions = [f"x = {a} + {a + 3}" for a in range(20)]
    questions += [f"y = {a} * 3" for a in range(20, 40)]
    questions += [f"z = {a} - 1" for a in range(40, 49)] + ["refuse = 49 - 2"]  # the endpoint refuses this one
    questions += [f"z = {a} - 1" for a in range(50, 60)]
    seeds = write_seeds((tmp_path / "seeds").as_uri(), questions)
    output = (tmp_path / "out").as_uri()
    body = spec(seeds, dataset_type="code", generator=openai_generator(proxy.url), workflow=[
        {"type": "instructionReversal", "instructionReversal": {"similarityThreshold": 0.01,
                                                                "metric": "token-jaccard"}}],
        failureBudget={"maxFailures": 0, "maxFraction": 0})
    default = FailureBudgetSpec()
    assert not FailureBudget(default.max_failures, default.max_fraction).exceeded(1, 1)  # would not stop
    doc = {"kind": "SyntheticDataJob", "metadata": {"name": "synth", "namespace": "default"}, "output": output}
    proxy.policy = lambda prompt: "400" if "refuse =" in prompt else None

    port = free_port()
    metrics_server = serve_workload_metrics(doc, port, address="127.0.0.1")
    before = scrape(port, text_string_to_metric_families)
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        code = workload.run(write_spec(output, body))
        after = scrape(port, text_string_to_metric_families)
    finally:
        ray.shutdown()
        metrics_server.shutdown()
    err = capfd.readouterr().err
    assert code == workload.EXIT_FAILED, err

    # The job stopped: the last shard, with the refusal, is not in the dataset; what is (the
    # shards the actor finished before the refusal: with all three in hand, taking turns on
    # its engine, none, one or both of the others) is whole and consistent with the statistics.
    manifest = read_manifest(dataset_uri(output))
    committed = [shard.shard for shard in manifest.shards]
    assert set(committed) <= {shard_name(0), shard_name(1)}
    rows, stats = check_consistent(output)
    assert stats["stoppedBy"] == workload.FAILURE_BUDGET_STOP and stats["seeds"] == 20 * len(committed)
    by_shard = Counter(int(row["id"][1:]) // 20 for row in rows)
    for shard in manifest.shards:
        number = int(shard.shard.split("-")[-1])
        shard_stats = open_store(output).read_json(workload.shard_stats_key(number))
        assert shard.rows == by_shard[number] == StepStats.from_data(shard_stats["stats"]).written
    # nothing else under the dataset: no file of an unfinished shard
    assert {info.key for info in open_store(dataset_uri(output)).list("")} == {
        "_manifest.json", *(f"_commits/{shard.shard}.json" for shard in manifest.shards),
        *(shard.path for shard in manifest.shards)}
    # why, with the figures: one failure against a budget of none
    assert re.match(r"1 of \d+ samples failed, more than the failure budget \(0 \+ 0 x samples\)", stats["failure"]), \
        stats["failure"]
    assert "HTTP 400" in stats["failure"]
    # ...said so on stderr and in the progress record (what the resource's status shows)
    assert "failure budget (0 + 0 x samples)" in err and "Traceback" not in err
    progress = read_progress(output)
    assert progress.phase == "failed" and progress.done == stats["seeds"] and progress.total == len(questions)
    assert progress.message.startswith(f"generation stopped: {stats['failure'][:60]}")
    assert f"the {len(rows)} records of the {len(committed)} shards finished before are committed" in progress.message
    assert "a retry resumes" in progress.message
    # every sample tried is on record, the refusal included (a retry tries it again)
    cache = cache_rows(output)
    assert [row["error_kind"] for row in cache if row["error_kind"]] == ["bad_request"]
    assert len(cache) == stats["requestsSent"] == sum(proxy.forwarded().values()) + 1

    # the engine actors' counts reach the driver's metrics endpoint
    def added(name: str, **labels: str) -> float:
        return after.get((name, tuple(sorted({"engine": "openai", **labels}.items()))), 0.0) - \
            before.get((name, tuple(sorted({"engine": "openai", **labels}.items()))), 0.0)

    assert added("tokenmill_generate_requests_total", outcome="ok") == sum(proxy.forwarded().values())
    assert added("tokenmill_generate_requests_total", outcome="error") == 1
    assert added("tokenmill_generate_errors_total", kind="bad_request") == 1
    assert added("tokenmill_generate_generated_tokens_total") > 0
    assert added("tokenmill_generate_request_duration_seconds_count") == stats["requestsSent"]


def scrape(port: int, parse) -> dict[tuple[str, tuple], float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in parse(text) for sample in family.samples if "engine" in sample.labels}
