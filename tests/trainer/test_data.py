"""The data pipeline's pure parts: packing, mixture plans, the sampler and the micro-batch iterator."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from tokenmill.trainer.data.loader import ArraySource, MicroBatchIterator
from tokenmill.trainer.data.packing import (
    IGNORE_INDEX,
    StreamPacker,
    document_ids,
    pack_documents,
    real_token_count,
    split_rows,
)
from tokenmill.trainer.data.permutation import IndexPermutation
from tokenmill.trainer.data.plan import MixtureError, MixturePlan, SourceSpec, apportion, plan_mixture
from tokenmill.trainer.data.sampler import MixtureSampler, SamplerState, micro_batches_per_step, rank_block
from tokenmill.trainer.data.schedule import InterleavedSchedule

EOT, PAD = 1000, 1001

# RECIPE.md's pretraining table: (name, share of tokens, unique tokens, epochs).
PRETRAIN_TABLE = (
    ("web", 0.15, 1_300_000_000_000, 1.2),
    ("web-rewrites", 0.15, 290_000_000_000, 5.2),
    ("synthetic", 0.40, 290_000_000_000, 13.8),
    ("code", 0.20, 820_000_000_000, 2.4),
    ("acquisitions", 0.10, 580_000_000_000, 1.7),
)


def random_docs(rng: np.random.Generator, count: int, max_len: int = 40) -> list[list[int]]:
    """Documents of distinct ordinary tokens (never EOT or PAD); lengths 0..max_len."""
    docs, next_token = [], 0
    for length in rng.integers(0, max_len + 1, size=count):
        docs.append(list(range(next_token, next_token + int(length))))
        next_token += int(length)
    return [[t % 997 for t in doc] for doc in docs]


def expected_stream(docs: list[list[int]]) -> list[int]:
    return [token for doc in docs for token in [*doc, EOT]]


def unpack(rows: np.ndarray, seq_len: int) -> list[int]:
    """The stream back from overlapping rows, padding removed."""
    if rows.shape[0] == 0:
        return []
    parts = [rows[0, :1]] + [row[1:] for row in rows]
    stream = np.concatenate(parts)
    return stream[stream != PAD].tolist()


# Packing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 4, 7, 64])
def test_packing_keeps_every_token_once_with_eot_after_each_document(seq_len: int) -> None:
    rng = np.random.default_rng(seq_len)
    docs = random_docs(rng, 50)
    rows = pack_documents(docs, seq_len, EOT, PAD)
    assert rows.shape[1] == seq_len + 1
    assert unpack(rows, seq_len) == expected_stream(docs)
    assert real_token_count(rows, PAD) == len(expected_stream(docs))
    # Rows overlap by exactly one token: the last of a row is the first of the next.
    np.testing.assert_array_equal(rows[:-1, -1], rows[1:, 0])
    # Only the last row may hold padding, and only at its end.
    assert not (rows[:-1] == PAD).any()
    last = rows[-1]
    assert (np.diff((last == PAD).astype(int)) >= 0).all()


def test_labels_are_shifted_inputs_with_padding_ignored() -> None:
    rows = pack_documents([[1, 2, 3], [4, 5]], 4, EOT, PAD)
    np.testing.assert_array_equal(rows, [[1, 2, 3, EOT, 4], [4, 5, EOT, PAD, PAD]])
    inputs, labels = split_rows(rows, PAD)
    np.testing.assert_array_equal(inputs, [[1, 2, 3, EOT], [4, 5, EOT, PAD]])
    np.testing.assert_array_equal(labels, [[2, 3, EOT, 4], [5, EOT, IGNORE_INDEX, IGNORE_INDEX]])


def test_document_ids_start_a_segment_at_each_eot_and_at_padding() -> None:
    inputs = np.array([[7, 8, EOT, 4, 5, EOT, 6, PAD, PAD]])
    np.testing.assert_array_equal(document_ids(inputs, EOT, PAD), [[0, 0, 1, 1, 1, 2, 2, 3, 3]])
    # The boundary falls exactly at each EOT of a packed row.
    rows = pack_documents(random_docs(np.random.default_rng(1), 30), 16, EOT, PAD)
    inputs, _ = split_rows(rows, PAD)
    ids = document_ids(inputs, EOT, PAD)
    changes = np.diff(ids, axis=1) != 0
    starts = (inputs[:, 1:] == EOT) | ((inputs[:, 1:] == PAD) & (inputs[:, :-1] != PAD))
    np.testing.assert_array_equal(changes, starts)


def test_tails_carry_over_and_pad_only_the_end() -> None:
    rows = pack_documents([[1, 2, 3, 4, 5, 6, 7]], 3, EOT, PAD)
    np.testing.assert_array_equal(rows, [[1, 2, 3, 4], [4, 5, 6, 7], [7, EOT, PAD, PAD]])
    dropped = pack_documents([[1, 2, 3, 4, 5, 6, 7]], 3, EOT, PAD, pad_last=False)
    np.testing.assert_array_equal(dropped, rows[:2])


def test_stream_packer_over_batches_equals_packing_at_once() -> None:
    rng = np.random.default_rng(7)
    docs = random_docs(rng, 80)
    packer = StreamPacker(13, EOT, PAD)
    parts = [packer.add(docs[i : i + 9]) for i in range(0, len(docs), 9)]
    parts.append(packer.finish())
    np.testing.assert_array_equal(np.concatenate(parts), pack_documents(docs, 13, EOT, PAD))


def test_empty_input_packs_to_nothing() -> None:
    assert pack_documents([], 8, EOT, PAD).shape == (0, 9)


# Plans --------------------------------------------------------------------------------------


def table_sources(scale: float, seq_len: int) -> list[SourceSpec]:
    return [SourceSpec(name, w, round(u * scale) // seq_len, e) for name, w, u, e in PRETRAIN_TABLE]


def test_pretraining_table_at_full_scale_follows_the_binding_source() -> None:
    plan = plan_mixture(table_sources(1.0, 4096), seq_len=4096, global_batch_size=5760)
    assert plan.total_sequences % 5760 == 0
    # Shares are exact to one sequence; no source exceeds its epochs; code binds at 2.4.
    for source, (_, weight, _, epochs) in zip(plan.sources, PRETRAIN_TABLE):
        assert abs(source.draws - Fraction(repr(weight)) * plan.total_sequences) <= 1
        assert source.epochs <= epochs
    assert plan.source("code").epochs == pytest.approx(2.4, abs=1e-5)
    assert plan.total_tokens == pytest.approx(9.84e12, rel=1e-3)  # the report: about 9.8T
    assert plan.num_steps == pytest.approx(417_000, rel=1e-3)


def consistent_table(total: int) -> list[SourceSpec]:
    """The table's shares and epochs with unique sizes that make both exact: n = share x total / epochs."""
    sources = []
    for name, weight, _, epochs in PRETRAIN_TABLE:
        size = Fraction(repr(weight)) * total / Fraction(repr(epochs))
        assert size.denominator == 1 and (Fraction(repr(weight)) * total).denominator == 1
        sources.append(SourceSpec(name, weight, int(size), epochs))
    return sources


