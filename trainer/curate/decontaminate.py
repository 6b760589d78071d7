"""Benchmark decontamination: the Phi-4 report's hybrid 13-gram / 7-gram rule (RECIPE.md).

Text on both sides is normalised the same way (`text.normalise_for_matching`: NFKC,
lower-cased, Unicode punctuation removed, split on white space). For each document:

1. it shares an `ngram`-gram (13) with a benchmark item that is not allow-listed:
   contaminated (13-gram), dropped;
2. otherwise `ratio = shared / min(#doc 7-grams, #item 7-grams)` over distinct `infoNgram`-grams
   (7), maximum over items: `>= contaminatedThreshold` contaminated (7-gram), dropped;
   `> infoThreshold` partial, kept and reported; else clean.

The allow-list is the union of the spec's `allowList` dataset (n-grams common in ordinary
text) and, with `allowListMinDocuments: K`, every benchmark 13-gram that at least K distinct
input documents contain. Matching is vectorised: a batch's n-grams are hashed at once
(`text.ngram_hashes`) and looked up in sorted hash arrays of the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from tokenmill.trainer.curate.text import Words, ngram_hashes, normalise_for_matching, split_words


class BenchmarkError(ValueError):
    """A benchmark or allow-list that cannot be used; names the dataset and the item."""


@dataclass(frozen=True)
class BenchmarkItem:
    benchmark: str
    item_id: str
    text: str


@dataclass
class BenchmarkIndex:
    """The benchmarks' n-grams as sorted hash arrays, built once by the driver."""

    ngram: int
    info_ngram: int
    items: list[BenchmarkItem]
    long_hashes: np.ndarray
    """Sorted distinct `ngram`-gram hashes of all items."""
    long_item: np.ndarray
    long_position: np.ndarray
    """First item (and word position in it) holding each long n-gram, for the evidence."""
    short_hashes: np.ndarray
    """Sorted distinct `info_ngram`-gram hashes; items of short_hashes[j] are
    short_items[short_ptr[j]:short_ptr[j+1]]."""
    short_ptr: np.ndarray
    short_items: np.ndarray
    short_counts: np.ndarray
    """Distinct `info_ngram`-grams of each item."""
    long_filter: np.ndarray | None = None
    short_filter: np.ndarray | None = None
    """Bitmaps over the low bits of the hashes: a document n-gram whose bit is clear is in no
    item, so only the few others are looked up in the sorted arrays."""

    def __post_init__(self) -> None:
        self.long_filter = _bitmap(self.long_hashes)
        self.short_filter = _bitmap(self.short_hashes)

    def long_ngram_text(self, hash_value: int) -> dict[str, Any]:
        """Benchmark, item and the words of the long n-gram with this hash."""
        where = int(np.searchsorted(self.long_hashes, np.uint64(hash_value)))
        item = self.items[int(self.long_item[where])]
        start = int(self.long_position[where])
        words = normalise_for_matching(pa.array([item.text])).to_pylist()[0].split()
        return {"benchmark": item.benchmark, "item": item.item_id, "ngram": " ".join(words[start:start + self.ngram])}


def build_index(items: Sequence[BenchmarkItem], ngram: int, info_ngram: int) -> BenchmarkIndex:
    """Hash every item; an item with fewer than `info_ngram` words can never match: an error."""
    if not items:
        raise BenchmarkError("the benchmarks hold no items")
    words = split_words(pa.array([item.text for item in items], pa.large_string()))
    short = np.flatnonzero(words.counts < info_ngram)
    if len(short):
        item = items[int(short[0])]
        raise BenchmarkError(
            f"benchmark {item.benchmark!r} item {item.item_id!r} has {int(words.counts[short[0]])} words after "
            f"normalisation, fewer than infoNgram ({info_ngram}); it can never be matched "
            f"({len(short)} such items in all)")
    long = ngram_hashes(words, ngram)
    order = np.argsort(long.hashes, kind="stable")
    long_hashes, first = np.unique(long.hashes[order], return_index=True)
    long_item = long.documents[order][first]
    long_position = long.positions[order][first]

    grams = ngram_hashes(words, info_ngram)
    pairs = np.unique(np.stack([grams.hashes, grams.documents.astype(np.uint64)], axis=1), axis=0)
    pair_hashes, pair_items = pairs[:, 0], pairs[:, 1].astype(np.int64)
    short_hashes, starts = np.unique(pair_hashes, return_index=True)
    short_ptr = np.append(starts, len(pair_hashes)).astype(np.int64)
    short_counts = np.bincount(pair_items, minlength=len(items)).astype(np.int64)
    return BenchmarkIndex(ngram, info_ngram, list(items), long_hashes, long_item, long_position,
                          short_hashes, short_ptr, pair_items, short_counts)


