"""An engine from a resource's spec, checked before any generation and put behind the cache.

`engine_from_generator(spec.generator, output=...)` serves a SyntheticDataJob (or any spec
with the `Generator` shape); PTS passes its fields to `build_engine` directly. Either way the
engine is probed (`check()`): a model that does not load or whose vocabulary does not match
its tokenizer, an unreachable endpoint, a rejected key or an unknown model name raise
`GenerationInputError` naming the field, before the first request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenmill.store import AttemptFence
from tokenmill.trainer.generate.cache import CachedEngine, FailureBudget, RequestCache, generations_uri
from tokenmill.trainer.generate.interface import Engine, GenerationInputError, SamplingParams
from tokenmill.trainer.generate.metrics import GenerateMetrics

ENGINES = ("openai", "torch", "vllm", "scripted")


def sampling_from_spec(sampling: Any, **overrides: Any) -> SamplingParams:
    """Our SamplingParams from the API's (`temperature`, `topP`, `maxTokens`, `seed`), with extras
    such as `stop`, `logprobs` or a per-call `seed` given as keyword arguments."""
    if isinstance(sampling, Mapping):
        values = {"temperature": sampling.get("temperature", 0.8), "top_p": sampling.get("topP", 0.95),
                  "max_tokens": sampling.get("maxTokens", 2048), "seed": sampling.get("seed")}
    else:
        values = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                  "max_tokens": sampling.max_tokens, "seed": sampling.seed}
    return SamplingParams(**(values | overrides))


def build_engine(
    engine: str,
    *,
    model_uri: str | None = None,
    endpoint: str | None = None,
    model_name: str | None = None,
    tokenizer: str | None = None,
    max_concurrency: int = 64,
    tensor_parallel_size: int = 1,
    device: str | None = None,
    field: str = "generator",
    check: bool = True,
    mistake_rate: float = 0.2,
) -> Engine:
    """The engine, checked (unless `check=False`); errors name `field`'s subfields."""
    if engine not in ENGINES:
        raise GenerationInputError(f"{field}.engine: unknown engine {engine!r}; known engines: {', '.join(ENGINES)}")
    built: Engine
    if engine == "openai":
        if not endpoint or not model_name:
            raise GenerationInputError(f"{field}: engine openai needs endpoint and modelName")
        from tokenmill.trainer.generate.openai_engine import OpenAIEngine
        from tokenmill.trainer.tokenizer import get_tokenizer

        built = OpenAIEngine(endpoint, model_name, max_concurrency=max_concurrency,
                             tokenizer=get_tokenizer(tokenizer) if tokenizer else None)
    elif engine == "scripted":  # the rule-based stand-in teacher: only when a spec asks for it
        from tokenmill.trainer.generate.scripted_engine import ScriptedEngine

        built = ScriptedEngine(mistake_rate=mistake_rate)
    else:
        if not model_uri:
            raise GenerationInputError(f"{field}.model: engine {engine} needs a model with a resolved uri")
        if engine == "torch":
            from tokenmill.trainer.generate.loading import load_torch_engine

            built = load_torch_engine(model_uri, device=device, field=f"{field}.model")
        else:
            from tokenmill.trainer.generate.vllm_engine import VLLMEngine

            built = VLLMEngine(model_uri, tensor_parallel_size=tensor_parallel_size,
                               max_concurrency=max_concurrency, field=f"{field}.model")
    built.metrics = GenerateMetrics(engine)
    if check:
        built.check()
    return built


def engine_from_generator(
    generator: Any,
    *,
    output: str | None,
    budget: FailureBudget | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    field: str = "generator",
    fence: AttemptFence | None = None,
) -> CachedEngine:
    """A checked engine for a `Generator` spec (the pydantic object or its camelCase dict), behind
    the request cache at `<output>/generations` (no cache when `output` is None; fenced by the
    attempt's `fence` when given)."""
    if isinstance(generator, Mapping):
        engine = generator.get("engine", "vllm")
        model = generator.get("model") or {}
        values = {"model_uri": model.get("uri"), "endpoint": generator.get("endpoint"),
                  "model_name": generator.get("modelName"),
                  "max_concurrency": generator.get("maxConcurrency", 64),
                  "tensor_parallel_size": generator.get("tensorParallelSize", 1),
                  "mistake_rate": generator.get("mistakeRate", 0.2)}
    else:
        engine = generator.engine
        values = {"model_uri": generator.model.uri if generator.model else None,
                  "endpoint": generator.endpoint, "model_name": generator.model_name,
                  "max_concurrency": generator.max_concurrency,
                  "tensor_parallel_size": generator.tensor_parallel_size,
                  "mistake_rate": generator.mistake_rate}
    built = build_engine(engine, tokenizer=tokenizer, device=device, field=field, **values)
    cache = RequestCache(generations_uri(output), fence=fence).load() if output is not None else None
    return CachedEngine(built, cache, budget, built.metrics)