def test_pretraining_table_shares_and_repeat_counts_are_exact_over_a_full_run() -> None:
    total = 609_960  # the smallest total at which every share x total and share x total / epochs is whole
    plan = plan_mixture(consistent_table(total), seq_len=8, global_batch_size=24)
    assert plan.total_sequences == total
    sampler = MixtureSampler(plan, seed=3)
    sources, sequences = sampler.draws(0, total)
    counts = np.bincount(sources, minlength=len(PRETRAIN_TABLE))
    for i, (name, weight, _, epochs) in enumerate(PRETRAIN_TABLE):
        assert counts[i] == Fraction(repr(weight)) * total, name
        planned = plan.sources[i]
        assert planned.epochs == pytest.approx(epochs)
        seen = np.bincount(sequences[sources == i], minlength=planned.num_sequences)
        # Every unique sequence is repeated floor(epochs) or ceil(epochs) times, and the
        # number of those seen once more is exactly the partial epoch.
        assert set(np.unique(seen)) <= {planned.full_epochs, planned.full_epochs + 1}
        assert np.count_nonzero(seen == planned.full_epochs + 1) == planned.partial_draws


def test_every_global_batch_holds_the_mixture_to_one_sequence_per_source() -> None:
    plan = plan_mixture(consistent_table(609_960), seq_len=8, global_batch_size=120)
    sampler = MixtureSampler(plan, seed=0)
    shares = np.array([float(s.share) for s in plan.sources])
    for step in (0, 1, 500, plan.num_steps - 1):
        sources, _ = sampler.draws(step * 120, (step + 1) * 120)
        counts = np.bincount(sources, minlength=len(shares))
        assert np.abs(counts - shares * 120).max() <= 1.0


