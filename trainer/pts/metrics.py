"""The PTSJob's Prometheus metrics beyond the plain counters of `trainer.metrics.PTS_SERIES`,
from the figures in its progress record.

The workload writes flat keys into `Progress.metrics` (`delta_p|<bin>`, `pivotal_per_solution|<n>`,
`verdicts|<reason>`, `problems`, `rollouts_reused`, `estimate_se_mean`, `estimate_se_max`);
`trainer.metrics` serves them as:

- `tokenmill_pts_pivotal_tokens_by_delta_p_total{delta_p}`: kept pivotal tokens by their change
  of p, in bins of 0.1 over [-1, 1] (`[0.3,0.4)`);
- `tokenmill_pts_solutions_by_pivotal_tokens_total{pivotal_tokens}`: searched solutions by how
  many pivotal tokens they kept;
- `tokenmill_pts_verdicts_total{reason}`: oracle verdicts by reason;
- `tokenmill_pts_problems_total`, `tokenmill_pts_rollouts_reused_total`;
- `tokenmill_pts_estimate_standard_error_mean` and `_max`: of the p(success | prefix) estimates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tokenmill.trainer.pts.stats import SearchStats, delta_bin_label


def progress_figures(stats: SearchStats) -> dict[str, float]:
    """The keys this module reads, from the search's statistics."""
    figures: dict[str, float] = {
        "problems": stats.problems,
        "rollouts_reused": stats.rollouts_reused,
        "estimate_se_mean": stats.estimate_se_mean,
        "estimate_se_max": stats.estimate_se_max,
    }
    figures.update({f"delta_p|{delta_bin_label(i)}": n for i, n in enumerate(stats.delta_p_histogram) if n})
    figures.update({f"pivotal_per_solution|{k}": n for k, n in stats.pivotal_per_solution.items()})
    figures.update({f"verdicts|{reason}": n for reason, n in stats.verdicts.items()})
    return {key: float(value) for key, value in figures.items()}


def pts_families(metrics: Mapping[str, float], names: Sequence[str], values: Sequence[str]) -> list[Metric]:
    names, values = list(names), list(values)
    by_delta = CounterMetricFamily("tokenmill_pts_pivotal_tokens_by_delta_p",
                                   "Kept pivotal tokens by their change of p (bins of 0.1).",
                                   labels=[*names, "delta_p"])
    by_count = CounterMetricFamily("tokenmill_pts_solutions_by_pivotal_tokens",
                                   "Searched solutions by how many pivotal tokens they kept.",
                                   labels=[*names, "pivotal_tokens"])
    verdicts = CounterMetricFamily("tokenmill_pts_verdicts", "Oracle verdicts on solutions and rollouts, by reason.",
                                   labels=[*names, "reason"])
    labelled = {"delta_p": by_delta, "pivotal_per_solution": by_count, "verdicts": verdicts}
    for key, value in sorted(metrics.items()):
        kind, _, label = key.partition("|")
        if label and kind in labelled:
            labelled[kind].add_metric([*values, label], value)
    families: list[Metric] = [family for family in labelled.values() if family.samples]
    for key, name, text, family_type in (
        ("problems", "tokenmill_pts_problems", "Problems read (searched or skipped).", CounterMetricFamily),
        ("rollouts_reused", "tokenmill_pts_rollouts_reused",
         "Estimate samples taken from rollouts drawn at a shorter prefix (no new rollout).", CounterMetricFamily),
        ("estimate_se_mean", "tokenmill_pts_estimate_standard_error_mean",
         "Mean standard error of the p(success | prefix) estimates.", GaugeMetricFamily),
        ("estimate_se_max", "tokenmill_pts_estimate_standard_error_max",
         "Largest standard error of a p(success | prefix) estimate.", GaugeMetricFamily),
    ):
        if key in metrics:
            family = family_type(name, text, labels=names)
            family.add_metric(values, metrics[key])
            families.append(family)
    return families
