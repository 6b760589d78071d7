"""Terminal front end of the local runner: live progress bars, workload output, a summary table.

Text from recipes, workloads and the store (names, messages, log lines, URIs) is printed as
plain `Text`, never parsed as rich markup: a line such as `[/oops]` is shown as written.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
from tokenmill.runner.evaluation import evaluation_state, run_evaluation, with_versions, work_uri
from tokenmill.runner.local import LocalRunner, RunEvents, StageResult, default_store, stage_log_uri
from tokenmill.store import Progress as ProgressRecord
from tokenmill.store import StoreError, open_store, read_progress

EVALUATION = "evaluation"
API_SERVER_ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
"""Where Ray's state API clients (Ray Train's placement-group cleaner among them) find the dashboard."""
INTERRUPTED_EXIT_CODE = 130

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
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls. The cleaner
    # is an actor: asked without an address, Ray searches the machine and fails when it finds
    # several clusters. Ray's processes, the workers included, inherit this environment, so the
    # dashboard's address is set in it before they start (and in the workloads', which inherit it too).
    port = _free_port()
    with _environment(API_SERVER_ADDRESS_ENV, f"http://127.0.0.1:{port}"):
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                           log_to_driver=False, configure_logging=False)
        try:
            yield context.address_info["gcs_address"]
        finally:
            ray.shutdown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    earlier = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if earlier is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = earlier


def run_with_progress(
    resources: list[AnyResource],
    recipe: Path,
    *,
    store: str | None,
    ray_address: str | None,
    start_ray: bool,
    console: Console,
    evaluation: dict | None = None,
    entrypoint: tuple[str, ...] | None = None,
) -> int:
    """Run the recipe's stages, then its evaluation (a resolved `evaluation.json`, when given),
    then write the report; returns the exit status (0 only when every stage and the evaluation succeeded).
    `entrypoint` replaces the workload command (`python -m tokenmill.trainer`)."""
    store_root = store or default_store(recipe)
    console.print(Text(f"running {len(resources)} resource(s) from {recipe} into {store_root}"))
    progress = progress_bars(console)
    tasks: dict[tuple[str, str], TaskID] = {}
    running: dict[tuple[str, str], AnyResource] = {}

    def say(*parts: str | tuple[str, str]) -> None:
        progress.console.print(Text.assemble(*parts), highlight=False, soft_wrap=True)

    def started(resource: AnyResource, resuming: bool) -> None:
        if resuming:
            say(("resume", "cyan"), f" {_label(resource)}: continuing from the work an earlier run committed")
        else:
            say(("start", "cyan"), f" {_label(resource)}")
        tasks[resource.key] = progress.add_task(_label(resource), total=None, message="starting", unit="")
        running[resource.key] = resource

    def on_progress(resource: AnyResource, record: ProgressRecord) -> None:
        task = tasks.get(resource.key)
        if task is not None:
            show_record(progress, task, record)

    def line(resource: AnyResource, text: str) -> None:
        progress.console.print(Text.assemble((_label(resource), "dim"), " ", text), highlight=False, soft_wrap=True)

    def finished(result: StageResult) -> None:
        running.pop(result.resource.key, None)
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
            if result.result == "Failed" and result.log:
                say(f"{_label(result.resource)}: its whole output is in {result.log}")

    try:
        with local_ray(ray_address, start_ray) as address, progress:
            runner = LocalRunner(store_root, address, events=RunEvents(started, on_progress, line, finished))
            if entrypoint:
                runner.entrypoint = entrypoint
            results = runner.run(resources)
        width = min(console.width, SUMMARY_WIDTH)
        console.print(summary_table(results), width=width)
        succeeded = all(r.result in ("Succeeded", "Up to date") for r in results)
        evaluated = True
        if succeeded and evaluation is not None:
            evaluated = evaluate_with_progress(evaluation, store_root, console)
    except KeyboardInterrupt:
        console.print(Text.assemble(("interrupted", "yellow"), f": committed work is kept; run `tokenmill run "
                                    f"{recipe}` again to resume"), highlight=False, soft_wrap=True)
        for resource in running.values():  # what it and Ray's processes printed while they stopped is kept there
            console.print(Text(f"{_label(resource)}: its whole output, what it printed while stopping included, "
                               f"is in {stage_log_uri(resource, store_root)}"), highlight=False, soft_wrap=True)
        return INTERRUPTED_EXIT_CODE
    if succeeded:
        print_report(store_root, console, width)
    return 0 if succeeded and evaluated else 1


def show_record(bars: Progress, task: TaskID, record: ProgressRecord) -> None:
    """Move a bar to a progress record. The first record with a total starts the bar's clock
    there, so work an earlier run committed does not count towards the rate."""
    if not record.total:
        bars.update(task, message=record.message)
        return
    completed = min(record.done, record.total)
    if next(shown for shown in bars.tasks if shown.id == task).total is None:
        bars.reset(task, total=record.total, completed=completed, message=record.message, unit=record.unit)
    else:
        bars.update(task, total=record.total, completed=completed, message=record.message, unit=record.unit)


def evaluate_with_progress(config: dict[str, Any], store_root: str, console: Console,
                           poll_seconds: float = 0.5) -> bool:
    """Run the recipe's evaluation (skipped when an earlier run did exactly this one, resumed
    when it evaluated some of the models) with a bar; True when it succeeded."""
    config = with_versions(config)
    state, evaluated = evaluation_state(config, store_root)
    if state == "done":
        console.print(Text.assemble(("skip", "green"), f" {EVALUATION}: already done (an earlier run evaluated "
                                    f"{', '.join(config['models'])} as they are now)"), highlight=False,
                      soft_wrap=True)
        return True
    if state == "partial":
        console.print(Text.assemble(("resume", "cyan"), f" {EVALUATION}: {', '.join(evaluated)} evaluated by an "
                                    "earlier run"), highlight=False, soft_wrap=True)
    else:
        console.print(Text.assemble(("start", "cyan"), f" {EVALUATION}: ", ", ".join(config["models"])),
                      highlight=False, soft_wrap=True)
    work = work_uri(store_root)
    with contextlib.suppress(StoreError):  # a record of an earlier evaluation is not this one's progress
        open_store(work).delete("_run/progress.json")
    bars = progress_bars(console)
    task = bars.add_task(EVALUATION, total=None, message="starting", unit="")
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_seconds):
            try:
                record = read_progress(work)
            except (StoreError, ValueError):  # a record being replaced; the next poll reads it
                continue
            if record is not None:
                show_record(bars, task, record)

    watcher = threading.Thread(target=poll, daemon=True)
    started = time.monotonic()
    with bars:
        watcher.start()
        try:
            code = run_evaluation(config, store_root, lambda text: bars.console.print(
                Text.assemble((EVALUATION, "dim"), " ", text), highlight=False, soft_wrap=True))
        finally:
            stop.set()
            watcher.join()
        bars.remove_task(task)
    if code == 0:
        console.print(Text.assemble(("done", "green"), f" {EVALUATION} in {time.monotonic() - started:.1f}s"))
        return True
    console.print(Text.assemble(("Failed", "red"), f" {EVALUATION}: exited with status {code}"))
    return False


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
