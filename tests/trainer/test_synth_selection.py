"""Seed selection keeps the top fraction of the whole job's passages: not of each shard's, the
same on every run, and a resumed scoring pass pays for no request twice."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.trainer.synth_fixtures import spec, write_seeds, write_spec
from tokenmill.layout import dataset_uri
from tokenmill.store import DatasetWriter, open_dataset, open_store, read_run_spec_at
from tokenmill.store.dataset_reader import read_verified_shard
from tokenmill.store.schemas import GENERATIONS
from tokenmill.trainer.generate import SamplingParams
from tokenmill.trainer.generate.cache import generations_uri
from tokenmill.trainer.generate.scripted_engine import ScriptedEngine
from tokenmill.trainer.synth import workload
from tokenmill.trainer.synth.steps import KEEP_NONE, Context, Cutoff, SeedSelection, rank_cutoff
from tokenmill.trainer.synth.workflow import item_of

# The scripted teacher scores a passage by the quantities it gives and the operations it needs
# (educational value + reasoning): 10, 7 | 2, 3 | 5, 5. In shards of two, ranking each shard
# keeps q0, q3 and q4; the job's top half is q0, q1 and the first of the two tied at 5, q4.
SEEDS = ["Compute 2 * 3 + 4 * 5 - 6.", "Compute 12 * 7 + 5.",
         "The sky was blue all day.", "She had 3 cats.",
         "What is 17 + 25?", "Tom has 5 apples and buys 7 more."]
SCORES = [10.0, 7.0, 2.0, 3.0, 5.0, 5.0]
JOB_WIDE = ["q0-p0", "q1-p0", "q4-p0"]
PER_SHARD = ["q0-p0", "q3-p0", "q4-p0"]
WORKFLOW = [{"type": "seedSelection", "seedSelection": {"keepFraction": 0.5, "passageWords": 12}}]


def seed_dicts(questions: list[str]) -> list[dict]:
    return [{"id": f"q{i}", "question": q, "source": "test", "answer": None, "tests": None, "meta": {}}
            for i, q in enumerate(questions)]


def context() -> Context:
    return Context(ScriptedEngine(mistake_rate=0.0), SamplingParams(seed=0, max_tokens=64))


def test_the_cutoff_keeps_the_wanted_count_and_breaks_ties_in_job_order() -> None:
    parts = [[((0, 0), 10.0), ((1, 0), 5.0)], [((2, 0), 5.0), ((2, 1), 5.0)], [((3, 0), 1.0)]]

    def cutoff(fraction: float) -> Cutoff:
        return rank_cutoff([Counter(s for _, s in part) for part in parts], fraction,
                           lambda number, score: [k for k, s in parts[number] if s == score])

    def kept(fraction: float) -> list:
        chosen = cutoff(fraction)
        return [key for part in parts for key, score in part if chosen.keeps(score, key)]

    assert kept(0.2) == [(0, 0)]  # ceil(0.2 x 5) = 1
    assert cutoff(0.6) == Cutoff(5.0, (2, 0)) and kept(0.6) == [(0, 0), (1, 0), (2, 0)]
    assert kept(0.8) == [(0, 0), (1, 0), (2, 0), (2, 1)]
    assert kept(1.0) == [key for part in parts for key, _ in part]
    assert rank_cutoff([Counter(), Counter()], 0.5, lambda *_: []) == KEEP_NONE


def test_scoring_the_shards_apart_and_cutting_job_wide_differs_from_ranking_each_shard() -> None:
    step = SeedSelection(keep_fraction=0.5, passage_words=12)
    seeds = seed_dicts(SEEDS)
    for position, seed in enumerate(seeds):
        seed["position"] = position
    shards = [seeds[start:start + 2] for start in range(0, len(seeds), 2)]

    ranked_apart = [o.item.id for shard in shards for o in step.run([item_of(s) for s in shard], context()) if o.kept]
    assert ranked_apart == PER_SHARD

    scored = [step.score([item_of(s) for s in shard], context())[0] for shard in shards]
    assert [p.score for shard in scored for p in shard] == SCORES
    step.cutoff = rank_cutoff([Counter(p.score for p in shard) for shard in scored], step.keep_fraction,
                              lambda number, score: [p.key for p in scored[number] if p.score == score])
    outcomes = [o for shard in shards for o in step.run([item_of(s) for s in shard], context())]
    assert [o.item.id for o in outcomes if o.kept] == JOB_WIDE
    assert Counter(o.reason for o in outcomes if not o.kept) == {"low-score": 3}
    assert outcomes[0].item.trail[-1] == {"step": "seedSelection", "educationalValue": 5.0, "reasoning": 5.0,
                                          "complexity": "high"}


def test_a_passage_whose_score_cannot_be_read_is_dropped_and_counted() -> None:
    class Mumbling(ScriptedEngine):
        def respond(self, prompt, rng):
            return "a fine passage" if "cats" in prompt else super().respond(prompt, rng)

    shared = Context(Mumbling(mistake_rate=0.0), SamplingParams(seed=0, max_tokens=64))
    outcomes = SeedSelection(keep_fraction=1.0, passage_words=12).run([item_of(s) for s in seed_dicts(SEEDS)], shared)
    assert Counter(o.reason for o in outcomes) == {"top-fraction": 5, "unparseable-score": 1}
    assert [o.item.id for o in outcomes if o.reason == "unparseable-score"] == ["q3-p0"]


# -- the workload on Ray --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(workload, "SEEDS_PER_SHARD", 2)
    monkeypatch.setenv(workload.WORKERS_ENV, "1")


def cache_keys(output: str) -> list[str]:
    """The key of every committed request-cache row (a request paid for twice would appear twice)."""
    writer = DatasetWriter(generations_uri(output), GENERATIONS)
    return [key for info in writer.resume().values()
            for key in read_verified_shard(writer.store, info).column("key").to_pylist()]


@pytest.mark.slow
def test_the_job_keeps_the_top_fraction_of_all_its_passages(ray_local, small_shards, tmp_path) -> None:
    seeds = write_seeds((tmp_path / "seeds").as_uri(), SEEDS)
    output = (tmp_path / "out").as_uri()
    body = spec(seeds, workflow=WORKFLOW, dataset_type="documents")

    def generation(name: str, **labels: str) -> float:
        from prometheus_client import REGISTRY

        return REGISTRY.get_sample_value(name, {"engine": "scripted", **labels}) or 0.0

    paid_before, hits_before = generation("tokenmill_generate_requests_total", outcome="ok"), generation(
        "tokenmill_generate_cache_hits_total")
    assert workload.run(write_spec(output, body)) == 0
    rows = open_dataset(dataset_uri(output)).read_all().to_pylist()
    assert sorted(row["id"] for row in rows) == JOB_WIDE
    stats = open_store(output).read_json(workload.STATS_KEY)
    [selection] = [step for step in stats["steps"] if step["step"] == "seedSelection"]
    assert (selection["in"], selection["kept"], selection["droppedByReason"]) == (6, 3, {"low-score": 3})
    # the scoring pass paid for each passage's score once; the workflow's pass got them from the cache
    assert stats["requestsSent"] == len(cache_keys(output)) == len(SEEDS)
    # the scoring pass's actors report what they paid for, the workflow's what the cache answered
    assert generation("tokenmill_generate_requests_total", outcome="ok") - paid_before == len(SEEDS)
    assert generation("tokenmill_generate_cache_hits_total") - hits_before == len(SEEDS)
    for row in rows:
        steps = json.loads(row["meta"])["provenance"]["steps"]
        assert steps[-1] == {"step": "seedSelection", "verdict": "kept", "reason": "top-fraction"}


@pytest.mark.slow
def test_a_resumed_scoring_pass_pays_for_nothing_twice_and_cuts_the_same(ray_local, small_shards, tmp_path) -> None:
    from tokenmill.trainer.synth.selection import scores_key, select_job_wide

    seeds = write_seeds((tmp_path / "seeds").as_uri(), SEEDS)
    output = (tmp_path / "out").as_uri()
    doc = read_run_spec_at(write_spec(output, spec(seeds, workflow=WORKFLOW, dataset_type="documents")))

    def scoring_pass() -> tuple[int, Cutoff | None]:
        prepared = workload.prepare(doc)
        units = [prepared.seeds[start:start + 2] for start in range(0, len(prepared.seeds), 2)]
        sent = select_job_wide(prepared.job, units)
        return sent, prepared.job.workflow.steps[0].cutoff

    first_sent, first_cutoff = scoring_pass()
    assert first_sent == len(SEEDS) and first_cutoff == Cutoff(5.0, (4, 0))
    # an attempt killed after scoring shard 0: shards 1 and 2 are scored again, from the cache
    store = open_store(output)
    store.delete(scores_key(1))
    store.delete(scores_key(2))
    sent, cutoff = scoring_pass()
    assert (sent, cutoff) == (2, first_cutoff)  # shard 0's two samples, recorded once
    keys = cache_keys(output)
    assert len(keys) == len(set(keys)) == len(SEEDS)
