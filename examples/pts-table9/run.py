"""The report's Table 9 in miniature: SFT, then DPO on Pivotal Token Search pairs, against DPO
on as many full-solution pairs from the same rollouts, judged on held-out problems.

    .venv/bin/python examples/pts-table9/run.py --seeds 3
    .venv/bin/python examples/pts-table9/run.py --seeds 1 --scale 0.25   # a quick check

Per seed, everything through the project's own workloads, driven by the local runner
(`tokenmill run`) on recipes this script writes:

1. data: arithmetic word problems ("Mia has 3 pens and buys 4 more pens at the market. How
   many pens does Mia have now?", sums and differences of numbers up to 9), each with the
   scripted teacher's worked solution; the (a, op, b) triples of the held-out set never
   occur in any training set;
2. recipe `main`: TrainingStage pretrain (documents of solved problems, a tiny byte-level
   model) -> TrainingStage sft (the conversations) -> PTSJob pts (the SFT model's own
   solutions to training problems, math oracle) -> TrainingStage dpo-pts (the pivotal pairs);
3. the full-solution pairs the same PTSJob wrote (`<output>/full-solution-pairs`) cut to as
   many pairs as the pivotal set holds, as a dataset of their own;
4. recipe `full`: TrainingStage dpo-full (those pairs, same DPO settings, the SFT model as
   policy and reference);
5. `python -m tokenmill.trainer.evaluate` on the held-out problems for SFT, PTS-DPO and
   full-solution DPO: greedy accuracy and the sampled success rate.

The table (mean and standard deviation over seeds, and every seed) is printed and written to
`<work>/table9.json` and `<work>/table9.md`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tokenmill.layout import dataset_uri, hf_export_uri, join
from tokenmill.store import CHAT_SAMPLES, DOCUMENTS, PREFERENCE_PAIRS, CheckpointStore, DatasetWriter, open_dataset
from tokenmill.trainer.generate.scripted_engine import correct_answer, worked_solution

NAMES = ["Sam", "Mia", "Leo", "Ava", "Noah", "Zoe"]
OBJECTS = ["apples", "pens", "cards", "shells", "stamps", "marbles"]
TRIPLES = [(a, "+", b) for a in range(1, 10) for b in range(1, 10)] + \
          [(a, "-", b) for a in range(2, 10) for b in range(1, a)]
HELD_OUT = 24
MODELS = ("SFT", "PTS-DPO", "Full-DPO")


def problem_text(rng: random.Random, a: int, op: str, b: int) -> str:
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    if op == "+":
        return f"{name} has {a} {thing} and buys {b} more {thing} at the market. How many {thing} does {name} have now?"
    return f"{name} has {a} {thing} and gives away {b} {thing} to a friend. How many {thing} does {name} have now?"


def solved(rng: random.Random, triple: tuple[int, str, int], teacher_rng: random.Random) -> tuple[str, str, str]:
    text = problem_text(rng, *triple)
    answer = correct_answer(text)
    if answer is None:
        raise ValueError(f"the scripted teacher cannot read {text!r}")
    return text, worked_solution(text, teacher_rng, 0.0), answer


def write(uri: str, schema, rows: list[dict]) -> str:
    writer = DatasetWriter(uri, schema)
    writer.write_shard(0, rows)
    writer.finalize(expected=[0])
    return uri


def make_data(directory: Path, seed: int, scale: float) -> dict[str, str]:
    rng = random.Random(seed)
    teacher = random.Random(seed + 1000)
    triples = list(TRIPLES)
    rng.shuffle(triples)
    held_out, training = triples[:HELD_OUT], triples[HELD_OUT:]
    n_docs, n_sft, n_pts = int(1200 * scale), int(600 * scale), max(8, int(48 * scale))

    def sample(count: int) -> list[tuple[str, str, str]]:
        return [solved(rng, rng.choice(training), teacher) for _ in range(count)]

    uris = {}
    docs = [{"id": f"doc-{i}", "text": f"Question: {q}\nSolution: {s}", "source": "pretrain", "lang": "en", "meta": "{}"}
            for i, (q, s, _) in enumerate(sample(n_docs))]
    uris["documents"] = write((directory / "documents").as_uri(), DOCUMENTS, docs)
    sft = [{"id": f"sft-{i}", "source": "sft", "meta": json.dumps({"answer": a}),
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": s}]}
           for i, (q, s, a) in enumerate(sample(n_sft))]
    uris["sft"] = write((directory / "sft").as_uri(), CHAT_SAMPLES, sft)
    pts = [{"id": f"pts-{i}", "source": "pts", "meta": json.dumps({"answer": a}),
            "messages": [{"role": "user", "content": q}]} for i, (q, _, a) in enumerate(sample(n_pts))]
    uris["problems"] = write((directory / "problems").as_uri(), CHAT_SAMPLES, pts)
    evaluation = []
    for i, triple in enumerate(held_out):
        q, _, a = solved(rng, triple, teacher)
        evaluation.append({"id": f"eval-{i}", "source": "eval", "meta": json.dumps({"answer": a}),
                           "messages": [{"role": "user", "content": q}]})
    uris["eval"] = write((directory / "eval").as_uri(), CHAT_SAMPLES, evaluation)
    return uris


def resource(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "tokenmill.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


RAY_TRAIN = {"workers": {"replicas": 1, "gpusPerWorker": 0, "cpusPerWorker": "2", "memoryPerWorker": "4Gi"}}


def dpo_stage(name: str, model: dict, datasets: list[dict], seed: int, scale: float) -> dict:
    return resource("TrainingStage", name, {
        "stage": "dpo", "model": {"parent": model},
        "dpo": {"beta": 0.1, "referenceModel": model},
        "datasets": datasets, "sequenceLength": 256,
        "optimization": {"globalBatchSequences": 8, "microBatchSequences": 8, "peakLearningRate": 1.0e-4,
                         "totalTokens": int(40960 * scale)},
        "execution": {"precision": "fp32", "seed": seed}, "ray": RAY_TRAIN})


def main_recipe(uris: dict[str, str], seed: int, scale: float) -> list[dict]:
    return [
        resource("TrainingStage", "pretrain", {
            "stage": "pretrain", "model": {"config": "tiny"},
            "datasets": [{"uri": uris["documents"], "weight": 1.0, "epochs": 50}],
            "sequenceLength": 128,
            "optimization": {"globalBatchSequences": 8, "microBatchSequences": 8, "peakLearningRate": 3.0e-3,
                             "warmupSteps": 10, "weightDecay": 0.1, "totalTokens": int(204800 * scale)},
            "execution": {"precision": "fp32", "seed": seed}, "ray": RAY_TRAIN}),
        resource("TrainingStage", "sft", {
            "stage": "sft", "model": {"parent": {"ref": {"kind": "TrainingStage", "name": "pretrain"}}},
            "datasets": [{"uri": uris["sft"], "weight": 1.0, "epochs": 50}],
            "sequenceLength": 256,
            "optimization": {"globalBatchSequences": 8, "microBatchSequences": 8, "peakLearningRate": 1.0e-3,
                             "warmupSteps": 10, "totalTokens": int(102400 * scale)},
            "execution": {"precision": "fp32", "seed": seed + 1}, "ray": RAY_TRAIN}),
        resource("PTSJob", "pts", {
            "model": {"ref": {"kind": "TrainingStage", "name": "sft"}},
            "problems": {"uri": uris["problems"]}, "oracle": {"kind": "math"}, "engine": "torch",
            "solutionsPerProblem": 2, "samplesPerEstimate": 16, "pGap": 0.2,
            "queryFilter": {"minSuccess": 0.1, "maxSuccess": 0.9}, "maxPivotalTokens": 4,
            "rollout": {"temperature": 1.0, "maxTokens": 48, "seed": seed},
            "ray": {"workers": {"replicas": 1, "gpusPerWorker": 0, "cpusPerWorker": "2", "memoryPerWorker": "4Gi"}}}),
        dpo_stage("dpo-pts", {"ref": {"kind": "TrainingStage", "name": "sft"}},
                  [{"ref": {"kind": "PTSJob", "name": "pts"}, "weight": 1.0, "epochs": 200}], seed + 2, scale),
    ]


def write_recipe(directory: Path, resources: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # JSON documents are YAML documents; the runner reads a folder's recipe.yaml
    (directory / "recipe.yaml").write_text("\n---\n".join(json.dumps(r, indent=1) for r in resources) + "\n")
    return directory


def tokenmill_run(recipe: Path, store: str, log: Path) -> None:
    command = [sys.executable, "-c", "import sys; from tokenmill.cli import main; sys.exit(main())",
               "run", str(recipe), "--store", store]
    with open(log, "ab") as output:
        status = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"tokenmill run {recipe} failed (exit {status}); see {log}")


def cut_full_solution_pairs(store: str, target: str, count: int, seed: int) -> int:
    """As many full-solution pairs as the pivotal set holds (all of them when there are fewer)."""
    rows = open_dataset(join(store, "ptsjobs", "pts", "full-solution-pairs")).read_all().to_pylist()
    random.Random(seed).shuffle(rows)
    chosen = rows[:count]
    writer = DatasetWriter(target, PREFERENCE_PAIRS)
    writer.write_shard(0, chosen or PREFERENCE_PAIRS.arrow.empty_table())
    writer.finalize(expected=[0])
    return len(chosen)


def run_seed(work: Path, seed: int, scale: float) -> dict:
    directory = work / f"seed-{seed}"
    store = (directory / "store").as_uri()
    log = directory / "run.log"
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    uris = make_data(directory / "data", seed, scale)
    tokenmill_run(write_recipe(directory / "main", main_recipe(uris, seed, scale)), store, log)
    pivotal = open_dataset(dataset_uri(join(store, "ptsjobs", "pts"))).read_all().num_rows
    full_uri = (directory / "data" / "full-solution-pairs").as_uri()
    full = cut_full_solution_pairs(store, full_uri, pivotal, seed)
    sft_export = hf_export_uri(join(store, "trainingstages", "sft"))
    sft_checkpoints = CheckpointStore.for_output(join(store, "trainingstages", "sft"))
    sft_checkpoint = sft_checkpoints.uri_for(sft_checkpoints.latest().step)  # type: ignore[union-attr]
    if pivotal and full:
        tokenmill_run(write_recipe(directory / "full", [dpo_stage(
            "dpo-full", {"uri": sft_checkpoint}, [{"uri": full_uri, "weight": 1.0, "epochs": 200}], seed + 2, scale)]),
            store, log)
    models = {"SFT": sft_export}
    if pivotal:
        models["PTS-DPO"] = hf_export_uri(join(store, "trainingstages", "dpo-pts"))
    if pivotal and full:
        models["Full-DPO"] = hf_export_uri(join(store, "trainingstages", "dpo-full"))
    config = {"problems": uris["eval"], "oracle": "math", "models": models, "samples": 8,
              "temperature": 1.0, "maxTokens": 48, "seed": seed}
    (directory / "evaluation.json").write_text(json.dumps(config))
    result_uri = (directory / "evaluation-result.json").as_uri()
    with open(log, "ab") as output:
        status = subprocess.run([sys.executable, "-m", "tokenmill.trainer.evaluate", "--config",
                                 json.dumps(config), "--out", result_uri],
                                stdout=output, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"the evaluation of seed {seed} failed (exit {status}); see {log}")
    result = json.loads((directory / "evaluation-result.json").read_text())
    stats = json.loads(Path(join(store, "ptsjobs", "pts", "_run", "pts-stats.json").removeprefix("file://"))
                       .read_text())["stats"]
    return {"seed": seed, "pivotalPairs": pivotal, "fullSolutionPairs": full,
            "problemsSearched": stats["problemsSearched"], "problems": stats["problems"],
            "seconds": round(time.monotonic() - started, 1), "models": result["models"]}


def table(runs: list[dict]) -> str:
    lines = ["| model | greedy accuracy | success rate (8 samples) | per seed (greedy / success) |",
             "| --- | ---: | ---: | --- |"]
    for label in MODELS:
        found = [run["models"][label] for run in runs if label in run["models"]]
        if not found:
            lines.append(f"| {label} | - | - | not trained (no pairs) |")
            continue
        greedy = [m["greedyAccuracy"] for m in found]
        success = [m["successRate"] for m in found]

        def spread(values: list[float]) -> str:
            return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 \
                else f"{values[0]:.3f}"

        per_seed = ", ".join(f"{g:.2f} / {s:.2f}" for g, s in zip(greedy, success))
        lines.append(f"| {label} | {spread(greedy)} | {spread(success)} | {per_seed} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="data and training tokens, relative")
    parser.add_argument("--work", type=Path, default=Path("tokenmill-runs/pts-table9"))
    args = parser.parse_args()
    if args.seeds < 1 or args.scale <= 0:
        parser.error("--seeds must be at least 1 and --scale above 0")
    work = args.work.resolve()
    runs = []
    for seed in range(args.seeds):
        runs.append(run_seed(work, seed, args.scale))
        print(f"seed {seed}: {json.dumps({k: v for k, v in runs[-1].items() if k != 'models'})}", flush=True)
    for run in runs:
        for model in run["models"].values():
            model.pop("perProblem", None)
    text = table(runs)
    (work / "table9.json").write_text(json.dumps(runs, indent=1))
    (work / "table9.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
