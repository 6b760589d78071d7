"""Prometheus metrics of a running workload, served by its driver for a PodMonitor to scrape.

The values are the workload's own progress record (`<output>/_run/progress.json`, written by
the workload as it goes: for training, by rank 0 at every metrics line), read when Prometheus
scrapes and at most once per `refresh_seconds`, so serving metrics adds no work to the
workload itself. Every series carries the resource's `kind`, `namespace` and `name`.

- every workload: `tokenmill_workload_progress_ratio` and `tokenmill_workload_phase{phase}`
  (1 for the current phase);
- TrainingStage: `tokenmill_train_step`, `_loss`, `_learning_rate`, `_grad_norm`,
  `_tokens_per_second`, `_mfu_ratio`, `_trained_token_ratio` and the counter
  `tokenmill_train_tokens_total`; stage dpo adds `tokenmill_train_dpo_reward_accuracy_ratio`,
  `_chosen_reward`, `_rejected_reward`, `_margin`, `_pairs_per_second` and `_pairs_total`;
- CorpusFilter: the funnel, `tokenmill_corpus_documents_total{step,verdict,reason}` and the
  rest listed in `trainer/curate/metrics.py`;
- PTSJob: the counters `tokenmill_pts_pivotal_tokens_total`, `_rollouts_total`,
  `_estimates_total`, `_tokens_generated_total`, `_problems_searched_total`,
  `_problems_skipped_too_hard_total`, `_problems_skipped_too_easy_total`,
  `_pivotal_pairs_total`, `_full_solution_pairs_total`, and those of `trainer/pts/metrics.py`
  (the Δp histogram, solutions by pivotal tokens, verdicts, estimate standard errors);
- SyntheticDataJob: `tokenmill_synth_records_total{step,verdict}`,
  `tokenmill_synth_tokens_generated_total` and the rest listed in `trainer/synth/metrics.py`;
- any workload that generates: `tokenmill_generate_*` (requests, tokens, errors, retries,
  cache hits, latency), counted live by the engines (`trainer/generate/metrics.py`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tokenmill.store import Progress, StoreError, read_progress

LABELS = ("kind", "namespace", "name")


@dataclass(frozen=True)
class Series:
    """One figure of `Progress.metrics` and the metric it is exported as."""

    key: str
    name: str
    help: str
    counter: bool = False


TRAINING_SERIES = (
    Series("step", "tokenmill_train_step", "Optimizer steps completed."),
    Series("loss", "tokenmill_train_loss", "Loss of the last logged step (mean token cross-entropy; dpo: DPO loss)."),
    Series("lr", "tokenmill_train_learning_rate", "Learning rate of the last logged step."),
    Series("grad_norm", "tokenmill_train_grad_norm", "Gradient norm before clipping, last logged step."),
    Series("tokens_per_s", "tokenmill_train_tokens_per_second", "Training throughput over the last logging window."),
    Series("mfu", "tokenmill_train_mfu_ratio", "Model FLOPs utilisation over the last logging window (0 to 1)."),
    Series("tokens_seen", "tokenmill_train_tokens", "Tokens trained on so far.", counter=True),
    Series("trained_token_share", "tokenmill_train_trained_token_ratio",
           "Share of the batch positions whose loss is taken (sft: assistant tokens), last logging window."),
    Series("reward_accuracy", "tokenmill_train_dpo_reward_accuracy_ratio",
           "dpo: share of the last logged step's pairs whose chosen reward exceeds the rejected one."),
    Series("chosen_reward", "tokenmill_train_dpo_chosen_reward", "dpo: mean beta x (policy - reference) log-prob "
           "of the chosen continuations, last logged step."),
    Series("rejected_reward", "tokenmill_train_dpo_rejected_reward", "dpo: the same for the rejected continuations."),
    Series("margin", "tokenmill_train_dpo_margin", "dpo: mean chosen minus rejected reward, last logged step."),
    Series("pairs_per_s", "tokenmill_train_dpo_pairs_per_second",
           "dpo: pairs trained per second, last logging window."),
    Series("pairs_seen", "tokenmill_train_dpo_pairs", "dpo: pairs trained on so far.", counter=True),
)
PTS_SERIES = (
    Series("problems_searched", "tokenmill_pts_problems_searched", "Problems searched (p(success) inside the window).",
           counter=True),
    Series("problems_skipped_too_hard", "tokenmill_pts_problems_skipped_too_hard",
           "Problems skipped with p(success) below minSuccess.", counter=True),
    Series("problems_skipped_too_easy", "tokenmill_pts_problems_skipped_too_easy",
           "Problems skipped with p(success) above maxSuccess.", counter=True),
    Series("estimates", "tokenmill_pts_estimates", "p(success | prefix) estimates made.", counter=True),
    Series("rollouts", "tokenmill_pts_rollouts", "Rollouts sampled and judged.", counter=True),
    Series("tokens_generated", "tokenmill_pts_tokens_generated", "Tokens of solutions and rollouts.", counter=True),
    Series("pivotal_tokens", "tokenmill_pts_pivotal_tokens", "Pivotal tokens found and kept.", counter=True),
    Series("pairs_pivotal", "tokenmill_pts_pivotal_pairs", "One-token pairs written.", counter=True),
    Series("pairs_full_solution", "tokenmill_pts_full_solution_pairs", "Full-solution pairs written.", counter=True),
)

SERIES_BY_KIND: Mapping[str, tuple[Series, ...]] = {"TrainingStage": TRAINING_SERIES, "PTSJob": PTS_SERIES}


def resource_labels(doc: Mapping[str, Any]) -> dict[str, str]:
    """The `kind`, `namespace` and `name` labels of a run spec document."""
    metadata = doc.get("metadata") or {}
    return {
        "kind": str(doc.get("kind") or ""),
        "namespace": str(metadata.get("namespace") or ""),
        "name": str(metadata.get("name") or ""),
    }


def progress_metrics(progress: Progress | None, labels: Mapping[str, str]) -> list[Metric]:
    """The metric families for one progress record (none before the workload wrote one)."""
    if progress is None:
        return []
    names, values = list(LABELS), [labels.get(label, "") for label in LABELS]
    families: list[Metric] = []
    if progress.fraction is not None:
        ratio = GaugeMetricFamily("tokenmill_workload_progress_ratio", "Fraction of the workload done (0 to 1).",
                                  labels=names)
        ratio.add_metric(values, progress.fraction)
        families.append(ratio)
    if progress.phase:
        phase = GaugeMetricFamily("tokenmill_workload_phase", "1 for the workload's current phase.",
                                  labels=[*names, "phase"])
        phase.add_metric([*values, progress.phase], 1.0)
        families.append(phase)
    for series in SERIES_BY_KIND.get(labels.get("kind", ""), ()):
        value = progress.metrics.get(series.key)
        if value is None:
            continue
        family_type = CounterMetricFamily if series.counter else GaugeMetricFamily
        family = family_type(series.name, series.help, labels=names)
        family.add_metric(values, float(value))
        families.append(family)
    if labels.get("kind") == "CorpusFilter":
        from tokenmill.trainer.curate.metrics import corpus_families

        families += corpus_families(progress.metrics, names, values)
    if labels.get("kind") == "SyntheticDataJob":
        from tokenmill.trainer.synth.metrics import synth_families

        families += synth_families(progress.metrics, names, values)
    if labels.get("kind") == "PTSJob":
        from tokenmill.trainer.pts.metrics import pts_families

        families += pts_families(progress.metrics, names, values)
    return families


class ProgressCollector:
    """A Prometheus collector over a workload's progress record, re-read at most every `refresh_seconds`."""

    def __init__(
        self,
        read: Callable[[], Progress | None],
        labels: Mapping[str, str],
        *,
        refresh_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read, self._labels = read, dict(labels)
        self._refresh, self._clock = refresh_seconds, clock
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._read_at: float | None = None

    def current(self) -> Progress | None:
        with self._lock:
            now = self._clock()
            if self._read_at is None or now - self._read_at >= self._refresh:
                try:
                    self._progress = self._read()
                except StoreError as error:  # keep the last values; the next scrape tries again
                    print(f"tokenmill metrics: cannot read progress: {error}", file=sys.stderr, flush=True)
                self._read_at = now
            return self._progress

    def collect(self) -> Iterator[Metric]:
        yield from progress_metrics(self.current(), self._labels)


class LiveCollector:
    """The families this process counts as it works (generation engines count requests, tokens,
    errors, retries, cache hits and latency into prometheus-client's default registry)."""

    def __init__(self, prefix: str = "tokenmill_generate_", registry: CollectorRegistry = REGISTRY) -> None:
        self._prefix, self._registry = prefix, registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.name.startswith(self._prefix):
                yield family


def serve_workload_metrics(doc: Mapping[str, Any], port: int, *, address: str = "0.0.0.0",
                           refresh_seconds: float = 1.0):
    """Serve `/metrics` for the workload of run spec `doc` on a daemon thread; returns the HTTP server."""
    output = str(doc["output"])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProgressCollector(lambda: read_progress(output), resource_labels(doc),
                                        refresh_seconds=refresh_seconds))
    registry.register(LiveCollector())
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server
