"""Job-wide seed selection: the top fraction of all the job's passages, not of each shard's.

When the workflow starts with `seedSelection`, the workload runs a scoring pass before the
workflow: every shard of seeds is split into passages and scored by the teacher (through the
request cache), and the scores alone (`<output>/_run/synth-scores/<shard>.json`: each
passage's key and score) are committed per shard. The driver then computes the cutoff
(`steps.rank_cutoff`) from the per-shard score counts, reading one shard's keys for the tie,
and gives it to the step; the workflow's pass asks the same scoring requests again, answered
from the request cache, and keeps what the cutoff keeps.

A resumed job reads back the shards already scored and scores the rest; requests answered
before the interruption come from the cache. The samples each scoring shard paid for are
recorded with its scores and count towards the job's `requestsSent`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from tokenmill.store import open_store, shard_name
from tokenmill.trainer.synth.steps import PassageKey, SeedSelection, rank_cutoff
from tokenmill.trainer.synth.workflow import item_of
from tokenmill.trainer.synth.workload import Job, ShardWorker, _check_fence, _workers, add_generation_counts

SCORES_PREFIX = "_run/synth-scores"


def scores_key(number: int) -> str:
    return f"{SCORES_PREFIX}/{shard_name(number)}.json"


def selection_step(job: Job) -> SeedSelection | None:
    first = job.workflow.steps[0] if job.workflow.steps else None
    return first if isinstance(first, SeedSelection) else None


class ScoringWorker(ShardWorker):
    """A Ray Data actor of the scoring pass: the engine behind the request cache, as in the
    workflow's pass; per shard, the passages' keys and scores."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        step = selection_step(self.job)
        assert step is not None
        results = []
        for payload in batch["shard"]:
            unit = json.loads(payload)
            engine = self.shard_engine()
            scored, _ = step.score([item_of(seed) for seed in unit["seeds"]], self.context(engine))
            record = {"shard": unit["shard"], "scores": [[*passage.key, passage.score] for passage in scored],
                      "sent": engine.sent}
            key = scores_key(unit["shard"])
            if self.engine.cache is not None:
                self.engine.cache.flush()  # every score paid for is cached before the shard counts as scored
            _check_fence(self.job, f"write {key} under {self.job.output}")
            self.store.write_json(key, record)
            results.append(json.dumps({"shard": unit["shard"], "sent": record["sent"],
                                       "generation": self.tally.take()}))
        return {"result": results}


def number_seeds(units: list[list[dict[str, Any]]]) -> None:
    """Gives every seed its `position` in the job (the passages' order, which breaks ties)."""
    position = 0
    for unit in units:
        for seed in unit:
            seed["position"] = position
            position += 1


def select_job_wide(job: Job, units: list[list[dict[str, Any]]], *, score: bool = True) -> int:
    """Scores the shards not scored yet (when `score`) and sets the seed-selection step's
    job-wide cutoff; returns the samples the scoring of all shards paid for, in this attempt
    and earlier ones. Without `score` (a job already stopped or complete) it only counts."""
    step = selection_step(job)
    if step is None:
        return 0
    number_seeds(units)
    store = open_store(job.output)
    missing = [number for number in range(len(units)) if not store.exists(scores_key(number))]
    if missing and score:
        import ray.data

        print(f"tokenmill synthetic-data: seed selection: scoring the passages of {len(missing)} of "
              f"{len(units)} shards", flush=True)
        items = [{"shard": json.dumps({"shard": number, "seeds": units[number]})} for number in missing]
        scored = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ScoringWorker, fn_constructor_kwargs={"job": job}, batch_size=1, batch_format="numpy", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=_workers(len(missing))))
        for row in scored.iter_rows():
            add_generation_counts(json.loads(row["result"]))
    sent = 0
    histograms: list[Counter] = []
    for number in range(len(units)):
        if not store.exists(scores_key(number)):
            histograms.append(Counter())
            continue
        record = store.read_json(scores_key(number))
        sent += int(record["sent"])
        histograms.append(Counter(float(entry[2]) for entry in record["scores"]))
    if score:
        def tied(number: int, value: float) -> list[PassageKey]:
            return [(int(p), int(n)) for p, n, s in store.read_json(scores_key(number))["scores"] if float(s) == value]

        step.cutoff = rank_cutoff(histograms, step.keep_fraction, tied)
        print(f"tokenmill synthetic-data: seed selection: keeping passages scoring above {step.cutoff.score:g} "
              f"(and ties up to {step.cutoff.last_tied}) of {sum(sum(h.values()) for h in histograms):,} scored",
              flush=True)
    return sent
