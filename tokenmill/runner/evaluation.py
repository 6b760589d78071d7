"""A recipe's held-out evaluation: `evaluation.json` beside the recipe, run after its last stage.

    {"problems": "file:data/eval", "oracle": "math",
     "models": {"SFT": "TrainingStage/sft", "PTS-DPO": "TrainingStage/dpo"},
     "samples": 8, "temperature": 1.0, "maxTokens": 40, "seed": 0}

`models` maps a label to a TrainingStage of the recipe (its Hugging Face export is evaluated)
or to a model URI; `problems` is a dataset URI (relative `file:` URIs are relative to the
recipe's folder). The evaluation itself runs in the trainer
(`python -m tokenmill.trainer.evaluate`), so the runner never imports torch; its result is
`<store root>/_evaluation/evaluation.json`, which the report reads, beside its progress record
and each model's committed figures (`models/<key>.json`).

A model that is a stage of the recipe is versioned by the time its stage's last run
succeeded: a rerun of the recipe whose stages were all up to date finds the evaluation done
(skipped), one interrupted during the evaluation keeps the models already evaluated
(resumed), and a retrained model is evaluated again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenmill.api.problems import Problem, RecipeError
from tokenmill.api.recipe import absolute_uri, recipe_dir
from tokenmill.api.resources import AnyResource
from tokenmill.layout import hf_export_uri, join
from tokenmill.resolve import output_uri
from tokenmill.store import ObjectNotFoundError, StoreError, open_store, read_progress

CONFIG_NAME = "evaluation.json"
WORK_DIR = "_evaluation"
RESULT_KEY = f"{WORK_DIR}/evaluation.json"
SETTINGS = ("problems", "oracle", "samples", "temperature", "maxTokens", "seed")
"""The config's fields that decide the figures (besides the models and their versions)."""


def evaluation_uri(store_root: str) -> str:
    return join(store_root, RESULT_KEY)


def work_uri(store_root: str) -> str:
    """Where the evaluation keeps its result, progress record and per-model figures."""
    return join(store_root, WORK_DIR)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def config_key(config: dict[str, Any]) -> str:
    """Digest of everything that decides an evaluation's figures."""
    return _digest({"settings": {name: config.get(name) for name in SETTINGS}, "models": config.get("models"),
                    "versions": config.get("versions") or {}})


def model_key(config: dict[str, Any], label: str) -> str:
    """Digest of everything that decides one model's figures."""
    return _digest({"settings": {name: config.get(name) for name in SETTINGS}, "label": label,
                    "model": config["models"][label], "version": (config.get("versions") or {}).get(label)})


def with_versions(config: dict[str, Any]) -> dict[str, Any]:
    """The config with `versions`: for each model that is a stage of the recipe, when its stage's
    last run succeeded (from its progress record); models given by URI have none."""
    versions = {}
    for label, stage_output in (config.get("stages") or {}).items():
        progress = read_progress(stage_output)
        versions[label] = progress.updated_at if progress is not None else ""
    return {**config, "versions": versions}


def evaluation_state(config: dict[str, Any], store_root: str) -> tuple[str, list[str]]:
    """("done", []) when an earlier run evaluated exactly this config (with its versions);
    ("partial", labels) when it committed the figures of some of its models; ("new", [])."""
    work = open_store(work_uri(store_root))
    try:
        if work.read_json("evaluation.json").get("key") == config_key(config):
            return "done", []
    except (ObjectNotFoundError, StoreError, ValueError):
        pass
    evaluated = [label for label in config["models"] if work.exists(f"models/{model_key(config, label)}.json")]
    return ("partial", evaluated) if evaluated else ("new", [])


def load_config(recipe: Path) -> dict[str, Any] | None:
    """The recipe's evaluation config, or None when it has none; RecipeError names a bad one."""
    path = recipe_dir(recipe) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecipeError([Problem(f"not valid JSON: {error}", file=str(path))]) from None
    if not isinstance(config, dict):
        raise RecipeError([Problem("expected a JSON object", file=str(path))])
    problems = []
    if not isinstance(config.get("problems"), str):
        problems.append(Problem("must be a dataset URI", "problems", file=str(path)))
    models = config.get("models")
    if not isinstance(models, dict) or not models or not all(isinstance(v, str) for v in models.values()):
        problems.append(Problem("must map labels to TrainingStage/NAME or a model URI", "models", file=str(path)))
    if problems:
        raise RecipeError(problems)
    return config


def resolve_config(config: dict[str, Any], recipe: Path, resources: list[AnyResource],
                   store_root: str) -> dict[str, Any]:
    """The config with absolute problem URIs and each stage reference turned into its export's URI."""
    base = recipe_dir(recipe).resolve()
    stages = {f"{resource.kind}/{resource.name}": resource for resource in resources}
    models = {}
    stage_outputs = {}
    for label, target in config["models"].items():
        if target in stages:
            stage_outputs[label] = output_uri(stages[target], store_root)
            models[label] = hf_export_uri(stage_outputs[label])
        elif "/" in target and "://" not in target and not target.startswith("file:"):
            raise RecipeError([Problem(f"{target} is not a resource of the recipe", f"models.{label}",
                                       file=CONFIG_NAME)])
        else:
            models[label] = absolute_uri(target, base)
    return {**config, "problems": absolute_uri(config["problems"], base), "models": models, "stages": stage_outputs}


def run_evaluation(config: dict[str, Any], store_root: str, line: Callable[[str], None],
                   python: str = sys.executable) -> int:
    """Run the evaluation workload; its output lines go to `line`; returns its exit status.
    Interrupted (Ctrl-C), it stops the workload before it returns."""
    command = [python, "-m", "tokenmill.trainer.evaluate", "--config", json.dumps(config),
               "--out", evaluation_uri(store_root)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert process.stdout is not None
        for text in process.stdout:
            line(text.rstrip("\n"))
        return process.wait()
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen, grace_seconds: float = 10.0) -> None:
    """Terminate `process` if it still runs (then kill it after `grace_seconds`) and reap it."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
