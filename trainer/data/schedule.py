"""The deterministic interleaving of sources: a smooth weighted round-robin with random access.

Source ``i`` has ``d_i`` draws in the stage. Its ``k``-th draw is placed at time
``(2k + 1) / (2 d_i)`` in ``(0, 1)``; the schedule is all draws sorted by (time, source index).
Every prefix of the schedule therefore holds each source's share to within about one sequence
per source, so every global batch (and every micro-batch) is a faithful sample of the mixture,
and no random draw can starve or flood a source.

The position of draw ``(i, k)`` has a closed form (the number of draws ordered before it), so a
window ``[start, stop)`` of the schedule is computed directly, in O(window + sources^2 log n),
without replaying the schedule from the beginning.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MAX_DRAWS = 2**31
"""Keeps every intermediate product below 2**62 in the vectorised int64 positions."""


class InterleavedSchedule:
    """Global sample index -> (source index, draw index within that source)."""

    def __init__(self, draws: Sequence[int]) -> None:
        self.draws = [int(d) for d in draws]
        if any(d < 0 for d in self.draws):
            raise ValueError(f"draws must be non-negative, got {self.draws}")
        if max(self.draws, default=0) >= _MAX_DRAWS:
            raise ValueError(f"a source may have at most {_MAX_DRAWS - 1} draws")
        self.total = sum(self.draws)
        self._d = np.array(self.draws, dtype=np.int64)

    def positions(self, source: int, ks: np.ndarray) -> np.ndarray:
        """Global positions of draws ``ks`` of ``source``."""
        ks = np.asarray(ks, dtype=np.int64)
        d_i = self.draws[source]
        # Draw k' of source j is earlier when (2k' + 1) / d_j < (2k + 1) / d_i, that is when
        # 2k' + 1 < (2k + 1) d_j / d_i; write (2k + 1) = q d_i + r to keep products small.
        q, r = np.divmod(2 * ks + 1, d_i)
        before = ks.copy()
        for j, d_j in enumerate(self.draws):
            if j == source or d_j == 0:
                continue
            whole, part = q * d_j, r * d_j
            if j < source:  # ties go to the lower source index: count times <= ours
                count = (whole + part // d_i + 1) // 2
            else:  # strictly earlier times only
                count = (whole - (-part // d_i)) // 2
            before += np.clip(count, 0, d_j)
        return before

    def window(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(source, k)`` arrays for global indices ``start .. stop - 1``."""
        if not 0 <= start <= stop <= self.total:
            raise IndexError(f"window [{start}, {stop}) outside the schedule [0, {self.total})")
        size = stop - start
        sources = np.full(size, -1, dtype=np.int64)
        ks = np.empty(size, dtype=np.int64)
        for i, d_i in enumerate(self.draws):
            if d_i == 0:
                continue
            lo = self._first_at_or_after(i, start)
            hi = self._first_at_or_after(i, stop)
            if hi == lo:
                continue
            mine = np.arange(lo, hi, dtype=np.int64)
            slots = self.positions(i, mine) - start
            sources[slots] = i
            ks[slots] = mine
        if size and sources.min() < 0:
            raise AssertionError("the interleaved schedule left a gap (this is a bug)")
        return sources, ks

    def position(self, source: int, k: int) -> int:
        """`positions` for one draw, in Python integers (faster than numpy for a scalar)."""
        d_i = self.draws[source]
        before = k
        for j, d_j in enumerate(self.draws):
            if j == source or d_j == 0:
                continue
            scaled = (2 * k + 1) * d_j
            count = (scaled // d_i + 1) // 2 if j < source else (-(-scaled // d_i)) // 2
            before += min(max(count, 0), d_j)
        return before

    def _first_at_or_after(self, source: int, index: int) -> int:
        """The smallest k whose position is >= index (d_i when there is none)."""
        lo, hi = 0, self.draws[source]
        while lo < hi:
            mid = (lo + hi) // 2
            if self.position(source, mid) < index:
                lo = mid + 1
            else:
                hi = mid
        return lo
