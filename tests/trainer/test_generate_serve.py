"""`tokenmill serve`'s batching and token streaming, over real HTTP with the official client.

The server runs in this process (aiohttp on 127.0.0.1, its own event loop in a thread) on the
real torch engine, which a test can hold at a known point (inside a batch, or inside the first
decode step of a batch) to see what the server does meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import openai
import pytest
from aiohttp import web

from tests.fixtures.s3 import free_port
from tests.trainer.generate_fixtures import tiny_model
from tokenmill.trainer.generate import GenerationRequest, SamplingParams, TorchEngine
from tokenmill.trainer.generate.interface import sample_seed
from tokenmill.trainer.generate.openai_engine import OpenAIEngine
from tokenmill.trainer.generate.serve import OpenAIServer
from tokenmill.trainer.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")
PATIENCE_S = 120.0


class HeldTorchEngine(TorchEngine):
    """The torch engine, which can be held on entering a batch (`hold_batches`) or after the
    first decode step of a batch (`hold_steps`) until `go_on` is set."""

    def __init__(self) -> None:
        super().__init__(tiny_model(), BYTE)
        self.hold_batches = self.hold_steps = False
        self.holding, self.go_on = threading.Event(), threading.Event()
        self.batch_sizes: list[int] = []
        self._listener = None

    @property
    def step_listener(self):  # type: ignore[override]
        return self._listener

    @step_listener.setter
    def step_listener(self, listener) -> None:
        def held(rows, tokens) -> None:
            listener(rows, tokens)
            self._hold(self.hold_steps)

        self._listener = None if listener is None else held

    def generate(self, requests):
        self.batch_sizes.append(len(requests))
        self._hold(self.hold_batches)
        return super().generate(requests)

    def _hold(self, wanted: bool) -> None:
        if wanted and not self.go_on.is_set():
            self.holding.set()
            assert self.go_on.wait(PATIENCE_S), "the test never let the engine go on"


@contextlib.contextmanager
def serving(server: OpenAIServer) -> Iterator[str]:
    """The server's app on a free port of 127.0.0.1, its event loop in a thread."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app())
    port = free_port()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(PATIENCE_S)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(PATIENCE_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(PATIENCE_S)
        loop.close()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def engine() -> HeldTorchEngine:
    return HeldTorchEngine()


@pytest.fixture
def server(engine) -> OpenAIServer:
    return OpenAIServer(engine, "tiny")


def _token_ids(choice) -> list[int]:
    return list((choice.model_extra or {}).get("token_ids") or [])


def test_concurrent_requests_become_one_engine_batch(engine, server):
    sampling = SamplingParams(temperature=1.0, max_tokens=6, seed=11)
    first = [GenerationRequest(prompt_token_ids=tuple(BYTE.encode("first")), sampling=sampling)]
    burst = [GenerationRequest(prompt_token_ids=tuple(BYTE.encode(f"request {i}")), sampling=sampling)
             for i in range(16)]
    engine.hold_batches = True
    results: dict[str, list] = {}
    with serving(server) as url:
        client = OpenAIEngine(url, "tiny", tokenizer=BYTE, max_concurrency=64)
        threads = [threading.Thread(target=lambda: results.__setitem__("first", client.generate(first)))]
        threads[0].start()
        wait_for(engine.holding.is_set, "the first batch to reach the engine")
        threads.append(threading.Thread(target=lambda: results.__setitem__("burst", client.generate(burst))))
        threads[1].start()
        wait_for(lambda: len(server.batcher.waiting) == len(burst), "the burst to queue behind the first batch")
        engine.go_on.set()
        for thread in threads:
            thread.join(PATIENCE_S)
    assert engine.batch_sizes == [1, len(burst)], "the 16 requests that waited together ran as one batch"
    engine.hold_batches = False
    # each as the engine draws it alone (the client sends sample 0's own seed): batching changes nothing
    alone = replace(sampling, seed=sample_seed(sampling.seed, 0))
    expected = [engine.generate([replace(r, sampling=alone)])[0] for r in burst]
    assert [o.completions[0].token_ids for o in results["burst"]] == [o.completions[0].token_ids for o in expected]
    assert all(o.ok for o in results["first"] + results["burst"])


def test_chat_stream_sends_tokens_while_generating(engine, server):
    messages = [{"role": "user", "content": "Tell me a story."}]
    sampling = SamplingParams(temperature=1.0, max_tokens=12, seed=5)
    expected = engine.generate([GenerationRequest(messages=messages, n=2, sampling=sampling)])[0].completions
    assert all(len(c.token_ids) >= 3 for c in expected), "a test prompt whose samples run a few tokens"
    engine.hold_steps = True
    with serving(server) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=PATIENCE_S)
        stream = client.chat.completions.create(
            model="tiny", messages=messages, n=2, temperature=1.0, max_tokens=12, seed=5, stream=True,
            stream_options={"include_usage": True})
        early = []
        for chunk in stream:
            early.append(chunk)
            if {c.index for ch in early for c in ch.choices if _token_ids(c)} == {0, 1}:
                break
        # a token of each choice came while the engine is held inside its first decode step
        assert engine.holding.is_set() and not engine.go_on.is_set()
        assert all(c.finish_reason is None for ch in early for c in ch.choices)
        assert [ch.choices[0].delta.role for ch in early[:2]] == ["assistant", "assistant"]
        engine.go_on.set()
        chunks = early + list(stream)

    *choice_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == sum(
        len(c.token_ids) for c in expected)
    for completion in expected:
        mine = [ch.choices[0] for ch in choice_chunks if ch.choices[0].index == completion.index]
        assert "".join(c.delta.content or "" for c in mine) == completion.text
        assert [t for c in mine for t in _token_ids(c)] == completion.token_ids
        # one chunk per token as it is drawn (the last token comes with the finish reason)
        token_chunks = [c for c in mine if _token_ids(c) and c.finish_reason is None]
        assert len(token_chunks) == len(completion.token_ids) - 1
        assert [c.finish_reason for c in mine if c.finish_reason] == [completion.finish_reason]
        assert mine[-1].finish_reason is not None


def test_completion_stream_with_stop_string_and_logprobs(engine, server):
    prompts = ["Once upon", "In a land"]
    with serving(server) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=PATIENCE_S)
        whole = client.completions.create(model="tiny", prompt=prompts, n=2, seed=3, temperature=1.0,
                                          max_tokens=16, logprobs=1)
        # a stop string taken from the middle of a sample, so that it cuts it
        cut_at = whole.choices[1].text[3:5]
        assert len(cut_at) == 2
        kwargs = dict(model="tiny", prompt=prompts, n=2, seed=3, temperature=1.0, max_tokens=16, logprobs=1,
                      stop=[cut_at])
        plain = client.completions.create(**kwargs)
        chunks = list(client.completions.create(stream=True, **kwargs))
        with pytest.raises(openai.BadRequestError, match="context"):
            client.completions.create(model="tiny", prompt=[65] * 300, stream=True)
    assert plain.choices[1].finish_reason == "stop" and cut_at not in plain.choices[1].text
    for choice in plain.choices:
        mine = [c for ch in chunks for c in ch.choices if c.index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [t for c in mine for t in _token_ids(c)] == _token_ids(choice)
        assert mine[-1].finish_reason == choice.finish_reason
        assert mine[-1].logprobs.token_logprobs == choice.logprobs.token_logprobs
        assert len(mine) >= len(_token_ids(choice))
