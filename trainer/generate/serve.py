"""`tokenmill serve MODEL_URI`: the torch engine behind the OpenAI API, on aiohttp.

Endpoints: `GET /v1/models`, `POST /v1/completions` (prompt as text or token ids),
`POST /v1/chat/completions` (messages, Phi-4's chat template), both with `n`, `seed`,
`temperature`, `top_p`, `top_k`, `max_tokens`, `stop`, `stop_token_ids`, log-probs and
`stream` (server-sent events); `GET /metrics` (Prometheus), `GET /health`.

Concurrent HTTP requests are decoded together (micro-batching): the requests that arrived
while the previous batch ran become the next batch as soon as the engine is free; an idle
engine waits for a burst to end (no new request for `GATHER_S`, at most `MAX_WAIT_S`). One
batch runs at a time, in a worker thread, so the event loop keeps accepting requests.
`--delay-ms` holds every batch's answers until that long after it started (benchmarks).

Streaming (`"stream": true`) sends server-sent events as the engine draws tokens: a chunk per
token and choice (the text that token completes; text that could still turn out to be part of
a stop string, or an incomplete UTF-8 character, waits for the next token), then a last chunk
per choice with the rest and `finish_reason` (and the log-probs, when asked), a usage chunk
with `stream_options.include_usage`, and `data: [DONE]`.

When `TOKENMILL_SERVE_API_KEY` is set, every `/v1` request must carry it as a bearer token.
Choices carry `token_ids` (the generated ids) besides the text, as vLLM's server can.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from tokenmill.trainer.generate.interface import (
    MAX_N,
    Completion,
    Engine,
    GenerationInputError,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
)

log = logging.getLogger("tokenmill.serve")
API_KEY_ENV = "TOKENMILL_SERVE_API_KEY"
MAX_BATCH_REQUESTS = 256
GATHER_S = 0.001
MAX_WAIT_S = 0.005


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


TokenSink = Callable[[list[tuple[int, int]]], None]


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future = field(repr=False)
    #: called on the event loop with (sample index, token id) pairs as the engine draws them
    on_tokens: TokenSink | None = field(default=None, repr=False)


class Batcher:
    """Runs the engine on batches of the requests waiting for it, one batch at a time.

    When the engine frees up, everything waiting becomes the next batch at once. When it was
    idle, a batch opens with the first request and closes once no request has come for
    `gather_s`, `max_wait_s` after it opened, or at `max_batch` requests. `delay_s` holds a
    batch's answers until that long after the batch started, while the engine goes on with the
    next one (benchmarks: a server that answers each request in that time).
    """

    def __init__(self, engine: Engine, delay_s: float = 0.0, *, gather_s: float = GATHER_S,
                 max_wait_s: float = MAX_WAIT_S, max_batch: int = MAX_BATCH_REQUESTS) -> None:
        self.engine = engine
        self.delay_s = delay_s
        self.gather_s, self.max_wait_s, self.max_batch = gather_s, max_wait_s, max_batch
        self.waiting: deque[_Pending] = deque()
        self.arrived = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def submit(self, request: GenerationRequest, on_tokens: TokenSink | None = None) -> RequestOutput:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(_Pending(request, future, on_tokens))
        self.arrived.set()
        return await future

    async def _gather(self) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        if not self.waiting:
            while not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            deadline = loop.time() + self.max_wait_s
            while len(self.waiting) < self.max_batch:
                wait = min(self.gather_s, deadline - loop.time())
                if wait <= 0:
                    break
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), wait)
                except TimeoutError:
                    break  # the burst is over
        count = min(len(self.waiting), self.max_batch)
        return [self.waiting.popleft() for _ in range(count)]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            started = loop.time()
            try:
                outputs: list[RequestOutput] | BaseException = await asyncio.to_thread(self._generate, batch, loop)
            except Exception as error:  # noqa: BLE001 - every waiter gets the error
                outputs = error
            # the answers wait out the delay; the engine goes on with the next batch meanwhile
            loop.call_at(started + self.delay_s, _answer, batch, outputs)

    def _generate(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> list[RequestOutput]:
        """The engine's answers to a batch (in the worker thread). When some of its requests
        stream, the engine reports each step's tokens, passed on to the event loop."""
        sinks = {r: p.on_tokens for r, p in enumerate(batch) if p.on_tokens is not None}
        if not sinks or not hasattr(self.engine, "step_listener"):
            return self.engine.generate([p.request for p in batch])

        def on_step(rows: Sequence[tuple[int, int]], tokens: Sequence[int]) -> None:
            drawn: dict[int, list[tuple[int, int]]] = {}
            for (r, index), token in zip(rows, tokens, strict=True):
                if r in sinks:
                    drawn.setdefault(r, []).append((index, int(token)))
            if drawn:
                loop.call_soon_threadsafe(_deliver, sinks, drawn)

        self.engine.step_listener = on_step  # type: ignore[attr-defined]
        try:
            return self.engine.generate([p.request for p in batch])
        finally:
            self.engine.step_listener = None  # type: ignore[attr-defined]


