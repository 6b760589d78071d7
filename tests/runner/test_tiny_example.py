"""`tokenmill run examples/tiny` end to end, as `make tiny` runs it from a clean checkout:
every stage succeeds, the evaluation compares SFT with PTS-DPO, and report.html is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_the_tiny_recipe_runs_end_to_end(tmp_path: Path) -> None:
    store = tmp_path / "tiny"
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "tokenmill.cli", "run", str(REPO / "examples" / "tiny"),
                           "--store", store.as_uri()], capture_output=True, text=True, env=env, timeout=2400)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    for output in ("corpusfilters/web", "syntheticdatajobs/math", "syntheticdatajobs/exercises",
                   "trainingstages/pretrain", "trainingstages/midtrain", "trainingstages/sft", "ptsjobs/pts",
                   "trainingstages/dpo"):
        assert json.loads((store / output / "_run" / "progress.json").read_text())["phase"] == "succeeded", output
    funnel = json.loads((store / "corpusfilters/web/_run/funnel.json").read_text())
    assert {"step": "decontamination", "verdict": "dropped", "reason": "contaminated-13gram",
            "documents": 4} in funnel["documents"]
    evaluation = json.loads((store / "_evaluation/evaluation.json").read_text())
    assert set(evaluation["models"]) == {"SFT", "PTS-DPO"}
    assert all(figures["problems"] == 20 for figures in evaluation["models"].values())
    assert (store / "report.html").is_file()
    assert f"report: {store.as_uri()}/report.html" in done.stdout
    summary = done.stdout[done.stdout.index("\u250f"):]  # from the summary table's top-left corner
    assert max(len(line) for line in summary.splitlines() if not line.startswith("report: ")) <= 80
