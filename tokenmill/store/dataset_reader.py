"""Reading a committed dataset: only the shards its manifest lists, each checksum verified."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

import pyarrow as pa

from tokenmill.layout import MANIFEST_NAME
from tokenmill.store.backends.base import Store
from tokenmill.store.errors import (
    ManifestNotFoundError,
    MissingShardError,
    ObjectNotFoundError,
    SchemaValidationError,
)
from tokenmill.store.manifest import Manifest, ShardInfo, parse_json
from tokenmill.store.opener import open_store
from tokenmill.store.retry import RetryPolicy
from tokenmill.store.schemas import DatasetSchema, get_schema
from tokenmill.store.shards import decode_shard
from tokenmill.store.uri import StoreURI

if TYPE_CHECKING:
    import ray.data


def read_manifest(uri: str | StoreURI | Store, *, retry: RetryPolicy | None = None) -> Manifest:
    """The committed manifest of the dataset at `uri`; ManifestNotFoundError if none yet.

    `read_manifest(uri).summary.as_dict()` is what the operator shows in status.outputs.
    """
    store = open_store(uri, retry=retry)
    try:
        data = store.read_bytes(MANIFEST_NAME)
    except ObjectNotFoundError as exc:
        raise ManifestNotFoundError(
            f"{store.uri} has no committed dataset ({MANIFEST_NAME} is missing)", store.uri
        ) from exc
    return Manifest.from_dict(parse_json(data, store.uri_of(MANIFEST_NAME)), store.uri)


def open_dataset(uri: str | StoreURI | Store, *, retry: RetryPolicy | None = None) -> Dataset:
    """The committed dataset at `uri`, as of its manifest now."""
    store = open_store(uri, retry=retry)
    return Dataset(store, read_manifest(store))


class Dataset:
    """A committed dataset. Every read is checked against the manifest's size and sha256."""

    def __init__(self, store: Store, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest

    def __repr__(self) -> str:
        summary = self.manifest.summary
        return (
            f"Dataset({self.uri!r}, {self.manifest.schema_ref}, "
            f"{summary.shards} shards, {summary.rows} rows)"
        )

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return self.manifest.shards

    @property
    def schema(self) -> DatasetSchema:
        """The registered schema the manifest names; SchemaValidationError if unknown here."""
        return get_schema(self.manifest.schema_name, self.manifest.schema_version)

    def expect_schema(self, schema: DatasetSchema) -> Dataset:
        """Self, after checking the dataset follows `schema` (name and version)."""
        if self.manifest.schema_ref != schema.ref:
            raise SchemaValidationError(
                f"{self.uri} holds {self.manifest.schema_ref}, expected {schema.ref}", self.uri
            )
        return self

    def read_shard(
        self, shard: ShardInfo | int | str, columns: Sequence[str] | None = None
    ) -> pa.Table:
        info = shard if isinstance(shard, ShardInfo) else self.manifest.shard(shard)
        return read_verified_shard(self.store, info, columns)

    def iter_tables(
        self, columns: Sequence[str] | None = None, *, prefetch: int = 1
    ) -> Iterator[pa.Table]:
        """One verified table per shard, in manifest order, reading `prefetch` shards ahead."""
        if prefetch <= 0 or len(self.shards) <= 1:
            for info in self.shards:
                yield self.read_shard(info, columns)
            return
        with ThreadPoolExecutor(max_workers=prefetch) as pool:
            pending = [
                pool.submit(self.read_shard, info, columns) for info in self.shards[:prefetch]
            ]
            for index in range(len(self.shards)):
                table = pending.pop(0).result()
                upcoming = index + prefetch
                if upcoming < len(self.shards):
                    pending.append(pool.submit(self.read_shard, self.shards[upcoming], columns))
                yield table

    def iter_batches(
        self, batch_size: int = 8192, columns: Sequence[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        for table in self.iter_tables(columns):
            yield from table.to_batches(max_chunksize=batch_size)

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        tables = list(self.iter_tables(columns))
        if tables:
            return pa.concat_tables(tables)
        empty = self.schema.with_metadata().empty_table()
        return empty if columns is None else empty.select(list(columns))

    def verify(self) -> None:
        """Read every shard and check it; raises the first IntegrityError found."""
        for shard in self.manifest.shards:
            self.read_shard(shard.shard, columns=[])

    def to_ray(self, columns: Sequence[str] | None = None) -> ray.data.Dataset:
        """A Ray Data dataset of the committed shards, one read task per shard, verified."""
        import ray.data

        items = [{"store": self.uri, "shard": json.dumps(s.to_dict())} for s in self.shards]
        if not items:
            return ray.data.from_arrow(self.read_all(columns))
        load = partial(_load_shards, columns=None if columns is None else list(columns))
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            load, batch_size=1, batch_format="pyarrow"
        )


def read_verified_shard(
    store: Store, info: ShardInfo, columns: Sequence[str] | None = None
) -> pa.Table:
    """One shard of the dataset at `store`, checked against its size and sha256."""
    uri = store.uri_of(info.path)
    try:
        data = store.read_bulk(info.path)
    except ObjectNotFoundError as exc:
        raise MissingShardError(
            f"shard {info.shard!r} of {store.uri} is committed but {uri} is missing", uri
        ) from exc
    return decode_shard(data, info, uri, columns)


def _load_shards(batch: pa.Table, columns: list[str] | None) -> pa.Table:
    """Ray Data UDF: the rows of the shards described in `batch` (store URI + shard JSON)."""
    tables = []
    for row in batch.to_pylist():
        info = ShardInfo.from_dict(json.loads(row["shard"]), row["store"])
        tables.append(read_verified_shard(open_store(row["store"]), info, columns))
    return pa.concat_tables(tables)
