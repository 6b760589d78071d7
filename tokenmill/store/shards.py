"""Encoding a table as a Parquet shard (hashed as it is written) and decoding it back with
its checksum verified."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokenmill.store.errors import ChecksumMismatchError, IntegrityError
from tokenmill.store.manifest import ShardInfo
from tokenmill.store.schemas import DatasetSchema

# Below this size hashing in a second thread costs more than it saves.
_PARALLEL_HASH_BYTES = 1 << 20


@dataclass(frozen=True)
class ParquetOptions:
    """How shards are encoded; the defaults are what every tokenmill dataset uses."""

    compression: str = "zstd"
    compression_level: int | None = None
    row_group_rows: int | None = None


@dataclass(frozen=True)
class EncodedShard:
    """What writing a shard produced: its size and sha256."""

    bytes: int
    sha256: str


class HashingSink:
    """A file-like sink for pq.write_table that passes bytes on to `target` and hashes them.
    The first `_PARALLEL_HASH_BYTES` are hashed as they come; past that a second thread
    hashes the rest, so the hash of a large shard overlaps the encoding instead of adding to
    it, and a small shard costs no thread."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self._size = 0
        self._hash = hashlib.sha256()
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        chunk = bytes(data)  # the Parquet writer reuses its buffer once we return
        self._target.write(chunk)
        if self._thread is None and self._size + len(chunk) < _PARALLEL_HASH_BYTES:
            self._hash.update(chunk)
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, daemon=True)
                self._thread.start()
            self._queue.put(chunk)
        self._size += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        self._target.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Stop the hashing thread, if one started (the target stays open: its owner closes it)."""
        if not self.closed:
            self.closed = True
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()

    def result(self) -> EncodedShard:
        self.close()
        return EncodedShard(bytes=self._size, sha256=self._hash.hexdigest())

    def _drain(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._hash.update(chunk)


def write_parquet(table: pa.Table, target: BinaryIO, options: ParquetOptions) -> EncodedShard:
    """Encode `table` as Parquet into `target`; returns the size and sha256 of the bytes."""
    sink = HashingSink(target)
    try:
        pq.write_table(
            table,
            sink,
            compression=options.compression,
            compression_level=options.compression_level,
            row_group_size=options.row_group_rows,
        )
    finally:
        sink.close()
    return sink.result()


class Sha256Job:
    """The sha256 of a buffer, computed in a second thread (hashlib releases the GIL) so that
    it overlaps the upload or the Parquet decoding the caller does meanwhile."""

    def __init__(self, data: bytes | pa.Buffer | memoryview) -> None:
        self._digest: list[str] = []
        self._thread: threading.Thread | None = None
        if memoryview(data).nbytes < _PARALLEL_HASH_BYTES:
            self._digest.append(sha256_hex(data))
        else:
            self._thread = threading.Thread(
                target=lambda: self._digest.append(sha256_hex(data)), daemon=True
            )
            self._thread.start()

    def result(self) -> str:
        if self._thread is not None:
            self._thread.join()
        return self._digest[0]


def count_tokens(table: pa.Table, schema: DatasetSchema) -> int | None:
    """The number of token ids in the schema's token column, or None if it has none."""
    if schema.token_column is None or schema.token_column not in table.column_names:
        return None
    lengths = pc.list_value_length(table.column(schema.token_column))
    return int(pc.sum(lengths).as_py() or 0)


def sha256_hex(data: bytes | pa.Buffer | memoryview) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()


def decode_shard(
    data: bytes, info: ShardInfo, uri: str, columns: Sequence[str] | None = None
) -> pa.Table:
    """Parse a shard's bytes, raising ChecksumMismatchError unless they are the committed ones.

    The hash runs while Parquet decodes; the table is only returned once both agree.
    """
    if len(data) != info.bytes:
        raise ChecksumMismatchError(
            f"shard {info.shard!r} at {uri} has {len(data)} bytes, its commit says {info.bytes}",
            uri,
        )
    digest = Sha256Job(data)
    try:
        table = pq.read_table(
            pa.BufferReader(data), columns=None if columns is None else list(columns)
        )
        error: Exception | None = None
    except (pa.ArrowException, OSError) as exc:
        table, error = None, exc
    if digest.result() != info.sha256:
        raise ChecksumMismatchError(
            f"shard {info.shard!r} at {uri} is corrupt: sha256 {digest.result()[:16]}… "
            f"differs from the committed {info.sha256[:16]}…",
            uri,
        )
    if error is not None or table is None:
        raise IntegrityError(f"shard {info.shard!r} at {uri} cannot be parsed: {error}", uri)
    if table.num_rows != info.rows:
        raise IntegrityError(
            f"shard {info.shard!r} at {uri} has {table.num_rows} rows, its commit says {info.rows}",
            uri,
        )
    return table
