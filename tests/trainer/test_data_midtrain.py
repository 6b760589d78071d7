"""Midtraining's mixture: the exact 30/70 split, long-document buckets and their boosts."""

from __future__ import annotations

from fractions import Fraction
import numpy as np
import pytest

from tokenmill.api.training import TrainingStageSpec
from tokenmill.trainer.data.midtrain import (
    ALL_LENGTHS,
    DEFAULT_LONG_DOCUMENT_BOOSTS,
    MIDTRAIN_SEQ_LEN,
    Component,
    LengthBucket,
    dataset_buckets,
    length_buckets,
    midtrain_plan,
    new_data_share,
    plan_for_stage,
    scale_to_split,
    stage_sources,
)
from tokenmill.trainer.data.plan import MixtureError
from tokenmill.trainer.data.sampler import MixtureSampler

BUCKETS = length_buckets(DEFAULT_LONG_DOCUMENT_BOOSTS)


def test_default_boosts_make_three_buckets_with_the_largest_matching_factor() -> None:
    assert BUCKETS == (
        LengthBucket(0, 8192, Fraction(1)),
        LengthBucket(8192, 16384, Fraction(2)),
        LengthBucket(16384, None, Fraction(4)),
    )
    assert [b.label for b in BUCKETS] == ["len-0-8191", "len-8192-16383", "len-16384-up"]
    assert BUCKETS[1].contains(8192) and not BUCKETS[1].contains(16384) and BUCKETS[2].contains(10**6)
    # Overlapping boosts: the largest factor of those matching applies.
    assert [b.factor for b in length_buckets([(100, 5.0), (200, 2.0)])] == [1, 5, 5]
    assert length_buckets([(100, 3.0)], min_tokens=150) == (LengthBucket(150, None, Fraction(3)),)


def components() -> list[Component]:
    organic = {"len-0-8191": 0, "len-8192-16383": 600, "len-16384-up": 200}
    synthetic = {"len-0-8191": 300, "len-8192-16383": 100, "len-16384-up": 0}
    return [
        Component("organic-long", 2, 3, "new", organic, BUCKETS),
        Component("synthetic-long", 1, 3, "new", synthetic, BUCKETS),
        Component("web", 0.15, 10, "replay", 5000),
        Component("web-rewrites", 0.15, 10, "replay", 1000),
        Component("synthetic", 0.40, 10, "replay", 1000),
        Component("code", 0.20, 10, "replay", 3000),
        Component("acquisitions", 0.10, 10, "replay", 2000),
    ]


def test_split_is_exactly_thirty_seventy_and_replay_keeps_pretraining_proportions() -> None:
    scaled = scale_to_split(components())
    sources = stage_sources(scaled)
    assert new_data_share(sources, scaled) == Fraction(3, 10)
    weights = {s.name: s.weight for s in sources}
    assert weights["web"] == Fraction(7, 10) * Fraction(15, 100)
    assert weights["synthetic"] == Fraction(7, 10) * Fraction(40, 100)
    # Empty buckets are no sources; the others share their dataset's weight by sequences x factor.
    assert "organic-long/len-0-8191" not in weights and "synthetic-long/len-16384-up" not in weights
    organic = Fraction(3, 10) * Fraction(2, 3)
    assert weights["organic-long/len-8192-16383"] == organic * (600 * 2) / (600 * 2 + 200 * 4)
    assert weights["organic-long/len-16384-up"] == organic * (200 * 4) / (600 * 2 + 200 * 4)


def test_the_sampler_draws_thirty_percent_new_and_boosts_long_documents_per_sequence() -> None:
    plan = midtrain_plan(components(), total_tokens=2000 * MIDTRAIN_SEQ_LEN, global_batch_size=40)
    assert plan.seq_len == 16384 and plan.total_sequences == 2000
    sources, _ = MixtureSampler(plan, seed=1).draws(0, plan.total_sequences)
    counts = np.bincount(sources, minlength=len(plan.sources))
    new = [i for i, s in enumerate(plan.sources) if "/" in s.name]
    assert counts[new].sum() == 600  # 30% of 2,000, exactly
    draws = {s.name: s.draws for s in plan.sources}
    per_sequence = {s.name: s.draws / s.num_sequences for s in plan.sources}
    # A sequence of 16K+ documents is drawn twice as often as one of 8K-16K documents.
    assert per_sequence["organic-long/len-16384-up"] == pytest.approx(
        2 * per_sequence["organic-long/len-8192-16383"], rel=0.01
    )
    assert per_sequence["synthetic-long/len-8192-16383"] == pytest.approx(
        2 * per_sequence["synthetic-long/len-0-8191"], rel=0.02
    )
    assert sum(draws.values()) == 2000


def test_a_bucket_that_cannot_supply_its_boosted_share_is_named() -> None:
    small = [
        Component("organic-long", 1, 1, "new", {"len-0-8191": 0, "len-8192-16383": 50, "len-16384-up": 10}, BUCKETS),
        Component("web", 1, 100, "replay", 10_000),
    ]
    with pytest.raises(MixtureError, match=r"source 'organic-long/len-16384-up' needs .* at most 1 epochs"):
        midtrain_plan(small, total_tokens=1000 * MIDTRAIN_SEQ_LEN, global_batch_size=10)


def test_a_midtraining_mixture_needs_both_roles() -> None:
    with pytest.raises(MixtureError, match="needs replay data"):
        scale_to_split([Component("a", 1, 1, "new", 10)])


