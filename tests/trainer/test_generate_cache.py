"""The request cache: committed beside the output, reloaded by a later run, manifest last."""

from __future__ import annotations

import time
import urllib.request
from dataclasses import replace

import pytest

from tests.trainer.generate_fixtures import export_tiny
from tokenmill.store import ManifestNotFoundError, open_dataset
from tokenmill.trainer.generate import GenerationRequest, SamplingParams, load_torch_engine
from tokenmill.trainer.generate.cache import CachedEngine, RequestCache, generations_uri, request_key, request_keys
from tokenmill.trainer.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")
SAMPLING = SamplingParams(temperature=1.0, max_tokens=12, seed=5, logprobs=True)


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    return f"file://{export_tiny(tmp_path_factory.mktemp('tiny-gen'))}"


def _batch(n: int = 3) -> list[GenerationRequest]:
    return [GenerationRequest(prompt_token_ids=tuple(BYTE.encode(text)), n=n, sampling=SAMPLING, id=text)
            for text in ("Once upon a time", "Numbers: 1 2 3", "Hello")]


def test_a_rerun_generates_nothing_and_returns_the_same(model_uri, tmp_path):
    cache_uri = generations_uri(f"file://{tmp_path}/job")
    first_engine = load_torch_engine(model_uri, device="cpu")
    first = CachedEngine(first_engine, RequestCache(cache_uri).load())
    outputs = first.generate(_batch())
    first.close()  # commits the pending rows
    with pytest.raises(ManifestNotFoundError):
        open_dataset(cache_uri)  # readers see nothing before the manifest

    second_engine = load_torch_engine(model_uri, device="cpu")
    second = CachedEngine(second_engine, RequestCache(cache_uri).load())
    again = second.generate(_batch())
    assert second_engine.prefill_tokens == 0 and second.hits == 9
    assert [[c.token_ids for c in o.completions] for o in again] == [[c.token_ids for c in o.completions] for o in outputs]
    assert all(c.cached for o in again for c in o.completions)
    assert again[0].completions[1].logprobs == outputs[0].completions[1].logprobs

    # two more samples per request: only those are generated, and they equal a cold run's
    more = second.generate(_batch(n=5))
    assert second.hits == 18 and [c.index for c in more[0].completions] == [0, 1, 2, 3, 4]
    cold = load_torch_engine(model_uri, device="cpu").generate(_batch(n=5))
    assert [c.token_ids for c in more[2].completions] == [c.token_ids for c in cold[2].completions]
    second.cache.finalize()
    rows = open_dataset(cache_uri).read_all().to_pylist()
    assert len(rows) == 15 and len({row["key"] for row in rows}) == 15
    assert {row["request_id"] for row in rows} == {"Once upon a time", "Numbers: 1 2 3", "Hello"}


def test_the_key_covers_engine_model_prompt_sampling_seed_and_index():
    request = _batch()[0]
    base = request_key("torch", "m", request, 0)
    variants = [
        request_key("openai", "m", request, 0),
        request_key("torch", "other", request, 0),
        request_key("torch", "m", GenerationRequest(prompt_token_ids=(1, 2), sampling=SAMPLING), 0),
        request_key("torch", "m", GenerationRequest(prompt_token_ids=request.prompt_token_ids,
                                                    sampling=SamplingParams(**{**SAMPLING.to_dict(), "seed": 6})), 0),
        request_key("torch", "m", GenerationRequest(prompt_token_ids=request.prompt_token_ids,
                                                    sampling=SamplingParams(**{**SAMPLING.to_dict(), "top_p": 0.5})), 0),
        request_key("torch", "m", request, 1),
    ]
    assert len({base, *variants}) == 7
    assert request_key("torch", "m", request.with_indices([0]), 0) == base


