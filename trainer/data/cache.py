"""The token shard cache: a document dataset tokenized and packed into token-sequence datasets.

Input: a committed dataset of schema ``documents`` (``text`` is tokenized) or ``token_sequences``
(already tokenized, one document per row).

Layout: ``<output>/<bucket label>/`` is one dataset of schema ``token_sequences/1`` per length
bucket (``len-0-up`` when documents are not bucketed; see `midtrain`). Its shard ``part-N``
holds the packed rows of the input's shard ``part-N``: one row per sequence, ``tokens`` of
``seq_len + 1`` ids (see `packing`), ``id`` ``<input shard>:<row>``, ``source`` the dataset's
name. A shard's manifest ``tokens`` is the number of text and end-of-text tokens it holds (each
row-overlap token once, padding excluded), so the manifest's summary is the source's unique
token count; its ``rows`` the number of sequences the sampler draws from.

Packing runs per input shard (documents never cross shards; a shard's last row is padded).
Empty documents are skipped. Documents shorter than the lowest bucket's ``min_tokens`` (a
length filter, e.g. midtraining's) land in no bucket; when the cache filters, each input
shard's filtered documents and tokens are recorded in ``_filtered/<shard>.json`` (with the
cache key) before its rows are committed, and `filtered_counts` sums them. Input shards are tokenized in parallel, one Ray task (one CPU, no
GPU) per shard. The writers' producer is the cache's content key (input shards' checksums,
tokenizer, seq_len, buckets), so a rerun or retry skips every committed shard, while a cache
built from other data or settings is discarded and rebuilt rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenmill.store import (
    DOCUMENTS,
    TOKEN_SEQUENCES,
    Dataset,
    DatasetSchema,
    DatasetWriter,
    Manifest,
    ParquetOptions,
    Producer,
    SchemaValidationError,
    ShardInfo,
    join_uri,
    open_dataset,
    open_store,
)
from tokenmill.trainer.data.midtrain import ALL_LENGTHS, LengthBucket
from tokenmill.trainer.data.packing import (
    TOKEN_DTYPE,
    StreamPacker,
    join_documents,
    real_token_count,
)
from tokenmill.trainer.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger("tokenmill.trainer.data")

CACHE_FORMAT = 1
PRODUCER_KIND = "TokenCache"
INPUT_SCHEMAS = (DOCUMENTS.name, TOKEN_SEQUENCES.name)
_TOKENS_TYPE = TOKEN_SEQUENCES.arrow.field("tokens").type


@dataclass(frozen=True)
class CacheSpec:
    """What a token cache is built with."""

    tokenizer: str
    seq_len: int
    buckets: tuple[LengthBucket, ...] = (ALL_LENGTHS,)
    documents_per_batch: int = 512
    """Documents tokenized at once (bounds a task's memory; rows are the same for any value)."""
    row_group_rows: int = 64
    """Parquet row-group size: the unit of random access for `TokenCacheSource`."""
    name: str = field(default="", compare=False)
    """Dataset name written to the ``source`` column and the producer."""

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {self.seq_len}")
        labels = [bucket.label for bucket in self.buckets]
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"buckets must be non-empty and distinct, got {labels}")
        ordered = sorted(self.buckets, key=lambda b: b.min_tokens)
        for lower, upper in zip(ordered, ordered[1:]):
            if lower.max_tokens is None or lower.max_tokens > upper.min_tokens:
                raise ValueError(f"length buckets overlap: {lower.label} and {upper.label}")


@dataclass(frozen=True)
class PackedShard:
    """One bucket's rows from one input shard."""

    rows: np.ndarray
    tokens: int


@dataclass(frozen=True)
class FilteredCounts:
    """Documents a length filter left out, and their tokens (each with its end-of-text)."""

    documents: int = 0
    tokens: int = 0

    def __add__(self, other: FilteredCounts) -> FilteredCounts:
        return FilteredCounts(self.documents + other.documents, self.tokens + other.tokens)


FILTERED_PREFIX = "_filtered"


