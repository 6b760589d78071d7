"""The local runner's live bars: done/total in the workload's unit, its rate and an ETA, and
workload text shown as written (never parsed as markup)."""

from __future__ import annotations

from rich.console import Console

from tokenmill.runner.console import progress_bars


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
