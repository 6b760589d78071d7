"""Prometheus metrics of generation, labelled by engine.

- `tokenmill_generate_requests_total{engine,outcome}`: samples generated (ok) or failed (error);
- `tokenmill_generate_generated_tokens_total`, `tokenmill_generate_prompt_tokens_total`;
- `tokenmill_generate_errors_total{engine,kind}`: failed samples and rejected calls by kind;
- `tokenmill_generate_retries_total{engine,kind}`: retried HTTP requests by the reason;
- `tokenmill_generate_cache_hits_total`: samples served from the request cache;
- `tokenmill_generate_request_duration_seconds`: latency of one engine call (an HTTP request,
  or one batch of the torch engine).

By default the series live in prometheus-client's process registry, which `tokenmill serve`
exposes at `/metrics` and the workload's metrics server includes.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_SHARED: dict[int, dict] = {}


class GenerateMetrics:
    def __init__(self, engine: str, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else REGISTRY
        families = _families(registry)
        self.engine = engine
        self._requests = families["requests"]
        self._generated = families["generated"].labels(engine)
        self._prompted = families["prompted"].labels(engine)
        self._errors = families["errors"]
        self._retries = families["retries"]
        self._hits = families["hits"].labels(engine)
        self._latency = families["latency"].labels(engine)

    def sample_ok(self, prompt_tokens: int, generated_tokens: int) -> None:
        self._requests.labels(self.engine, "ok").inc()
        self._prompted.inc(prompt_tokens)
        self._generated.inc(generated_tokens)

    def sample_failed(self, kind: str) -> None:
        self._requests.labels(self.engine, "error").inc()
        self._errors.labels(self.engine, kind).inc()

    def error(self, kind: str) -> None:
        self._errors.labels(self.engine, kind).inc()

    def retry(self, kind: str) -> None:
        self._retries.labels(self.engine, kind).inc()

    def cache_hits(self, count: int) -> None:
        self._hits.inc(count)

    def observe_latency(self, seconds: float) -> None:
        self._latency.observe(seconds)


def _families(registry: CollectorRegistry) -> dict:
    """The metric families, registered once per registry."""
    key = id(registry)
    if key not in _SHARED:
        _SHARED[key] = {
            "requests": Counter("tokenmill_generate_requests", "Samples generated or failed.",
                                ["engine", "outcome"], registry=registry),
            "generated": Counter("tokenmill_generate_generated_tokens", "Tokens generated.",
                                 ["engine"], registry=registry),
            "prompted": Counter("tokenmill_generate_prompt_tokens", "Prompt tokens of generated samples.",
                                ["engine"], registry=registry),
            "errors": Counter("tokenmill_generate_errors", "Failed samples and calls, by kind.",
                              ["engine", "kind"], registry=registry),
            "retries": Counter("tokenmill_generate_retries", "Retried requests, by the reason.",
                               ["engine", "kind"], registry=registry),
            "hits": Counter("tokenmill_generate_cache_hits", "Samples served from the request cache.",
                            ["engine"], registry=registry),
            "latency": Histogram("tokenmill_generate_request_duration_seconds",
                                 "Latency of one engine call (an HTTP request or a torch batch).",
                                 ["engine"], buckets=LATENCY_BUCKETS, registry=registry),
        }
    return _SHARED[key]
