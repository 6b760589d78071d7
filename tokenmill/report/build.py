"""Reads a finished run from its store root and writes report.html with matplotlib PNGs."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from tokenmill.layout import join
from tokenmill.outputs import check_outputs
from tokenmill.store import ObjectNotFoundError, Store, StoreError, open_store

REPORT_NAME = "report.html"
IMAGES_DIR = "report"
EVALUATION_KEY = "_evaluation/evaluation.json"
KIND_ORDER = {"CorpusFilter": 0, "SyntheticDataJob": 1, "TrainingStage": 2, "PTSJob": 3}


class ReportError(Exception):
    """The store root holds no run to report on."""


@dataclass
class StageRecord:
    kind: str
    name: str
    output: str
    spec: dict[str, Any]
    progress: dict[str, Any]
    outputs: dict[str, Any] | None
    records: dict[str, Any] = field(default_factory=dict)
    """Per-kind records: funnel, history (training metrics), pts (search statistics)."""

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def stage(self) -> str:
        return str(self.spec.get("stage", "")) if self.kind == "TrainingStage" else ""


@dataclass
class RunRecords:
    root: str
    stages: list[StageRecord]
    evaluation: dict[str, Any] | None


def _read_json(store: Store, key: str) -> Any:
    try:
        return store.read_json(key)
    except ObjectNotFoundError:
        return None


def _read_jsonl(store: Store, key: str) -> list[dict[str, Any]]:
    try:
        text = store.read_bytes(key).decode()
    except ObjectNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_run(root: str) -> RunRecords:
    """Every resource that ran under `root` (`<plural>/<name>/_run/spec.json`), with its records."""
    store = open_store(root)
    stages = []
    for plural in store.list_dirs(""):
        if plural.startswith("_"):
            continue
        for name in store.list_dirs(plural):
            resource = store.child(f"{plural}/{name}")
            document = _read_json(resource, "_run/spec.json")
            if not isinstance(document, dict) or "kind" not in document:
                continue
            kind = str(document["kind"])
            output = str(document.get("output") or resource.uri)
            stage = StageRecord(kind, str(document.get("metadata", {}).get("name", name)), output,
                                document.get("spec") or {}, _read_json(resource, "_run/progress.json") or {}, None)
            report = check_outputs(kind, output)
            if report.committed and report.summary is not None:
                stage.outputs = report.summary.model_dump(exclude_none=True, mode="json")
            if kind == "CorpusFilter":
                stage.records["funnel"] = _read_json(resource, "_run/funnel.json")
            elif kind == "TrainingStage":
                stage.records["history"] = _read_jsonl(resource, "_run/train_metrics.jsonl")
            elif kind == "SyntheticDataJob":
                stage.records["synth"] = _read_json(resource, "_run/synth-stats.json")
            elif kind == "PTSJob":
                stats = _read_json(resource, "_run/pts-stats.json")
                stage.records["pts"] = stats.get("stats", stats) if isinstance(stats, dict) else None
            stages.append(stage)
    if not stages:
        raise ReportError(f"{root} holds no run: no <kind>/<name>/_run/spec.json under it")
    stages.sort(key=lambda s: (str(s.progress.get("updated_at") or "~"), KIND_ORDER.get(s.kind, 9), s.name))
    return RunRecords(root, stages, _read_json(store, EVALUATION_KEY))


# ---------------------------------------------------------------- figures from the records


def funnel_steps(funnel: dict[str, Any]) -> tuple[list[tuple[str, int]], list[tuple[str, str, int]]]:
    """Documents kept after each step, in pipeline order, and the documents dropped per step and reason."""
    kept: dict[str, int] = {}
    dropped: list[tuple[str, str, int]] = []
    for row in funnel.get("documents", []):
        step, count = str(row.get("step")), int(row.get("documents", 0))
        if row.get("verdict") == "kept":
            kept[step] = kept.get(step, 0) + count
        elif row.get("verdict") == "dropped":
            dropped.append((step, str(row.get("reason")), count))
    return list(kept.items()), dropped


def synthetic_steps(stats: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(step, items in, items kept) per workflow step, from the job's `_run/synth-stats.json`."""
    return [(str(row.get("step")), int(row.get("in", 0)), int(row.get("kept", 0))) for row in stats.get("steps", [])]


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def draw_plots(run: RunRecords) -> dict[str, bytes]:
    """PNG bytes by file name, one per plot the run's records allow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: dict[str, bytes] = {}
    for stage in run.stages:
        slug = f"{stage.kind.lower()}-{stage.name}"
        if stage.kind == "CorpusFilter" and stage.records.get("funnel"):
            kept, _ = funnel_steps(stage.records["funnel"])
            if kept:
                figure, axis = plt.subplots(figsize=(7, 3.2))
                names, counts = [k for k, _ in kept], [v for _, v in kept]
                bars = axis.bar(names, counts, color="#4c72b0")
                axis.bar_label(bars, labels=[f"{c:,}" for c in counts], fontsize=8)
                axis.set_ylabel("documents kept")
                axis.set_title(f"{stage.label}: documents after each step")
                axis.tick_params(axis="x", labelrotation=20)
                images[f"{slug}-funnel.png"] = _png(figure)
        elif stage.kind == "SyntheticDataJob" and stage.records.get("synth"):
            steps = synthetic_steps(stage.records["synth"])
            if steps:
                figure, axis = plt.subplots(figsize=(7, 3.2))
                names = [s for s, _, _ in steps]
                rates = [accepted / total if total else 0.0 for _, total, accepted in steps]
                bars = axis.bar(names, rates, color="#55a868")
                axis.bar_label(bars, labels=[f"{kept:,} of {total:,}" for _, total, kept in steps], fontsize=8)
                axis.set_ylim(0, 1.1)
                axis.set_ylabel("accepted share")
                axis.set_title(f"{stage.label}: acceptance per workflow step")
                images[f"{slug}-acceptance.png"] = _png(figure)
        elif stage.kind == "TrainingStage" and stage.records.get("history"):
            history = stage.records["history"]
            steps = [row["step"] for row in history]
            figure, (loss_axis, lr_axis) = plt.subplots(1, 2, figsize=(8, 3))
            loss_axis.plot(steps, [row.get("loss") for row in history], color="#c44e52")
            loss_axis.set_xlabel("step")
            loss_axis.set_ylabel("loss")
            loss_axis.set_title(f"{stage.label} ({stage.stage}): loss")
            lr_axis.plot(steps, [row.get("lr", row.get("learning_rate")) for row in history], color="#8172b2")
            lr_axis.set_xlabel("step")
            lr_axis.set_ylabel("learning rate")
            lr_axis.set_title("learning rate")
            lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            figure.tight_layout()
            images[f"{slug}-training.png"] = _png(figure)
        elif stage.kind == "PTSJob" and stage.records.get("pts"):
            stats = stage.records["pts"]
            figure, (delta_axis, per_axis) = plt.subplots(1, 2, figsize=(8, 3))
            histogram = stats.get("deltaPHistogram") or {}
            delta_axis.bar(list(histogram), list(histogram.values()), color="#dd8452")
            delta_axis.set_title(f"{stage.label}: Δp of pivotal tokens")
            delta_axis.set_xlabel("Δp bin")
            delta_axis.set_ylabel("pivotal tokens")
            delta_axis.tick_params(axis="x", labelrotation=45, labelsize=7)
            per_solution = stats.get("pivotalPerSolution") or {}
            per_axis.bar(list(per_solution), list(per_solution.values()), color="#937860")
            per_axis.set_title("pivotal tokens per solution")
            per_axis.set_xlabel("pivotal tokens kept")
            per_axis.set_ylabel("solutions")
            figure.tight_layout()
            images[f"{slug}-pts.png"] = _png(figure)
    return images


# ---------------------------------------------------------------- HTML and text


def _stage_facts(stage: StageRecord) -> list[tuple[str, str]]:
    facts: list[tuple[str, str]] = []
    outputs = stage.outputs or {}
    if outputs.get("rows") is not None:
        facts.append(("rows committed", f"{outputs['rows']:,}"))
    if outputs.get("tokens"):
        facts.append(("tokens", f"{outputs['tokens']:,}"))
    if outputs.get("checkpoint"):
        step = str(outputs["checkpoint"]).rstrip("/").rsplit("/", 1)[-1].removeprefix("step-").lstrip("0") or "0"
        facts.append(("checkpoint", f"step {step}" + (", Hugging Face export" if outputs.get("hf_export") else "")))
    if stage.kind == "TrainingStage" and stage.records.get("history"):
        last = stage.records["history"][-1]
        facts.append(("final loss", f"{last.get('loss', float('nan')):.4f} at step {last.get('step')}"))
    if stage.kind == "SyntheticDataJob" and stage.records.get("synth"):
        stats = stage.records["synth"]
        facts.append(("seeds", f"{stats.get('seeds', 0):,}"))
        facts += [(f"{step} kept", f"{kept:,} of {total:,}") for step, total, kept in synthetic_steps(stats)]
    if stage.kind == "PTSJob" and stage.records.get("pts"):
        stats = stage.records["pts"]
        facts += [("problems searched", f"{stats.get('problemsSearched', 0)} of {stats.get('problems', 0)}"),
                  ("pivotal tokens", str(stats.get("pivotalTokens", 0))),
                  ("pairs", ", ".join(f"{k} {v}" for k, v in (stats.get("pairs") or {}).items()) or "0")]
    facts.append(("phase", str(stage.progress.get("phase", "unknown"))))
    return facts


def render_html(run: RunRecords, images: dict[str, bytes]) -> str:
    from jinja2 import Environment

    from tokenmill.report.template import REPORT_TEMPLATE

    environment = Environment(autoescape=True)
    sections = []
    for stage in run.stages:
        slug = f"{stage.kind.lower()}-{stage.name}"
        section: dict[str, Any] = {"label": stage.label, "stage": stage.stage, "facts": _stage_facts(stage),
                                   "images": [f"{IMAGES_DIR}/{name}" for name in images if name.startswith(slug + "-")]}
        if stage.kind == "CorpusFilter" and stage.records.get("funnel"):
            section["dropped"] = funnel_steps(stage.records["funnel"])[1]
        if stage.kind == "SyntheticDataJob" and stage.records.get("synth"):
            section["dropped"] = [(str(row.get("step")), str(reason), int(count))
                                  for row in stage.records["synth"].get("steps", [])
                                  for reason, count in (row.get("droppedByReason") or {}).items()]
        sections.append(section)
    return environment.from_string(REPORT_TEMPLATE).render(run=run, sections=sections, evaluation=run.evaluation)


def build_report(root: str, out: str | None = None) -> str:
    """Write report.html and its PNGs under `out` (default: the run's store root); return the report's URI."""
    run = read_run(root)
    images = draw_plots(run)
    target = open_store(out or root)
    for name, data in images.items():
        target.write_bytes(f"{IMAGES_DIR}/{name}", data)
    target.write_bytes(REPORT_NAME, render_html(run, images).encode())
    return join(target.uri, REPORT_NAME)


def headline(stage: StageRecord) -> str:
    """The one figure a reader wants first from each stage."""
    outputs = stage.outputs or {}
    if stage.kind == "CorpusFilter" and stage.records.get("funnel"):
        kept, _ = funnel_steps(stage.records["funnel"])
        if kept:
            return f"{kept[-1][1]:,} of {kept[0][1]:,} documents kept"
    if stage.kind == "SyntheticDataJob" and stage.records.get("synth"):
        return f"{outputs.get('rows', 0):,} rows from {stage.records['synth'].get('seeds', 0):,} seeds"
    if stage.kind == "TrainingStage" and stage.records.get("history"):
        last = stage.records["history"][-1]
        return f"{stage.stage}: {last.get('step')} steps, final loss {last.get('loss', float('nan')):.3f}"
    if stage.kind == "PTSJob" and stage.records.get("pts"):
        stats = stage.records["pts"]
        return (f"{stats.get('pivotalTokens', 0)} pivotal tokens, {stats.get('problemsSearched', 0)} of "
                f"{stats.get('problems', 0)} problems searched")
    return str(stage.progress.get("phase", ""))


def text_summary(run: RunRecords) -> list[str]:
    """A few lines for the terminal (each under 80 columns)."""
    lines = [f"{stage.label[:30]:<30} {headline(stage)}"[:79] for stage in run.stages]
    if run.evaluation:
        lines.append("held-out evaluation    greedy accuracy   success rate")
        for label, figures in run.evaluation.get("models", {}).items():
            lines.append(f"  {label[:20]:<20} {figures['greedyAccuracy']:>15.3f}   "
                         f"{figures['successRate']:.3f} ± {figures['successRateStderr']:.3f}"[:79])
    return lines


__all__ = ["ReportError", "RunRecords", "StoreError", "build_report", "read_run", "text_summary"]