def test_budget_beyond_the_supply_names_the_source_and_the_numbers() -> None:
    with pytest.raises(MixtureError) as raised:
        plan_mixture(table_sources(1.0, 4096), seq_len=4096, global_batch_size=5760, total_tokens=10**13)
    message = str(raised.value)
    assert "10,000,000,000,000 tokens" in message
    assert "source 'code' needs 1,999,99" in message  # 20% of the budget, in whole sequences
    assert "819,999,997,952 unique tokens" in message
    assert "at most 2.4 epochs allowed" in message
    assert "1,967,999,991,808 tokens available" in message
    assert "would need 2.44 epochs" in message
    assert "source 'acquisitions'" in message and "at most 1.7 epochs" in message
    assert "'synthetic'" not in message  # it can supply its share
    assert "The most this mixture can supply is 9,839,98" in message


def test_budget_within_the_supply_is_planned_exactly() -> None:
    plan = plan_mixture(table_sources(1.0, 4096), seq_len=4096, global_batch_size=5760, total_tokens=9_800_000_000_000)
    assert plan.total_tokens <= 9_800_000_000_000 < plan.total_tokens + 5760 * 4096
    assert [s.draws for s in plan.sources] == apportion([s.share for s in plan.sources], plan.total_sequences)


@pytest.mark.parametrize(
    ("sources", "kwargs", "fragment"),
    [
        ([], {}, "no sources"),
        ([SourceSpec("a", 1, 0, 1)], {}, "'a' is empty"),
        ([SourceSpec("a", 0, 5, 1)], {}, "weight must be positive"),
        ([SourceSpec("a", 1, 5, 1), SourceSpec("a", 1, 5, 1)], {}, "repeated: a"),
        ([SourceSpec("a", 1, 5, None)], {}, "every source needs epochs"),
        ([SourceSpec("a", 1, 5, 1)], {"total_tokens": 10, "global_batch_size": 4}, "less than one global batch"),
    ],
)
def test_bad_mixtures_are_refused(sources: list[SourceSpec], kwargs: dict, fragment: str) -> None:
    with pytest.raises(MixtureError, match=fragment):
        plan_mixture(sources, seq_len=8, **kwargs)


def test_unlimited_epochs_with_a_budget_and_dict_sources() -> None:
    plan = plan_mixture(
        [{"name": "a", "weight": 3, "num_sequences": 2}, {"name": "b", "weight": 1, "num_sequences": 10, "epochs": 1}],
        seq_len=4,
        total_tokens=35,  # 8 sequences; the rest of a sequence is not trained on
    )
    assert plan.draws == (6, 2)
    assert plan.source("a").epochs == 3.0


def test_plan_round_trips_through_a_dict() -> None:
    plan = plan_mixture(consistent_table(609_960), seq_len=8, global_batch_size=24)
    again = MixturePlan.from_dict(plan.to_dict())
    assert again == plan and again.fingerprint() == plan.fingerprint()


