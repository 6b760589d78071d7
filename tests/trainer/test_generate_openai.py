"""`tokenmill serve` over real HTTP, and the `openai` engine against it, through a fault proxy."""

from __future__ import annotations

import openai
import pytest
import torch
from prometheus_client import CollectorRegistry

from tests.fixtures.s3 import free_port
from tests.trainer.generate_fixtures import export_tiny
from tests.trainer.generate_http import OpenAIFaultProxy, ServeProcess
from tokenmill.trainer.generate import GenerationInputError, GenerationRequest, SamplingParams, load_torch_engine
from tokenmill.trainer.generate.cache import (
    CachedEngine,
    FailureBudget,
    GenerationBudgetExceeded,
    RequestCache,
    generations_uri,
)
from tokenmill.trainer.generate.metrics import GenerateMetrics
from tokenmill.trainer.generate.openai_engine import OpenAIEngine, RetryPolicy
from tokenmill.trainer.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")
KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    return f"file://{export_tiny(tmp_path_factory.mktemp('tiny-gen'))}"


@pytest.fixture(scope="module")
def server(model_uri):
    process = ServeProcess(model_uri, name="tiny", api_key=KEY)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def local(model_uri):
    return load_torch_engine(model_uri, device="cpu")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def _ids(text: str) -> list[int]:
    return BYTE.encode(text)


def test_serve_completions_match_the_torch_engine(client, local):
    response = client.completions.create(model="tiny", prompt=_ids("Once upon a time"), n=3, seed=4,
                                         max_tokens=12, temperature=1.0, logprobs=2)
    expected = local.generate([GenerationRequest(
        prompt_token_ids=_ids("Once upon a time"), n=3,
        sampling=SamplingParams(temperature=1.0, max_tokens=12, seed=4, logprobs=True, top_logprobs=2))])[0]
    assert [c.model_extra["token_ids"] for c in response.choices] == [c.token_ids for c in expected.completions]
    assert [c.text for c in response.choices] == [c.text for c in expected.completions]
    for choice, completion in zip(response.choices, expected.completions, strict=True):
        torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs),
                                   torch.tensor(completion.logprobs), atol=1e-4, rtol=0)
        # a dict by token text: byte tokens that are not UTF-8 on their own may share one key
        assert all(1 <= len(step) <= 2 for step in choice.logprobs.top_logprobs)
    assert response.usage.prompt_tokens == len(_ids("Once upon a time"))
    assert response.usage.completion_tokens == sum(len(c.token_ids) for c in expected.completions)


def test_serve_chat_streaming_and_errors(client, local, server):
    messages = [{"role": "user", "content": "Say something."}]
    response = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20,
                                              logprobs=True, top_logprobs=3)
    expected = local.generate([GenerationRequest(messages=messages, sampling=SamplingParams(temperature=0, max_tokens=20))])
    (choice,) = response.choices
    assert choice.message.content == expected[0].completions[0].text
    assert len(choice.logprobs.content) == len(expected[0].completions[0].token_ids)
    assert all(len(step.top_logprobs) == 3 for step in choice.logprobs.content)

    stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="n must be"):
        client.completions.create(model="tiny", prompt="hi", n=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=[65] * 300)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert server.metric("tokenmill_generate_request_duration_seconds_count") > 0


def test_probe_fails_fast_and_never_shows_the_key(server):
    with pytest.raises(GenerationInputError, match="apiKeySecret.*rejected the API key") as error:
        OpenAIEngine(server.url, "tiny", api_key="sk-wrong-key-42").check()
    assert "sk-wrong-key-42" not in str(error.value)
    with pytest.raises(GenerationInputError, match=r"modelName.*does not serve model 'gpt-4o'.*tiny"):
        OpenAIEngine(server.url, "gpt-4o", api_key=KEY).check()
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(GenerationInputError, match=f"endpoint: cannot reach {nowhere}"):
        OpenAIEngine(nowhere, "tiny", api_key=KEY, probe_timeout_s=5).check()
    OpenAIEngine(server.url, "tiny", api_key=KEY).check()


def _batch() -> list[GenerationRequest]:
    sampling = SamplingParams(temperature=1.0, max_tokens=8, seed=100, logprobs=True)
    return [GenerationRequest(prompt_token_ids=tuple(_ids(f"Prompt number {i}:")), n=3, sampling=sampling, id=str(i))
            for i in range(6)] + [
        GenerationRequest(messages=({"role": "user", "content": f"Question {i}?"},), n=2, sampling=sampling)
        for i in range(2)]


