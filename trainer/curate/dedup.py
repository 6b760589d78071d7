"""Exact and near-duplicate removal: content hashes, MinHash signatures and LSH clusters.

Signatures are computed where the documents are (one Ray task per shard), vectorised with
numpy: every shingle (word n-gram hash, `text.ngram_hashes`) goes through `numPermutations`
multiply-shift hash functions at once and the minimum per document is a `reduceat`. The
driver then buckets documents by band (`bands` bands of `numPermutations / bands` rows),
checks each candidate pair's estimated Jaccard similarity (the share of equal signature
values) against `jaccardThreshold`, and joins the pairs that pass into connected components;
the first document of each component in input order is kept. Documents shorter than
`ngram` words have no shingles and are only deduplicated exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from tokenmill.trainer.curate.text import Words, ngram_hashes

SIGNATURE_SEED = 0x5EED_D0C5
CHUNK_SHINGLES = 2048  # keeps the [shingles, permutations] block in cache


def content_hash(text: str) -> int:
    """64-bit digest of a document's normalised text, for exact duplicates."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def permutations(count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SIGNATURE_SEED)
    multipliers = rng.integers(1, 2**63, size=count, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    offsets = rng.integers(0, 2**63, size=count, dtype=np.uint64)
    return multipliers, offsets


def signatures(words: Words, ngram: int, num_permutations: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 signatures [documents, permutations], whether each document has shingles)."""
    shingles = ngram_hashes(words, ngram)
    documents = len(words)
    out = np.full((documents, num_permutations), np.iinfo(np.uint32).max, dtype=np.uint32)
    has = shingles.counts > 0
    if len(shingles.hashes) == 0:
        return out, has
    multipliers, offsets = permutations(num_permutations)
    for start in range(0, len(shingles.hashes), CHUNK_SHINGLES):
        hashes = shingles.hashes[start:start + CHUNK_SHINGLES]
        docs = shingles.documents[start:start + CHUNK_SHINGLES]
        values = hashes[:, None] * multipliers[None, :]
        values += offsets[None, :]
        values >>= np.uint64(32)
        values = values.astype(np.uint32)
        segment = np.flatnonzero(np.append(True, docs[1:] != docs[:-1]))
        minima = np.minimum.reduceat(values, segment, axis=0)
        present = docs[segment]
        out[present] = np.minimum(out[present], minima)
    return out, has


def band_keys(signature: np.ndarray, bands: int) -> np.ndarray:
    """uint64 [documents, bands]: one hash per band of rows."""
    documents, length = signature.shape
    rows = length // bands
    multipliers = np.random.default_rng(SIGNATURE_SEED + 1).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    shaped = signature.reshape(documents, bands, rows).astype(np.uint64)
    return (shaped * multipliers[None, None, :]).sum(axis=2, dtype=np.uint64) ^ np.arange(bands, dtype=np.uint64)


@dataclass(frozen=True)
class Duplicate:
    """A dropped document and the one kept in its place."""

    index: int
    kept: int
    similarity: float | None
    """Estimated Jaccard similarity with the document it was linked to (None for exact copies)."""


def exact_duplicates(hashes: np.ndarray) -> list[Duplicate]:
    """Every document whose content hash an earlier one has, in input order."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    kept = first[inverse]
    return [Duplicate(int(i), int(kept[i]), None) for i in np.flatnonzero(kept != np.arange(len(hashes)))]


def near_duplicates(signature: np.ndarray, bands: int, threshold: float) -> list[Duplicate]:
    """Clusters of documents at least `threshold` similar (estimated), one kept per cluster (the first)."""
    documents = len(signature)
    if documents < 2:
        return []
    keys = band_keys(signature, bands)
    left: list[np.ndarray] = []
    right: list[np.ndarray] = []
    for band in range(bands):
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if len(same) == 0:
            continue
        # each member against its predecessor and against its bucket's first member
        starts = np.flatnonzero(np.append(True, sorted_keys[1:] != sorted_keys[:-1]))
        bucket_first = order[starts][np.searchsorted(starts, np.arange(documents), side="right") - 1]
        members = order[same + 1]
        left += [order[same], bucket_first[same + 1]]
        right += [members, members]
    if not left:
        return []
    a, b = np.concatenate(left), np.concatenate(right)
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    similarity = np.empty(len(pairs))
    for start in range(0, len(pairs), 1 << 16):
        chunk = pairs[start:start + (1 << 16)]
        similarity[start:start + len(chunk)] = (signature[chunk[:, 0]] == signature[chunk[:, 1]]).mean(axis=1)
    linked = similarity >= threshold
    pairs, similarity = pairs[linked], similarity[linked]
    if len(pairs) == 0:
        return []
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(documents, documents))
    _, component = connected_components(graph, directed=False)
    first = np.full(component.max() + 1, documents, dtype=np.int64)
    np.minimum.at(first, component, np.arange(documents))
    best = np.zeros(documents)
    np.maximum.at(best, pairs[:, 0], similarity)
    np.maximum.at(best, pairs[:, 1], similarity)
    kept = first[component]
    return [Duplicate(int(i), int(kept[i]), round(float(best[i]), 4))
            for i in np.flatnonzero(kept != np.arange(documents))]


def estimated_jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.mean(np.asarray(a) == np.asarray(b)))