def stage(stage: str, datasets: list[dict], **overrides) -> TrainingStageSpec:
    """A TrainingStage spec as the API parses it (defaults and validators applied)."""
    spec = {
        "stage": stage,
        "model": {"parent": {"uri": "file:///pretrain/checkpoints/step-00000010"}},
        "datasets": datasets,
        "longDocumentBoost": [{"minTokens": 16384, "factor": 3.0}] if stage == "midtrain" else [],
        "sequenceLength": 1024,
        "ropeBase": 250000,
        "optimization": {"globalBatchSequences": 10, "peakLearningRate": 1e-4, "totalTokens": 100 * 1024},
        **overrides,
    }
    return TrainingStageSpec.model_validate(spec)


def test_midtraining_filters_new_data_by_length_with_the_reports_defaults() -> None:
    spec = stage("midtrain", [
        {"ref": {"kind": "CorpusFilter", "name": "long-context"}, "weight": 0.2, "role": "new"},
        {"ref": {"kind": "SyntheticDataJob", "name": "long-synthetic"}, "weight": 0.1, "role": "new"},
        {"uri": "file:///books", "weight": 0.1, "role": "new"},
        {"uri": "file:///short-ok", "weight": 0.1, "role": "new", "minDocumentTokens": 0},
        {"ref": {"kind": "CorpusFilter", "name": "web"}, "weight": 0.7, "role": "replay"},
    ])
    assert [d.min_document_tokens for d in spec.datasets] == [8192, 4096, 8192, 0, None]
    # The default survives the trip to the run spec, where refs are replaced by URIs.
    assert [d.get("minDocumentTokens") for d in spec.to_wire()["datasets"]] == [8192, 4096, 8192, 0, None]
    buckets = [dataset_buckets(spec, d) for d in spec.datasets]
    assert buckets[0] == (LengthBucket(8192, 16384, Fraction(1)), LengthBucket(16384, None, Fraction(3)))
    assert buckets[1] == (LengthBucket(4096, 16384, Fraction(1)), LengthBucket(16384, None, Fraction(3)))
    assert [b.label for b in buckets[3]] == ["len-0-16383", "len-16384-up"]
    assert buckets[4] == (ALL_LENGTHS,)  # replay keeps the pretraining data as it was
    pretrain = stage("pretrain", [{"uri": "file:///web", "weight": 1.0}], model={"config": "tiny"})
    assert dataset_buckets(pretrain, pretrain.datasets[0]) == (ALL_LENGTHS,)
    filtered = stage("pretrain", [{"uri": "file:///web", "weight": 1.0, "minDocumentTokens": 300}],
                     model={"config": "tiny"})
    assert dataset_buckets(filtered, filtered.datasets[0]) == (LengthBucket(300, None),)


def test_the_production_planner_enforces_thirty_seventy_whatever_the_weights() -> None:
    spec = stage("midtrain", [
        {"uri": "file:///long", "name": "long", "weight": 1.0, "epochs": 4, "role": "new"},
        {"uri": "file:///web", "name": "web", "weight": 1.0, "epochs": 2, "role": "replay"},
        {"uri": "file:///code", "name": "code", "weight": 3.0, "epochs": 2, "role": "replay"},
    ])
    sizes = {"long": {"len-8192-16383": 20, "len-16384-up": 10}, "web": 500, "code": 500}
    plan = plan_for_stage(spec, sizes, ["long", "web", "code"])
    draws = {s.name: s.draws for s in plan.sources}
    # 30 new sequences of 100, split by sequences x factor (20 x 1 : 10 x 3); replay 70 as 1 : 3.
    assert draws == {"long/len-8192-16383": 12, "long/len-16384-up": 18, "web": 18, "code": 52}
    sources, _ = MixtureSampler(plan, seed=3).draws(0, plan.total_sequences)
    assert np.isin(sources, [0, 1]).sum() == 30
    with pytest.raises(MixtureError, match="needs replay data"):
        plan_for_stage(stage("midtrain", [{"uri": "file:///long", "weight": 1.0, "role": "new"}]),
                       {"long": {"len-8192-16383": 5, "len-16384-up": 5}}, ["long"])
    # Other stages keep their weights as given.
    pretrain = stage("pretrain", [{"uri": "file:///a", "weight": 1.0, "epochs": 9},
                                  {"uri": "file:///b", "weight": 1.0, "epochs": 9}], model={"config": "tiny"})
    plan = plan_for_stage(pretrain, {"a": 500, "b": 500}, ["a", "b"])
    assert [s.draws for s in plan.sources] == [50, 50]


def test_token_shares_hold_when_one_source_is_many_small_padded_shards() -> None:
    """At 16K a shard of a few thousand tokens is one mostly padded row; shares are of tokens."""
    seq_len = 16_384
    spec = stage("pretrain", [{"uri": "file:///small", "weight": 0.5}, {"uri": "file:///big", "weight": 0.5}],
                 model={"config": "tiny"}, sequenceLength=seq_len, ropeBase=None,
                 optimization={"globalBatchSequences": 10, "peakLearningRate": 1e-4, "totalTokens": 400 * seq_len})
    small_tokens, big_tokens = 400 * 3_000, 600 * seq_len  # 400 shards of 3,000 tokens; full rows
    plan = plan_for_stage(spec, {"small": 400, "big": 600}, ["small", "big"],
                          {"small": small_tokens, "big": big_tokens})
    trained = {s.name: s.trained_tokens for s in plan.sources}
    assert trained["small"] / sum(trained.values()) == pytest.approx(0.5, abs=0.01)
    padded = plan_for_stage(spec, {"small": 400, "big": 600}, ["small", "big"])  # sequences, not tokens
    share = padded.source("small").draws * 3_000 / (padded.source("small").draws * 3_000
                                                    + padded.source("big").draws * seq_len)
    assert share < 0.2
