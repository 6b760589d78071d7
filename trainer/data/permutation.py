"""A seeded pseudo-random permutation of ``range(n)`` with random access and O(1) memory.

A balanced Feistel network over the smallest even number of bits that covers ``n`` is a
bijection of ``[0, 2**bits)``; cycle-walking (re-encrypting values >= n) restricts it to a
bijection of ``[0, n)``. Any position's image is computed on its own, so a sampler can jump to
any sample without materialising a shuffled index (which would take gigabytes for a source of
hundreds of millions of sequences), and every rank computes only the positions it reads.
"""

from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 6
_MASK64 = (1 << 64) - 1


def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective 64-bit hash (uint64 arithmetic wraps by design)."""
    x = values.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def derive_key(*parts: int | str) -> int:
    """A 64-bit key from a tuple of ints and strings (stable across processes and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class IndexPermutation:
    """``perm(positions)`` maps positions in ``[0, n)`` to a shuffled ``[0, n)``, keyed by ``key``."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self._half = bits // 2
        self._half_mask = np.uint64((1 << self._half) - 1)
        self._round_keys = [np.uint64(derive_key(key, r) & _MASK64) for r in range(_ROUNDS)]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        out = self._encrypt(x.astype(np.uint64))
        walking = out >= np.uint64(self.n)
        while walking.any():
            out[walking] = self._encrypt(out[walking])
            walking = out >= np.uint64(self.n)
        return out.astype(np.int64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left = x >> half
        right = x & self._half_mask
        for round_key in self._round_keys:
            left, right = right, left ^ (mix64(right ^ round_key) & self._half_mask)
        return (left << half) | right
