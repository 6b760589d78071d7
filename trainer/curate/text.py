"""Text normalisation and vectorised word n-gram hashing shared by the curation steps.

Matching text (deduplication and decontamination) is normalised as the Phi-4 report's
examples show: NFKC, lower-cased, every Unicode punctuation character (category P) removed,
then split on white space. Words are hashed without a per-word Python loop: Arrow splits a
whole batch into words, and numpy hashes every byte of every word at once (a polynomial
hash per word, then a 64-bit finaliser), then combines consecutive word hashes into n-gram
hashes. Two different n-grams share a 64-bit hash with probability about 2**-64 per pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PUNCTUATION = r"\p{P}+"
_BYTE_BASE = np.uint64(0x100000001B3)
_WORD_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
_WORD_BASE_INVERSE = pow(_WORD_BASE, -1, 2**64)
_power_tables: dict[int, np.ndarray] = {}


def mix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    z = values.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def normalise_for_matching(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Lower-case, punctuation removed (NFKC first, so compatibility forms match)."""
    lowered = pc.utf8_lower(pc.utf8_normalize(texts, "NFKC"))
    return pc.replace_substring_regex(lowered, PUNCTUATION, "")


@dataclass(frozen=True)
class Words:
    """The words of a batch of documents: one uint64 hash per word, documents by offsets."""

    hashes: np.ndarray
    """uint64, every document's words in order."""
    offsets: np.ndarray
    """int64, len(documents) + 1: document i holds hashes[offsets[i]:offsets[i+1]]."""
    lengths: np.ndarray
    """int64 byte length of each word."""

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def split_words(texts: pa.Array | pa.ChunkedArray, *, normalise: bool = True) -> Words:
    """Hash every word of every document (null documents have no words)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks else pa.array([], pa.string())
    texts = texts.cast(pa.large_string())
    normalised = normalise_for_matching(texts) if normalise else texts
    lists = pc.utf8_split_whitespace(normalised)
    list_offsets = np.asarray(lists.offsets.fill_null(0) if lists.null_count else lists.offsets,
                              dtype=np.int64)
    list_offsets = list_offsets - list_offsets[0]
    words = lists.flatten()
    if len(words) == 0:
        return Words(np.zeros(0, np.uint64), list_offsets, np.zeros(0, np.int64))
    # hash each distinct word once: a batch has far fewer distinct words than words
    encoded = pc.dictionary_encode(words)
    distinct_hashes, distinct_lengths = _hash_strings(encoded.dictionary)
    indices = np.asarray(encoded.indices, dtype=np.int64)
    lengths = distinct_lengths[indices]
    nonempty = lengths > 0  # Arrow keeps an empty word at each end of a padded string
    if not nonempty.all():
        list_offsets = np.concatenate(([0], np.cumsum(nonempty)))[list_offsets]
        indices, lengths = indices[nonempty], lengths[nonempty]
    hashes = distinct_hashes[indices]
    return Words(hashes, list_offsets, lengths)


def _hash_strings(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash, byte length) of every string, without a per-string Python loop."""
    strings = strings.cast(pa.large_string())
    count = len(strings)
    buffers = strings.buffers()
    byte_offsets = np.frombuffer(buffers[1], dtype=np.int64)[strings.offset: strings.offset + count + 1]
    lengths = np.diff(byte_offsets)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(count, np.uint64), lengths
    data = np.frombuffer(buffers[2], dtype=np.uint8)[byte_offsets[0]: byte_offsets[-1]]
    starts = byte_offsets[:-1] - byte_offsets[0]
    position = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    contributions = (data.astype(np.uint64) + np.uint64(1)) * _powers(int(lengths.max()))[position]
    sums = np.concatenate((np.zeros(1, np.uint64), np.cumsum(contributions, dtype=np.uint64)))
    hashes = sums[starts + lengths] - sums[starts]  # wrapping: exact modulo 2**64
    return mix64(hashes ^ lengths.astype(np.uint64)), lengths


def _powers(length: int) -> np.ndarray:
    powers = np.full(max(length, 1), _BYTE_BASE, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, dtype=np.uint64)


@dataclass(frozen=True)
class NGrams:
    """Word n-gram hashes of a batch: `hashes[i]` belongs to document `documents[i]`."""

    hashes: np.ndarray
    documents: np.ndarray
    positions: np.ndarray
    """Index of the n-gram's first word within its document."""
    counts: np.ndarray
    """n-grams per document (zero for documents shorter than n words)."""


def ngram_hashes(words: Words, n: int) -> NGrams:
    """Every word n-gram of every document, hashed (order-sensitive), documents in order.

    The n-gram starting at word i hashes sum_k w[i+k] * B**k (mod 2**64), computed for all
    n-grams at once from prefix sums of w[j] * B**j, times B**-i."""
    counts = words.counts
    per_document = np.maximum(counts - n + 1, 0)
    documents = np.repeat(np.arange(len(words), dtype=np.int64), per_document)
    if len(documents) == 0:
        empty = np.zeros(0, np.uint64)
        return NGrams(empty, documents, np.zeros(0, np.int64), per_document)
    first_ngram = np.concatenate(([0], np.cumsum(per_document)[:-1]))
    positions = np.arange(len(documents), dtype=np.int64) - np.repeat(first_ngram, per_document)
    starts = words.offsets[:-1][documents] + positions
    total = len(words.hashes)
    prefix = np.empty(total + 1, dtype=np.uint64)
    prefix[0] = 0
    np.cumsum(words.hashes * _powers_of(_WORD_BASE, total), dtype=np.uint64, out=prefix[1:])
    combined = (prefix[starts + n] - prefix[starts]) * _powers_of(_WORD_BASE_INVERSE, total)[starts]
    return NGrams(mix64(combined ^ np.uint64(n)), documents, positions, per_document)


def _powers_of(base: int, length: int) -> np.ndarray:
    """base**0 .. base**(length-1) modulo 2**64, cached and grown as needed."""
    table = _power_tables.get(base)
    if table is None or len(table) < length:
        size = max(length, 1 << 16, 0 if table is None else 2 * len(table))
        table = np.full(size, np.uint64(base), dtype=np.uint64)
        table[0] = 1
        table = np.cumprod(table, dtype=np.uint64)
        _power_tables[base] = table
    return table[:length]


def hash_phrase(text: str, n: int | None = None) -> np.ndarray:
    """The n-gram hashes of one text (all its words as one n-gram when n is None)."""
    words = split_words(pa.array([text], pa.large_string()))
    size = int(words.counts[0]) if n is None else n
    if size == 0:
        return np.zeros(0, np.uint64)
    return ngram_hashes(words, size).hashes
