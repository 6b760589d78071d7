"""Prometheus metrics of the operator, served with /healthz and /readyz over HTTP.

Labels are kinds, phases, results and error classes only: never resource names, so the
series count stays bounded however many resources a cluster holds.

    tokenmill_resources{kind,phase}                          gauge, from the operator's cache
    tokenmill_committed_bytes{kind}                          gauge, sum of status.outputs.bytes
    tokenmill_stage_runs_total{kind,result}                  attempts that ended: succeeded | failed
    tokenmill_stage_duration_seconds{kind,result}            histogram of attempt durations
    tokenmill_stage_last_success_timestamp_seconds{kind}     when an attempt of the kind last succeeded
    tokenmill_rayjobs_created_total{kind}                    RayJobs created
    tokenmill_reconcile_errors_total{kind,reason}            failed reconciliations by error class
    tokenmill_reconcile_duration_seconds                     histogram of one reconciliation
    tokenmill_reconcile_queue_depth                          resources waiting to be reconciled
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from tokenmill.api.resources import KINDS
from tokenmill.api.status import PHASES

DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 172800, 345600, 604800)
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _CacheCollector:
    """Counts cached resources by kind and phase at scrape time."""

    def __init__(self, source: Callable[[], Iterable[Mapping[str, Any]]]):
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        phases: Tally[tuple[str, str]] = Tally()
        committed: Tally[str] = Tally()
        for body in self._source():
            kind = str(body.get("kind", ""))
            if kind not in KINDS:
                continue
            status = body.get("status") or {}
            phase = status.get("phase") or "Pending"
            phases[(kind, phase if phase in PHASES else "Pending")] += 1
            outputs = status.get("outputs") or {}
            if isinstance(outputs.get("bytes"), int):
                committed[kind] += outputs["bytes"]
        resources = GaugeMetricFamily("tokenmill_resources", "tokenmill resources by kind and phase",
                                      labels=["kind", "phase"])
        for kind in KINDS:
            for phase in PHASES:
                resources.add_metric([kind, phase], phases[(kind, phase)])
        yield resources
        stored = GaugeMetricFamily("tokenmill_committed_bytes", "bytes of committed outputs by kind",
                                   labels=["kind"])
        for kind in KINDS:
            stored.add_metric([kind], committed[kind])
        yield stored

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


class Metrics:
    def __init__(self, resources: Callable[[], Iterable[Mapping[str, Any]]] = lambda: ()):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_CacheCollector(resources))
        self.stage_runs = Counter("tokenmill_stage_runs", "attempts that ended, by kind and result",
                                  ["kind", "result"], registry=self.registry)
        self.stage_duration = Histogram("tokenmill_stage_duration_seconds", "duration of attempts",
                                        ["kind", "result"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.last_success = Gauge("tokenmill_stage_last_success_timestamp_seconds",
                                  "Unix time an attempt of the kind last succeeded", ["kind"], registry=self.registry)
        self.rayjobs_created = Counter("tokenmill_rayjobs_created", "RayJobs created", ["kind"],
                                       registry=self.registry)
        self.reconcile_errors = Counter("tokenmill_reconcile_errors", "failed reconciliations",
                                        ["kind", "reason"], registry=self.registry)
        self.reconcile_duration = Histogram("tokenmill_reconcile_duration_seconds", "duration of one reconciliation",
                                            buckets=RECONCILE_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("tokenmill_reconcile_queue_depth", "resources waiting to be reconciled",
                                 registry=self.registry)
        for kind in KINDS:  # publish zeros, so rate() and absent() behave from the start
            for result in ("succeeded", "failed"):
                self.stage_runs.labels(kind, result)
            self.rayjobs_created.labels(kind)

    def attempt_finished(self, kind: str, result: str, duration: float | None) -> None:
        self.stage_runs.labels(kind, result).inc()
        if duration is not None:
            self.stage_duration.labels(kind, result).observe(duration)
        if result == "succeeded":
            self.last_success.labels(kind).set(time.time())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """`/metrics`, `/healthz` (the event loop answers) and `/readyz` (the operator has started
    and, with peering, this replica's state is known)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], bool], *, host: str = "0.0.0.0", port: int = 8080):
        self.metrics = metrics
        self.ready = ready
        self.host = host
        self.port = port
        self._runner: Any = None

    async def start(self) -> int:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web

        body = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"status": "ok"})

    async def _readyz(self, request: Any) -> Any:
        from aiohttp import web

        ok = self.ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)
