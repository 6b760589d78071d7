"""The mixture sampler: which (source, sequence) every global sample index reads.

Global order. Sample ``g`` of the stage (``0 <= g < plan.total_sequences``) is the ``k``-th
draw of some source under the smooth interleaving of `schedule` (a fixed, seed-free order that
keeps every batch close to the mixture's shares). Draw ``k`` of a source with ``n`` unique
sequences reads sequence ``perm[seed, source, k // n](k % n)``: a fresh seeded permutation per
epoch (`permutation`), so a source repeated 2.4 times is two full shuffled passes and 40% of a
third, and every unique sequence is seen ``floor`` or ``ceil`` of its epochs.

Ranks. Step ``s`` covers global samples ``[s B, (s + 1) B)`` for the global batch ``B``. It is
consumed in micro-rounds of ``W x m`` samples (``W`` ranks, micro-batch ``m``): in the round
starting at ``g``, rank ``r`` takes the contiguous block ``[g + r m, g + (r + 1) m)``. Ranks
are therefore disjoint and together cover every sample with no gap, and after every round the
consumed samples are exactly the prefix ``[0, g + W m)``.

State. That prefix property makes one integer, the global sample index of the next round,
the whole resumable state (identical on every rank); seed and plan fingerprint travel with it
to refuse a resume against a different plan. At a step boundary the state is independent of
the world size, so a run may resume on a different number of ranks; the set of samples in
every step depends only on the plan and the seed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenmill.trainer.data.permutation import IndexPermutation, derive_key
from tokenmill.trainer.data.plan import MixturePlan
from tokenmill.trainer.data.schedule import InterleavedSchedule

STATE_VERSION = 1


@dataclass(frozen=True)
class SamplerState:
    """Where a stage's data stream stands: ``{"version", "sample_index", "seed", "plan"}``."""

    sample_index: int
    seed: int
    plan: str

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "sample_index": self.sample_index, "seed": self.seed, "plan": self.plan}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplerState:
        version = data.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"unsupported sampler state version {version!r} (expected {STATE_VERSION})")
        return cls(int(data["sample_index"]), int(data["seed"]), str(data["plan"]))


class MixtureSampler:
    """Random access to the sample order of a `MixturePlan` for a seed."""

    def __init__(self, plan: MixturePlan, seed: int, *, cached_permutations: int = 16) -> None:
        self.plan = plan
        self.seed = int(seed)
        self.schedule = InterleavedSchedule(plan.draws)
        self._sizes = [source.num_sequences for source in plan.sources]
        self._permutations: OrderedDict[tuple[int, int], IndexPermutation] = OrderedDict()
        self._cached = cached_permutations

    @property
    def total(self) -> int:
        return self.schedule.total

    def draws(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(source index, sequence index within the source)`` for global samples ``start .. stop - 1``."""
        sources, ks = self.schedule.window(start, stop)
        sequences = np.empty_like(ks)
        for source in np.unique(sources):
            mine = np.flatnonzero(sources == source)
            epochs, positions = np.divmod(ks[mine], self._sizes[source])
            for epoch in np.unique(epochs):
                same = epochs == epoch
                sequences[mine[same]] = self._permutation(int(source), int(epoch))(positions[same])
        return sources, sequences

    def state(self, sample_index: int) -> SamplerState:
        return SamplerState(sample_index, self.seed, self.plan.fingerprint())

    def check_state(self, state: SamplerState) -> int:
        """The sample index of a saved state, after checking it belongs to this plan and seed."""
        if state.seed != self.seed:
            raise ValueError(f"the saved data position is for seed {state.seed}, this run uses seed {self.seed}")
        if state.plan != self.plan.fingerprint():
            raise ValueError(
                "the saved data position belongs to a different mixture plan "
                f"({state.plan} != {self.plan.fingerprint()}): sources, sizes or draws changed"
            )
        if not 0 <= state.sample_index <= self.total:
            raise ValueError(f"saved sample index {state.sample_index} outside [0, {self.total}]")
        return state.sample_index

    def _permutation(self, source: int, epoch: int) -> IndexPermutation:
        key = (source, epoch)
        permutation = self._permutations.get(key)
        if permutation is None:
            name = self.plan.sources[source].name
            permutation = IndexPermutation(self._sizes[source], derive_key(self.seed, name, epoch))
            self._permutations[key] = permutation
            if len(self._permutations) > self._cached:
                self._permutations.popitem(last=False)
        else:
            self._permutations.move_to_end(key)
        return permutation


def micro_batches_per_step(global_batch_size: int, world_size: int, micro_batch_size: int) -> int:
    """Gradient-accumulation steps per rank: the global batch is fixed, ranks and micro-batches divide it."""
    if world_size < 1 or micro_batch_size < 1:
        raise ValueError("world_size and micro_batch_size must be at least 1")
    per_round = world_size * micro_batch_size
    if global_batch_size % per_round:
        raise ValueError(
            f"global batch {global_batch_size} is not divisible by world size {world_size} x "
            f"micro-batch {micro_batch_size} = {per_round}"
        )
    return global_batch_size // per_round


def rank_block(sample_index: int, rank: int, world_size: int, micro_batch_size: int) -> tuple[int, int]:
    """Global samples ``[start, stop)`` that ``rank`` reads in the micro-round starting at ``sample_index``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    start = sample_index + rank * micro_batch_size
    return start, start + micro_batch_size
