"""The CorpusFilter's funnel as Prometheus metrics, through the exposition format a PodMonitor scrapes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.store import Progress
from tokenmill.trainer.curate.workload import progress_metrics as funnel_figures
from tokenmill.trainer.metrics import ProgressCollector

LABELS = {"kind": "CorpusFilter", "namespace": "team", "name": "web"}
FUNNEL = {
    "documents": [
        {"step": "input", "verdict": "dropped", "reason": "invalid-json", "documents": 1},
        {"step": "input", "verdict": "kept", "reason": "passed", "documents": 99},
        {"step": "outliers", "verdict": "dropped", "reason": "too-short", "documents": 9},
        {"step": "decontamination", "verdict": "kept", "reason": "partial", "documents": 2},
    ],
    "bytesIn": 12345, "bytesOut": 6789, "kept": 88, "languages": {"en": 80, "de": 8},
    "qualityHistogram": {"bins": [0.0, 0.5, 1.0], "documents": [30, 60]},
    "classifier": {"heldOutAccuracy": 0.93, "heldOutF1": 0.91},
}


def scrape(progress: Progress) -> dict[str, dict]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProgressCollector(lambda: progress, LABELS))
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_the_funnel_is_served_as_labelled_counters_and_a_histogram():
    families = scrape(Progress(phase="succeeded", done=4, total=4, unit="shards", metrics=funnel_figures(FUNNEL)))
    documents = {(s.labels["step"], s.labels["verdict"], s.labels["reason"]): s.value
                 for s in families["tokenmill_corpus_documents"].samples if s.name.endswith("_total")}
    assert documents[("input", "dropped", "invalid-json")] == 1
    assert documents[("outliers", "dropped", "too-short")] == 9
    assert documents[("decontamination", "kept", "partial")] == 2
    assert all(s.labels["kind"] == "CorpusFilter" and s.labels["name"] == "web"
               for s in families["tokenmill_corpus_documents"].samples)
    assert families["tokenmill_corpus_input_bytes"].samples[0].value == 12345
    assert families["tokenmill_corpus_output_bytes"].samples[0].value == 6789
    languages = {s.labels["language"]: s.value for s in families["tokenmill_corpus_kept_documents"].samples}
    assert languages == {"en": 80, "de": 8}
    buckets = {s.labels["le"]: s.value for s in families["tokenmill_corpus_quality_score"].samples
               if s.name.endswith("_bucket")}
    assert buckets == {"0.5": 30, "+Inf": 90}
    assert families["tokenmill_corpus_classifier_held_out_f1_ratio"].samples[0].value == 0.91
