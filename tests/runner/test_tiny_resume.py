"""`tokenmill run` interrupted at a random stage (Ctrl-C or killed) and run again resumes from
committed work and reaches the same outputs and evaluation as an uninterrupted run.

A smaller variant of examples/tiny (its seed and evaluation data): a scripted-teacher
SyntheticDataJob, a pretraining stage with checkpoints, and the held-out evaluation, through
the real runner, workloads and Ray.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.runner.tiny_variant import STAGES, committed_outputs, recipe  # noqa: F401
from tokenmill.store import open_store, read_progress


def start(recipe: Path, store: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "COLUMNS": "100"}
    return subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "run", str(recipe), "--store", store.as_uri()],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]
    return output


def outcome(store: Path) -> dict:
    """The committed outputs and the evaluation's figures (without the model URIs, which name the store)."""
    evaluation = open_store(store.as_uri()).read_json("_evaluation/evaluation.json")
    figures = {label: {k: v for k, v in model.items() if k != "model"} for label, model in evaluation["models"].items()}
    return {**committed_outputs(store.as_uri()), "evaluation": figures}


def wait_for(condition, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the moment to interrupt it"
        assert time.monotonic() < deadline, "the run never reached the moment to interrupt it"
        time.sleep(0.2)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_result(recipe: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    finish(start(recipe, reference))
    expected = outcome(reference)
    assert expected["evaluation"]["pretrain"]["problems"] == 20

    rng = random.Random()
    stage = rng.choice(STAGES)
    how = rng.choice((signal.SIGINT, signal.SIGKILL))
    store = tmp_path / "interrupted"
    process = start(recipe, store)

    def reached() -> bool:
        progress = read_progress(f"{store.as_uri()}/{stage}")
        if progress is None:
            return False
        if stage.startswith("trainingstages"):  # after a checkpoint, so there is committed work to resume
            return (store / stage / "checkpoints").is_dir() and any((store / stage / "checkpoints").iterdir())
        return True

    wait_for(reached, process)
    os.killpg(process.pid, how)
    process.communicate(timeout=120)
    assert process.returncode != 0

    output = finish(start(recipe, store))
    assert f"resume {'SyntheticDataJob/exercises' if stage.startswith('synth') else 'TrainingStage/pretrain'}" in output
    assert outcome(store) == expected, f"interrupted at {stage} with {how.name}"
    assert (store / "report.html").is_file()
    assert "report: " in output
