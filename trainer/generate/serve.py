"""`tokenmill serve MODEL_URI`: the torch engine behind the OpenAI API, on aiohttp.

Endpoints: `GET /v1/models`, `POST /v1/completions` (prompt as text or token ids),
`POST /v1/chat/completions` (messages, Phi-4's chat template), both with `n`, `seed`,
`temperature`, `top_p`, `top_k`, `max_tokens`, `stop`, `stop_token_ids`, log-probs and
`stream` (server-sent events); `GET /metrics` (Prometheus), `GET /health`.

Concurrent HTTP requests are decoded together: a batcher collects what arrived while the
previous batch ran and hands it to the engine as one batch (in a worker thread, so the event
loop keeps accepting requests). Streaming sends a completion's tokens as chunks once its
batch is done; it follows the protocol but does not lower the time to the first token.

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
from collections.abc import Sequence
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


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Runs the engine on whatever requests are waiting, one batch at a time."""

    def __init__(self, engine: Engine, delay_s: float = 0.0) -> None:
        self.engine = engine
        self.delay_s = delay_s
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def submit(self, request: GenerationRequest) -> RequestOutput:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(request, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < MAX_BATCH_REQUESTS:
                batch.append(self.queue.get_nowait())
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            try:
                outputs = await asyncio.to_thread(self.engine.generate, [p.request for p in batch])
            except Exception as error:  # noqa: BLE001 - every waiter gets the error
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            for pending, output in zip(batch, outputs, strict=True):
                if not pending.future.done():
                    pending.future.set_result(output)


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

    async def _generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        self.engine.check_requests(requests)
        return list(await asyncio.gather(*(self.batcher.submit(r) for r in requests)))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompts = self._prompts(body.get("prompt"))
        logprobs = body.get("logprobs")
        if logprobs is not None and (not isinstance(logprobs, int) or not 0 <= logprobs <= 20):
            raise BadRequest("logprobs must be an integer from 0 to 20", "logprobs")
        if body.get("echo"):
            raise BadRequest("echo is not supported", "echo")
        n = self._n(body)
        sampling = self._sampling(body, logprobs=logprobs is not None, top_logprobs=logprobs or 0, default_max=16)
        requests = [GenerationRequest(prompt_token_ids=p, n=n, sampling=sampling) for p in prompts]
        outputs = await self._generate(requests)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices = []
        for p, output in enumerate(outputs):
            for completion in output.completions:
                choices.append(self._text_choice(p * n + completion.index, completion, logprobs is not None))
        if body.get("stream"):
            return await self._stream(request, ident, created, "text_completion", choices)
        return web.json_response({
            "id": ident, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [choice for choice, _ in choices], "usage": _usage(outputs)})

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

    def _text_choice(self, index: int, completion: Completion, logprobs: bool) -> tuple[dict, list]:
        choice: dict[str, Any] = {"index": index, "text": completion.text, "finish_reason": completion.finish_reason,
                                  "token_ids": completion.token_ids, "logprobs": None}
        tokens = [self.tokenizer.decode([t]) for t in completion.token_ids]
        if logprobs:
            offsets, position = [], 0
            for token in tokens:
                offsets.append(position)
                position += len(token)
            choice["logprobs"] = {
                "tokens": tokens, "token_logprobs": completion.logprobs,
                "top_logprobs": [{t.token: t.logprob for t in step} for step in completion.top_logprobs]
                if completion.top_logprobs is not None else None,
                "text_offset": offsets,
            }
        return choice, tokens

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", "messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise BadRequest(f"messages[{index}] must have string content", f"messages[{index}].content")
        top = body.get("top_logprobs") or 0
        if not isinstance(top, int) or not 0 <= top <= 20:
            raise BadRequest("top_logprobs must be an integer from 0 to 20", "top_logprobs")
        want = bool(body.get("logprobs"))
        n = self._n(body)
        prompt = GenerationRequest(messages=tuple(messages))
        prompt.check("request")
        ids = self.tokenizer.encode_chat(list(messages), add_generation_prompt=True)
        room = getattr(self.engine, "context_length", 4096) - len(ids)
        sampling = self._sampling(body, logprobs=want, top_logprobs=top if want else 0,
                                  default_max=max(1, room))
        (output,) = await self._generate([GenerationRequest(messages=tuple(messages), n=n, sampling=sampling)])
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [self._chat_choice(c, want) for c in output.completions]
        if body.get("stream"):
            return await self._stream(request, ident, created, "chat.completion.chunk", choices)
        return web.json_response({
            "id": ident, "object": "chat.completion", "created": created, "model": self.model_name,
            "choices": [choice for choice, _ in choices], "usage": _usage([output])})

    def _chat_choice(self, completion: Completion, logprobs: bool) -> tuple[dict, list]:
        tokens = [self.tokenizer.decode([t]) for t in completion.token_ids]
        choice: dict[str, Any] = {
            "index": completion.index, "message": {"role": "assistant", "content": completion.text},
            "finish_reason": completion.finish_reason, "token_ids": completion.token_ids, "logprobs": None}
        if logprobs:
            choice["logprobs"] = {"content": [
                {"token": token, "logprob": lp, "bytes": list(token.encode()),
                 "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
                                  for t in (completion.top_logprobs[i] if completion.top_logprobs else [])]}
                for i, (token, lp) in enumerate(zip(tokens, completion.logprobs or [], strict=False))]}
        return choice, tokens

    async def _stream(self, request: web.Request, ident: str, created: int, kind: str,
                      choices: list[tuple[dict, list]]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chat = kind == "chat.completion.chunk"
        for choice, tokens in choices:
            text = choice["message"]["content"] if chat else choice["text"]
            pieces = _split_text(text, tokens)
            for position, piece in enumerate(pieces):
                last = position == len(pieces) - 1
                delta: dict[str, Any] = {"index": choice["index"], "finish_reason": choice["finish_reason"] if last else None}
                if chat:
                    delta["delta"] = ({"role": "assistant"} if position == 0 else {}) | {"content": piece}
                else:
                    delta["text"] = piece
                chunk = {"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": [delta]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _split_text(text: str, tokens: list[str]) -> list[str]:
    """The completion's text in pieces of about one token each, joining back to `text`."""
    pieces, position = [], 0
    for token in tokens:
        if position >= len(text):
            break
        pieces.append(text[position:position + len(token)])
        position += len(token)
    if position < len(text):
        pieces.append(text[position:])
    return pieces or [""]


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
