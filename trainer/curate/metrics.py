"""The CorpusFilter's Prometheus metrics, from the funnel figures in its progress record.

The workload writes the funnel into `Progress.metrics` as flat keys (`documents|<step>|<verdict>|<reason>`,
`language|<code>`, `quality_bin|<upper bound>`, `classifier|<figure>`, `bytes_in`, `bytes_out`);
`trainer.metrics` serves them as:

- `tokenmill_corpus_documents_total{step,verdict,reason}`
- `tokenmill_corpus_input_bytes_total`, `tokenmill_corpus_output_bytes_total`
- `tokenmill_corpus_kept_documents{language}`
- `tokenmill_corpus_quality_score` (a histogram of the kept-so-far scores before the quality cut)
- `tokenmill_corpus_classifier_held_out_accuracy_ratio`, `..._f1_ratio`
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric


def corpus_families(metrics: Mapping[str, float], names: Sequence[str], values: Sequence[str]) -> list[Metric]:
    names, values = list(names), list(values)
    documents = CounterMetricFamily("tokenmill_corpus_documents",
                                    "Documents per curation step, verdict (kept or dropped) and reason.",
                                    labels=[*names, "step", "verdict", "reason"])
    languages = GaugeMetricFamily("tokenmill_corpus_kept_documents", "Kept documents per identified language.",
                                  labels=[*names, "language"])
    bins: list[tuple[float, float]] = []
    for key, value in metrics.items():
        kind, _, rest = key.partition("|")
        if kind == "documents":
            step, verdict, reason = rest.split("|", 2)
            documents.add_metric([*values, step, verdict, reason], value)
        elif kind == "language":
            languages.add_metric([*values, rest], value)
        elif kind == "quality_bin":
            bins.append((float(rest), value))
    families: list[Metric] = [documents, languages]
    for key, name, text in (("bytes_in", "tokenmill_corpus_input_bytes", "UTF-8 bytes of text read."),
                            ("bytes_out", "tokenmill_corpus_output_bytes", "UTF-8 bytes of text kept.")):
        if key in metrics:
            family = CounterMetricFamily(name, text, labels=names)
            family.add_metric(values, metrics[key])
            families.append(family)
    if bins:
        bins.sort()
        cumulative, total, buckets = 0.0, sum(count for _, count in bins), []
        for upper, count in bins:
            cumulative += count
            buckets.append(("+Inf" if upper >= 1.0 else str(upper), cumulative))
        if buckets[-1][0] != "+Inf":
            buckets.append(("+Inf", total))
        histogram = HistogramMetricFamily("tokenmill_corpus_quality_score",
                                          "Quality classifier scores of the documents that reached the quality step.",
                                          labels=names)
        histogram.add_metric(values, buckets, sum_value=None)
        families.append(histogram)
    for key, name in (("classifier|heldOutAccuracy", "tokenmill_corpus_classifier_held_out_accuracy_ratio"),
                      ("classifier|heldOutF1", "tokenmill_corpus_classifier_held_out_f1_ratio")):
        if key in metrics:
            family = GaugeMetricFamily(name, "The quality classifier's figure on held-out annotations.", labels=names)
            family.add_metric(values, metrics[key])
            families.append(family)
    return families
