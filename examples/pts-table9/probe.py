"""DPO settings tried on one seed of a finished `run.py` run: its SFT checkpoint and its pairs
(pivotal, and as many full-solution pairs), judged on validation problems of the training pool
that no training set of that seed holds (never the held-out problems).

    .venv/bin/python examples/pts-table9/probe.py --work tokenmill-runs/pts-table9 --seed 2 --name p1 \\
        --settings '{"a": {"lr": 2e-5, "beta": 0.1, "steps": 32, "nll": 1.0}}'

Each setting trains `pts-<label>` (and `full-<label>` unless "kinds" is ["pts"]) through the
local runner; the figures are printed and written to `<work>/seed-<seed>/probe-<name>/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the example's own module, beside this file)

from tokenmill.layout import dataset_uri, hf_export_uri, join  # noqa: E402
from tokenmill.store import CheckpointStore  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("tokenmill-runs/pts-table9"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="probe")
    parser.add_argument("--settings", required=True, help='JSON: {label: {"lr", "beta", "steps", "nll"}}')
    parser.add_argument("--validation", type=int, default=128, help="validation problems")
    parser.add_argument("--samples", type=int, default=4, help="samples per problem for the success rate")
    parser.add_argument("--held-out", action="store_true",
                        help="judge on the seed's held-out problems instead (for settings already chosen)")
    args = parser.parse_args()
    settings = json.loads(args.settings)
    seed_dir = args.work.resolve() / f"seed-{args.seed}"
    source = (seed_dir / "store").as_uri()
    work = seed_dir / f"probe-{args.name}"
    work.mkdir(parents=True, exist_ok=True)
    store = (work / "store").as_uri()
    if args.held_out:
        validation = (seed_dir / "data" / "eval").as_uri()
    else:
        validation = run.validation_data(seed_dir / "data", args.seed, args.validation)
    checkpoints = CheckpointStore.for_output(join(source, "trainingstages", "sft"))
    sft = checkpoints.uri_for(checkpoints.latest().step)  # type: ignore[union-attr]
    pairs = {"pts": dataset_uri(join(source, "ptsjobs", "pts")),
             "full": (seed_dir / "data" / "full-solution-pairs").as_uri()}
    recipe, models = [], {"SFT": hf_export_uri(join(source, "trainingstages", "sft"))}
    for label, setting in settings.items():
        run.DPO.update(beta=setting["beta"], peakLearningRate=setting["lr"], chosenNllWeight=setting["nll"])
        run.STEPS["dpo"] = setting["steps"]
        for kind in setting.get("kinds", ["pts", "full"]):
            name = f"{kind}-{label}"
            recipe.append(run.dpo_stage(name, {"uri": sft}, [{"uri": pairs[kind], "weight": 1.0, "epochs": 1000}],
                                        args.seed + 2, 1.0))
            models[name] = hf_export_uri(join(store, "trainingstages", name))
    timings: dict[str, float] = {}
    run.tokenmill_run(run.write_recipe(work / "recipe", recipe), store, work / "run.log", timings, None)
    config = {"problems": validation, "oracle": "math", "models": models, "samples": args.samples,
              "temperature": 1.0, "maxTokens": run.ROLLOUT_TOKENS, "seed": args.seed}
    result = work / "evaluation-result.json"
    if run.logged([sys.executable, "-m", "tokenmill.trainer.evaluate", "--config", json.dumps(config),
                   "--out", result.as_uri()], work / "run.log", timings, "evaluation") != 0:
        raise SystemExit(f"the evaluation failed; see {work / 'run.log'}")
    figures = json.loads(result.read_text())["models"]
    for model, values in figures.items():
        setting = settings.get(model.split("-", 1)[-1], {})
        print(f"seed {args.seed} {model} {json.dumps(setting)}: greedy {values['greedyAccuracy']:.3f}, "
              f"success {values['successRate']:.3f}")
    print(f"wall seconds per part: {json.dumps(timings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
