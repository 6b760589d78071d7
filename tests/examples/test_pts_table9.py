"""The miniature Table 9 (`examples/pts-table9/run.py`): its data keep the held-out problems out
of every training set, its recipes are valid resources, and its table reports what the runs
measured. The experiment itself (three seeds of pretrain, SFT, PTS, two DPO stages and an
evaluation through the local runner) takes tens of minutes and is not run here; its figures
are in trainer/pts/README.md."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tokenmill.api.loader import load_recipe
from tokenmill.store import open_dataset
from tokenmill.trainer.generate.scripted_engine import correct_answer


@pytest.fixture(scope="module")
def table9():
    path = REPO / "examples" / "pts-table9" / "run.py"
    spec = importlib.util.spec_from_file_location("pts_table9_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def rows(uri: str) -> list[dict]:
    return open_dataset(uri).read_all().to_pylist()


def question(row: dict) -> str:
    if "text" in row:
        return row["text"].split("\n")[0].removeprefix("Question: ")
    return row["messages"][0]["content"]


@pytest.mark.parametrize("seed", [0, 1])
def test_held_out_problems_never_appear_in_any_training_set(table9, tmp_path: Path, seed: int) -> None:
    uris = table9.make_data(tmp_path, seed, 0.2)
    evaluation = rows(uris["eval"])
    held_out = {question(row) for row in evaluation}
    assert len(held_out) == len(evaluation) == table9.HELD_OUT
    for name in ("documents", "sft", "problems"):
        training = rows(uris[name])
        assert training, name
        assert not held_out & {question(row) for row in training}, name
    for row in evaluation + rows(uris["problems"]) + rows(uris["sft"]):
        assert json.loads(row["meta"])["answer"] == correct_answer(question(row))
    for row in rows(uris["sft"]):
        answer = json.loads(row["meta"])["answer"]
        assert row["messages"][1]["content"].endswith(f"\\boxed{{{answer}}}.")


def test_validation_problems_are_neither_held_out_nor_trained_on(table9, tmp_path: Path) -> None:
    uris = table9.make_data(tmp_path, 3, 0.2)
    validation = [question(row) for row in rows(table9.validation_data(tmp_path, 3, 48))]
    assert len(set(validation)) == 48
    assert not set(validation) & {question(row) for row in rows(uris["eval"])}
    for name in ("documents", "sft", "problems"):
        assert not set(validation) & {question(row) for row in rows(uris[name])}, name


def test_the_split_covers_every_problem_once_and_differs_by_seed(table9) -> None:
    held_out, training = table9.split_problems(0)
    assert len(set(held_out)) == table9.HELD_OUT
    assert set(held_out).isdisjoint(training)
    assert sorted(held_out + training) == sorted(table9.PROBLEMS)
    assert set(table9.split_problems(1)[0]) != set(held_out)


def test_the_recipes_it_writes_are_valid_resources(table9, tmp_path: Path) -> None:
    uris = table9.make_data(tmp_path / "data", 0, 0.2)
    main = table9.write_recipe(tmp_path / "main", table9.main_recipe(uris, 0, 1.0))
    loaded = load_recipe(main)
    assert [(item.resource.kind, item.resource.metadata.name) for item in loaded] == [
        ("TrainingStage", "pretrain"), ("TrainingStage", "sft"), ("PTSJob", "pts"), ("TrainingStage", "dpo-pts")]
    full = table9.write_recipe(tmp_path / "full", [table9.dpo_stage(
        "dpo-full", {"uri": "file:///checkpoints/sft/step-1"}, [{"uri": uris["problems"], "weight": 1.0}], 2, 1.0)])
    assert [item.resource.metadata.name for item in load_recipe(full)] == ["dpo-full"]


def run(seed: int, sft: tuple[float, float], pts: tuple[float, float] | None) -> dict:
    models = {"SFT": {"greedyAccuracy": sft[0], "successRate": sft[1]}}
    if pts is not None:
        models["PTS-DPO"] = {"greedyAccuracy": pts[0], "successRate": pts[1]}
    return {"seed": seed, "models": models}


def test_the_table_gives_mean_spread_and_every_seed(table9) -> None:
    text = table9.table([run(0, (0.5, 0.25), (0.75, 0.5)), run(1, (0.25, 0.5), None)])
    lines = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    assert set(lines) == set(table9.MODELS)
    assert "0.375 ± 0.177" in lines["SFT"] and "0.50 / 0.25, 0.25 / 0.50" in lines["SFT"]
    assert "0.750" in lines["PTS-DPO"] and "1 of 2 seeds" in lines["PTS-DPO"]
    assert "not trained" in lines["Full-DPO"]


def test_the_cpu_meter_counts_a_watched_process_and_its_children(table9) -> None:
    burn = "import time; sum(range(20_000_000)); time.sleep(2)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"
    with table9.CpuMeter() as meter:
        process = subprocess.Popen([sys.executable, "-c", parent])
        meter.watch(process.pid)
        process.wait()
    assert meter.seconds > 0.2
    assert len(meter.seen) == 2
