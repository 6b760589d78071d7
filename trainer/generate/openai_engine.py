"""The `openai` engine: any OpenAI-compatible endpoint (a hosted teacher, `vllm serve`,
`tokenmill serve`) through the official `openai` client (async).

- Each sample is one HTTP request with `n=1` and the sample's own seed
  (`sample_seed(seed, i)`), so every sample is cached, retried and reproduced on its own.
  Chat requests go to `/chat/completions`; token-id prompts to `/completions`.
- At most `max_concurrency` requests are in flight, over aiohttp (the client's
  `DefaultAioHttpClient`; about half the CPU per request of its default transport).
- Requests go through the client's generic `post`, answered as plain JSON: the typed
  `create()` methods walk every prompt token through their parameter transforms and build
  pydantic models of each answer, which cost more CPU per request than all the rest
  together (several milliseconds for a prompt of a few hundred tokens).
- 429, 5xx, timeouts and dropped connections are retried with exponential backoff and full
  jitter, waiting at least what `Retry-After` (or `retry-after-ms`) asks; other errors (400,
  404) are not retried. A sample still failing is returned as a `SampleFailure`.
- The API key comes from `TOKENMILL_GENERATOR_API_KEY` (the Secret the operator mounts) and
  is never logged or put into a message.
- `check()` probes `GET /models` first: an unreachable endpoint, a 401 or a model the
  endpoint does not serve fail at once, naming the endpoint and the field.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai

from tokenmill.trainer.generate.interface import (
    Completion,
    Engine,
    GenerationInputError,
    GenerationRequest,
    RequestOutput,
    SampleFailure,
    TopLogprob,
    sample_seed,
)
from tokenmill.trainer.tokenizer import Tokenizer

log = logging.getLogger("tokenmill.generate")
API_KEY_ENV = "TOKENMILL_GENERATOR_API_KEY"
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per request and the backoff between them (seconds)."""

    attempts: int = 8
    base_s: float = 0.5
    max_s: float = 60.0
    timeout_s: float = 600.0

    def backoff(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Full jitter over base x 2^attempt (capped), and never sooner than Retry-After."""
        jittered = rng.uniform(0, min(self.max_s, self.base_s * 2 ** attempt))
        return max(jittered, retry_after or 0.0)


def _retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    if response is None:
        return None
    headers = response.headers
    if (value := headers.get("retry-after-ms")) is not None:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else max(0.0, parsed.timestamp() - time.time())


def _dropped_connection(error: BaseException) -> bool:
    """Whether the error was caused by a connection the peer closed or reset (aiohttp's
    transport reports those to the client as a connect timeout)."""
    cause = error.__cause__ or error.__context__
    seen = 0
    while cause is not None and seen < 8:
        if isinstance(cause, (ConnectionError, aiohttp.ClientConnectionError)) and not isinstance(cause, TimeoutError):
            return True
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return False


def classify(error: Exception) -> tuple[str, bool]:
    """A short kind for metrics and records, and whether to retry."""
    if isinstance(error, openai.APITimeoutError):
        return ("connection" if _dropped_connection(error) else "timeout"), True
    if isinstance(error, openai.APIConnectionError):
        return "connection", True
    if isinstance(error, openai.RateLimitError):
        return "rate_limit", True
    if isinstance(error, openai.AuthenticationError):
        return "auth", False
    if isinstance(error, openai.NotFoundError):
        return "not_found", False
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        if status >= 500:
            return "server", True
        return ("bad_request", False) if status not in RETRYABLE_STATUS else (f"http_{status}", True)
    return type(error).__name__, False


def _message(error: Exception) -> str:
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {str(error)[:300]}"
    return f"{type(error).__name__}: {str(error)[:300]}"


class OpenAIEngine(Engine):
    engine_name = "openai"

    def __init__(
        self,
        endpoint: str,
        model_name: str,
        *,
        api_key: str | None = None,
        tokenizer: Tokenizer | None = None,
        max_concurrency: int = 64,
        retry: RetryPolicy | None = None,
        probe_timeout_s: float = 30.0,
        metrics: Any = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.model_name = model_name
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.tokenizer = tokenizer
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryPolicy()
        self.probe_timeout_s = probe_timeout_s
        self.metrics = metrics
        self.http_requests = 0
        self._rng = random.Random()

    def __repr__(self) -> str:  # never the key
        return f"OpenAIEngine({self.endpoint!r}, {self.model_name!r})"

    @property
    def model_identity(self) -> str:
        return f"openai:{self.endpoint}#{self.model_name}"

    def _client(self, timeout: float) -> openai.AsyncOpenAI:
        try:
            http_client = openai.DefaultAioHttpClient(timeout=timeout)
        except RuntimeError:  # an openai release without its aiohttp transport
            http_client = None
        return openai.AsyncOpenAI(base_url=self.endpoint, api_key=self._api_key or "unset",
                                  max_retries=0, timeout=timeout, http_client=http_client)

    # -- the probe ---------------------------------------------------------------------

    def check(self) -> None:
        asyncio.run(self._probe())

    async def _probe(self) -> None:
        client = self._client(self.probe_timeout_s)
        try:
            listing = await client.models.list()
            served = [model.id for model in listing.data]
        except openai.AuthenticationError:
            raise GenerationInputError(
                f"generator.apiKeySecret: the endpoint {self.endpoint} rejected the API key (HTTP 401)") from None
        except openai.PermissionDeniedError:
            raise GenerationInputError(
                f"generator.apiKeySecret: the endpoint {self.endpoint} denied access (HTTP 403)") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as error:
            raise GenerationInputError(
                f"generator.endpoint: cannot reach {self.endpoint}: {type(error).__name__}") from None
        except openai.APIStatusError as error:
            raise GenerationInputError(
                f"generator.endpoint: {self.endpoint}/models answered HTTP {error.status_code}") from None
        finally:
            await client.close()
        if self.model_name not in served:
            shown = ", ".join(served[:10]) or "none"
            raise GenerationInputError(
                f"generator.modelName: {self.endpoint} does not serve model {self.model_name!r} (it serves: {shown})")

    # -- generation --------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        self.check_requests(requests)
        return asyncio.run(self._generate(requests))

    async def _generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        client = self._client(self.retry.timeout_s)
        limit = asyncio.Semaphore(self.max_concurrency)
        outputs = [RequestOutput(request) for request in requests]

        async def one(position: int, index: int) -> None:
            async with limit:
                result = await self._sample(client, requests[position], index)
            if isinstance(result, Completion):
                outputs[position].completions.append(result)
            else:
                outputs[position].failures.append(result)

        try:
            await asyncio.gather(*(one(p, i) for p, r in enumerate(requests) for i in r.indices))
        finally:
            await client.close()
        for output in outputs:
            output.completions.sort(key=lambda c: c.index)
            output.failures.sort(key=lambda f: f.index)
        return outputs

    async def _sample(self, client: openai.AsyncOpenAI, request: GenerationRequest, index: int) -> Completion | SampleFailure:
        kind, message = "unknown", "no attempt made"
        for attempt in range(self.retry.attempts):
            started = time.perf_counter()
            self.http_requests += 1
            try:
                completion = await self._call(client, request, index)
            except (openai.APIError, ValueError) as error:
                kind, retryable = classify(error)
                message = _message(error)
                if not retryable or attempt == self.retry.attempts - 1:
                    break
                delay = self.retry.backoff(attempt, _retry_after(error), self._rng)
                if self.metrics is not None:
                    self.metrics.retry(kind)
                log.info("retrying a %s request in %.2f s after %s (attempt %d)",
                         self.endpoint, delay, kind, attempt + 1)
                await asyncio.sleep(delay)
                continue
            finally:
                if self.metrics is not None:
                    self.metrics.observe_latency(time.perf_counter() - started)
            return completion
        log.warning("a request to %s failed for good: %s", self.endpoint, message)
        return SampleFailure(index, kind, message)

    async def _call(self, client: openai.AsyncOpenAI, request: GenerationRequest, index: int) -> Completion:
        params = request.sampling
        body: dict[str, Any] = {
            "model": self.model_name, "n": 1, "temperature": params.temperature, "top_p": params.top_p,
            "max_tokens": params.max_tokens, "seed": sample_seed(params.seed, index),
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_k:
            body["top_k"] = params.top_k
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        want = params.logprobs or params.top_logprobs > 0
        chat = request.messages is not None
        if chat:
            body["messages"] = [dict(m) for m in request.messages or ()]
            if want:
                body["logprobs"] = True
                if params.top_logprobs:
                    body["top_logprobs"] = params.top_logprobs
        else:
            body["prompt"] = list(request.prompt_token_ids or ())
            if want:
                body["logprobs"] = params.top_logprobs
        response = await client.post("/chat/completions" if chat else "/completions", cast_to=object, body=body)
        if not isinstance(response, dict) or not isinstance(response.get("choices"), list):
            raise ValueError("the endpoint's answer is not a completion object")
        if not response["choices"]:
            raise ValueError("the endpoint returned no choices")
        choice = response["choices"][0]
        logprobs, tops = None, None
        if chat:
            text = (choice.get("message") or {}).get("content") or ""
            steps = (choice.get("logprobs") or {}).get("content")
            if steps is not None:
                logprobs = [step["logprob"] for step in steps]
                if params.top_logprobs:
                    tops = [[TopLogprob(-1, top["logprob"], top["token"]) for top in step.get("top_logprobs") or ()]
                            for step in steps]
        else:
            text = choice.get("text") or ""
            lp = choice.get("logprobs")
            if lp is not None:
                logprobs = list(lp.get("token_logprobs") or [])
                if params.top_logprobs and lp.get("top_logprobs") is not None:
                    tops = [[TopLogprob(-1, value, token) for token, value in (step or {}).items()]
                            for step in lp["top_logprobs"]]
        token_ids = _token_ids(choice)
        if token_ids is None:
            token_ids = self.tokenizer.encode(text) if self.tokenizer is not None else []
        usage = response.get("usage") or {}
        return Completion(
            index=index, token_ids=token_ids, text=text,
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            logprobs=logprobs if want else None, top_logprobs=tops if params.top_logprobs else None,
        )


def _token_ids(choice: dict[str, Any]) -> list[int] | None:
    """The generated ids when the server sends them (tokenmill serve; vLLM's `token_ids`)."""
    ids = choice.get("token_ids")
    if isinstance(ids, list) and all(isinstance(t, int) for t in ids):
        return ids
    return None
