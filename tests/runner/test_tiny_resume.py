"""`tokenmill run examples/tiny` interrupted at random stages, first by Ctrl-C (SIGINT to the
terminal's process group), then, in the run that resumes it, by SIGKILL, and run a third
time: it resumes from committed work and commits the same outputs and evaluation as the
uninterrupted reference run.

The stages are drawn from a seed printed with every failure; `TOKENMILL_RESUME_SEED=<seed>`
replays a draw. Within the drawn stage the run is interrupted once the stage's workload has
reported a drawn share of its work (or, for a stage that reports only at the end, right after
it starts).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.fixtures.tiny_run import TinyRun, committed_outcome, finish, start_tiny, tiny_stages
from tokenmill.store import read_progress

STAGES = tiny_stages()


class LiveOutput:
    """The lines of a running process's output, read as they come."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        self._thread.join(timeout=120)
        return "\n".join(self.lines)


def wait_for(condition, process: subprocess.Popen, what: str, output: LiveOutput, timeout: float = 2400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}:\n" + "\n".join(output.lines[-60:])
        assert time.monotonic() < deadline, f"the run never reached {what}"
        time.sleep(0.1)


def interrupt(store: Path, index: int, share: float, how: signal.Signals) -> tuple[str, bool]:
    """Run examples/tiny into `store` and interrupt it with `how` once stage `index` has reported
    `share` of its work in this run (or has finished); returns the run's output and whether the
    stage was unfinished when interrupted."""
    label, path = STAGES[index]
    process = start_tiny(store)
    output = LiveOutput(process)
    wait_for(lambda: any(line in (f"start {label}", f"resume {label}") or line.startswith(f"resume {label}:")
                         for line in output.lines), process, f"the start of {label}", output)
    began = datetime.now(timezone.utc)

    def reached() -> bool:
        record = read_progress(f"{store.as_uri()}/{path}")
        if record is None or not record.updated_at:
            return False
        if datetime.fromisoformat(record.updated_at.replace("Z", "+00:00")) < began:
            return False  # an earlier run's record
        if record.phase == "succeeded":
            return True
        return (record.fraction or 0.0) >= share

    wait_for(reached, process, f"{share:.0%} of {label}", output)
    record = read_progress(f"{store.as_uri()}/{path}")
    unfinished = record is not None and record.phase != "succeeded"
    os.killpg(process.pid, how)
    process.wait(timeout=300)
    text = output.text()
    assert process.returncode != 0, text[-3000:]
    return text, unfinished


@pytest.mark.slow
@pytest.mark.timeout(3 * 3000)
def test_an_interrupted_tiny_run_resumes_to_the_same_result(tiny_reference: TinyRun, tmp_path: Path) -> None:
    expected = committed_outcome(tiny_reference.uri)
    assert set(expected["evaluation"]["models"]) == {"SFT", "PTS-DPO"}

    seed = int(os.environ.get("TOKENMILL_RESUME_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    first = rng.randrange(len(STAGES))
    second = rng.randrange(first, len(STAGES))
    shares = (rng.choice((0.0, 0.3, 0.6)), rng.choice((0.0, 0.3, 0.6)))
    draw = (f"seed {seed} (TOKENMILL_RESUME_SEED={seed}): Ctrl-C in {STAGES[first][0]} at {shares[0]:.0%}, "
            f"then SIGKILL in {STAGES[second][0]} at {shares[1]:.0%}")
    print(draw)
    store = tmp_path / "interrupted"

    output, _ = interrupt(store, first, shares[0], signal.SIGINT)
    assert "interrupted: committed work is kept" in output, f"{draw}\n{output[-3000:]}"
    # Ctrl-C reaches every process of the terminal's group, Ray's own among them, which may print
    # their threads' tracebacks while they stop: that goes to the stage's log, not the terminal.
    assert "Traceback" not in output, f"{draw}\n{output[-3000:]}"
    for line in output.splitlines():
        if "its whole output, what it printed while stopping included, is in " in line:
            log = line.rsplit(" is in ", 1)[1]
            assert Path(log.removeprefix("file://")).read_text(), f"{draw}\n{line}"

    output, unfinished = interrupt(store, second, shares[1], signal.SIGKILL)
    assert all(f"skip {label}: already done" in output for label, _ in STAGES[:first]), f"{draw}\n{output[-3000:]}"

    process = start_tiny(store)
    output = finish(process)
    label = STAGES[second][0]
    if unfinished:
        assert f"resume {label}: continuing from the work an earlier run committed" in output, f"{draw}\n{output}"
    assert all(f"skip {done}: already done" in output for done, _ in STAGES[:second]), f"{draw}\n{output}"
    assert committed_outcome(store.as_uri()) == expected, draw
    assert (store / "report.html").is_file()
    assert f"report: {store.as_uri()}/report.html" in output
