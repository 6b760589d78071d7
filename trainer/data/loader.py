"""The torch-facing side: micro-batches of ``(input_ids, labels, doc_ids)`` for one rank.

Each micro-batch holds ``micro_batch_size`` packed sequences as int64 tensors of shape
``(micro_batch_size, seq_len)``: ``labels`` are the inputs shifted by one with padding set to
``IGNORE_INDEX``, and ``doc_ids`` number the documents inside each row (see `packing`), for a
model that keeps attention from crossing document boundaries. ``state_dict()`` after a
micro-batch is the position to checkpoint; it is the same on every rank (see `sampler`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from tokenmill.trainer.data.packing import document_ids, split_rows
from tokenmill.trainer.data.plan import MixturePlan
from tokenmill.trainer.data.sampler import MixtureSampler, SamplerState, micro_batches_per_step, rank_block


class SequenceSource(Protocol):
    """Random access to a source's packed rows of ``seq_len + 1`` tokens."""

    @property
    def num_sequences(self) -> int: ...

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` (any order, repeats allowed) as an int array ``(len(indices), seq_len + 1)``."""
        ...


class ArraySource:
    """A source of packed rows held in memory (tests and in-process use)."""

    def __init__(self, rows: np.ndarray) -> None:
        if rows.ndim != 2:
            raise ValueError(f"rows must be 2-D (sequences, seq_len + 1), got shape {rows.shape}")
        self.rows = rows

    @property
    def num_sequences(self) -> int:
        return int(self.rows.shape[0])

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.rows[np.asarray(indices, dtype=np.int64)]


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    step: int
    """Optimizer step this micro-batch belongs to."""
    micro_step: int
    """Index within the step's gradient accumulation (0-based)."""
    accumulation_steps: int
    """Micro-batches per step on each rank."""

    @property
    def last_in_step(self) -> bool:
        """True for the micro-batch after which the optimizer steps."""
        return self.micro_step == self.accumulation_steps - 1


class MicroBatchIterator:
    """Yields this rank's micro-batches from the sampler's global order, resumable exactly."""

    def __init__(
        self,
        sampler: MixtureSampler,
        sources: Mapping[str, SequenceSource] | Sequence[SequenceSource],
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        eot_id: int,
        pad_id: int,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        plan = sampler.plan
        self.sampler = sampler
        self.sources = _ordered_sources(sources, plan.names)
        _check_sources(self.sources, plan)
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = micro_batches_per_step(plan.global_batch_size, world_size, micro_batch_size)
        self.eot_id = eot_id
        self.pad_id = pad_id
        rank_block(0, rank, world_size, micro_batch_size)  # validates the rank
        self._index = 0
        self._step_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        if state is not None:
            self.load_state_dict(state)

    @property
    def sample_index(self) -> int:
        """Global index of the next micro-round (samples before it are consumed on all ranks)."""
        return self._index

    @property
    def step(self) -> int:
        return self._index // self.sampler.plan.global_batch_size

    @property
    def num_steps(self) -> int:
        return self.sampler.plan.num_steps

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state(self._index).to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        index = self.sampler.check_state(SamplerState.from_dict(state))
        per_round = self.world_size * self.micro_batch_size
        if index % self.sampler.plan.global_batch_size % per_round:
            raise ValueError(
                f"saved sample index {index} is inside a micro-round of {per_round} samples: resume "
                "mid-step only with the same world size and micro-batch size (or from a step boundary)"
            )
        self._index = index

    def __iter__(self) -> Iterator[MicroBatch]:
        return self

    def __next__(self) -> MicroBatch:
        plan = self.sampler.plan
        if self._index >= self.sampler.total:
            raise StopIteration
        start, stop = rank_block(self._index, self.rank, self.world_size, self.micro_batch_size)
        rows = self._read(start, stop)
        step = self._index // plan.global_batch_size
        micro_step = self._index % plan.global_batch_size // (self.world_size * self.micro_batch_size)
        self._index += self.world_size * self.micro_batch_size
        inputs, labels = split_rows(rows, self.pad_id)
        doc_ids = document_ids(inputs, self.eot_id, self.pad_id).astype(np.int64)
        return MicroBatch(
            input_ids=torch.from_numpy(inputs),
            labels=torch.from_numpy(labels),
            doc_ids=torch.from_numpy(doc_ids),
            step=step,
            micro_step=micro_step,
            accumulation_steps=self.accumulation_steps,
        )

    def _read(self, start: int, stop: int) -> np.ndarray:
        source_ids, sequence_ids = self._step_draws(start, stop)
        rows = np.empty((stop - start, self.sampler.plan.seq_len + 1), dtype=np.int64)
        for source in np.unique(source_ids):
            mine = np.flatnonzero(source_ids == source)
            rows[mine] = self.sources[source].read(sequence_ids[mine])
        return rows

    def _step_draws(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Draws for ``[start, stop)``, computed once per global batch (locating a window costs
        the same for one sample as for a whole batch)."""
        batch = self.sampler.plan.global_batch_size
        first = start - start % batch
        if self._step_cache is None or self._step_cache[0] != first:
            self._step_cache = (first, *self.sampler.draws(first, first + batch))
        _, sources, sequences = self._step_cache
        return sources[start - first : stop - first], sequences[start - first : stop - first]


def _ordered_sources(
    sources: Mapping[str, SequenceSource] | Sequence[SequenceSource], names: Sequence[str]
) -> list[SequenceSource]:
    if isinstance(sources, Mapping):
        missing = [name for name in names if name not in sources]
        if missing:
            raise KeyError(f"no data for planned sources: {', '.join(missing)}")
        return [sources[name] for name in names]
    if len(sources) != len(names):
        raise ValueError(f"{len(sources)} sources given for a plan of {len(names)}")
    return list(sources)


def _check_sources(sources: Sequence[SequenceSource], plan: MixturePlan) -> None:
    for source, planned in zip(sources, plan.sources, strict=True):
        if source.num_sequences != planned.num_sequences:
            raise ValueError(
                f"source {planned.name!r} holds {source.num_sequences} sequences but the plan "
                f"was made for {planned.num_sequences}"
            )
