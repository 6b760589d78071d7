"""Runs a planned recipe on this machine: one local Ray, a local (or any) store, live progress."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tokenmill.api.graph import dependencies
from tokenmill.api.output_prefix import ClaimedOutput, output_problem
from tokenmill.api.problems import Problem, RecipeError
from tokenmill.api.resources import KINDS, AnyResource
from tokenmill.api.semantic import output_overlaps
from tokenmill.api.status import OutputSummary
from tokenmill.layout import driver_log_uri, run_spec_uri
from tokenmill.outputs import check_outputs
from tokenmill.resolve import UnresolvedInput, output_uri, resolve_spec, run_spec
from tokenmill.runner.evaluation import stop_process
from tokenmill.store import (
    DriverLogUploader,
    ObjectNotFoundError,
    Progress,
    StoreError,
    read_progress,
    read_run_spec,
    write_run_spec,
)
from tokenmill.workloads import NOT_BUILT_EXIT_CODE, PHASE_SUCCEEDED, workload_built


@dataclass
class StageResult:
    resource: AnyResource
    result: str
    """Succeeded, Up to date, Failed, Not built yet, or Blocked."""
    detail: str = ""
    seconds: float = 0.0
    output: str = ""
    outputs: OutputSummary | None = None
    log: str = ""
    """Where the workload's whole output is kept, when it ran."""


@dataclass
class RunEvents:
    """Callbacks the CLI uses to draw progress; all optional."""

    started: Callable[[AnyResource, bool], None] = lambda resource, resuming: None
    """A workload starts; `resuming` when an earlier, unfinished run of the same spec left work to resume."""
    progress: Callable[[AnyResource, Progress], None] = lambda resource, record: None
    line: Callable[[AnyResource, str], None] = lambda resource, text: None
    finished: Callable[[StageResult], None] = lambda result: None


WORKLOAD_MESSAGE_PREFIX = "tokenmill "
"""How a workload's own messages begin (`tokenmill <kind>: ...`); the last one explains a failure."""

LOG_UPLOAD_SECONDS = 5.0
"""How often a running stage's log is copied to the store."""
LOG_DRAIN_SECONDS = 10.0
"""How long, once an interrupted workload is reaped, its output is still copied to the log: a
process it started that still holds its output open must not hold up the runner."""


def stage_log_uri(resource: AnyResource, store_root: str) -> str:
    """Where the local runner keeps a stage's whole output (its workload's stdout and stderr): the
    output's `_run/driver.log`, as on a cluster; each run of the stage replaces it."""
    return driver_log_uri(output_uri(resource, store_root))