def test_the_engine_keys_every_sample_as_request_key_does():
    """The keys the cached engine looks up (built once per request) are `request_key`'s, so a
    cache written by one is served by the other."""
    requests = [
        GenerationRequest(messages=({"role": "system", "content": "Réponds brièvement."},
                                    {"role": "user", "content": 'Say "hi" \\ ünïcødé'}), n=3, sampling=SAMPLING),
        GenerationRequest(prompt_token_ids=(5, 6, 7), sampling=SAMPLING, sample_indices=(2, 9)),
        GenerationRequest(prompt_token_ids=(5, 6, 7), n=2,
                          sampling=SamplingParams(**{**SAMPLING.to_dict(), "seed": None})),
    ]
    for engine, model in (("torch", "sha256:abc"), ("openai", 'http://h/v1 "m"')):
        for request in requests:
            keys = request_keys(engine, model, request)
            assert list(keys) == list(request.indices)
            assert keys == {index: request_key(engine, model, request, index) for index in request.indices}
    assert request_keys("torch", "a", requests[1]) != request_keys("torch", "b", requests[1])


def test_the_workload_metrics_server_shows_generation(model_uri, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from tests.fixtures.s3 import free_port
    from tokenmill.trainer.generate.metrics import GenerateMetrics
    from tokenmill.trainer.metrics import serve_workload_metrics

    engine = load_torch_engine(model_uri, device="cpu")
    engine.metrics = GenerateMetrics("torch")
    cached = CachedEngine(engine, None, metrics=engine.metrics)
    cached.generate(_batch(n=2))
    port = free_port()
    server = serve_workload_metrics({"kind": "SyntheticDataJob", "metadata": {"name": "s", "namespace": "n"},
                                     "output": f"file://{tmp_path}/job"}, port, address="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("tokenmill_generate_requests_total", (("engine", "torch"), ("outcome", "ok")))] >= 6
    assert samples[("tokenmill_generate_generated_tokens_total", (("engine", "torch"),))] > 0
    assert samples[("tokenmill_generate_request_duration_seconds_count", (("engine", "torch"),))] >= 1


def test_model_and_request_cache_on_s3(s3_bucket, tmp_path):
    from tokenmill.store import upload_dir

    export = export_tiny(tmp_path / "hf")
    model = f"{s3_bucket.uri}/stage/hf"
    upload_dir(export, model, last=["config.json"])
    cache_uri = generations_uri(f"{s3_bucket.uri}/job")
    first = CachedEngine(load_torch_engine(model, device="cpu"), RequestCache(cache_uri).load())
    outputs = first.generate(_batch(n=2))
    first.close()
    again = CachedEngine(load_torch_engine(model, device="cpu"), RequestCache(cache_uri).load())
    assert [[c.token_ids for c in o.completions] for o in again.generate(_batch(n=2))] == [
        [c.token_ids for c in o.completions] for o in outputs]
    assert again.engine.prefill_tokens == 0 and again.hits == 6


def _scripted_batch() -> list[GenerationRequest]:
    sampling = SamplingParams(temperature=1.0, max_tokens=64, seed=3)
    return [GenerationRequest(messages=({"role": "user", "content": f"Task: solve\n### Problem\nWhat is {a} + 4?"},),
                              n=2, sampling=sampling) for a in (1, 2, 1)]  # the third repeats the first


def test_a_sample_asked_twice_in_one_call_is_generated_once(tmp_path):
    from tokenmill.trainer.generate.scripted_engine import ScriptedEngine

    teacher = ScriptedEngine()
    cache = RequestCache(generations_uri(f"file://{tmp_path}/job")).load()
    engine = CachedEngine(teacher, cache)
    first, second, repeated = engine.generate(_scripted_batch())
    assert teacher.answered == 4 and engine.attempted == 4 and engine.hits == 2
    assert [c.text for c in repeated.completions] == [c.text for c in first.completions] != \
        [c.text for c in second.completions]
    assert all(c.cached for c in repeated.completions) and not any(c.cached for c in first.completions)
    engine.close()
    assert len(open_dataset_rows(cache)) == 4  # recorded once


def test_a_sample_answered_between_another_calls_lookup_and_its_turn_is_served_not_generated(tmp_path):
    """Calls that take turns on one engine look up the cache before their turn (`plan`), then
    generate in it (`run`): what an earlier turn answered meanwhile is not paid for again."""
    from tokenmill.trainer.generate.scripted_engine import ScriptedEngine

    teacher = ScriptedEngine()
    engine = CachedEngine(teacher, RequestCache(generations_uri(f"file://{tmp_path}/job")).load())
    wider = [replace(request, n=4) for request in _scripted_batch()[:2]]
    early, late = engine.plan(_scripted_batch()[:2]), engine.plan(wider)  # both miss everything
    engine.run(early)
    engine.run(late)
    first, second = engine.finish(late)
    assert teacher.answered == 4 + 4 and engine.attempted == 8  # the late call paid for indices 2 and 3 only
    assert [c.cached for c in first.completions] == [True, True, False, False]
    assert [c.text for c in first.completions[:2]] == [c.text for c in engine.finish(early)[0].completions]
    assert engine.hits == 4 and [c.index for c in second.completions] == [0, 1, 2, 3]


def open_dataset_rows(cache: RequestCache) -> list[dict]:
    cache.finalize()
    return open_dataset(cache.uri).read_all().to_pylist()


def test_commit_soon_commits_in_the_background_and_a_failed_commit_is_raised_with_its_rows_kept(tmp_path):
    from tokenmill.store import AttemptFence, StaleAttemptError, write_run_spec
    from tokenmill.trainer.generate.scripted_engine import ScriptedEngine

    output = f"file://{tmp_path}/job"
    spec = {"runSpecVersion": 1, "kind": "SyntheticDataJob", "metadata": {"name": "s"}, "attempt": 1,
            "output": output, "spec": {}}
    write_run_spec(output, spec)
    cache = RequestCache(generations_uri(output), fence=AttemptFence(output, 1)).load()
    engine = CachedEngine(ScriptedEngine(), cache)
    engine.generate(_scripted_batch()[:1])
    cache.commit_soon()  # returns at once; the committer thread writes the shard
    deadline = time.monotonic() + 60
    while sum(info.rows for info in cache.writer.committed().values()) < 2:
        assert time.monotonic() < deadline, "the background commit never landed"
        time.sleep(0.05)

    write_run_spec(output, {**spec, "attempt": 2})  # a newer attempt took over
    engine.generate(_scripted_batch()[1:2])
    cache.commit_soon()
    with pytest.raises(StaleAttemptError, match="names attempt 2"):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            cache.commit_soon()  # raises once the background commit has failed
            time.sleep(0.05)
    assert sum(info.rows for info in cache.writer.committed().values()) == 2  # nothing more committed
    with pytest.raises(StaleAttemptError):
        cache.flush()  # the rows are still pending: tried again, refused again


@pytest.mark.parametrize("first_named_commits_first", [True, False])
def test_workers_asking_at_once_pay_once_each_and_every_later_load_serves_the_first_committed_answer(
        model_uri, tmp_path, first_named_commits_first):
    """Two workers that loaded the cache before either committed a sample both pay for it,
    once each (the documented bound); each serves its own answer while it runs; every later
    load serves one answer for it, the first committed, whichever worker wrote it."""
    cache_uri = generations_uri(f"file://{tmp_path}/job")
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, seed=None)  # an engine that does not reproduce samples
    batch = [GenerationRequest(prompt_token_ids=tuple(BYTE.encode("Once upon a time")), n=2, sampling=unseeded)]

    def texts(engine: CachedEngine) -> list[list[int]]:
        return [c.token_ids for c in engine.generate(batch)[0].completions]

    workers = [CachedEngine(load_torch_engine(model_uri, device="cpu"), RequestCache(cache_uri).load())
               for _ in range(2)]
    answers = [texts(worker) for worker in workers]
    assert answers[0] != answers[1]
    assert [texts(worker) for worker in workers] == answers  # each worker answers its repeats itself
    assert [worker.attempted for worker in workers] == [2, 2]  # paid once per worker, never more
    # shards are named after their worker: the first committed must win whichever name sorts first
    first_named = min(range(2), key=lambda i: workers[i].cache._writer_id)
    first_to_commit = first_named if first_named_commits_first else 1 - first_named
    workers[first_to_commit].close()
    workers[1 - first_to_commit].close()
    writer = RequestCache(cache_uri).writer
    assert sum(info.rows for info in writer.committed().values()) == 4  # both answers on record

    for _ in range(2):  # a resumed attempt, another node: the same answer, generated by nobody
        later = CachedEngine(load_torch_engine(model_uri, device="cpu"), RequestCache(cache_uri).load())
        assert texts(later) == answers[first_to_commit] and later.attempted == 0