def test_apportion_sums_to_the_total_and_stays_within_one() -> None:
    shares = [Fraction(1, 3)] * 3
    assert apportion(shares, 10) == [4, 3, 3]
    assert sum(apportion([Fraction(1, 7), Fraction(6, 7)], 1000)) == 1000


# Permutation and schedule -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_permutation_is_a_bijection_that_depends_on_the_key(n: int) -> None:
    first = IndexPermutation(n, 1)(np.arange(n))
    assert sorted(first.tolist()) == list(range(n))
    if n >= 16:
        assert not np.array_equal(first, IndexPermutation(n, 2)(np.arange(n)))
        assert not np.array_equal(first, np.arange(n))


def test_schedule_matches_a_sort_by_time_and_windows_agree() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        draws = rng.integers(0, 25, size=rng.integers(1, 6)).tolist()
        schedule = InterleavedSchedule(draws)
        order = sorted((Fraction(2 * k + 1, 2 * d), i, k) for i, d in enumerate(draws) for k in range(d))
        sources, ks = schedule.window(0, schedule.total)
        assert sources.tolist() == [i for _, i, _ in order]
        assert ks.tolist() == [k for _, _, k in order]
        start = int(rng.integers(0, schedule.total + 1))
        stop = int(rng.integers(start, schedule.total + 1))
        window = schedule.window(start, stop)
        assert window[0].tolist() == sources[start:stop].tolist()
        assert window[1].tolist() == ks[start:stop].tolist()


# Sampler -----------------------------------------------------------------------------------


def small_plan(global_batch_size: int = 12) -> MixturePlan:
    return plan_mixture(
        [SourceSpec("a", 0.5, 37, 3), SourceSpec("b", 0.3, 20, 2.5), SourceSpec("c", 0.2, 101, 1)],
        seq_len=6,
        global_batch_size=global_batch_size,
    )


def test_sampler_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    plan = small_plan()
    first = MixtureSampler(plan, seed=11).draws(0, plan.total_sequences)
    again = MixtureSampler(plan, seed=11).draws(0, plan.total_sequences)
    other = MixtureSampler(plan, seed=12).draws(0, plan.total_sequences)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], other[0])  # the interleaving is seed-free
    assert not np.array_equal(first[1], other[1])


def test_each_epoch_is_a_fresh_permutation() -> None:
    plan = small_plan()
    sources, sequences = MixtureSampler(plan, seed=5).draws(0, plan.total_sequences)
    a = sequences[sources == 0]
    assert plan.source("a").full_epochs == 2 and plan.source("a").partial_draws > 0
    epochs = [a[i * 37 : (i + 1) * 37] for i in range(3)]
    assert all(sorted(e.tolist()) == list(range(37)) for e in epochs[:2])
    assert len(set(epochs[2].tolist())) == len(epochs[2]) == plan.source("a").partial_draws
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize(("world_size", "micro"), [(1, 12), (2, 3), (3, 2), (4, 1)])
def test_ranks_are_disjoint_and_cover_every_sample(world_size: int, micro: int) -> None:
    plan = small_plan()
    seen: list[int] = []
    per_step = micro_batches_per_step(plan.global_batch_size, world_size, micro)
    for round_start in range(0, plan.total_sequences, world_size * micro):
        for rank in range(world_size):
            start, stop = rank_block(round_start, rank, world_size, micro)
            seen += range(start, stop)
    assert sorted(seen) == list(range(plan.total_sequences))
    assert len(seen) == len(set(seen))
    assert per_step * world_size * micro == plan.global_batch_size


def test_a_global_batch_that_ranks_cannot_divide_is_refused() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        micro_batches_per_step(12, 5, 1)


# Iterator ----------------------------------------------------------------------------------


