"""The SyntheticDataJob's Prometheus metrics, from the figures in its progress record.

The workload writes flat keys into `Progress.metrics` (`records|<step>|<verdict>|<reason>`,
`requests|<step>`, `tokens|<step>`, `tokens_generated`, `records_written`, `seeds`);
`trainer.metrics` serves them as:

- `tokenmill_synth_records_total{step,verdict}`: items each step kept or dropped;
- `tokenmill_synth_dropped_total{step,reason}`: dropped items by the step's reason;
- `tokenmill_synth_tokens_generated_total` and `tokenmill_synth_step_tokens_generated_total{step}`;
- `tokenmill_synth_requests_total{step}`: samples each step asked the engine for (cached ones included);
- `tokenmill_synth_seeds_total`, `tokenmill_synth_records_written_total`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, Metric


def synth_families(metrics: Mapping[str, float], names: Sequence[str], values: Sequence[str]) -> list[Metric]:
    names, values = list(names), list(values)
    records = CounterMetricFamily("tokenmill_synth_records", "Items per workflow step and verdict (kept or dropped).",
                                  labels=[*names, "step", "verdict"])
    dropped = CounterMetricFamily("tokenmill_synth_dropped", "Items a workflow step dropped, by reason.",
                                  labels=[*names, "step", "reason"])
    requests = CounterMetricFamily("tokenmill_synth_requests", "Samples a workflow step asked the engine for.",
                                   labels=[*names, "step"])
    step_tokens = CounterMetricFamily("tokenmill_synth_step_tokens_generated", "Tokens generated per workflow step.",
                                      labels=[*names, "step"])
    by_verdict: Counter = Counter()
    for key, value in metrics.items():
        kind, _, rest = key.partition("|")
        if kind == "records":
            step, verdict, reason = rest.split("|", 2)
            by_verdict[(step, verdict)] += value
            if verdict == "dropped":
                dropped.add_metric([*values, step, reason], value)
        elif kind == "requests":
            requests.add_metric([*values, rest], value)
        elif kind == "tokens":
            step_tokens.add_metric([*values, rest], value)
    for (step, verdict), value in sorted(by_verdict.items()):
        records.add_metric([*values, step, verdict], value)
    families: list[Metric] = [records, dropped, requests, step_tokens]
    for key, name, text in (("tokens_generated", "tokenmill_synth_tokens_generated", "Tokens the generator produced."),
                            ("seeds", "tokenmill_synth_seeds", "Seeds run through the workflow."),
                            ("records_written", "tokenmill_synth_records_written", "Records written to the dataset.")):
        if key in metrics:
            family = CounterMetricFamily(name, text, labels=names)
            family.add_metric(values, metrics[key])
            families.append(family)
    return families
