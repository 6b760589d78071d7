"""Prometheus metrics of generation, labelled by engine.

- `tokenmill_generate_requests_total{engine,outcome}`: samples generated (ok) or failed (error);
- `tokenmill_generate_generated_tokens_total`, `tokenmill_generate_prompt_tokens_total`;
- `tokenmill_generate_errors_total{engine,kind}`: failed samples and rejected calls by kind;
- `tokenmill_generate_retries_total{engine,kind}`: retried HTTP requests by the reason;
- `tokenmill_generate_cache_hits_total`: samples served from the request cache;
- `tokenmill_generate_request_duration_seconds`: latency of one engine call (an HTTP request,
  or one batch of the torch engine).

By default the series live in prometheus-client's process registry, which `tokenmill serve`
exposes at `/metrics` and the workload's metrics server includes. Engines in Ray actors count
into a `GenerationTally` instead; the actor sends its counts back with each result and the
driver adds them to its own series (`GenerateMetrics.add`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

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

    def add(self, counts: Mapping[str, Any]) -> None:
        """Adds another process's counts (a `GenerationTally.take()`) to these series."""
        failed = counts.get("failed") or {}
        for outcome, number in (("ok", counts.get("ok", 0)), ("error", sum(failed.values()))):
            if number:
                self._requests.labels(self.engine, outcome).inc(number)
        for kind, number in [*failed.items(), *(counts.get("errors") or {}).items()]:
            self._errors.labels(self.engine, kind).inc(number)
        for kind, number in (counts.get("retries") or {}).items():
            self._retries.labels(self.engine, kind).inc(number)
        self._prompted.inc(counts.get("promptTokens", 0))
        self._generated.inc(counts.get("generatedTokens", 0))
        self._hits.inc(counts.get("cacheHits", 0))
        for seconds in counts.get("latencies") or ():
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


class GenerationTally(GenerateMetrics):
    """What a `GenerateMetrics` counts, kept in memory instead, for a process nobody scrapes (a
    Ray actor): `take()` returns the counts since the last call, and the process that serves
    `/metrics` adds them to its own series with `GenerateMetrics.add`."""

    def __init__(self, engine: str) -> None:  # no registry: nothing is registered
        self.engine = engine
        self._lock = threading.Lock()
        self._counts = self._empty()

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"ok": 0, "promptTokens": 0, "generatedTokens": 0, "cacheHits": 0, "failed": {}, "errors": {},
                "retries": {}, "latencies": []}

    def _add(self, name: str, kind: str, count: int = 1) -> None:
        with self._lock:
            self._counts[name][kind] = self._counts[name].get(kind, 0) + count

    def sample_ok(self, prompt_tokens: int, generated_tokens: int) -> None:
        with self._lock:
            self._counts["ok"] += 1
            self._counts["promptTokens"] += prompt_tokens
            self._counts["generatedTokens"] += generated_tokens

    def sample_failed(self, kind: str) -> None:
        self._add("failed", kind)

    def error(self, kind: str) -> None:
        self._add("errors", kind)

    def retry(self, kind: str) -> None:
        self._add("retries", kind)

    def cache_hits(self, count: int) -> None:
        with self._lock:
            self._counts["cacheHits"] += count

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            self._counts["latencies"].append(seconds)

    def take(self) -> dict[str, Any]:
        """The counts since the last call (JSON data, labelled by `engine`)."""
        with self._lock:
            counts, self._counts = self._counts, self._empty()
        return {"engine": self.engine, **counts}