def allow_list_hashes(entries: Sequence[str], ngram: int, where: str) -> np.ndarray:
    """The `ngram`-gram hashes of allow-list entries (each entry at least `ngram` words)."""
    if not entries:
        return np.zeros(0, np.uint64)
    words = split_words(pa.array(list(entries), pa.large_string()))
    short = np.flatnonzero(words.counts < ngram)
    if len(short):
        raise BenchmarkError(f"allow-list {where}: entry {int(short[0])} ({entries[int(short[0])][:80]!r}) has "
                             f"fewer than {ngram} words after normalisation")
    return np.unique(ngram_hashes(words, ngram).hashes)


@dataclass
class Matches:
    """What a batch of documents shares with the benchmarks, before the allow-list is known."""

    long_hits: list[np.ndarray]
    """Per document: the distinct benchmark long n-gram hashes it contains."""
    ratio: np.ndarray
    """Per document: max over items of shared / min(#doc short n-grams, #item short n-grams)."""
    item: np.ndarray
    """Per document: the item reaching that ratio (-1 when it shares nothing)."""


def match(words: Words, index: BenchmarkIndex) -> Matches:
    documents = len(words)
    long = ngram_hashes(words, index.ngram)
    hits: list[np.ndarray] = [np.zeros(0, np.uint64)] * documents
    if len(long.hashes) and len(index.long_hashes):
        found = _member(long.hashes, index.long_hashes, index.long_filter)
        if found.any():
            pairs = np.unique(np.stack([long.documents[found].astype(np.uint64), long.hashes[found]], axis=1), axis=0)
            doc_of_pair = pairs[:, 0].astype(np.int64)
            bounds = np.searchsorted(doc_of_pair, np.arange(documents + 1))
            hits = [pairs[bounds[d]:bounds[d + 1], 1] for d in range(documents)]

    ratio = np.zeros(documents, np.float64)
    best_item = np.full(documents, -1, np.int64)
    short = ngram_hashes(words, index.info_ngram)
    if len(short.hashes) == 0 or len(index.short_hashes) == 0:
        return Matches(hits, ratio, best_item)
    found = _member(short.hashes, index.short_hashes, index.short_filter)
    if not found.any():
        return Matches(hits, ratio, best_item)
    # distinct shared n-grams per document, and distinct n-grams of the documents sharing any
    doc_of, hashes = _distinct(short.documents[found], short.hashes[found])
    where = np.searchsorted(index.short_hashes, hashes)
    matched = np.zeros(documents, bool)
    matched[doc_of] = True
    involved = matched[short.documents]
    counted, _ = _distinct(short.documents[involved], short.hashes[involved])
    doc_counts = np.bincount(counted, minlength=documents)
    fan_out = index.short_ptr[where + 1] - index.short_ptr[where]
    doc_of = np.repeat(doc_of, fan_out)
    first = np.repeat(index.short_ptr[where], fan_out)
    offset = np.arange(len(doc_of)) - np.repeat(np.cumsum(fan_out) - fan_out, fan_out)
    items = index.short_items[first + offset]
    keys, shared = np.unique(doc_of * len(index.items) + items, return_counts=True)
    pair_doc, pair_item = keys // len(index.items), keys % len(index.items)
    pair_ratio = shared / np.minimum(doc_counts[pair_doc], index.short_counts[pair_item])
    order = np.lexsort((-pair_item, pair_ratio, pair_doc))  # per document, best ratio last (lowest item on ties)
    last = np.append(pair_doc[order][1:] != pair_doc[order][:-1], True)
    ratio[pair_doc[order][last]] = pair_ratio[order][last]
    best_item[pair_doc[order][last]] = pair_item[order][last]
    return Matches(hits, ratio, best_item)