def cache_key(manifest: Manifest, spec: CacheSpec) -> str:
    """A content key: the same input shards and settings give the same cache."""
    key = {
        "format": CACHE_FORMAT,
        "schema": manifest.schema_ref,
        "input": [[s.shard, s.sha256] for s in manifest.shards],
        "tokenizer": spec.tokenizer,
        "seq_len": spec.seq_len,
        "buckets": [[b.min_tokens, b.max_tokens] for b in spec.buckets],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def bucket_uri(output: str, bucket: LengthBucket) -> str:
    return join_uri(output, bucket.label)


def pack_token_batches(
    batches: Iterable[tuple[np.ndarray, np.ndarray]], eot_id: int, pad_id: int, spec: CacheSpec
) -> dict[str, PackedShard]:
    """Pack batches of documents, given as ``(flat tokens, lengths)``, into one stream per length bucket.

    A document's length is its token count without EOT; empty documents and documents in no
    bucket are dropped.
    """
    return pack_and_count(batches, eot_id, pad_id, spec)[0]


def pack_and_count(
    batches: Iterable[tuple[np.ndarray, np.ndarray]], eot_id: int, pad_id: int, spec: CacheSpec
) -> tuple[dict[str, PackedShard], FilteredCounts]:
    """`pack_token_batches`, and the non-empty documents that fell in no bucket."""
    packers = {b.label: StreamPacker(spec.seq_len, eot_id, pad_id) for b in spec.buckets}
    parts: dict[str, list[np.ndarray]] = {label: [] for label in packers}
    edges = _bucket_edges(spec.buckets)
    filtered = FilteredCounts()
    for flat, lengths in batches:
        which = _bucket_index(lengths, edges)
        which[lengths == 0] = -1
        dropped = (which == -1) & (lengths > 0)
        filtered += FilteredCounts(int(dropped.sum()), int(lengths[dropped].sum() + dropped.sum()))
        for index, bucket in enumerate(spec.buckets):
            chosen = which == index
            if chosen.any():
                tokens, kept = _select_documents(flat, lengths, chosen)
                parts[bucket.label].append(packers[bucket.label].add_stream(join_documents(tokens, kept, eot_id)))
    packed = {}
    for label, packer in packers.items():
        parts[label].append(packer.finish())
        rows = np.concatenate(parts[label])
        packed[label] = PackedShard(rows, real_token_count(rows, pad_id))
    return packed, filtered


def text_batches(texts: Iterable[Sequence[str]], tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Tokenized batches of texts as ``(flat tokens, lengths)`` (one thread: a Ray task has one CPU)."""
    for batch in texts:
        yield tokenizer.encode_flat(batch)


def token_batches(table: pa.Table, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of a ``tokens`` list column (one document per row) as ``(flat tokens, lengths)``."""
    for batch in table.to_batches(max_chunksize=batch_rows):
        column = batch.column(0)
        lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(TOKEN_DTYPE, copy=False)
        yield flat, lengths


def rows_table(rows: np.ndarray, shard: str, source: str) -> pa.Table:
    """Rows as a ``token_sequences`` table (ids ``<shard>:<row>``)."""
    width = rows.shape[1]
    offsets = pa.array(np.arange(rows.shape[0] + 1, dtype=np.int32) * width, type=pa.int32())
    values = pa.array(rows.reshape(-1).astype(np.int32, copy=False), type=pa.int32())
    tokens = pa.ListArray.from_arrays(offsets, values, type=_TOKENS_TYPE)
    ids = pa.array([f"{shard}:{i}" for i in range(rows.shape[0])], type=pa.string())
    sources = pa.array([source] * rows.shape[0], type=pa.string())
    return pa.table({"id": ids, "tokens": tokens, "source": sources})


def cache_shard(
    documents_uri: str,
    schema: DatasetSchema,
    shard: Mapping[str, Any],
    spec: CacheSpec,
    writers: Mapping[str, DatasetWriter],
    filtered_uri: str | None = None,
    key: str = "",
) -> dict[str, int]:
    """Tokenize, pack and commit one input shard into every bucket; returns rows per bucket.

    With ``filtered_uri`` the documents the length filter left out are recorded there first.
    """
    info = ShardInfo.from_dict(shard, documents_uri)
    tokenizer = get_tokenizer(spec.tokenizer)
    dataset = Dataset(open_store(documents_uri), Manifest(schema.name, schema.version, (info,)))
    if schema.name == DOCUMENTS.name:
        table = dataset.read_shard(info, columns=["text"])
        texts = (b.column(0).to_pylist() for b in table.to_batches(max_chunksize=spec.documents_per_batch))
        batches = text_batches(texts, tokenizer)
    else:
        batches = token_batches(dataset.read_shard(info, columns=["tokens"]), spec.documents_per_batch)
    packed, filtered = pack_and_count(batches, tokenizer.eot_id, tokenizer.pad_id, spec)
    if filtered_uri is not None:
        record = {"key": key, "documents": filtered.documents, "tokens": filtered.tokens}
        open_store(filtered_uri).write_json(f"{info.shard}.json", record)
    for label, result in packed.items():
        table = rows_table(result.rows, info.shard, spec.name)
        writers[label].write_shard(info.shard, table, tokens=result.tokens)
    return {label: int(result.rows.shape[0]) for label, result in packed.items()}


def build_token_cache(
    documents_uri: str,
    output_uri: str,
    spec: CacheSpec,
    *,
    use_ray: bool = True,
    max_in_flight: int | None = None,
) -> dict[str, Manifest]:
    """Build (or finish) the cache of a committed document dataset; returns each bucket's manifest.

    Committed shards are skipped, so calling it again after a crash does only the rest.
    """
    documents = open_dataset(documents_uri)
    schema = documents.schema
    if schema.name not in INPUT_SCHEMAS:
        raise SchemaValidationError(
            f"{documents.uri} holds {schema.ref}; a token cache reads {' or '.join(INPUT_SCHEMAS)}", documents.uri
        )
    key = cache_key(documents.manifest, spec)
    producer = Producer(kind=PRODUCER_KIND, name=spec.name, uid=key)
    filtered_uri = join_uri(output_uri, FILTERED_PREFIX) if filters(spec) else None
    options = ParquetOptions(row_group_rows=spec.row_group_rows)
    writers = {
        b.label: DatasetWriter(bucket_uri(output_uri, b), TOKEN_SEQUENCES, producer=producer, options=options)
        for b in spec.buckets
    }
    done = [set(writer.resume()) for writer in writers.values()]
    todo = [s for s in documents.shards if not all(s.shard in committed for committed in done)]
    log.info("token cache %s: %d of %d shards to do", output_uri, len(todo), len(documents.shards))
    args = [(documents.uri, schema, s.to_dict(), spec, writers, filtered_uri, key) for s in todo]
    if use_ray:
        _run_on_ray(args, max_in_flight)
    else:
        for arg in args:
            cache_shard(*arg)
    expected = [s.shard for s in documents.shards]
    return {label: writer.finalize(expected=expected) for label, writer in writers.items()}


def filters(spec: CacheSpec) -> bool:
    """Whether the cache leaves out short documents (its lowest bucket starts above 0)."""
    return min(bucket.min_tokens for bucket in spec.buckets) > 0


def filtered_counts(documents_uri: str, output_uri: str, spec: CacheSpec) -> FilteredCounts | None:
    """What the length filter left out of a built cache (None when the cache does not filter)."""
    if not filters(spec):
        return None
    manifest = open_dataset(documents_uri).manifest
    key = cache_key(manifest, spec)
    store = open_store(join_uri(output_uri, FILTERED_PREFIX))
    total = FilteredCounts()
    for shard in manifest.shards:
        record = store.read_json(f"{shard.shard}.json")
        if record.get("key") != key:
            raise SchemaValidationError(
                f"the length-filter record of shard {shard.shard!r} in {store.uri} belongs to another cache",
                store.uri,
            )
        total += FilteredCounts(int(record["documents"]), int(record["tokens"]))
    return total


def _run_on_ray(args: list[tuple[Any, ...]], max_in_flight: int | None) -> None:
    import ray

    if not args:
        return
    if not ray.is_initialized():
        ray.init()
    remote = ray.remote(num_cpus=1, num_gpus=0)(cache_shard)
    limit = max_in_flight or max(1, 2 * int(ray.available_resources().get("CPU", 1)))
    pending: list[Any] = []
    for arg in args:
        if len(pending) >= limit:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
        pending.append(remote.remote(*arg))
    ray.get(pending)


def _select_documents(flat: np.ndarray, lengths: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tokens and lengths of the chosen documents, in order."""
    if chosen.all():
        return flat, lengths
    owner = np.repeat(np.arange(lengths.size), lengths)
    return flat[chosen[owner]], lengths[chosen]


def _bucket_edges(buckets: Sequence[LengthBucket]) -> list[tuple[int, int | None]]:
    return [(b.min_tokens, b.max_tokens) for b in buckets]


def _bucket_index(lengths: np.ndarray, edges: Sequence[tuple[int, int | None]]) -> np.ndarray:
    """The bucket of each length, or -1 when none holds it."""
    which = np.full(lengths.shape, -1, dtype=np.int64)
    for index, (lower, upper) in enumerate(edges):
        inside = lengths >= lower
        if upper is not None:
            inside &= lengths < upper
        which[inside] = index
    return which
