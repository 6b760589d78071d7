"""The SyntheticDataJob's workflow machinery against the engine alone.

The workflow (agreement filter with 4 samples, then self-revision of up to 2 rounds) runs over
200 arithmetic seeds on the scripted stand-in teacher with a fixed latency per request (1 ms by
default). Every engine call the workflow makes is recorded; the peer replays exactly those
calls on the same engine with nothing around them. The difference is what the machinery adds:
prompt rendering, sampling, answer extraction, voting, critique parsing, counting, provenance,
output rows and, in the `+cache` variant, the request cache (keys, a committed shard after
every engine call, as the workload does) on a local store.

Rounds alternate the three variants; the figures are medians of wall seconds over rounds, with
the per-round overhead's median and range, and CPU seconds (this process), which other
processes on a shared machine do not distort.

    python benchmarks/synth.py [--rounds 5] [--latency-ms 1] [--seeds 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tokenmill.trainer.generate import GenerationRequest, RequestOutput, SamplingParams
from tokenmill.trainer.generate.cache import CachedEngine, RequestCache
from tokenmill.trainer.generate.scripted_engine import ScriptedEngine, pose
from tokenmill.trainer.synth.steps import AgreementFilter, Context, SelfRevision
from tokenmill.trainer.synth.workflow import DATASET_TYPES, Workflow

TARGET_OVERHEAD = 0.10


class Recording(ScriptedEngine):
    """The scripted teacher, keeping every call's requests for the replay."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[list[GenerationRequest]] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        self.calls.append(list(requests))
        return super().generate(requests)


def seeds(count: int) -> list[dict]:
    import random

    rng = random.Random(0)
    return [{"id": f"s{n}", "question": pose(rng), "source": "bench", "answer": None, "tests": None, "meta": {}}
            for n in range(count)]


def workflow() -> Workflow:
    return Workflow(DATASET_TYPES["math"],
                    [AgreementFilter(4, 0.0, 1.0), SelfRevision(2, ["reasoning", "factual accuracy"])],
                    [{"type": "agreementFilter"}, {"type": "selfRevision"}])


def timed(function) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args(argv)
    latency = args.latency_ms / 1000
    batch = seeds(args.seeds)
    sampling = SamplingParams(seed=0, max_tokens=256)
    figures: dict[str, list[tuple[float, float]]] = {"engine alone": [], "workflow": [], "workflow+cache": []}
    records = 0
    for _ in range(args.rounds):
        recording = Recording(mistake_rate=0.3, latency_s=latency)
        wall, cpu, (rows, _) = timed(lambda: workflow().run(batch, Context(recording, sampling)))
        figures["workflow"].append((wall, cpu))
        records = len(rows)

        engine = ScriptedEngine(mistake_rate=0.3, latency_s=latency)
        wall, cpu, _ = timed(lambda: [engine.generate(call) for call in recording.calls])
        figures["engine alone"].append((wall, cpu))

        with tempfile.TemporaryDirectory() as directory:
            cache = RequestCache(Path(directory, "generations").as_uri()).load()
            cached = CachedEngine(ScriptedEngine(mistake_rate=0.3, latency_s=latency), cache)
            context = Context(cached, sampling, after_call=cache.flush)
            wall, cpu, _ = timed(lambda: workflow().run(batch, context))
            figures["workflow+cache"].append((wall, cpu))

    calls = sum(len(call) for call in recording.calls)
    print(f"{args.seeds} seeds, {len(recording.calls)} engine calls, {calls} requests at "
          f"{args.latency_ms:g} ms each, {records} records; medians of {args.rounds} rounds")
    base_wall = [w for w, _ in figures["engine alone"]]
    for name, values in figures.items():
        walls, cpus = [w for w, _ in values], [c for _, c in values]
        line = (f"  {name:15s} wall {statistics.median(walls):7.3f} s   cpu {statistics.median(cpus):7.3f} s   "
                f"{records / statistics.median(walls):8.1f} records/s")
        if name != "engine alone":
            overheads = [w / b - 1 for w, b in zip(walls, base_wall)]
            line += (f"   added {statistics.median(overheads):+.1%} (range {min(overheads):+.1%} to "
                     f"{max(overheads):+.1%}; target < {TARGET_OVERHEAD:.0%})")
        print(line)


if __name__ == "__main__":
    main()
