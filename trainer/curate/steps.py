"""The per-batch curation steps: each a pure function from a batch of documents to verdicts.

A step returns `Verdicts`: for every document whether it is dropped, the reason (a short
kebab-case word that becomes a metric label), the evidence (a small JSON-able dict) and any
per-document values it records on kept documents. The pipeline (`pipeline.py`) runs them in
order and counts every reason.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenmill.api.corpus import OutlierFilter
from tokenmill.trainer.curate.text import ngram_hashes, split_words

NON_TEXT = r"[^\p{L}\p{M}\p{N}\p{P}\p{Z}\s]"
CONTROL = "[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f\u200b\ufeff]"
REPETITION_NGRAM = 3


@dataclass
class Verdicts:
    """What one step decided about each document of a batch."""

    step: str
    dropped: np.ndarray
    reasons: list[str]
    """The reason of each dropped document ('' for kept ones)."""
    evidence: list[dict[str, Any] | None]
    recorded: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-document values kept on the documents (language, score…)."""

    @classmethod
    def keep_all(cls, step: str, count: int) -> Verdicts:
        return cls(step, np.zeros(count, bool), [""] * count, [None] * count)

    def drop(self, index: int, reason: str, evidence: dict[str, Any] | None = None) -> None:
        if not self.dropped[index]:
            self.dropped[index] = True
            self.reasons[index] = reason
            self.evidence[index] = evidence


def normalise_documents(texts: pa.Array, extraction: str = "preserve-structure") -> pa.Array:
    """Unicode NFC, one newline convention, no control or zero-width characters, single spaces
    between words (indentation kept), no trailing white space on lines and at most one blank
    line in a row; `plain` collapses all white space to single spaces."""
    text = pc.utf8_normalize(texts, "NFC")
    text = pc.replace_substring_regex(text, r"\r\n?", "\n")
    text = pc.replace_substring_regex(text, CONTROL, "")
    if extraction == "plain":
        text = pc.replace_substring_regex(text, r"\s+", " ")
    else:
        text = pc.replace_substring_regex(text, r"[ \t\p{Zs}]+\n", "\n")
        text = pc.replace_substring_regex(text, r"(\S)[ \p{Zs}]{2,}", "\\1 ")  # indentation is kept
        text = pc.replace_substring_regex(text, r"\n{3,}", "\n\n")
    return pc.utf8_trim_whitespace(text)


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / max(len(zlib.compress(raw, 6)), 1)


def top_ngram_fraction(texts: pa.Array, n: int = REPETITION_NGRAM) -> np.ndarray:
    """Per document, the share of its word characters covered by its most frequent word n-gram."""
    words = split_words(texts)
    grams = ngram_hashes(words, n)
    result = np.zeros(len(words), dtype=np.float64)
    if len(grams.hashes) == 0:
        return result
    word_chars = np.add.reduceat(np.concatenate((words.lengths, [0])), words.offsets[:-1]) \
        if len(words.lengths) else np.zeros(len(words))
    word_chars = np.where(words.counts > 0, word_chars, 0)
    gram_chars = np.zeros(len(grams.hashes), dtype=np.int64)
    starts = words.offsets[:-1][grams.documents] + grams.positions
    for k in range(n):
        gram_chars += words.lengths[starts + k]
    order = np.lexsort((grams.hashes, grams.documents))
    documents, hashes, chars = grams.documents[order], grams.hashes[order], gram_chars[order]
    new_run = np.ones(len(order), bool)
    new_run[1:] = (documents[1:] != documents[:-1]) | (hashes[1:] != hashes[:-1])
    run_starts = np.flatnonzero(new_run)
    run_counts = np.diff(np.append(run_starts, len(order)))
    run_documents = documents[run_starts]
    covered = run_counts * chars[run_starts]
    best = np.zeros(len(words), dtype=np.int64)
    np.maximum.at(best, run_documents, np.where(run_counts > 1, covered, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        result = np.where(word_chars > 0, best / np.maximum(word_chars, 1), 0.0)
    return np.minimum(result, 1.0)


def outliers(texts: pa.Array, spec: OutlierFilter) -> Verdicts:
    """Length bounds, non-text characters, repetition and compression ratio (cheapest first)."""
    count = len(texts)
    verdicts = Verdicts.keep_all("outliers", count)
    chars = np.asarray(pc.utf8_length(texts).fill_null(0), dtype=np.int64)
    for index in np.flatnonzero(chars < spec.min_chars):
        verdicts.drop(int(index), "too-short", {"chars": int(chars[index])})
    for index in np.flatnonzero(chars > spec.max_chars):
        verdicts.drop(int(index), "too-long", {"chars": int(chars[index])})
    non_text = np.asarray(pc.count_substring_regex(texts, NON_TEXT).fill_null(0), dtype=np.int64)
    fraction = non_text / np.maximum(chars, 1)
    for index in np.flatnonzero(fraction > spec.max_non_text_fraction):
        verdicts.drop(int(index), "non-text", {"nonTextFraction": round(float(fraction[index]), 4)})
    alive = np.flatnonzero(~verdicts.dropped)
    if len(alive):
        repeated = top_ngram_fraction(texts.take(pa.array(alive)))
        for index, share in zip(alive, repeated):
            if share > spec.max_top_ngram_fraction:
                verdicts.drop(int(index), "repetition", {"topNgramFraction": round(float(share), 4)})
    python_texts = texts.to_pylist()
    for index in np.flatnonzero(~verdicts.dropped):
        ratio = compression_ratio(python_texts[index])
        if ratio < spec.min_compression_ratio:
            verdicts.drop(int(index), "low-compression-ratio", {"compressionRatio": round(ratio, 3)})
        elif ratio > spec.max_compression_ratio:
            verdicts.drop(int(index), "high-compression-ratio", {"compressionRatio": round(ratio, 3)})
    return verdicts


def language(texts: Sequence[str], identifier: Any, languages: Sequence[str], threshold: float) -> Verdicts:
    """Keep documents whose top language is listed with at least `threshold` confidence."""
    verdicts = Verdicts.keep_all("language", len(texts))
    labels, scores = identifier.predict(texts)
    wanted = set(languages)
    for index, (label, score) in enumerate(zip(labels, scores)):
        if label not in wanted:
            verdicts.drop(index, "language", {"language": label, "score": round(float(score), 4)})
        elif score < threshold:
            verdicts.drop(index, "low-language-score", {"language": label, "score": round(float(score), 4)})
    verdicts.recorded = {"lang": np.asarray(labels, dtype=object), "lang_score": np.asarray(scores, np.float64)}
    return verdicts


def counts_of(verdicts: Verdicts) -> Mapping[str, int]:
    """reason -> documents dropped for it."""
    out: dict[str, int] = {}
    for reason in np.asarray(verdicts.reasons, dtype=object)[verdicts.dropped]:
        out[reason] = out.get(reason, 0) + 1
    return out
