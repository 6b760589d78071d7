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
result is written as JSON to `--out` (written whole, in one object write).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from typing import Any

from tokenmill.store import StoreError, open_parent

EXIT_INVALID = 2


def _judged(engine: Any, judge: Any, problems: list, sampling: Any, n: int) -> list[list[bool]]:
    """n solutions to every problem, all in one batch, each judged by the oracle."""
    from tokenmill.trainer.generate import GenerationRequest

    requests = [GenerationRequest(prompt_token_ids=tuple(problem.question_ids), n=n,
                                  sampling=replace(sampling, seed=sampling.seed * 1_000_003 + index), id=problem.id)
                for index, problem in enumerate(problems)]
    verdicts = []
    for problem, output in zip(problems, engine.generate(requests)):
        if not output.ok:
            raise RuntimeError(f"problem {problem.id}: generation failed: {output.error}")
        verdicts.append([judge.check(problem, completion.token_ids).correct for completion in output.completions])
    return verdicts


def evaluate_model(model_uri: str, config: dict[str, Any], label: str) -> dict[str, Any]:
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
                         SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=seed, stop_token_ids=stops), 1)
        sampled = _judged(engine, judge, problems,
                          SamplingParams(temperature=float(config.get("temperature", 1.0)), max_tokens=max_tokens,
                                         seed=seed, stop_token_ids=stops), samples)
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


def evaluate(config: dict[str, Any]) -> dict[str, Any]:
    models = config.get("models")
    if not isinstance(models, dict) or not models:
        raise ValueError("models: give at least one {label: model URI}")
    if not config.get("problems"):
        raise ValueError("problems: the URI of the held-out problems is missing")
    return {
        "problems": config["problems"],
        "oracle": config.get("oracle", "math"),
        "temperature": float(config.get("temperature", 1.0)),
        "maxTokens": int(config.get("maxTokens", 40)),
        "seed": int(config.get("seed", 0)),
        "models": {label: evaluate_model(str(uri), config, label) for label, uri in models.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.trainer.evaluate", description=__doc__)
    parser.add_argument("--config", required=True, help="the evaluation config as JSON")
    parser.add_argument("--out", required=True, help="URI of the JSON file to write")
    args = parser.parse_args(argv)
    try:
        config = json.loads(args.config)
        result = evaluate(config)
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
