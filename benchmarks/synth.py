"""The SyntheticDataJob's workflow machinery against the engine alone.

The workflow (agreement filter with 4 samples, then self-revision of up to 2 rounds) runs over
800 arithmetic seeds (50 shards of the workload's `SEEDS_PER_SHARD`: long enough that the
actor's first and last shards, which nothing overlaps, weigh little), on the scripted stand-in
teacher with a fixed latency per request (1 ms by default). Every engine call is recorded;
the peer, "engine alone", replays exactly those calls on the same engine with nothing around
them. Our variants:

- `workflow`: the steps alone (prompt rendering, sampling, answer extraction, voting,
  critique parsing, counting, provenance, output rows);
- `workflow+cache`: the same behind the request cache on a local store (`file://`, fsynced):
  keys per sample, lookups, records, a background group commit after every engine call, and
  the last commit waited for at the end;
- `shard worker`: the workload's own Ray Data actor code (`ShardWorker.run_shard`, without
  Ray), driven as Ray Data drives one actor: the shards in order, `CALLS_PER_ACTOR` calls at
  once. The workflow behind the request cache, and per shard its statistics file, its
  committed dataset shard and the request cache flushed before the shard is reported. The
  shards' workflows run at once and their calls go to the engine's own thread, one at a time
  (as for a real teacher: the engine stays a serial resource, so the engine alone is still
  the peer);
  one shard's work between its calls, and its commit, overlap another shard's requests. The
  scripted engine's latency is a sleep per request, which lets other threads run meanwhile,
  as a GPU or a remote teacher would;
- `2 in hand`: the same worker driven with two calls at once (two shards in hand);
- `one at a time`: the same worker called for one shard after the other, so each shard's
  workflow and commit hold up the next shard's requests.

Rounds run the six in turn (the order rotating). Per variant: the median over rounds of
wall seconds with its range; the added wall time per round (`ours / engine alone - 1`,
median and range), against the issue's target; and, since wall time on a shared machine
is noisy, the added CPU seconds of this process (background commits included) as a share of
the engine's wall time, which other processes do not distort (it leaves out time spent
waiting for the disk).

    python benchmarks/synth.py [--rounds 9] [--latency-ms 1] [--seeds 800]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenmill.trainer.generate import GenerationRequest, RequestOutput, SamplingParams
from tokenmill.trainer.generate.cache import CachedEngine, RequestCache
from tokenmill.trainer.generate.scripted_engine import ScriptedEngine, pose
from tokenmill.trainer.synth import workload
from tokenmill.trainer.synth.steps import AgreementFilter, Context, SelfRevision
from tokenmill.trainer.synth.workflow import DATASET_TYPES, Workflow

TARGET_OVERHEAD = 0.10
MISTAKE_RATE = 0.3
WORKFLOW_SPEC = [
    {"type": "agreementFilter", "agreementFilter": {"samples": 4, "minAgreement": 0.0, "maxAgreement": 1.0}},
    {"type": "selfRevision", "selfRevision": {"rounds": 2, "rubric": ["reasoning", "factual accuracy"]}},
]


class Recording(ScriptedEngine):
    """The scripted teacher, keeping every call's requests for the replay."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[list[GenerationRequest]] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        self.calls.append(list(requests))
        return super().generate(requests)


def questions(count: int) -> list[str]:
    import random

    rng = random.Random(0)
    return [pose(rng) for _ in range(count)]


def seeds(count: int) -> list[dict]:
    return [{"id": f"s{n}", "question": question, "source": "bench", "answer": None, "tests": None, "meta": {}}
            for n, question in enumerate(questions(count))]


def workflow() -> Workflow:
    return Workflow(DATASET_TYPES["math"],
                    [AgreementFilter(4, 0.0, 1.0), SelfRevision(2, ["reasoning", "factual accuracy"])],
                    WORKFLOW_SPEC)


def shards(batch: list[dict]) -> list[list[dict]]:
    size = workload.SEEDS_PER_SHARD
    return [batch[start:start + size] for start in range(0, len(batch), size)]


def timed(function: Callable[[], int]) -> tuple[float, float, int]:
    wall, cpu = time.perf_counter(), time.process_time()
    records = function()
    return time.perf_counter() - wall, time.process_time() - cpu, records


def run_workflow(engine: ScriptedEngine, batch: list[dict], sampling: SamplingParams) -> int:
    context = Context(engine, sampling)
    return sum(len(workflow().run(part, context)[0]) for part in shards(batch))


def run_cached(latency: float, batch: list[dict], sampling: SamplingParams, directory: str) -> int:
    cache = RequestCache(Path(directory, "generations").as_uri()).load()
    cached = CachedEngine(ScriptedEngine(mistake_rate=MISTAKE_RATE, latency_s=latency), cache)
    context = Context(cached, sampling, after_call=cache.commit_soon)
    records = sum(len(workflow().run(part, context)[0]) for part in shards(batch))
    cache.flush()
    return records


