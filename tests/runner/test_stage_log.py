"""Each stage's whole output is kept in its `_run/driver.log`, and the terminal says where when it
matters: after a failure, and after Ctrl-C. Ctrl-C reaches every process of the terminal's group,
the workload's among them (and Ray's, which may print their threads' tracebacks while they
stop): the terminal shows the runner's own message, the log what the workload printed while
stopping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("run_scripted.py")

RECIPE = """\
apiVersion: tokenmill.dev/v1alpha1
kind: CorpusFilter
metadata: {name: web}
spec:
  inputs: [{name: raw, uri: "file:raw"}]
"""


def start_runner(recipe: Path, store: Path, tmp_path: Path, **scripted: str) -> subprocess.Popen:
    """The runner in a session of its own (a terminal's job), the scripted workload in place of the real ones."""
    env = {**os.environ, "SCRIPTED_LOG": str(tmp_path / "calls.jsonl"), "COLUMNS": "200", "PYTHONUNBUFFERED": "1",
           **scripted}
    return subprocess.Popen([sys.executable, str(RUNNER), str(recipe), store.as_uri()], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


@pytest.fixture
def interrupted_run(write_recipe, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The runner with its CorpusFilter waiting for Ctrl-C."""
    ready = tmp_path / "ready"
    store = tmp_path / "store"
    process = start_runner(write_recipe(recipe=RECIPE), store, tmp_path, SCRIPTED_WAIT_FOR_SIGINT="corpus-filter",
                           SCRIPTED_READY=str(ready))
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the workload never started waiting"
            time.sleep(0.05)
        yield process, store
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_ctrl_c_shows_no_workload_shutdown_noise_and_keeps_the_whole_output_in_the_stage_log(interrupted_run):
    process, store = interrupted_run
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, output
    lines = output.splitlines()
    assert "CorpusFilter/web corpus-filter web working" in lines, output
    assert "Traceback" not in output and "scripted workload stopped" not in output, output
    log_uri = f"{store.as_uri()}/corpusfilters/web/_run/driver.log"
    assert any(line.startswith("interrupted: committed work is kept") for line in lines), output
    assert f"CorpusFilter/web: its whole output, what it printed while stopping included, is in {log_uri}" in lines, \
        output
    log = (store / "corpusfilters" / "web" / "_run" / "driver.log").read_text()
    assert log.startswith("corpus-filter web working\n"), log
    assert 'Exception in thread ClusterMonitor' in log and "ConnectionError: the cluster went away" in log, log
    assert log.endswith("scripted workload stopped\n"), log


def test_a_failed_stage_names_its_log_which_holds_the_workloads_stderr(write_recipe, tmp_path: Path):
    store = tmp_path / "store"
    process = start_runner(write_recipe(recipe=RECIPE), store, tmp_path, SCRIPTED_FAIL="corpus-filter")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1, output
    lines = output.splitlines()
    assert "Failed CorpusFilter/web: workload exited with status 1" in lines, output
    log_uri = f"{store.as_uri()}/corpusfilters/web/_run/driver.log"
    assert f"CorpusFilter/web: its whole output is in {log_uri}" in lines, output
    assert (store / "corpusfilters" / "web" / "_run" / "driver.log").read_text() == "scripted failure\n"