def make_sources(plan: MixturePlan) -> dict[str, ArraySource]:
    """Rows whose first token encodes (source, sequence): 1000 x source + sequence."""
    sources = {}
    for i, planned in enumerate(plan.sources):
        rows = np.full((planned.num_sequences, plan.seq_len + 1), 5, dtype=np.int32)
        rows[:, 0] = 1000 * (i + 1) + np.arange(planned.num_sequences)
        rows[:, 3] = EOT
        sources[planned.name] = ArraySource(rows)
    return sources


def iterator(plan: MixturePlan, rank: int, world: int, micro: int, state: dict | None = None) -> MicroBatchIterator:
    return MicroBatchIterator(
        MixtureSampler(plan, seed=9),
        make_sources(plan),
        rank=rank,
        world_size=world,
        micro_batch_size=micro,
        eot_id=EOT,
        pad_id=PAD,
        state=state,
    )


def test_iterator_yields_tensors_in_the_global_order_split_by_rank() -> None:
    plan = small_plan()
    sampler = MixtureSampler(plan, seed=9)
    sources, sequences = sampler.draws(0, plan.total_sequences)
    expected = 1000 * (sources + 1) + sequences
    got = {rank: [b.input_ids[:, 0] for b in iterator(plan, rank, 2, 3)] for rank in range(2)}
    interleaved = [t for pair in zip(got[0], got[1]) for t in pair]
    np.testing.assert_array_equal(torch.cat(interleaved).numpy(), expected)
    batch = next(iterator(plan, 0, 2, 3))
    assert batch.input_ids.shape == batch.labels.shape == batch.doc_ids.shape == (3, plan.seq_len)
    assert batch.input_ids.dtype == batch.labels.dtype == batch.doc_ids.dtype == torch.int64
    assert batch.doc_ids[0].tolist() == [0, 0, 0, 1, 1, 1]
    assert (batch.micro_step, batch.accumulation_steps, batch.last_in_step) == (0, 2, False)


def test_resume_from_a_saved_position_mid_epoch_is_exact() -> None:
    plan = small_plan()
    full = [b.input_ids for b in iterator(plan, 1, 2, 3)]
    run = iterator(plan, 1, 2, 3)
    first = [next(run).input_ids for _ in range(7)]  # stops mid-step (2 micro-batches per step)
    state = run.state_dict()
    assert set(state) == {"version", "sample_index", "seed", "plan"}
    assert state["sample_index"] == 7 * 2 * 3
    resumed = iterator(plan, 1, 2, 3, state=state)
    rest = [b.input_ids for b in resumed]
    assert len(first) + len(rest) == len(full)
    for a, b in zip(first + rest, full):
        torch.testing.assert_close(a, b)
    assert resumed.step == plan.num_steps


def test_resume_at_a_step_boundary_works_on_another_world_size() -> None:
    plan = small_plan()
    run = iterator(plan, 0, 2, 3)
    for _ in range(4):  # two whole steps
        next(run)
    state = run.state_dict()
    two_ranks = [iterator(plan, rank, 2, 3, state=state) for rank in range(2)]
    four_ranks = [iterator(plan, rank, 4, 1, state=state) for rank in range(4)]
    assert all(r.step == 2 for r in two_ranks + four_ranks)

    def step_samples(ranks: list[MicroBatchIterator]) -> list[int]:
        per_rank = ranks[0].accumulation_steps
        return sorted(int(t) for r in ranks for _ in range(per_rank) for t in next(r).input_ids[:, 0])

    assert step_samples(two_ranks) == step_samples(four_ranks)
    with pytest.raises(ValueError, match="inside a micro-round"):
        iterator(plan, 0, 2, 2, state=dict(state, sample_index=state["sample_index"] + 6))


def test_a_state_from_another_seed_or_plan_is_refused() -> None:
    plan = small_plan()
    state = iterator(plan, 0, 1, 12).state_dict()
    with pytest.raises(ValueError, match="seed"):
        iterator(plan, 0, 1, 12, state=SamplerState(0, 1, state["plan"]).to_dict())
    with pytest.raises(ValueError, match="different mixture plan"):
        iterator(plan, 0, 1, 12, state=dict(state, plan="0" * 16))