def shard_worker(latency: float, count: int, directory: str) -> tuple[workload.ShardWorker, list[list[dict]]]:
    """The workload's worker for a run spec over `count` seeds, its engine given the latency."""
    from tokenmill.store import DOCUMENTS, DatasetWriter, read_run_spec_at, write_run_spec

    root = Path(directory)
    seeds_uri = (root / "seeds").as_uri()
    writer = DatasetWriter(seeds_uri, DOCUMENTS)
    writer.write_shard(0, [{"id": f"s{n}", "text": question, "source": "bench", "lang": "en", "meta": "{}"}
                           for n, question in enumerate(questions(count))])
    writer.finalize(expected=[0])
    output = (root / "out").as_uri()
    body = {"seeds": [{"uri": seeds_uri}], "datasetType": "math", "workflow": WORKFLOW_SPEC,
            "generator": {"engine": "scripted", "mistakeRate": MISTAKE_RATE,
                          "sampling": {"temperature": 1.0, "maxTokens": 256, "seed": 0}}}
    doc = {"runSpecVersion": 1, "apiVersion": "tokenmill.dev/v1alpha1", "kind": "SyntheticDataJob",
           "metadata": {"name": "bench", "namespace": "default", "uid": "uid-bench", "generation": 1},
           "attempt": 1, "output": output, "spec": body}
    prepared = workload.prepare(read_run_spec_at(write_run_spec(output, doc)))
    worker = workload.ShardWorker(prepared.job)
    worker.engine.engine.latency_s = latency
    return worker, shards(prepared.seeds)


def run_worker(worker: workload.ShardWorker, parts: list[list[dict]], calls: int) -> int:
    """The shards in order through `calls` threads, as Ray Data hands them to one actor."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=calls) as pool:
        results = list(pool.map(worker.run_shard, range(len(parts)), parts))
    return sum(n for result in results for step, verdict, _, n in result["stats"]["records"]
               if step == "output" and verdict == "kept")


def replay(calls: list[list[GenerationRequest]], latency: float) -> int:
    engine = ScriptedEngine(mistake_rate=MISTAKE_RATE, latency_s=latency)
    for call in calls:
        engine.generate(call)
    return 0


def describe(values: list[float], unit: str = "s") -> str:
    return f"{statistics.median(values):7.3f} {unit} ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--latency-ms", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=800)
    args = parser.parse_args(argv)
    latency = args.latency_ms / 1000
    batch = seeds(args.seeds)
    sampling = SamplingParams(temperature=1.0, seed=0, max_tokens=256)
    names = ["engine alone", "workflow", "workflow+cache", "shard worker", "2 in hand", "one at a time"]
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    records: dict[str, int] = {}
    load_before = os.getloadavg()[0]
    recording = Recording(mistake_rate=MISTAKE_RATE, latency_s=latency)
    run_workflow(recording, batch, sampling)  # the calls to replay, and a warm-up of every import
    with tempfile.TemporaryDirectory() as directory:
        run_cached(latency, batch[:8], sampling, directory)
    for number in range(args.rounds):
        with tempfile.TemporaryDirectory() as directory:
            worker, parts = shard_worker(latency, args.seeds, str(Path(directory, "actor")))
            pair, _ = shard_worker(latency, args.seeds, str(Path(directory, "pair")))
            serial, _ = shard_worker(latency, args.seeds, str(Path(directory, "serial")))
            variants: dict[str, Callable[[], int]] = {
                "engine alone": lambda: replay(recording.calls, latency),
                "workflow": lambda: run_workflow(ScriptedEngine(mistake_rate=MISTAKE_RATE, latency_s=latency),
                                                 batch, sampling),
                "workflow+cache": lambda: run_cached(latency, batch, sampling, directory),
                "shard worker": lambda: run_worker(worker, parts, workload.CALLS_PER_ACTOR),
                "2 in hand": lambda: run_worker(pair, parts, 2),
                "one at a time": lambda: run_worker(serial, parts, 1),
            }
            for name in names[number % len(names):] + names[:number % len(names)]:
                wall, cpu, made = timed(variants[name])
                figures[name].append((wall, cpu))
                records.setdefault(name, made)
            for each in (worker, pair, serial):
                each.close()

    requests = sum(len(call) for call in recording.calls)
    print(f"{args.seeds} seeds in shards of {workload.SEEDS_PER_SHARD}, {len(recording.calls)} engine calls, "
          f"{requests} requests at {args.latency_ms:g} ms each, {records['workflow']} records; "
          f"{args.rounds} rounds: median (min-max); load average before {load_before:.1f}, after "
          f"{os.getloadavg()[0]:.1f}")
    base = [wall for wall, _ in figures["engine alone"]]
    base_cpu = [cpu for _, cpu in figures["engine alone"]]
    for name in names:
        walls, cpus = [w for w, _ in figures[name]], [c for _, c in figures[name]]
        line = f"  {name:14s} wall {describe(walls)}   cpu {statistics.median(cpus):6.3f} s"
        if name != "engine alone":
            added = [wall / reference - 1 for wall, reference in zip(walls, base)]
            added_cpu = [(cpu - reference) / wall for cpu, reference, wall in zip(cpus, base_cpu, base)]
            verdict = "met" if statistics.median(added) < TARGET_OVERHEAD else "NOT met"
            line += (f"   {records[name] / statistics.median(walls):6.1f} records/s\n"
                     f"  {'':14s} ratio to the engine alone {statistics.median(walls) / statistics.median(base):.3f}; "
                     f"added wall per round {statistics.median(added):+.1%} ({min(added):+.1%} to {max(added):+.1%}; "
                     f"target < {TARGET_OVERHEAD:.0%}: {verdict}); added CPU / engine wall "
                     f"{statistics.median(added_cpu):+.1%} ({min(added_cpu):+.1%} to {max(added_cpu):+.1%})")
        print(line)


if __name__ == "__main__":
    main()
