"""The run report: `report.html` and its PNG plots, built from what a run committed to its store.

Every figure is read from the run's records under the store root (a local folder or an S3
prefix): each resource's `_run/spec.json`, `_run/progress.json`, the CorpusFilter's
`_run/funnel.json`, a training stage's `_run/train_metrics.jsonl`, the PTSJob's
`_run/pts-stats.json`, a SyntheticDataJob's per-step counts in its progress metrics, the
committed manifests, and `_evaluation/evaluation.json`. Text from the run (names, reasons,
URIs) is escaped by Jinja2's autoescape.
"""

from tokenmill.report.build import ReportError, RunRecords, build_report, read_run, text_summary

__all__ = ["ReportError", "RunRecords", "build_report", "read_run", "text_summary"]
