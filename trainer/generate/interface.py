"""The one interface every generation engine implements: a batch of requests in, completions out.

A `GenerationRequest` is a prompt (chat messages, or token ids) with `n` samples and its
`SamplingParams`. The engine answers with one `RequestOutput` per request, holding a
`Completion` per sample (or the error that request failed with).

Sampling is reproducible per sample: sample `i` of a request with seed `s` is drawn from its
own random stream (`sample_seed(s, i)`), so it does not depend on `n`, on the other requests
in the batch or on which samples were already cached. That is what lets the request cache
key a result by its sample index.

Log-probabilities are those of the model's own distribution (temperature 1, before top-k and
top-p), so they can be compared across sampling settings (Pivotal Token Search estimates).
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

FinishReason = Literal["stop", "length"]
MAX_N = 4096


class GenerationError(Exception):
    """A generation failed; the message names what and where, never a secret."""


class GenerationInputError(GenerationError):
    """Bad input found before any generation: the message names the field or the endpoint."""


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request.

    temperature 0 is greedy. top_k 0 and top_p 1 disable those filters. `stop` strings end a
    completion and are cut from its text; `stop_token_ids` end it too and are kept in its
    token ids (not in its text); end of turn (`<|im_end|>`) and end of text (`<|endoftext|>`)
    always stop. `logprobs` asks for the sampled token's log-probability at every step, and
    `top_logprobs` for the k most likely tokens as well.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def check(self, where: str = "sampling") -> None:
        """Raises GenerationInputError naming the first out-of-range field."""
        problems = {
            "temperature": not (0.0 <= self.temperature <= 2.0 and math.isfinite(self.temperature)),
            "topP": not (0.0 < self.top_p <= 1.0),
            "topK": self.top_k < 0,
            "maxTokens": not (1 <= self.max_tokens <= 131072),
            "seed": self.seed is not None and self.seed < 0,
            "topLogprobs": not (0 <= self.top_logprobs <= 20),
        }
        for name, bad in problems.items():
            if bad:
                raise GenerationInputError(f"{where}.{name}: {getattr(self, _snake(name))!r} is out of range")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationInputError(f"{where}.stop: stop strings must be non-empty strings")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop), "stop_token_ids": list(self.stop_token_ids)}


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


Message = Mapping[str, str]


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and how many samples to draw from it.

    Exactly one of `messages` (chat turns, rendered with Phi-4's chat template and an open
    assistant turn) or `prompt_token_ids` (used as they are: continue a prefix) is set.
    `sample_indices` selects which of the `n` samples to produce (all by default): the request
    cache asks only for the ones it lacks. `id` is the caller's, carried through untouched.
    """

    messages: tuple[Message, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    n: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    sample_indices: tuple[int, ...] | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))
        if self.prompt_token_ids is not None:
            object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in self.prompt_token_ids))
        if self.sample_indices is not None:
            object.__setattr__(self, "sample_indices", tuple(int(i) for i in self.sample_indices))

    @property
    def indices(self) -> tuple[int, ...]:
        return self.sample_indices if self.sample_indices is not None else tuple(range(self.n))

    def check(self, where: str = "request") -> None:
        if (self.messages is None) == (self.prompt_token_ids is None):
            raise GenerationInputError(f"{where}: set exactly one of messages or prompt_token_ids")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise GenerationInputError(f"{where}.promptTokenIds: the prompt is empty")
        if self.messages is not None:
            if not self.messages:
                raise GenerationInputError(f"{where}.messages: no messages")
            for index, message in enumerate(self.messages):
                if message.get("role") not in ("system", "user", "assistant"):
                    raise GenerationInputError(
                        f"{where}.messages[{index}].role: must be system, user or assistant, "
                        f"got {message.get('role')!r}")
                if not isinstance(message.get("content"), str):
                    raise GenerationInputError(f"{where}.messages[{index}].content: must be a string")
        if not 1 <= self.n <= MAX_N:
            raise GenerationInputError(f"{where}.n: {self.n} is out of range (1 to {MAX_N})")
        if any(not 0 <= i < self.n for i in self.indices) or len(set(self.indices)) != len(self.indices):
            raise GenerationInputError(f"{where}.sampleIndices: must be distinct and below n={self.n}")
        self.sampling.check(f"{where}.sampling")

    def prompt_key(self) -> dict[str, Any]:
        """The prompt as plain JSON data (for hashing and logging)."""
        if self.messages is not None:
            return {"messages": [{"role": m["role"], "content": m["content"]} for m in self.messages]}
        return {"prompt_token_ids": list(self.prompt_token_ids or ())}

    def with_indices(self, indices: Sequence[int]) -> GenerationRequest:
        return replace(self, sample_indices=tuple(indices))


@dataclass
class TopLogprob:
    token_id: int
    logprob: float
    token: str = ""


@dataclass
class Completion:
    """One sample: generated ids (a closing stop token included), text (stops excluded), and
    per generated token the log-probability of the token drawn and, when asked, the top k."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None
    cached: bool = False

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("cached")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, cached: bool = False) -> Completion:
        tops = data.get("top_logprobs")
        return cls(
            index=int(data["index"]),
            token_ids=[int(t) for t in data["token_ids"]],
            text=str(data["text"]),
            finish_reason=data["finish_reason"],
            prompt_tokens=int(data["prompt_tokens"]),
            logprobs=None if data.get("logprobs") is None else [float(v) for v in data["logprobs"]],
            top_logprobs=None if tops is None else [[TopLogprob(**t) for t in step] for step in tops],
            cached=cached,
        )


@dataclass
class SampleFailure:
    """A sample that could not be generated (after the engine's retries)."""

    index: int
    kind: str  # a short class: "rate_limit", "server", "timeout", "connection", "bad_request", ...
    message: str


@dataclass
class RequestOutput:
    """The completions of one request by sample index, and the samples that failed."""

    request: GenerationRequest
    completions: list[Completion] = field(default_factory=list)
    failures: list[SampleFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def error(self) -> str | None:
        return self.failures[0].message if self.failures else None


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` of a request seeded `seed` (None stays unseeded)."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"tokenmill-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def stable_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Engine(ABC):
    """A model behind the interface. `check()` validates model and endpoint before any work;
    `generate` answers every request (errors are per request, in `RequestOutput.error`)."""

    #: "torch", "openai" or "vllm"
    engine_name: str
    #: a GenerateMetrics the engine reports latency (and retries) to, if any
    metrics: Any = None

    @property
    @abstractmethod
    def model_identity(self) -> str:
        """What the outputs depend on besides the request: a checkpoint digest, or the
        endpoint and model name. Part of every request-cache key."""

    def check(self) -> None:
        """Probe the model or endpoint; raises GenerationInputError. Default: nothing to do."""

    def check_requests(self, requests: Sequence[GenerationRequest]) -> None:
        """Raises GenerationInputError for the first bad request, naming its index and field."""
        for index, request in enumerate(requests):
            request.check(f"requests[{index}]")

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        """One output per request, in order."""

    def close(self) -> None:
        """Release the model or the connections."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