def _answer(batch: list[_Pending], outputs: list[RequestOutput] | BaseException) -> None:
    for position, pending in enumerate(batch):
        if pending.future.done():
            continue
        if isinstance(outputs, BaseException):
            pending.future.set_exception(outputs)
        else:
            pending.future.set_result(outputs[position])


def _deliver(sinks: dict[int, TokenSink], drawn: dict[int, list[tuple[int, int]]]) -> None:
    for r, pairs in drawn.items():
        sinks[r](pairs)


class OpenAIServer:
    def __init__(self, engine: Engine, model_name: str, *, api_key: str | None = None,
                 delay_s: float = 0.0) -> None:
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.batcher = Batcher(engine, delay_s)
        self.tokenizer = engine.tokenizer  # type: ignore[attr-defined]
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        app.on_startup.append(lambda _app: self.batcher.start())
        app.on_cleanup.append(lambda _app: self.batcher.stop())
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/v1/") and self.api_key is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return _error(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
        try:
            return await handler(request)
        except BadRequest as error:
            kind = "not_found_error" if error.status == 404 else "invalid_request_error"
            return _error(error.status, str(error), kind, error.param, error.code)
        except GenerationInputError as error:
            return _error(400, str(error), "invalid_request_error")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tokenmill",
             "max_model_len": getattr(self.engine, "context_length", None)}]})

    # -- requests ----------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model != self.model_name:
            raise BadRequest(f"The model `{model}` does not exist.", "model", 404, "model_not_found")
        return body

    def _sampling(self, body: dict[str, Any], *, logprobs: bool, top_logprobs: int, default_max: int) -> SamplingParams:
        stop = body.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max
        temperature = body.get("temperature")
        top_p = body.get("top_p")
        try:
            params = SamplingParams(
                temperature=1.0 if temperature is None else float(temperature),
                top_p=1.0 if top_p is None else float(top_p),
                top_k=max(0, int(body.get("top_k") or 0)),
                max_tokens=int(max_tokens),
                stop=tuple(stop),
                stop_token_ids=tuple(body.get("stop_token_ids") or ()),
                seed=None if body.get("seed") is None else int(body["seed"]),
                logprobs=logprobs,
                top_logprobs=top_logprobs,
            )
        except (TypeError, ValueError) as error:
            raise BadRequest(f"bad sampling parameter: {error}") from None
        params.check("request")
        return params

    def _n(self, body: dict[str, Any]) -> int:
        n = body.get("n")
        n = 1 if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise BadRequest(f"n must be an integer from 1 to {MAX_N}", "n")
        return n

    async def _generate(self, requests: Sequence[GenerationRequest],
                        sinks: Sequence[TokenSink | None] | None = None) -> list[RequestOutput]:
        self.engine.check_requests(requests)
        sinks = sinks or [None] * len(requests)
        outputs = list(await asyncio.gather(*(self.batcher.submit(r, sink) for r, sink in zip(requests, sinks,
                                                                                                strict=True))))
        metrics = self.engine.metrics
        if metrics is not None:
            for output in outputs:
                for completion in output.completions:
                    metrics.sample_ok(completion.prompt_tokens, completion.completion_tokens)
        return outputs

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompts = self._prompts(body.get("prompt"))
        logprobs = body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= 20):
            raise BadRequest("logprobs must be an integer from 0 to 20", "logprobs")
        if body.get("echo"):
            raise BadRequest("echo is not supported", "echo")
        n = self._n(body)
        want = logprobs is not None
        sampling = self._sampling(body, logprobs=want, top_logprobs=logprobs or 0, default_max=16)
        requests = [GenerationRequest(prompt_token_ids=p, n=n, sampling=sampling) for p in prompts]
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            return await self._stream(request, body, requests, _ChunkFormat(
                ident, created, self.model_name, "text_completion", chat=False),
                lambda c: self._text_logprobs(c) if want else None)
        outputs = await self._generate(requests)
        choices = [self._text_choice(p * n + completion.index, completion, want)
                   for p, output in enumerate(outputs) for completion in output.completions]
        return web.json_response({
            "id": ident, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": choices, "usage": _usage(outputs)})

    def _prompts(self, prompt: Any) -> list[tuple[int, ...]]:
        if isinstance(prompt, str):
            return [tuple(self.tokenizer.encode(prompt))]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [tuple(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [tuple(self.tokenizer.encode(p)) for p in prompt]
        if isinstance(prompt, list) and prompt and all(
                isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [tuple(p) for p in prompt]
        raise BadRequest("prompt must be a string, a list of strings, token ids, or lists of token ids", "prompt")

    def _text_choice(self, index: int, completion: Completion, logprobs: bool) -> dict[str, Any]:
        return {"index": index, "text": completion.text, "finish_reason": completion.finish_reason,
                "token_ids": completion.token_ids, "logprobs": self._text_logprobs(completion) if logprobs else None}

    def _text_logprobs(self, completion: Completion) -> dict[str, Any]:
        tokens = [self.tokenizer.decode([t]) for t in completion.token_ids]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {
            "tokens": tokens, "token_logprobs": completion.logprobs,
            "top_logprobs": [{t.token: t.logprob for t in step} for step in completion.top_logprobs]
            if completion.top_logprobs is not None else None,
            "text_offset": offsets,
        }

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", "messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise BadRequest(f"messages[{index}] must have string content", f"messages[{index}].content")
        top = body.get("top_logprobs") or 0
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise BadRequest("top_logprobs must be an integer from 0 to 20", "top_logprobs")
        want = bool(body.get("logprobs"))
        n = self._n(body)
        prompt = GenerationRequest(messages=tuple(messages))
        prompt.check("request")
        ids = self.tokenizer.encode_chat(list(messages), add_generation_prompt=True)
        room = getattr(self.engine, "context_length", 4096) - len(ids)
        sampling = self._sampling(body, logprobs=want, top_logprobs=top if want else 0,
                                  default_max=max(1, room))
        requests = [GenerationRequest(messages=tuple(messages), n=n, sampling=sampling)]
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            return await self._stream(request, body, requests, _ChunkFormat(
                ident, created, self.model_name, "chat.completion.chunk", chat=True),
                lambda c: self._chat_logprobs(c) if want else None)
        (output,) = await self._generate(requests)
        choices = [self._chat_choice(c, want) for c in output.completions]
        return web.json_response({
            "id": ident, "object": "chat.completion", "created": created, "model": self.model_name,
            "choices": choices, "usage": _usage([output])})

    def _chat_choice(self, completion: Completion, logprobs: bool) -> dict[str, Any]:
        return {
            "index": completion.index, "message": {"role": "assistant", "content": completion.text},
            "finish_reason": completion.finish_reason, "token_ids": completion.token_ids,
            "logprobs": self._chat_logprobs(completion) if logprobs else None}

    def _chat_logprobs(self, completion: Completion) -> dict[str, Any]:
        tokens = [self.tokenizer.decode([t]) for t in completion.token_ids]
        return {"content": [
            {"token": token, "logprob": lp, "bytes": list(token.encode()),
             "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
                              for t in (completion.top_logprobs[i] if completion.top_logprobs else [])]}
            for i, (token, lp) in enumerate(zip(tokens, completion.logprobs or [], strict=False))]}

    # -- streaming ---------------------------------------------------------------------

    async def _stream(self, request: web.Request, body: dict[str, Any], requests: list[GenerationRequest],
                      chunks: _ChunkFormat, logprobs_of: Callable[[Completion], dict | None]) -> web.StreamResponse:
        """Server-sent events as the engine draws the tokens of `requests` (choice p * n + i
        is sample i of prompt p)."""
        n = requests[0].n
        sampling = requests[0].sampling
        stop_ids = frozenset({self.tokenizer.eos_id, self.tokenizer.eot_id, *sampling.stop_token_ids})
        holdback = max((len(s) for s in sampling.stop), default=1) - 1
        streams = [[_ChoiceStream(p * n + i, self.tokenizer, stop_ids, holdback) for i in range(n)]
                   for p in range(len(requests))]
        events: asyncio.Queue[tuple[int, list[tuple[int, int]]] | None] = asyncio.Queue()
        sinks = [lambda pairs, p=p: events.put_nowait((p, pairs)) for p in range(len(requests))]
        generation = asyncio.ensure_future(self._generate(requests, sinks))
        generation.add_done_callback(lambda _: events.put_nowait(None))
        response: web.StreamResponse | None = None
        try:
            while (event := await events.get()) is not None:
                if response is None:
                    response = await self._open_stream(request, chunks, streams)
                p, pairs = event
                await response.write(b"".join(
                    chunks.encode(streams[p][index].index, streams[p][index].add([token]), [token])
                    for index, token in pairs))
            try:
                outputs = generation.result()
            except (BadRequest, GenerationInputError):
                if response is None:
                    raise
                outputs = None
            except Exception as error:  # noqa: BLE001 - the stream ends with the error
                log.exception("generation failed")
                if response is None:
                    return _error(500, f"generation failed: {type(error).__name__}", "server_error")
                outputs = None
            if response is None:
                response = await self._open_stream(request, chunks, streams)
            if outputs is None:
                error_event = {"error": {"message": "generation failed", "type": "server_error"}}
                await response.write(f"data: {json.dumps(error_event)}\n\n".encode())
                await response.write_eof()
                return response
            final = []
            for p, output in enumerate(outputs):
                for completion in output.completions:
                    stream = streams[p][completion.index]
                    text, token_ids = stream.finish(completion)
                    final.append(chunks.encode(stream.index, text, token_ids, completion.finish_reason,
                                               logprobs_of(completion)))
            options = body.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                final.append(chunks.usage(_usage(outputs)))
            final.append(b"data: [DONE]\n\n")
            await response.write(b"".join(final))
            await response.write_eof()
            return response
        finally:
            if not generation.done():
                generation.add_done_callback(lambda done: done.exception())  # a client that left

    async def _open_stream(self, request: web.Request, chunks: _ChunkFormat,
                           streams: list[list[_ChoiceStream]]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if chunks.chat:
            await response.write(b"".join(chunks.encode(s.index, "", [], role=True) for row in streams for s in row))
        return response


@dataclass
class _ChunkFormat:
    """Server-sent events of one streamed response."""

    ident: str
    created: int
    model: str
    kind: str
    chat: bool

    def encode(self, index: int, text: str, token_ids: list[int], finish_reason: str | None = None,
               logprobs: dict | None = None, *, role: bool = False) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if role else (
                {"content": text} if text or finish_reason is None else {})
        else:
            choice["text"] = text
        choice |= {"logprobs": logprobs, "finish_reason": finish_reason, "token_ids": token_ids}
        return self._event({"choices": [choice]})

    def usage(self, usage: dict[str, int]) -> bytes:
        return self._event({"choices": [], "usage": usage})

    def _event(self, fields: dict[str, Any]) -> bytes:
        chunk = {"id": self.ident, "object": self.kind, "created": self.created, "model": self.model, **fields}
        return f"data: {json.dumps(chunk)}\n\n".encode()


class _ChoiceStream:
    """One streamed choice: the tokens drawn so far and the text already sent.

    Text is sent as soon as it is final: not an incomplete UTF-8 character (shown as U+FFFD
    until its last byte comes), and not the last `holdback` characters, which could still
    start a stop string (the engine cuts a completion's text before its first stop string).
    """

    def __init__(self, index: int, tokenizer: Any, stop_ids: frozenset[int], holdback: int) -> None:
        self.index, self.tokenizer, self.stop_ids, self.holdback = index, tokenizer, stop_ids, holdback
        self.token_ids: list[int] = []
        self.text_ids: list[int] = []
        self.sent = ""

    def add(self, tokens: list[int]) -> str:
        """The new text that `tokens` make final."""
        self.token_ids.extend(tokens)
        self.text_ids.extend(t for t in tokens if t not in self.stop_ids)
        text = self.tokenizer.decode(self.text_ids).rstrip("\ufffd")
        text = text[:max(0, len(text) - self.holdback)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def finish(self, completion: Completion) -> tuple[str, list[int]]:
        """The rest of the completion's text and token ids."""
        rest = completion.text[len(self.sent):] if completion.text.startswith(self.sent) else ""
        if not completion.text.startswith(self.sent):
            log.warning("a streamed choice's text differs from its completion's")
        return rest, completion.token_ids[len(self.token_ids):]


def _usage(outputs: Sequence[RequestOutput]) -> dict[str, int]:
    prompt = sum(o.completions[0].prompt_tokens for o in outputs if o.completions)
    completion = sum(c.completion_tokens for o in outputs for c in o.completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def build_server(model_uri: str, *, model_name: str | None = None, device: str | None = None,
                 delay_ms: float = 0.0) -> OpenAIServer:
    from tokenmill.trainer.generate.loading import load_torch_engine
    from tokenmill.trainer.generate.metrics import GenerateMetrics

    engine = load_torch_engine(model_uri, device=device)
    engine.metrics = GenerateMetrics("torch")
    name = model_name or model_uri.rstrip("/").rsplit("/", 1)[-1]
    return OpenAIServer(engine, name, api_key=os.environ.get(API_KEY_ENV) or None, delay_s=delay_ms / 1000)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        server = build_server(args.model, model_name=args.served_model_name, device=args.device,
                              delay_ms=args.delay_ms)
    except GenerationInputError as error:
        print(f"tokenmill serve: {error}", file=sys.stderr)
        return 2
    print(f"tokenmill serve: model {server.model_name!r} on http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0
