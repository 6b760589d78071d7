"""Packing documents into fixed-length training sequences (pure numpy, no per-token Python).

Layout of the token stream and of a stored sequence:

- Every document is followed by end-of-text (EOT): ``d0 EOT d1 EOT d2 EOT ...``. Documents are
  encoded as ordinary text, so EOT never occurs inside one.
- A stored row holds ``seq_len + 1`` tokens: ``input_ids = row[:-1]`` and ``labels = row[1:]``
  (the shifted target). Row ``i`` is ``stream[i * seq_len : i * seq_len + seq_len + 1]``: rows
  overlap by one token, so every stream token after the first is a label exactly once and no
  token is dropped at a row boundary.
- Tails carry over: a document that does not fit in a row continues at the start of the next
  row (without its earlier context, since attention never crosses rows). Only the end of a
  whole stream (one input shard) leaves a partial row; it is filled with ``pad_id`` (a dummy
  token that never occurs in text), and padded labels are ignored (``IGNORE_INDEX``).
- Document ids for attention masking: EOT *opens* a segment. The EOT that ends document ``k``
  belongs to document ``k + 1``'s segment, so predicting "end of document" happens inside the
  document, and the first token of the next document is predicted from EOT alone, never from
  the previous document. Padding forms its own segment. Ids restart at 0 in every row; they
  only need to differ between neighbouring segments.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

TOKEN_DTYPE = np.int32
IGNORE_INDEX = -100
"""Label value that the loss skips (torch's cross-entropy default)."""


def flatten_token_lists(token_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate tokenizer output into one int32 array and the per-document lengths."""
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    total = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=TOKEN_DTYPE, count=total)
    return flat, lengths


def join_documents(flat: np.ndarray, lengths: np.ndarray, eot_id: int) -> np.ndarray:
    """The token stream: each document's tokens followed by one EOT."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if int(lengths.sum()) != flat.size:
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {flat.size} tokens")
    stream = np.empty(flat.size + lengths.size, dtype=TOKEN_DTYPE)
    eot_positions = np.cumsum(lengths + 1) - 1
    is_eot = np.zeros(stream.size, dtype=bool)
    is_eot[eot_positions] = True
    stream[is_eot] = eot_id
    stream[~is_eot] = flat
    return stream


def full_rows(num_tokens: int, seq_len: int) -> int:
    """How many complete rows of ``seq_len + 1`` tokens (stride ``seq_len``) a stream holds."""
    _check_seq_len(seq_len)
    return max(0, (num_tokens - 1) // seq_len)


def cut_rows(stream: np.ndarray, seq_len: int, num_rows: int) -> np.ndarray:
    """Rows ``i * seq_len : i * seq_len + seq_len + 1`` for ``i < num_rows``, as a new array."""
    if num_rows == 0:
        return np.empty((0, seq_len + 1), dtype=TOKEN_DTYPE)
    needed = num_rows * seq_len + 1
    if stream.size < needed:
        raise ValueError(f"{num_rows} rows of {seq_len} need {needed} tokens, have {stream.size}")
    windows = np.lib.stride_tricks.sliding_window_view(stream[:needed], seq_len + 1)
    return np.ascontiguousarray(windows[::seq_len], dtype=TOKEN_DTYPE)


def pad_tail(tail: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """The last, partial row of a stream, filled with ``pad_id``; empty when nothing is left.

    ``tail`` is what follows the last complete row, starting with the overlap token (the last
    token of that row). A tail of one token has no label left to train on and gives no row.
    """
    if tail.size > seq_len + 1:
        raise ValueError(f"a tail has at most {seq_len + 1} tokens, got {tail.size}")
    if tail.size <= 1:
        return np.empty((0, seq_len + 1), dtype=TOKEN_DTYPE)
    row = np.full((1, seq_len + 1), pad_id, dtype=TOKEN_DTYPE)
    row[0, : tail.size] = tail
    return row


def pack_stream(stream: np.ndarray, seq_len: int, pad_id: int, *, pad_last: bool = True) -> np.ndarray:
    """All rows of a finished stream; the partial last row is padded or, with ``pad_last=False``, dropped."""
    rows = full_rows(stream.size, seq_len)
    packed = cut_rows(stream, seq_len, rows)
    if not pad_last:
        return packed
    last = pad_tail(stream[rows * seq_len :], seq_len, pad_id)
    return np.concatenate([packed, last]) if last.size else packed


def pack_documents(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    eot_id: int,
    pad_id: int,
    *,
    pad_last: bool = True,
) -> np.ndarray:
    """Tokenized documents to rows of ``seq_len + 1`` tokens (see the module docstring)."""
    flat, lengths = flatten_token_lists(token_lists)
    return pack_stream(join_documents(flat, lengths, eot_id), seq_len, pad_id, pad_last=pad_last)


def document_ids(input_ids: np.ndarray, eot_id: int, pad_id: int) -> np.ndarray:
    """Per-token segment ids over the last axis: a new segment at every EOT and at the padding."""
    tokens = np.asarray(input_ids)
    starts = tokens == eot_id
    is_pad = tokens == pad_id
    starts[..., 1:] |= is_pad[..., 1:] & ~is_pad[..., :-1]
    return np.cumsum(starts, axis=-1, dtype=np.int32)


def split_rows(rows: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, labels)`` of stored rows; labels at padding are ``IGNORE_INDEX``."""
    inputs = rows[..., :-1].astype(np.int64)
    labels = rows[..., 1:].astype(np.int64)
    labels[labels == pad_id] = IGNORE_INDEX
    return inputs, labels


def real_token_count(rows: np.ndarray, pad_id: int) -> int:
    """Tokens of text and EOT in rows, counting each overlap token once (padding excluded).

    This is the number of tokens the rows train on as labels, plus the stream's first token.
    """
    if rows.shape[0] == 0:
        return 0
    return int(np.count_nonzero(rows[:, 1:] != pad_id)) + int(rows[0, 0] != pad_id)


class StreamPacker:
    """Packs documents batch by batch, carrying the partial row over to the next batch.

    ``add`` returns the rows completed so far; ``finish`` returns the padded last row. The rows
    are the same as ``pack_documents`` over all batches at once.
    """

    def __init__(self, seq_len: int, eot_id: int, pad_id: int, *, pad_last: bool = True) -> None:
        _check_seq_len(seq_len)
        self.seq_len = seq_len
        self.eot_id = eot_id
        self.pad_id = pad_id
        self.pad_last = pad_last
        self._tail = np.empty(0, dtype=TOKEN_DTYPE)

    @property
    def pending_tokens(self) -> int:
        """Tokens waiting for the next row (including the overlap token)."""
        return int(self._tail.size)

    def add(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        flat, lengths = flatten_token_lists(token_lists)
        return self.add_stream(join_documents(flat, lengths, self.eot_id))

    def add_stream(self, stream: np.ndarray) -> np.ndarray:
        """Append already-joined tokens (documents with their EOTs)."""
        joined = np.concatenate([self._tail, stream.astype(TOKEN_DTYPE, copy=False)])
        rows = full_rows(joined.size, self.seq_len)
        packed = cut_rows(joined, self.seq_len, rows)
        self._tail = joined[rows * self.seq_len :].copy()
        return packed

    def finish(self) -> np.ndarray:
        tail, self._tail = self._tail, np.empty(0, dtype=TOKEN_DTYPE)
        if not self.pad_last:
            return np.empty((0, self.seq_len + 1), dtype=TOKEN_DTYPE)
        return pad_tail(tail, self.seq_len, self.pad_id)


def pack_batches(
    batches: Iterable[Sequence[Sequence[int]]],
    seq_len: int,
    eot_id: int,
    pad_id: int,
    *,
    pad_last: bool = True,
) -> Iterable[np.ndarray]:
    """Rows from batches of tokenized documents, with tails carried across batches."""
    packer = StreamPacker(seq_len, eot_id, pad_id, pad_last=pad_last)
    for batch in batches:
        rows = packer.add(batch)
        if rows.shape[0]:
            yield rows
    last = packer.finish()
    if last.shape[0]:
        yield last


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
