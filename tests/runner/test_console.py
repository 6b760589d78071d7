"""The local runner's live bars: done/total in the workload's unit, its rate and an ETA, and
workload text shown as written (never parsed as markup); the evaluation's bar and its plain
start, resume, skip and done lines."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from tests.conftest import REPO
from tokenmill.runner.console import evaluate_with_progress, progress_bars, show_record
from tokenmill.store import DOCUMENTS, DatasetWriter, Progress, read_progress

PROBLEMS = 4


def test_a_stage_bar_shows_its_count_rate_and_eta() -> None:
    clock = [0.0]
    console = Console(record=True, width=160, force_terminal=True, color_system=None)
    bars = progress_bars(console, get_time=lambda: clock[0])
    task = bars.add_task("TrainingStage/[bold]pretrain", total=None, message="starting", unit="")
    for second in range(5):  # 10 steps a second
        clock[0] = float(second)
        bars.update(task, total=200, completed=10 * second, unit="steps", message="loss [/x] 4.1")
    console.print(bars.make_tasks_table(bars.tasks))
    line = console.export_text()
    assert "TrainingStage/[bold]pretrain" in line and "40/200 steps" in line
    assert "10 steps/s" in line
    assert "eta 0:00:16" in line
    assert "loss [/x] 4.1" in line


def test_a_resumed_bar_counts_only_this_runs_work_towards_its_rate() -> None:
    """The evaluation resumed with 180 of 360 solutions judged by an earlier run: the bar starts
    there, and its rate and ETA come from what this run judges (15 solutions a second)."""
    clock = [0.0]
    console = Console(record=True, width=160, force_terminal=True, color_system=None)
    bars = progress_bars(console, get_time=lambda: clock[0])
    task = bars.add_task("evaluation", total=None, message="starting", unit="")
    for second in range(5):
        clock[0] = 10.0 + second
        show_record(bars, task, Progress(phase="evaluating", done=180 + 15 * second, total=360, unit="solutions",
                                         message="PTS-DPO"))
    console.print(bars.make_tasks_table(bars.tasks))
    line = console.export_text()
    assert "240/360 solutions" in line and "15 solutions/s" in line
    assert "eta 0:00:08" in line and "PTS-DPO" in line


@pytest.fixture
def evaluation(tmp_path: Path) -> dict:
    """Two random tiny models (committed checkpoints) on four of the tiny recipe's held-out problems."""
    from tests.trainer.posttrain_data import write_parent

    problems = read_dataset(REPO / "examples" / "tiny" / "data" / "eval")[:PROBLEMS]
    writer = DatasetWriter((tmp_path / "problems").as_uri(), DOCUMENTS)
    writer.write_shard(0, problems)
    writer.finalize(expected=[0])
    models = {"first": write_parent(tmp_path / "first", seed=1), "second": write_parent(tmp_path / "second", seed=2)}
    return {"problems": (tmp_path / "problems").as_uri(), "oracle": "math",
            "models": models, "samples": 2, "temperature": 1.0, "maxTokens": 8, "seed": 0}


def read_dataset(folder: Path) -> list[dict]:
    return [row for shard in sorted(folder.glob("part-*.parquet")) for row in pq.read_table(shard).to_pylist()]


def lines(console: Console) -> list[str]:
    return console.export_text().splitlines()


@pytest.mark.slow
def test_the_evaluation_starts_reports_progress_resumes_and_is_skipped_when_done(evaluation: dict,
                                                                                 tmp_path: Path) -> None:
    store = tmp_path / "run"
    console = Console(record=True, width=100)
    assert evaluate_with_progress(evaluation, store.as_uri(), console)
    first = lines(console)
    assert first[0] == "start evaluation: first, second"
    assert first[-1].startswith("done evaluation in ")
    record = read_progress(f"{store.as_uri()}/_evaluation")
    assert record is not None and record.phase == "succeeded" and record.unit == "solutions"
    assert record.done == record.total == 2 * PROBLEMS * (1 + 2)  # two models; one greedy solution + two samples
    result = json.loads((store / "_evaluation" / "evaluation.json").read_text())
    assert set(result["models"]) == {"first", "second"}

    console = Console(record=True, width=100)
    assert evaluate_with_progress(evaluation, store.as_uri(), console)
    assert lines(console) == ["skip evaluation: already done (an earlier run evaluated first, second as they "
                              "are now)"]

    # Interrupted after the first model: its figures were committed, the result was not.
    (store / "_evaluation" / "evaluation.json").unlink()
    second = sorted((store / "_evaluation" / "models").iterdir())
    for path in second:
        if json.loads(path.read_text())["model"] == evaluation["models"]["second"]:
            path.unlink()
    console = Console(record=True, width=100)
    assert evaluate_with_progress(evaluation, store.as_uri(), console)
    resumed = lines(console)
    assert resumed[0] == "resume evaluation: first evaluated by an earlier run"
    assert "evaluation first: evaluated by an earlier run" in resumed
    assert resumed[-1].startswith("done evaluation in ")
    again = json.loads((store / "_evaluation" / "evaluation.json").read_text())
    assert again["models"] == result["models"]  # the same figures, the first model's reused

    changed = {**evaluation, "samples": 3}  # another config: evaluated afresh
    console = Console(record=True, width=100)
    assert evaluate_with_progress(changed, store.as_uri(), console)
    assert lines(console)[0] == "start evaluation: first, second"