def _distinct(documents: np.ndarray, hashes: np.ndarray, *extra: np.ndarray) -> tuple[np.ndarray, ...]:
    """The distinct (document, hash) pairs (sorted), with the matching rows of `extra`."""
    order = np.lexsort((hashes, documents))
    documents, hashes = documents[order], hashes[order]
    first = np.ones(len(order), bool)
    first[1:] = (documents[1:] != documents[:-1]) | (hashes[1:] != hashes[:-1])
    return (documents[first], hashes[first], *(column[order][first] for column in extra))


def _bitmap(hashes: np.ndarray) -> np.ndarray:
    bits = 1 << max(20, min(27, int(len(hashes) * 16).bit_length()))
    bitmap = np.zeros(bits, dtype=bool)
    bitmap[(hashes & np.uint64(bits - 1)).astype(np.int64)] = True
    return bitmap


def _member(values: np.ndarray, sorted_set: np.ndarray, bitmap: np.ndarray | None = None) -> np.ndarray:
    """Which `values` are in `sorted_set`."""
    if bitmap is None:
        candidates = np.arange(len(values))
    else:
        candidates = np.flatnonzero(bitmap[(values & np.uint64(len(bitmap) - 1)).astype(np.int64)])
    found = np.zeros(len(values), dtype=bool)
    if len(candidates):
        where = np.minimum(np.searchsorted(sorted_set, values[candidates]), len(sorted_set) - 1)
        found[candidates] = sorted_set[where] == values[candidates]
    return found


def common_ngrams(long_hits: Sequence[np.ndarray], min_documents: int) -> np.ndarray:
    """Benchmark long n-grams found in at least `min_documents` distinct documents."""
    nonempty = [hits for hits in long_hits if len(hits)]
    if not nonempty:
        return np.zeros(0, np.uint64)
    values, counts = np.unique(np.concatenate(nonempty), return_counts=True)
    return values[counts >= min_documents]


@dataclass(frozen=True)
class Thresholds:
    info: float
    contaminated: float


def decide(long_hits: np.ndarray, ratio: float, item: int, index: BenchmarkIndex, allowed: np.ndarray,
           thresholds: Thresholds) -> tuple[str, dict[str, Any] | None]:
    """One document's verdict: contaminated-13gram, contaminated-7gram, partial or clean, with evidence."""
    if len(long_hits):
        flagged = long_hits[~np.isin(long_hits, allowed)] if len(allowed) else long_hits
        if len(flagged):
            return f"contaminated-{index.ngram}gram", index.long_ngram_text(int(np.min(flagged)))
    if item >= 0 and ratio > thresholds.info or item >= 0 and ratio >= thresholds.contaminated:
        source = index.items[item]
        evidence = {"benchmark": source.benchmark, "item": source.item_id, "ratio": round(float(ratio), 4)}
        if ratio >= thresholds.contaminated:
            return f"contaminated-{index.info_ngram}gram", evidence
        return "partial", evidence
    return "clean", None


def decontaminate(texts: pa.Array, index: BenchmarkIndex, thresholds: Thresholds,
                  allow: np.ndarray | None = None, allow_min_documents: int | None = None) -> list[tuple[str, Any]]:
    """The whole rule over one batch (the pipeline splits it across workers and the driver)."""
    found = match(split_words(texts), index)
    allowed = np.zeros(0, np.uint64) if allow is None else allow
    if allow_min_documents:
        allowed = np.union1d(allowed, common_ngrams(found.long_hits, allow_min_documents))
    return [decide(hits, float(r), int(i), index, allowed, thresholds)
            for hits, r, i in zip(found.long_hits, found.ratio, found.item)]
