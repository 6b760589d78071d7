"""Terminal front end of the local runner: live progress bars, workload output, a summary table.

Text from recipes, workloads and the store (names, messages, log lines, URIs) is printed as
plain `Text`, never parsed as rich markup: a line such as `[/oops]` is shown as written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from tokenmill.api.resources import AnyResource
from tokenmill.runner.local import LocalRunner, RunEvents, StageResult, default_store

RESULT_STYLE = {
    "Succeeded": "green",
    "Up to date": "green",
    "Failed": "red",
    "Not built yet": "yellow",
    "Blocked": "yellow",
}


def _label(resource: AnyResource) -> str:
    return f"{resource.kind}/{resource.name}"


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
) -> int:
    store_root = store or default_store(recipe)
    console.print(Text(f"running {len(resources)} resource(s) from {recipe} into {store_root}"))
    progress = Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[message]}", markup=False), TimeElapsedColumn(), console=console,
    )
    tasks: dict[tuple[str, str], TaskID] = {}

    def started(resource: AnyResource) -> None:
        tasks[resource.key] = progress.add_task(_label(resource), total=1.0, message="starting")

    def on_progress(resource: AnyResource, fraction: float | None, message: str) -> None:
        if resource.key in tasks:
            progress.update(tasks[resource.key], completed=fraction or 0.0, message=message)

    def line(resource: AnyResource, text: str) -> None:
        progress.console.print(Text.assemble((_label(resource), "dim"), " ", text), highlight=False, soft_wrap=True)

    def finished(result: StageResult) -> None:
        task = tasks.get(result.resource.key)
        if task is not None:
            done = 1.0 if result.result == "Succeeded" else progress.tasks[task].completed
            progress.update(task, completed=done, message=result.result)
        elif result.result != "Succeeded":
            style = RESULT_STYLE.get(result.result, "white")
            progress.console.print(Text.assemble((result.result, style), f" {_label(result.resource)}: ", result.detail))

    with local_ray(ray_address, start_ray) as address, progress:
        runner = LocalRunner(store_root, address, events=RunEvents(started, on_progress, line, finished))
        results = runner.run(resources)
    console.print(summary_table(results))
    return 0 if all(r.result in ("Succeeded", "Up to date") for r in results) else 1


def summary_table(results: list[StageResult]) -> Table:
    table = Table(title="tokenmill run")
    for column in ("resource", "result", "time", "outputs", "detail"):
        table.add_column(column)
    for result in results:
        style = RESULT_STYLE.get(result.result, "white")
        table.add_row(
            Text(_label(result.resource)),
            Text(result.result, style=style),
            f"{result.seconds:.1f}s" if result.seconds else "",
            Text(_describe_outputs(result)),
            Text(result.detail),
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
        parts.append(f"checkpoint {outputs.checkpoint}")
    if outputs.hf_export:
        parts.append(f"hf {outputs.hf_export}")
    return ", ".join(parts) or outputs.uri