def test_faults_are_retried_and_failures_recorded_once(server, tmp_path):
    kinds = {0: None, 1: "429", 2: "500", 3: "stall", 4: "reset"}

    def plan(sample: int, attempt: int) -> str | None:
        kind = sample % 6
        if kind == 5:
            return "500"  # for ever: this sample fails after its retries
        if kind == 2:
            return "500" if attempt < 2 else None
        return kinds[kind] if attempt == 0 else None

    proxy = OpenAIFaultProxy(server.port, plan, stall_seconds=60.0, retry_after="1").start()
    try:
        retry = RetryPolicy(attempts=4, base_s=0.05, max_s=0.2, timeout_s=15.0)
        registry = CollectorRegistry()
        metrics = GenerateMetrics("openai", registry)
        faulty = OpenAIEngine(proxy.url, "tiny", api_key=KEY, tokenizer=BYTE, max_concurrency=8, retry=retry,
                              metrics=metrics)
        cache = RequestCache(generations_uri(f"file://{tmp_path}/job")).load()
        engine = CachedEngine(faulty, cache, FailureBudget(max_fraction=0.5), metrics)
        outputs = engine.generate(_batch())
        engine.close()
    finally:
        proxy.stop()
    clean = OpenAIEngine(server.url, "tiny", api_key=KEY, tokenizer=BYTE).generate(_batch())
    assert {kind for _, _, kind, _ in proxy.log} >= {"429", "500", "stall", "reset", "forward"}
    failed = 0
    for output, reference in zip(outputs, clean, strict=True):
        indices = [c.index for c in output.completions] + [f.index for f in output.failures]
        assert sorted(indices) == list(range(output.request.n)), "every sample once: done or failed"
        by_index = {c.index: c for c in reference.completions}
        for completion in output.completions:
            assert completion.token_ids == by_index[completion.index].token_ids
        for failure in output.failures:
            assert failure.kind == "server" and "HTTP 500" in failure.message
        failed += len(output.failures)
    assert failed == engine.failed == len(cache.failures) > 0

    def metric(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"engine": "openai", **labels}) or 0.0

    assert metric("tokenmill_generate_errors_total", kind="server") == failed
    assert metric("tokenmill_generate_requests_total", outcome="error") == failed
    ok = sum(len(o.completions) for o in outputs)
    assert metric("tokenmill_generate_requests_total", outcome="ok") == ok
    assert metric("tokenmill_generate_generated_tokens_total") == sum(
        c.completion_tokens for o in outputs for c in o.completions)
    for kind in ("rate_limit", "server", "timeout", "connection"):
        assert metric("tokenmill_generate_retries_total", kind=kind) > 0, kind
    assert metric("tokenmill_generate_request_duration_seconds_count") == len(proxy.log)
    # Retry-After: 1 was honoured: the second attempt of a 429 came at least a second later
    times: dict = {}
    for sample, attempt, _, at in proxy.log:
        times[(sample, attempt)] = at
    rate_limited = [sample for sample, _, kind, _ in proxy.log if kind == "429"]
    assert rate_limited and all(times[(s, 1)] - times[(s, 0)] >= 1.0 for s in rate_limited)

    strict = CachedEngine(OpenAIEngine(f"http://127.0.0.1:{free_port()}/v1", "tiny", api_key=KEY,
                                       retry=RetryPolicy(attempts=1, timeout_s=2)), None, FailureBudget())
    with pytest.raises(GenerationBudgetExceeded, match="failure budget"):
        strict.generate(_batch()[:1])


def test_a_rerun_makes_no_requests(server, tmp_path):
    cache_uri = generations_uri(f"file://{tmp_path}/job")
    first = CachedEngine(OpenAIEngine(server.url, "tiny", api_key=KEY), RequestCache(cache_uri).load())
    outputs = first.generate(_batch())
    first.close()
    before = server.metric("tokenmill_generate_requests_total")
    assert before >= sum(r.n for r in _batch()), "the server counts the samples it answers"
    second = CachedEngine(OpenAIEngine(server.url, "tiny", api_key=KEY), RequestCache(cache_uri).load())
    again = second.generate(_batch())
    assert server.metric("tokenmill_generate_requests_total") == before
    assert second.engine.http_requests == 0 and second.hits == sum(r.n for r in _batch())
    assert [[c.text for c in o.completions] for o in again] == [[c.text for c in o.completions] for o in outputs]
