"""Terminal front end of the local runner: live progress bars, workload output, a summary table.

Text from recipes, workloads and the store (names, messages, log lines, URIs) is printed as
plain `Text`, never parsed as rich markup: a line such as `[/oops]` is shown as written.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from tokenmill.api.resources import AnyResource
from tokenmill.runner.evaluation import run_evaluation
from tokenmill.runner.local import LocalRunner, RunEvents, StageResult, default_store
from tokenmill.store import Progress as ProgressRecord

SUMMARY_WIDTH = 80

RESULT_STYLE = {
    "Succeeded": "green",
    "Up to date": "green",
    "Failed": "red",
    "Not built yet": "yellow",
    "Blocked": "yellow",
}


def _label(resource: AnyResource) -> str:
    return f"{resource.kind}/{resource.name}"


class RateColumn(ProgressColumn):
    """Units of the workload's own progress (steps, documents, problems) per second."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit") or ""
        if task.speed is None or not unit:
            return Text("")
        speed = task.speed
        figure = f"{speed:,.0f}" if speed >= 10 else f"{speed:.2f}"
        return Text(f"{figure} {unit}/s")


class CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit") or ""
        if not unit or task.total is None:
            return Text("")
        return Text(f"{task.completed:,.0f}/{task.total:,.0f} {unit}")


def progress_bars(console: Console, get_time: Callable[[], float] | None = None) -> Progress:
    """One bar per running stage: done/total in the workload's unit, rate, ETA, elapsed, message."""
    return Progress(
        TextColumn("{task.description}", markup=False), BarColumn(bar_width=20), CountColumn(), RateColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[message]}", markup=False), console=console, get_time=get_time,
    )


@contextlib.contextmanager
def local_ray(address: str | None, start: bool) -> Iterator[str | None]:
    """Yield the address of the Ray cluster workloads should join, starting one if asked."""
    if address or not start:
        yield address
        return
    try:
        import ray
    except ImportError:  # the trainer extra is not installed: workloads start their own Ray
        yield None
        return
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    context = ray.init(include_dashboard=True, log_to_driver=False, configure_logging=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def run_with_progress(
    resources: list[AnyResource],
    recipe: Path,
    *,
    store: str | None,
    ray_address: str | None,
    start_ray: bool,
    console: Console,
    evaluation: dict | None = None,
) -> int:
    """Run the recipe's stages, then its evaluation (a resolved `evaluation.json`, when given),
    then write the report; returns the exit status (0 only when every stage and the evaluation succeeded)."""
    store_root = store or default_store(recipe)
    console.print(Text(f"running {len(resources)} resource(s) from {recipe} into {store_root}"))
    progress = progress_bars(console)
    tasks: dict[tuple[str, str], TaskID] = {}

    def say(*parts: str | tuple[str, str]) -> None:
        progress.console.print(Text.assemble(*parts), highlight=False, soft_wrap=True)

    def started(resource: AnyResource, resuming: bool) -> None:
        if resuming:
            say(("resume", "cyan"), f" {_label(resource)}: continuing from the work an earlier run committed")
        else:
            say(("start", "cyan"), f" {_label(resource)}")
        tasks[resource.key] = progress.add_task(_label(resource), total=None, message="starting", unit="")

    def on_progress(resource: AnyResource, record: ProgressRecord) -> None:
        task = tasks.get(resource.key)
        if task is None:
            return
        if record.total:
            progress.update(task, total=record.total, completed=min(record.done, record.total),
                            message=record.message, unit=record.unit)
        else:
            progress.update(task, message=record.message)

    def line(resource: AnyResource, text: str) -> None:
        progress.console.print(Text.assemble((_label(resource), "dim"), " ", text), highlight=False, soft_wrap=True)

    def finished(result: StageResult) -> None:
        task = tasks.pop(result.resource.key, None)
        if task is not None:
            progress.remove_task(task)
        style = RESULT_STYLE.get(result.result, "white")
        if result.result == "Succeeded":
            say(("done", style), f" {_label(result.resource)} in {result.seconds:.1f}s: {_describe_outputs(result)}")
        elif result.result == "Up to date":
            say(("skip", style), f" {_label(result.resource)}: already done ({result.detail})")
        else:
            say((result.result, style), f" {_label(result.resource)}: ", result.detail)

    with local_ray(ray_address, start_ray) as address, progress:
        runner = LocalRunner(store_root, address, events=RunEvents(started, on_progress, line, finished))
        results = runner.run(resources)
    width = min(console.width, SUMMARY_WIDTH)
    console.print(summary_table(results), width=width)
    succeeded = all(r.result in ("Succeeded", "Up to date") for r in results)
    evaluated = True
    if succeeded and evaluation is not None:
        console.print(Text.assemble(("start", "cyan"), " evaluation: ", ", ".join(evaluation["models"])))
        started = time.monotonic()
        code = run_evaluation(evaluation, store_root, lambda text: console.print(
            Text.assemble(("evaluation", "dim"), " ", text), highlight=False, soft_wrap=True))
        evaluated = code == 0
        if evaluated:
            console.print(Text.assemble(("done", "green"), f" evaluation in {time.monotonic() - started:.1f}s"))
        else:
            console.print(Text.assemble(("Failed", "red"), f" evaluation: exited with status {code}"))
    if succeeded:
        print_report(store_root, console, width)
    return 0 if succeeded and evaluated else 1


def print_report(store_root: str, console: Console, width: int = SUMMARY_WIDTH) -> str | None:
    """Build report.html for the run under `store_root` and print its short text summary."""
    try:
        from tokenmill.report import build_report, read_run, text_summary
    except ImportError as error:  # the report needs the trainer extra's matplotlib and jinja2
        console.print(Text(f"no report: {error}"))
        return None
    uri = build_report(store_root)
    for text in text_summary(read_run(store_root)):
        console.print(Text(text), width=width, no_wrap=True, overflow="ellipsis")
    console.print(Text(f"report: {uri}"), width=width, soft_wrap=True)
    return uri


def summary_table(results: list[StageResult]) -> Table:
    table = Table(title="tokenmill run")
    table.add_column("resource", overflow="fold")
    table.add_column("result", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("outputs / detail", overflow="fold")
    for result in results:
        style = RESULT_STYLE.get(result.result, "white")
        table.add_row(
            Text(_label(result.resource)),
            Text(result.result, style=style),
            f"{result.seconds:.0f}s" if result.seconds else "",
            Text(_describe_outputs(result) if result.outputs else result.detail),
        )
    return table


def _describe_outputs(result: StageResult) -> str:
    outputs = result.outputs
    if outputs is None:
        return result.output
    parts = []
    if outputs.rows is not None:
        parts.append(f"{outputs.rows:,} rows")
    if outputs.tokens:
        parts.append(f"{outputs.tokens:,} tokens")
    if outputs.checkpoint:
        step = outputs.checkpoint.rstrip("/").rsplit("/", 1)[-1].removeprefix("step-").lstrip("0") or "0"
        parts.append(f"step {step}" + (" + hf export" if outputs.hf_export else ""))
    return ", ".join(parts) or outputs.uri
