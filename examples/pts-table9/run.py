"""The report's Table 9 in miniature: SFT, then DPO on Pivotal Token Search pairs, against DPO
on as many full-solution pairs from the same rollouts, judged on held-out problems.

    .venv/bin/python examples/pts-table9/run.py --seeds 3
    .venv/bin/python examples/pts-table9/run.py --seeds 3 --parallel 3   # seeds side by side
    .venv/bin/python examples/pts-table9/run.py --seeds 1 --scale 0.25   # a quick check

Per seed, everything through the project's own workloads, driven by the local runner
(`tokenmill run`) on recipes this script writes:

1. data: arithmetic word problems ("Mia has 8 shells and loses 5. How many does Mia have
   now?", sums and differences of numbers up to 9, 6 names x 6 objects x 126 number pairs),
   each with the scripted teacher's worked solution ("Step 1: 8 - 5 = 3.\nThe answer is
   \\boxed{3}."); 64 problems are held out and never occur in any training set (documents,
   SFT conversations, PTS problems);
2. recipe `main`: TrainingStage pretrain (documents of solved problems, a tiny byte-level
   model) -> TrainingStage sft (the conversations) -> PTSJob pts (the SFT model's own
   solutions to training problems, math oracle) -> TrainingStage dpo-pts (the pivotal pairs);
3. the full-solution pairs the same PTSJob wrote (`<output>/full-solution-pairs`) cut to as
   many pairs as the pivotal set holds, as a dataset of their own;
4. recipe `full`: TrainingStage dpo-full (those pairs, same DPO settings, the SFT model as
   policy and reference);
5. `python -m tokenmill.trainer.evaluate` on the held-out problems for SFT, PTS-DPO and
   full-solution DPO: greedy accuracy and the success rate of 8 samples at temperature 1.

The table (mean and standard deviation over seeds, and every seed; then per seed the problems
PTS searched, the pairs, the rollouts, wall and CPU minutes) is printed and written to
`<work>/table9.json` (with each stage's wall seconds) and `<work>/table9.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil  # installed with Ray

from tokenmill.layout import dataset_uri, hf_export_uri, join
from tokenmill.runner.console import local_ray
from tokenmill.store import CHAT_SAMPLES, DOCUMENTS, PREFERENCE_PAIRS, CheckpointStore, DatasetWriter, open_dataset
from tokenmill.trainer.generate.scripted_engine import correct_answer, worked_solution

# Names of one length, objects of another and verbs of a third put the numbers of every problem
# at the same places, so that a two-layer byte-level model learns to read them within minutes.
NAMES = ["Sam", "Mia", "Leo", "Ava", "Max", "Zoe"]
OBJECTS = ["apples", "shells", "stamps", "grapes", "sticks", "plates"]
TRIPLES = [(a, "+", b) for a in range(1, 10) for b in range(1, 10)] + \
          [(a, "-", b) for a in range(2, 10) for b in range(1, a)]
PROBLEMS = [(name, thing, a, op, b) for name in NAMES for thing in OBJECTS for (a, op, b) in TRIPLES]
"""Every problem the example poses: 6 names x 6 objects x 126 sums and differences."""
HELD_OUT = 64
MODELS = ("SFT", "PTS-DPO", "Full-DPO")


def problem_text(name: str, thing: str, a: int, op: str, b: int) -> str:
    verb = "finds" if op == "+" else "loses"
    return f"{name} has {a} {thing} and {verb} {b}. How many does {name} have now?"


def solved(problem: tuple, teacher: random.Random) -> tuple[str, str, str]:
    text = problem_text(*problem)
    answer = correct_answer(text)
    if answer is None:
        raise ValueError(f"the scripted teacher cannot read {text!r}")
    return text, worked_solution(text, teacher, 0.0), answer


def split_problems(seed: int) -> tuple[list[tuple], list[tuple]]:
    """The held-out problems and the training pool, disjoint: no held-out question is ever trained on."""
    problems = list(PROBLEMS)
    random.Random(seed).shuffle(problems)
    return problems[:HELD_OUT], problems[HELD_OUT:]


def write(uri: str, schema, rows: list[dict]) -> str:
    writer = DatasetWriter(uri, schema)
    writer.write_shard(0, rows)
    writer.finalize(expected=[0])
    return uri


def make_data(directory: Path, seed: int, scale: float) -> dict[str, str]:
    rng = random.Random(seed + 1)
    teacher = random.Random(seed + 1000)
    held_out, training = split_problems(seed)
    n_docs, n_sft, n_pts = int(SIZES["documents"] * scale), int(SIZES["sft"] * scale), max(4, int(SIZES["pts"] * scale))

    def sample(count: int) -> list[tuple[str, str, str]]:
        return [solved(rng.choice(training), teacher) for _ in range(count)]

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
    for i, problem in enumerate(held_out):
        q, _, a = solved(problem, teacher)
        evaluation.append({"id": f"eval-{i}", "source": "eval", "meta": json.dumps({"answer": a}),
                           "messages": [{"role": "user", "content": q}]})
    uris["eval"] = write((directory / "eval").as_uri(), CHAT_SAMPLES, evaluation)
    return uris


def validation_data(data: Path, seed: int, count: int) -> str:
    """`count` problems of the training pool that no training set of this seed's `data` holds (nor the
    held-out set), as a dataset under `data`: for choosing settings without looking at the held-out problems."""
    trained = set()
    for name in ("documents", "sft", "problems"):
        for row in open_dataset((data / name).as_uri()).read_all().to_pylist():
            trained.add(row["text"].split("\n")[0].removeprefix("Question: ") if name == "documents"
                        else row["messages"][0]["content"])
    held_out, training = split_problems(seed)
    unseen = [problem for problem in training if problem_text(*problem) not in trained]
    rows = []
    for i, problem in enumerate(random.Random(seed + 77).sample(unseen, min(count, len(unseen)))):
        question, _, answer = solved(problem, random.Random(0))
        rows.append({"id": f"validation-{i}", "source": "validation", "meta": json.dumps({"answer": answer}),
                     "messages": [{"role": "user", "content": question}]})
    return write((data / "validation").as_uri(), CHAT_SAMPLES, rows)


def resource(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "tokenmill.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


RAY_TRAIN = {"workers": {"replicas": 1, "gpusPerWorker": 0, "cpusPerWorker": "2", "memoryPerWorker": "4Gi"}}
SEQUENCE = 256
BATCH = 8
SIZES = {"documents": 3000, "sft": 1500, "pts": 10}
"""Rows of each dataset at --scale 1."""
STEPS = {"pretrain": 384, "sft": 128, "dpo": 16}
"""Optimizer steps of each stage at --scale 1 (BATCH sequences of SEQUENCE tokens each)."""
DPO = {"beta": 0.1, "peakLearningRate": 1.0e-5, "chosenNllWeight": 1.0}
"""Picked on validation problems of seed 2 (trainer/pts/README.md): the one setting of those tried above SFT there."""
PTS = {"solutionsPerProblem": 2, "samplesPerEstimate": 32, "pGap": 0.2,
       "queryFilter": {"minSuccess": 0.1, "maxSuccess": 0.9}, "maxPivotalTokens": 4}
ROLLOUT_TOKENS = 56


def tokens(stage: str, scale: float) -> int:
    return max(1, round(STEPS[stage] * scale)) * BATCH * SEQUENCE


def dpo_stage(name: str, model: dict, datasets: list[dict], seed: int, scale: float) -> dict:
    return resource("TrainingStage", name, {
        "stage": "dpo", "model": {"parent": model},
        "dpo": {"beta": DPO["beta"], "chosenNllWeight": DPO["chosenNllWeight"], "referenceModel": model},
        "datasets": datasets, "sequenceLength": SEQUENCE,
        "optimization": {"globalBatchSequences": BATCH, "microBatchSequences": BATCH,
                         "peakLearningRate": DPO["peakLearningRate"], "decay": "constant",
                         "totalTokens": tokens("dpo", scale)},
        "execution": {"precision": "fp32", "seed": seed}, "ray": RAY_TRAIN})


def main_recipe(uris: dict[str, str], seed: int, scale: float) -> list[dict]:
    return [
        resource("TrainingStage", "pretrain", {
            "stage": "pretrain", "model": {"config": "tiny"},
            "datasets": [{"uri": uris["documents"], "weight": 1.0, "epochs": 100}],
            "sequenceLength": SEQUENCE,
            "optimization": {"globalBatchSequences": BATCH, "microBatchSequences": BATCH, "peakLearningRate": 3.0e-3,
                             "warmupSteps": 20, "decay": "cosine", "minLearningRateRatio": 0.1,
                             "weightDecay": 0.1, "totalTokens": tokens("pretrain", scale)},
            "execution": {"precision": "fp32", "seed": seed}, "ray": RAY_TRAIN}),
        resource("TrainingStage", "sft", {
            "stage": "sft", "model": {"parent": {"ref": {"kind": "TrainingStage", "name": "pretrain"}}},
            "datasets": [{"uri": uris["sft"], "weight": 1.0, "epochs": 100}],
            "sequenceLength": SEQUENCE,
            "optimization": {"globalBatchSequences": BATCH, "microBatchSequences": BATCH, "peakLearningRate": 1.0e-3,
                             "warmupSteps": 5, "decay": "cosine", "minLearningRateRatio": 0.1,
                             "totalTokens": tokens("sft", scale)},
            "execution": {"precision": "fp32", "seed": seed + 1}, "ray": RAY_TRAIN}),
        resource("PTSJob", "pts", {
            "model": {"ref": {"kind": "TrainingStage", "name": "sft"}},
            "problems": {"uri": uris["problems"]}, "oracle": {"kind": "math"}, "engine": "torch", **PTS,
            "rollout": {"temperature": 1.0, "maxTokens": ROLLOUT_TOKENS, "seed": seed},
            "ray": RAY_TRAIN}),
        dpo_stage("dpo-pts", {"ref": {"kind": "TrainingStage", "name": "sft"}},
                  [{"ref": {"kind": "PTSJob", "name": "pts"}, "weight": 1.0, "epochs": 1000}], seed + 2, scale),
    ]


def write_recipe(directory: Path, resources: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # JSON documents are YAML documents; the runner reads a folder's recipe.yaml
    (directory / "recipe.yaml").write_text("\n---\n".join(json.dumps(r, indent=1) for r in resources) + "\n")
    return directory


def logged(command: list[str], log: Path, timings: dict[str, float], first: str) -> int:
    """Runs `command` with its output appended to `log`, adding to `timings` the wall seconds of
    each part: `first` until the runner starts its first resource, then each resource (from its
    `start Kind/name` line to the next one, or to the end)."""
    name, current = first, time.monotonic()

    def lap(following: str) -> None:
        nonlocal name, current
        now = time.monotonic()
        timings[name] = round(timings.get(name, 0.0) + now - current, 1)
        name, current = following, now

    with open(log, "a", encoding="utf-8", errors="replace") as output, \
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace") as process:
        assert process.stdout is not None
        for line in process.stdout:
            output.write(line)
            if line.startswith("start ") and "/" in line:
                lap(line.split()[1].split("/", 1)[1])
        status = process.wait()
    lap(name)
    return status


def tokenmill_run(recipe: Path, store: str, log: Path, timings: dict[str, float], ray_address: str | None) -> None:
    command = [sys.executable, "-c", "import sys; from tokenmill.cli import main; sys.exit(main())",
               "run", str(recipe), "--store", store]
    if ray_address:
        command += ["--ray-address", ray_address]
    status = logged(command, log, timings, "runner start-up")
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


def run_seed(work: Path, seed: int, scale: float, ray_address: str | None) -> dict:
    directory = work / f"seed-{seed}"
    store = (directory / "store").as_uri()
    log = directory / "run.log"
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    timings: dict[str, float] = {}
    uris = make_data(directory / "data", seed, scale)
    timings["data"] = round(time.monotonic() - started, 1)
    tokenmill_run(write_recipe(directory / "main", main_recipe(uris, seed, scale)), store, log, timings, ray_address)
    pivotal = open_dataset(dataset_uri(join(store, "ptsjobs", "pts"))).read_all().num_rows
    full_uri = (directory / "data" / "full-solution-pairs").as_uri()
    full = cut_full_solution_pairs(store, full_uri, pivotal, seed)
    sft_export = hf_export_uri(join(store, "trainingstages", "sft"))
    sft_checkpoints = CheckpointStore.for_output(join(store, "trainingstages", "sft"))
    sft_checkpoint = sft_checkpoints.uri_for(sft_checkpoints.latest().step)  # type: ignore[union-attr]
    if pivotal and full:
        tokenmill_run(write_recipe(directory / "full", [dpo_stage(
            "dpo-full", {"uri": sft_checkpoint}, [{"uri": full_uri, "weight": 1.0, "epochs": 1000}], seed + 2, scale)]),
            store, log, timings, ray_address)
    models = {"SFT": sft_export}
    if pivotal:
        models["PTS-DPO"] = hf_export_uri(join(store, "trainingstages", "dpo-pts"))
    if pivotal and full:
        models["Full-DPO"] = hf_export_uri(join(store, "trainingstages", "dpo-full"))
    config = {"problems": uris["eval"], "oracle": "math", "models": models, "samples": 8,
              "temperature": 1.0, "maxTokens": ROLLOUT_TOKENS, "seed": seed}
    (directory / "evaluation.json").write_text(json.dumps(config))
    result_uri = (directory / "evaluation-result.json").as_uri()
    status = logged([sys.executable, "-m", "tokenmill.trainer.evaluate", "--config", json.dumps(config),
                     "--out", result_uri], log, timings, "evaluation")
    if status != 0:
        raise SystemExit(f"the evaluation of seed {seed} failed (exit {status}); see {log}")
    result = json.loads((directory / "evaluation-result.json").read_text())
    stats = json.loads(Path(join(store, "ptsjobs", "pts", "_run", "pts-stats.json").removeprefix("file://"))
                       .read_text())["stats"]
    return {"seed": seed, "pivotalPairs": pivotal, "fullSolutionPairs": full,
            "problemsSearched": stats["problemsSearched"], "problems": stats["problems"],
            "rollouts": stats.get("rollouts"), "seconds": round(time.monotonic() - started, 1),
            "stageSeconds": timings, "models": result["models"]}


class CpuMeter:
    """CPU seconds of the watched processes and their descendants (this script: its Ray cluster
    and workers, the runners, the workloads, the evaluations), sampled each second."""

    def __init__(self) -> None:
        self.roots: list[psutil.Process] = []
        self.seen: dict[tuple[int, float], float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def watch(self, pid: int) -> None:
        try:
            self.roots.append(psutil.Process(pid))
        except psutil.Error:
            pass

    def _sample(self) -> None:
        while not self.stop.wait(1.0):
            for root in list(self.roots):
                try:
                    processes = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                for process in processes:
                    try:
                        times = process.cpu_times()
                        self.seen[(process.pid, process.create_time())] = times.user + times.system
                    except psutil.Error:
                        pass

    def __enter__(self) -> CpuMeter:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def seconds(self) -> float:
        return round(sum(self.seen.values()), 1)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: list[dict]) -> str:
    """The accuracy table (mean ± standard deviation over seeds, then each seed), and what PTS found per seed."""
    lines = ["| model | greedy accuracy | success rate (8 samples) | per seed (greedy / success) |",
             "| --- | ---: | ---: | --- |"]
    for label in MODELS:
        found = [run["models"][label] for run in runs if label in run["models"]]
        if not found:
            lines.append(f"| {label} | - | - | not trained (no pairs) |")
            continue
        greedy = [m["greedyAccuracy"] for m in found]
        success = [m["successRate"] for m in found]
        per_seed = ", ".join(f"{g:.2f} / {s:.2f}" for g, s in zip(greedy, success))
        if len(found) < len(runs):
            per_seed += f" ({len(found)} of {len(runs)} seeds; the others had no pairs)"
        lines.append(f"| {label} | {spread(greedy)} | {spread(success)} | {per_seed} |")
    if all("problemsSearched" in run for run in runs):
        lines += ["", "| seed | problems searched | pivotal pairs | full-solution pairs | rollouts | minutes |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {run['seed']} | {run['problemsSearched']} of {run['problems']} | {run['pivotalPairs']} | "
                  f"{run['fullSolutionPairs']} | {run['rollouts']} | {run['seconds'] / 60:.1f} |" for run in runs]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="data and training tokens, relative")
    parser.add_argument("--work", type=Path, default=Path("tokenmill-runs/pts-table9"))
    parser.add_argument("--parallel", type=int, default=1, help="seeds run at the same time")
    parser.add_argument("--dpo-lr", type=float, default=DPO["peakLearningRate"], help="DPO learning rate")
    parser.add_argument("--dpo-steps", type=int, default=STEPS["dpo"], help="DPO steps at --scale 1")
    parser.add_argument("--dpo-beta", type=float, default=DPO["beta"], help="DPO beta")
    parser.add_argument("--dpo-nll", type=float, default=DPO["chosenNllWeight"],
                        help="weight of the chosen completion's NLL in the DPO loss (dpo.chosenNllWeight)")
    args = parser.parse_args()
    if args.seeds < 1 or args.scale <= 0 or args.parallel < 1 or args.dpo_steps < 1:
        parser.error("--seeds, --parallel and --dpo-steps must be at least 1 and --scale above 0")
    if args.dpo_lr <= 0 or args.dpo_beta <= 0 or args.dpo_nll < 0:
        parser.error("--dpo-lr and --dpo-beta must be above 0 and --dpo-nll at least 0")
    DPO.update(peakLearningRate=args.dpo_lr, beta=args.dpo_beta, chosenNllWeight=args.dpo_nll)
    STEPS["dpo"] = args.dpo_steps
    work = args.work.resolve()
    started = time.monotonic()

    loads = []

    def one(seed: int, ray_address: str | None) -> dict:
        run = run_seed(work, seed, args.scale, ray_address)
        loads.append(os.getloadavg()[1])
        print(f"seed {seed}: {json.dumps({k: v for k, v in run.items() if k != 'models'})}", flush=True)
        return run

    # one Ray cluster for every seed's stages: one start-up instead of two per seed
    with CpuMeter() as meter, local_ray(None, True) as ray_address, ThreadPoolExecutor(args.parallel) as pool:
        meter.watch(os.getpid())
        runs = list(pool.map(lambda seed: one(seed, ray_address), range(args.seeds)))
    summary = (f"{args.seeds} seed(s) at --scale {args.scale:g}, {args.parallel} at a time, DPO lr {args.dpo_lr:g}, "
               f"beta {args.dpo_beta:g}, {args.dpo_steps} steps, chosen NLL weight {args.dpo_nll:g}: "
               f"{(time.monotonic() - started) / 60:.1f} minutes, {meter.seconds / 60:.1f} CPU minutes "
               f"(all processes), load average {max(loads):.1f} (5 minutes, at most)")
    print(summary, flush=True)
    for run in runs:
        for model in run["models"].values():
            model.pop("perProblem", None)
    text = table(runs) + "\n\n" + summary
    (work / "table9.json").write_text(json.dumps(runs, indent=1))
    (work / "table9.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
