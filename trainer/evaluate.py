"""Held-out evaluation of trained models on oracle-judged problems (the tiny recipe's last step).

`python -m tokenmill.trainer.evaluate --config <json> --out <uri>` reads a config

    {"problems": URI, "oracle": "math", "models": {"SFT": URI, "PTS-DPO": URI},
     "samples": 8, "temperature": 1.0, "maxTokens": 40, "seed": 0}

and, for each model (a checkpoint or Hugging Face export) on every problem (a `documents` or
`chat_samples` dataset with the ground truth in `meta`, as a PTSJob reads them):
- greedy accuracy: one greedy solution per problem, judged by the oracle;
- success rate: `samples` solutions at `temperature`, the share the oracle accepts (the
  quantity Pivotal Token Search moves), with its standard error over problems.

Sampling is seeded per problem, so a rerun on the same models gives the same figures. The
result is written as JSON to `--out` (written whole, in one object write), with its `key`: a
digest of the config, so a caller can tell an evaluation of exactly this config is done.

Progress and resume, beside `--out` (in its folder): `_run/progress.json` counts solutions
(greedy and sampled) as they are judged, and each model's figures are committed to
`models/<key>.json` as soon as they are known; a rerun of the same config reuses them. A
model's key covers the config's settings, the model's URI and its `versions` entry (the
caller's word for which build of the model the URI holds), so a retrained model is
evaluated again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from tokenmill.layout import join
from tokenmill.runner.evaluation import config_key, model_key
from tokenmill.store import Progress, StoreError, open_parent, open_store, write_progress

EXIT_INVALID = 2
PROBLEMS_PER_BATCH = 10
"""Problems generated together; progress is written after each batch."""


def _judged(engine: Any, judge: Any, problems: list, sampling: Any, n: int,
            judged: Callable[[int], None] = lambda count: None) -> list[list[bool]]:
    """n solutions to every problem, in batches of PROBLEMS_PER_BATCH problems, each judged by the
    oracle; `judged` is told how many solutions each batch judged."""
    from tokenmill.trainer.generate import GenerationRequest

    requests = [GenerationRequest(prompt_token_ids=tuple(problem.question_ids), n=n,
                                  sampling=replace(sampling, seed=sampling.seed * 1_000_003 + index), id=problem.id)
                for index, problem in enumerate(problems)]
    verdicts = []
    for start in range(0, len(requests), PROBLEMS_PER_BATCH):
        batch = requests[start:start + PROBLEMS_PER_BATCH]
        for problem, output in zip(problems[start:start + PROBLEMS_PER_BATCH], engine.generate(batch)):
            if not output.ok:
                raise RuntimeError(f"problem {problem.id}: generation failed: {output.error}")
            verdicts.append([judge.check(problem, completion.token_ids).correct
                             for completion in output.completions])
        judged(len(batch) * n)
    return verdicts


def evaluate_model(model_uri: str, config: dict[str, Any], label: str,
                   judged: Callable[[int], None] = lambda count: None) -> dict[str, Any]:
    from tokenmill.trainer.generate import SamplingParams, build_engine
    from tokenmill.trainer.oracles import make_oracle
    from tokenmill.trainer.pts.engine_policy import solution_decoder
    from tokenmill.trainer.pts.policy import OracleJudge
    from tokenmill.trainer.pts.workload import read_problems

    engine = build_engine("torch", model_uri=model_uri, field=f"models.{label}")
    try:
        tokenizer = engine.tokenizer
        stops = tuple(sorted({tokenizer.eos_id, tokenizer.eot_id}))
        problems = read_problems(str(config["problems"]), tokenizer)
        judge = OracleJudge(make_oracle(str(config.get("oracle", "math"))), solution_decoder(tokenizer.decode, stops))
        max_tokens = int(config.get("maxTokens", 40))
        seed = int(config.get("seed", 0))
        samples = int(config.get("samples", 8))
        greedy = _judged(engine, judge, problems,
                         SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=seed, stop_token_ids=stops), 1,
                         judged)
        sampled = _judged(engine, judge, problems,
                          SamplingParams(temperature=float(config.get("temperature", 1.0)), max_tokens=max_tokens,
                                         seed=seed, stop_token_ids=stops), samples, judged)
        rows = [{"id": problem.id, "greedyCorrect": first[0], "successRate": sum(many) / len(many)}
                for problem, first, many in zip(problems, greedy, sampled)]
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    count = len(rows)
    rates = [row["successRate"] for row in rows]
    mean = sum(rates) / count
    spread = math.sqrt(sum((rate - mean) ** 2 for rate in rates) / (count - 1)) if count > 1 else 0.0
    return {
        "model": model_uri,
        "problems": count,
        "greedyAccuracy": sum(row["greedyCorrect"] for row in rows) / count,
        "successRate": mean,
        "successRateStderr": spread / math.sqrt(count),
        "samplesPerProblem": samples,
        "perProblem": rows,
    }


def _problem_count(uri: str) -> int:
    from tokenmill.store import read_manifest

    return int(read_manifest(uri).summary.rows)


def evaluate(config: dict[str, Any], work: str | None = None) -> dict[str, Any]:
    """The figures of every model of `config`. With `work` (a folder URI), progress goes to
    `<work>/_run/progress.json` and each model's figures to `<work>/models/<key>.json`, where a
    rerun of the same config finds them."""
    models = config.get("models")
    if not isinstance(models, dict) or not models:
        raise ValueError("models: give at least one {label: model URI}")
    if not config.get("problems"):
        raise ValueError("problems: the URI of the held-out problems is missing")
    results = open_store(join(work, "models")) if work else None
    per_model = _problem_count(str(config["problems"])) * (1 + int(config.get("samples", 8)))
    figures: dict[str, dict[str, Any]] = {}
    for label in models:
        name = f"{model_key(config, label)}.json"
        if results is not None and results.exists(name):
            figures[label] = results.read_json(name)
            print(f"{label}: evaluated by an earlier run")
    done = per_model * len(figures)
    total = per_model * len(models)

    def report(phase: str, message: str = "") -> None:
        if work:
            write_progress(work, Progress(phase=phase, done=done, total=total, unit="solutions", message=message))

    def judged(count: int) -> None:
        nonlocal done
        done += count
        report("evaluating", current)

    for label, uri in models.items():
        if label in figures:
            continue
        current = label
        report("evaluating", current)
        figures[label] = evaluate_model(str(uri), config, label, judged)
        if results is not None:
            results.write_json(f"{model_key(config, label)}.json", figures[label])
    report("succeeded")
    return {
        "key": config_key(config),
        "problems": config["problems"],
        "oracle": config.get("oracle", "math"),
        "temperature": float(config.get("temperature", 1.0)),
        "maxTokens": int(config.get("maxTokens", 40)),
        "seed": int(config.get("seed", 0)),
        "models": {label: figures[label] for label in models},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.trainer.evaluate", description=__doc__)
    parser.add_argument("--config", required=True, help="the evaluation config as JSON")
    parser.add_argument("--out", required=True, help="URI of the JSON file to write")
    args = parser.parse_args(argv)
    work = args.out.rsplit("/", 1)[0]
    try:
        config = json.loads(args.config)
        result = evaluate(config, work)
    except (ValueError, KeyError, StoreError) as error:
        print(f"tokenmill evaluate: {error}; nothing was written", file=sys.stderr)
        return EXIT_INVALID
    store, key = open_parent(args.out)
    store.write_json(key, result)
    for label, figures in result["models"].items():
        print(f"{label}: greedy accuracy {figures['greedyAccuracy']:.3f}, success rate "
              f"{figures['successRate']:.3f} ± {figures['successRateStderr']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