@dataclass
class LocalRunner:
    store_root: str
    ray_address: str | None = None
    entrypoint: tuple[str, ...] = (sys.executable, "-m", "tokenmill.trainer")
    """The workload command; `<kind> --spec <uri>` is appended."""
    poll_seconds: float = 0.5
    events: RunEvents = field(default_factory=RunEvents)
    _last_message: str = field(default="", init=False, repr=False)

    def run(self, resources: list[AnyResource]) -> list[StageResult]:
        """Run `resources` (in dependency order); raises RecipeError, before anything runs, when an
        output is a root, has dot segments, or overlaps another resource's output."""
        check_outputs_apart(resources, self.store_root)
        results: dict[tuple[str, str], StageResult] = {}
        for resource in resources:
            blocked = [key for key in dependencies(resource) if results[key].result not in ("Succeeded", "Up to date")]
            if blocked:
                names = ", ".join(f"{kind}/{name} ({results[(kind, name)].result.lower()})" for kind, name in blocked)
                result = StageResult(resource, "Blocked", f"inputs not available: {names}")
                if not workload_built(KINDS[resource.kind].workload_module):
                    result.detail += f"; its {KINDS[resource.kind].cli_name} workload is not built yet either"
            else:
                inputs = {key: results[key].outputs for key in dependencies(resource) if results[key].outputs}
                result = self._run_one(resource, inputs)  # type: ignore[arg-type]
            results[resource.key] = result
            self.events.finished(result)
        return list(results.values())

    def _run_one(self, resource: AnyResource, inputs: dict[tuple[str, str], OutputSummary]) -> StageResult:
        output = output_uri(resource, self.store_root)
        try:
            resolved = resolve_spec(resource, inputs)
        except UnresolvedInput as error:
            return StageResult(resource, "Blocked", str(error), output=output)
        document = run_spec(resource, output=output, attempt=1, resolved=resolved)
        if _up_to_date(output, document):
            report = check_outputs(resource.kind, output)
            if report.committed:
                return StageResult(resource, "Up to date", "outputs committed by an earlier run", output=output,
                                   outputs=report.summary)
        resuming = _unfinished_earlier_run(output, document)
        write_run_spec(output, document)
        self.events.started(resource, resuming)
        started = time.monotonic()
        code = self._execute(resource, output)
        seconds = time.monotonic() - started
        log = driver_log_uri(output)
        if code == NOT_BUILT_EXIT_CODE:
            return StageResult(resource, "Not built yet", f"the {KINDS[resource.kind].cli_name} workload does not exist yet",
                               seconds, output, log=log)
        if code != 0:
            reason = f": {self._last_message}" if self._last_message else ""
            return StageResult(resource, "Failed", f"workload exited with status {code}{reason}", seconds, output,
                               log=log)
        report = check_outputs(resource.kind, output)
        if not report.committed:
            return StageResult(resource, "Failed", f"workload exited 0 but {report.message}", seconds, output, log=log)
        return StageResult(resource, "Succeeded", "", seconds, output, report.summary, log=log)

    def _execute(self, resource: AnyResource, output: str) -> int:
        """Run the workload, relaying its output line by line and keeping all of it in the stage's
        log. Interrupted (Ctrl-C, which reaches the workload and Ray's processes too), the relay
        stops at once: what they print while they stop goes to the log only.

        A thread of its own reads the output into the log, so no line is lost to the interruption
        (Python raises KeyboardInterrupt only in the main thread, which relays)."""
        command = [*self.entrypoint, KINDS[resource.kind].cli_name, "--spec", run_spec_uri(output)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch_progress, args=(resource, output, stop), daemon=True)
        self._last_message = ""
        with tempfile.TemporaryDirectory(prefix="tokenmill-run-") as folder:
            log_path = os.path.join(folder, "driver.log")
            with open(log_path, "w", encoding="utf-8", buffering=1) as log, \
                    DriverLogUploader(log_path, output, interval_s=LOG_UPLOAD_SECONDS):
                process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           encoding="utf-8", errors="replace", env=env)
                lines: queue.Queue[str | None] = queue.Queue()
                reader = threading.Thread(target=_log_lines, args=(process.stdout, log, lines), daemon=True)
                try:
                    watcher.start()
                    reader.start()
                    while (text := self._next_line(lines)) is not None:
                        text = text.rstrip("\n")
                        if text.startswith(WORKLOAD_MESSAGE_PREFIX):
                            self._last_message = text.split(": ", 1)[-1]
                        self.events.line(resource, text)
                    code = process.wait()
                finally:  # interrupted (Ctrl-C): the workload stops too; what it committed stays
                    stop.set()
                    stop_process(process)
                    reader.join(LOG_DRAIN_SECONDS)
        watcher.join()
        self._report_progress(resource, output)
        return code

    def _next_line(self, lines: queue.Queue[str | None]) -> str | None:
        """The workload's next line (None at its end), waiting in slices so that Ctrl-C is taken at
        once even when another thread of the runner received the signal."""
        while True:
            with contextlib.suppress(queue.Empty):
                return lines.get(timeout=self.poll_seconds)

    def _watch_progress(self, resource: AnyResource, output: str, stop: threading.Event) -> None:
        while not stop.wait(self.poll_seconds):
            self._report_progress(resource, output)

    def _report_progress(self, resource: AnyResource, output: str) -> None:
        try:
            progress = read_progress(output)
        except (StoreError, ValueError):  # a record being replaced; the next poll reads it
            return
        if progress is not None:
            self.events.progress(resource, progress)


def _log_lines(stream: IO[str], log: IO[str], lines: queue.Queue[str | None]) -> None:
    """Copy every line of `stream` to `log` and pass it on to `lines`; None marks its end."""
    try:
        # OSError, ValueError: the log closed, an interrupted runner stopped waiting for the rest
        with contextlib.suppress(OSError, ValueError):
            for text in stream:
                log.write(text)
                lines.put(text)
    finally:
        lines.put(None)


def check_outputs_apart(resources: list[AnyResource], store_root: str) -> None:
    """Raise RecipeError listing every output that could destroy data written by another."""
    outputs = [(resource, output_uri(resource, store_root)) for resource in resources]
    problems = []
    for resource, output in outputs:
        label = "/".join(resource.key)
        reason = output_problem(output)
        if reason:
            problems.append(Problem(f"output {output} {reason}", "spec.output.uri", label))
        claimed = [ClaimedOutput("/".join(other.key), uri) for other, uri in outputs if other is not resource]
        problems += [problem.located(resource=label) for problem in output_overlaps(resource, output, claimed)]
    if problems:
        raise RecipeError(problems)


def _up_to_date(output: str, document: dict) -> bool:
    """An earlier run of the same spec finished: its progress says so and its spec is identical."""
    progress = read_progress(output)
    if progress is None or progress.phase != PHASE_SUCCEEDED:
        return False
    try:
        return read_run_spec(output) == document
    except ObjectNotFoundError:
        return False


def _unfinished_earlier_run(output: str, document: dict) -> bool:
    """An earlier run of the same spec started and did not finish: its committed work is resumed."""
    try:
        progress = read_progress(output)
        return progress is not None and progress.phase != PHASE_SUCCEEDED and read_run_spec(output) == document
    except (StoreError, ValueError):
        return False


def default_store(recipe: Path) -> str:
    return (Path.cwd() / "tokenmill-runs" / recipe.resolve().name).as_uri()
