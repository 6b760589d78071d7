"""The local runner: dependency order, resolved inputs, resume, failures, unbuilt workloads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tokenmill.runner.local import LocalRunner
from tokenmill.runner.plan import plan_recipe
from tokenmill.workloads import NOT_BUILT_EXIT_CODE

SCRIPT = Path(__file__).with_name("scripted_workload.py")

RECIPE = """\
apiVersion: tokenmill.dev/v1alpha1
kind: PTSJob
metadata: {name: pts}
spec:
  model: {ref: {kind: TrainingStage, name: pretrain}}
  problems: {uri: "file:problems"}
  oracle: {kind: math}
---
apiVersion: tokenmill.dev/v1alpha1
kind: TrainingStage
metadata: {name: pretrain}
spec:
  stage: pretrain
  model: {config: tiny}
  datasets: [{ref: {kind: CorpusFilter, name: web}, weight: 1}]
  sequenceLength: 64
  optimization: {globalBatchSequences: 2, peakLearningRate: 0.001, totalTokens: 1024}
  ray: {workers: {replicas: 1, gpusPerWorker: 0}}
---
apiVersion: tokenmill.dev/v1alpha1
kind: CorpusFilter
metadata: {name: web}
spec:
  inputs: [{name: raw, uri: "file:raw"}]
"""


@pytest.fixture
def recipe(write_recipe):
    return write_recipe(recipe=RECIPE)


@pytest.fixture
def calls(tmp_path, monkeypatch):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("SCRIPTED_LOG", str(log))

    def read() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return read


def run(recipe: Path, store: Path):
    runner = LocalRunner(store.as_uri(), entrypoint=(sys.executable, str(SCRIPT)))
    return {result.resource.name: result for result in runner.run(plan_recipe(recipe))}


def test_runs_in_dependency_order_with_resolved_inputs(recipe, calls, tmp_path):
    store = tmp_path / "store"
    results = run(recipe, store)
    assert [r.result for r in results.values()] == ["Succeeded"] * 3
    order = [(c["kind"], c["name"]) for c in calls()]
    assert order == [("corpus-filter", "web"), ("training-stage", "pretrain"), ("pts", "pts")]
    corpus, stage, pts = (c["spec"] for c in calls())
    assert corpus["inputs"][0]["uri"] == (recipe / "raw").as_uri()
    assert stage["datasets"][0] == {"uri": f"{store.as_uri()}/corpusfilters/web/data", "name": "web",
                                    "weight": 1.0, "epochs": 1.0, "role": "new"}
    assert pts["model"] == {"uri": f"{store.as_uri()}/trainingstages/pretrain/checkpoints/step-00000010"}
    assert results["web"].outputs.rows == 1
    assert results["pretrain"].outputs.checkpoint.endswith("step-00000010")


def test_rerun_resumes_and_skips_finished_work(recipe, calls, tmp_path):
    store = tmp_path / "store"
    run(recipe, store)
    first = len(calls())
    results = run(recipe, store)
    assert [r.result for r in results.values()] == ["Up to date"] * 3
    assert len(calls()) == first
    assert results["web"].outputs.rows == 1


def test_failure_blocks_dependents(recipe, calls, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRIPTED_FAIL", "training-stage")
    results = run(recipe, tmp_path / "store")
    assert results["web"].result == "Succeeded"
    assert results["pretrain"].result == "Failed" and "status 1" in results["pretrain"].detail
    assert results["pts"].result == "Blocked"
    assert "TrainingStage/pretrain (failed)" in results["pts"].detail
    assert [c["name"] for c in calls()] == ["web", "pretrain"]


def test_exit_zero_without_committed_output_is_a_failure(recipe, calls, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRIPTED_NO_OUTPUT", "corpus-filter")
    results = run(recipe, tmp_path / "store")
    assert results["web"].result == "Failed"
    assert "_manifest.json" in results["web"].detail
    assert results["pretrain"].result == "Blocked"


def test_unbuilt_workload_is_named_not_pretended(recipe, calls, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRIPTED_MISSING", "corpus-filter")
    results = run(recipe, tmp_path / "store")
    assert results["web"].result == "Not built yet"
    assert "corpus-filter workload does not exist yet" in results["web"].detail
    assert results["pretrain"].result == "Blocked"


def test_entrypoint_reports_a_missing_workload_module(monkeypatch, capsys):
    import dataclasses

    from tokenmill.api.resources import KINDS
    from tokenmill.trainer.__main__ import main

    missing = dataclasses.replace(KINDS["PTSJob"], workload_module="tokenmill.trainer.no_such_package.workload")
    monkeypatch.setitem(KINDS, "PTSJob", missing)
    assert main(["pts", "--spec", "file:///nowhere/_run/spec.json"]) == NOT_BUILT_EXIT_CODE
    assert "the pts workload is not built yet" in capsys.readouterr().err


def test_the_runner_refuses_outputs_that_overlap_before_running_anything(recipe, calls, tmp_path):
    from tokenmill.api.problems import RecipeError

    store = tmp_path / "store"
    resources = plan_recipe(recipe)
    web = next(resource for resource in resources if resource.name == "web")
    nested = web.model_copy(update={"spec": web.spec.model_copy(update={
        "output": web.spec.output.model_copy(update={"uri": f"{store.as_uri()}/trainingstages"})})})
    resources = [nested if resource is web else resource for resource in resources]
    with pytest.raises(RecipeError) as error:
        LocalRunner(store.as_uri(), entrypoint=(sys.executable, str(SCRIPT))).run(resources)
    assert "CorpusFilter/web" in str(error.value) and "TrainingStage/pretrain" in str(error.value)
    assert calls() == []


def test_the_summary_prints_workload_text_as_written(recipe):
    from rich.console import Console

    from tokenmill.runner.console import summary_table
    from tokenmill.runner.local import StageResult

    resource = plan_recipe(recipe)[0]
    console = Console(record=True, width=200)
    console.print(summary_table([StageResult(resource, "Failed", "workload said [/oops] and [bold]hi")]))
    assert "workload said [/oops] and [bold]hi" in console.export_text()
