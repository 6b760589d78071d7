"""A recipe's held-out evaluation: `evaluation.json` beside the recipe, run after its last stage.

    {"problems": "file:data/eval", "oracle": "math",
     "models": {"SFT": "TrainingStage/sft", "PTS-DPO": "TrainingStage/dpo"},
     "samples": 8, "temperature": 1.0, "maxTokens": 40, "seed": 0}

`models` maps a label to a TrainingStage of the recipe (its Hugging Face export is evaluated)
or to a model URI; `problems` is a dataset URI (relative `file:` URIs are relative to the
recipe's folder). The evaluation itself runs in the trainer
(`python -m tokenmill.trainer.evaluate`), so the runner never imports torch; its result is
`<store root>/_evaluation/evaluation.json`, which the report reads.
"""

from __future__ import annotations

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

CONFIG_NAME = "evaluation.json"
RESULT_KEY = "_evaluation/evaluation.json"


def evaluation_uri(store_root: str) -> str:
    return join(store_root, RESULT_KEY)


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
    for label, target in config["models"].items():
        if target in stages:
            models[label] = hf_export_uri(output_uri(stages[target], store_root))
        elif "/" in target and "://" not in target and not target.startswith("file:"):
            raise RecipeError([Problem(f"{target} is not a resource of the recipe", f"models.{label}",
                                       file=CONFIG_NAME)])
        else:
            models[label] = absolute_uri(target, base)
    return {**config, "problems": absolute_uri(config["problems"], base), "models": models}


def run_evaluation(config: dict[str, Any], store_root: str, line: Callable[[str], None],
                   python: str = sys.executable) -> int:
    """Run the evaluation workload; its output lines go to `line`; returns its exit status."""
    command = [python, "-m", "tokenmill.trainer.evaluate", "--config", json.dumps(config),
               "--out", evaluation_uri(store_root)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert process.stdout is not None
    for text in process.stdout:
        line(text.rstrip("\n"))
    return process.wait()
