"""Encoding a table into one Parquet shard and decoding it back with its checksum verified."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

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
    data: pa.Buffer
    rows: int
    sha256: str
    tokens: int | None


def encode_shard(
    table: pa.Table, options: ParquetOptions, tokens: int | None = None,
    schema: DatasetSchema | None = None,
) -> EncodedShard:
    """`table` as Parquet bytes with their sha256 and, where the schema knows, token count."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        table, sink, compression=options.compression,
        compression_level=options.compression_level, row_group_size=options.row_group_rows,
    )
    data = sink.getvalue()
    if tokens is None and schema is not None:
        tokens = count_tokens(table, schema)
    return EncodedShard(data=data, rows=table.num_rows, sha256=sha256_hex(data), tokens=tokens)


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

    The hash runs in a second thread while Parquet decodes (hashlib releases the GIL), so
    verification costs little wall time; the table is only returned once both agree.
    """
    if len(data) != info.bytes:
        raise ChecksumMismatchError(
            f"shard {info.shard!r} at {uri} has {len(data)} bytes, its commit says {info.bytes}",
            uri,
        )
    digest: list[str] = []
    hasher = None
    if len(data) >= _PARALLEL_HASH_BYTES:
        hasher = threading.Thread(target=lambda: digest.append(sha256_hex(data)), daemon=True)
        hasher.start()
    else:
        digest.append(sha256_hex(data))
    try:
        table = pq.read_table(pa.BufferReader(data), columns=None if columns is None else list(columns))
        error: Exception | None = None
    except (pa.ArrowException, OSError) as exc:
        table, error = None, exc
    if hasher is not None:
        hasher.join()
    if digest[0] != info.sha256:
        raise ChecksumMismatchError(
            f"shard {info.shard!r} at {uri} is corrupt: sha256 {digest[0][:16]}… "
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
