"""Midtraining's mixture: the exact 30/70 split, long-document buckets and their boosts."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest

from tokenmill.trainer.data.midtrain import (
    ALL_LENGTHS,
    DEFAULT_LONG_DOCUMENT_BOOSTS,
    MIDTRAIN_SEQ_LEN,
    Component,
    LengthBucket,
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


def test_plan_for_a_stage_spec_uses_its_weights_boosts_and_budget() -> None:
    dataset = SimpleNamespace
    spec = SimpleNamespace(
        stage="midtrain",
        datasets=[dataset(weight=0.3, epochs=4.0, role="new"), dataset(weight=0.7, epochs=2.0, role="replay")],
        long_document_boost=[SimpleNamespace(min_tokens=16384, factor=3.0)],
        sequence_length=1024,
        optimization=SimpleNamespace(global_batch_sequences=10, total_tokens=100 * 1024),
    )
    sizes = {"long": {"len-0-16383": 20, "len-16384-up": 10}, "replay": 500}
    plan = plan_for_stage(spec, sizes, ["long", "replay"])
    draws = {s.name: s.draws for s in plan.sources}
    assert draws == {"long/len-0-16383": 12, "long/len-16384-up": 18, "replay": 70}
    pretrain = SimpleNamespace(**{**vars(spec), "stage": "pretrain", "long_document_boost": []})
    plan = plan_for_stage(pretrain, {"long": 30, "replay": 500}, ["long", "replay"])
    assert plan.names == ("long", "replay") and ALL_LENGTHS.label == "len-0-up"
