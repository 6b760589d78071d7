"""Writing a dataset: shards committed one by one, the manifest merged and written last.

Protocol (every step is a single idempotent PUT or DELETE, so each is safely retried):

1. stage:    the shard's Parquet bytes go to `<shard>.<random>.parquet`, a key unique to
             this write. Nothing refers to it yet, so a crash here leaves nothing visible.
2. commit:   `_commits/<shard>.json` records path, rows, bytes, sha256 and tokens. Each
             worker writes only its own record: concurrent writers cannot lose an update.
             A record names the shard as done for a resumed writer, not yet for readers.
3. finalize: one committer merges the records into `_manifest.json`, written last. Only
             now do readers see the shards. Data files no record refers to (crashed or
             superseded writes) are deleted afterwards.

Typical use in a workload (any number of Ray workers call write_shard; the driver finalizes):

    writer = DatasetWriter(uri, DOCUMENTS, producer=producer)
    done = writer.resume()                  # discards other runs' shards, returns ours
    for n in my_share_of_the_work:
        if shard_name(n) not in done:
            writer.write_shard(n, compute(n))
    manifest = writer.finalize(expected=range(total))   # on the driver, after all workers
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from tokenmill.layout import MANIFEST_NAME
from tokenmill.store.backends.base import ObjectInfo, Store
from tokenmill.store.errors import (
    DatasetConflictError,
    IncompleteDatasetError,
    ManifestError,
    ObjectNotFoundError,
)
from tokenmill.store.manifest import (
    COMMITS_DIR,
    CommitRecord,
    Manifest,
    Producer,
    ShardInfo,
    check_stats,
    commit_record_key,
    parse_json,
    shard_name,
    utc_now,
)
from tokenmill.store.opener import open_store
from tokenmill.store.retry import RetryPolicy
from tokenmill.store.runrecord import AttemptFence
from tokenmill.store.schemas import DatasetSchema, TableLike, validate_table
from tokenmill.store.shards import EncodedShard, ParquetOptions, count_tokens, write_parquet
from tokenmill.store.uri import StoreURI

log = logging.getLogger("tokenmill.store")
_READ_CONCURRENCY = 16


@dataclass(frozen=True)
class StagedShard:
    """A shard whose bytes are stored but not yet committed."""

    shard: str
    path: str
    rows: int
    bytes: int
    sha256: str
    tokens: int | None


class DatasetWriter:
    """Writes shards of one dataset; safe to use from many processes at once.

    A writer is picklable (it carries URIs, not clients), so it can be handed to Ray tasks.
    """

    def __init__(
        self,
        uri: str | StoreURI | Store,
        schema: DatasetSchema,
        *,
        producer: Producer | None = None,
        options: ParquetOptions | None = None,
        retry: RetryPolicy | None = None,
        fence: AttemptFence | None = None,
    ) -> None:
        self.store = open_store(uri, retry=retry)
        self.schema = schema
        self.producer = producer
        self.options = options or ParquetOptions()
        self.fence = fence
        """Checked before every deletion of others' files and before the manifest."""

    @property
    def uri(self) -> str:
        return self.store.uri

    # -- writing -------------------------------------------------------------------------

    def stage(self, shard: int | str, data: TableLike, *, tokens: int | None = None) -> StagedShard:
        """Validate and store a shard's bytes under a key unique to this write."""
        name = shard_name(shard)
        table = validate_table(data, self.schema)
        path = f"{name}.{secrets.token_hex(6)}.parquet"
        written: list[EncodedShard] = []

        def produce(stream: BinaryIO) -> None:
            written[:] = [write_parquet(table, stream, self.options)]

        self.store.write_stream(path, produce)
        if tokens is None:
            tokens = count_tokens(table, self.schema)
        return StagedShard(
            shard=name,
            path=path,
            rows=table.num_rows,
            bytes=written[0].bytes,
            sha256=written[0].sha256,
            tokens=tokens,
        )

    def commit(self, staged: StagedShard) -> ShardInfo:
        """Record a staged shard as done: one PUT of this shard's own commit record."""
        if self.fence is not None:
            self.fence.check(f"commit shard {staged.shard} of {self.uri}")
        info = ShardInfo(
            shard=staged.shard,
            path=staged.path,
            rows=staged.rows,
            bytes=staged.bytes,
            sha256=staged.sha256,
            tokens=staged.tokens,
            attempt=self.producer.attempt if self.producer else 0,
            written_at=utc_now(),
        )
        record = CommitRecord(info, self.schema.name, self.schema.version, self.producer)
        self.store.write_json(commit_record_key(info.shard), record.to_dict())
        return info

    def write_shard(
        self, shard: int | str, data: TableLike, *, tokens: int | None = None
    ) -> ShardInfo:
        """Stage and commit one shard. Writing a committed shard again replaces it."""
        if self.fence is not None:  # before the upload too, so a stale attempt leaves no file behind
            self.fence.check(f"commit shard {shard_name(shard)} of {self.uri}")
        return self.commit(self.stage(shard, data, tokens=tokens))

    # -- resuming ------------------------------------------------------------------------

    def committed(self) -> dict[str, ShardInfo]:
        """The shards this run (same producer uid and generation, same schema) committed."""
        return {r.shard.shard: r.shard for r in self._records() if self._ours(r)}

    def is_committed(self, shard: int | str) -> bool:
        try:
            record = self._record(commit_record_key(shard_name(shard)))
        except ObjectNotFoundError:
            return False
        return self._ours(record)

    def resume(self) -> dict[str, ShardInfo]:
        """Discard what other runs left here, then return the intact shards this run committed.

        Another run is another producer uid or generation, or another schema: its shards
        are stale (the resource changed), so its manifest, records and data are deleted.
        A record of ours whose data file is gone or has the wrong size (lost to a crash or
        a hand) is dropped too, so that shard is written again.
        """
        listing = self.store.list("")
        sizes = {o.key: o.size for o in listing}
        records = self._records(listing)
        stale = [r for r in records if not self._ours(r)]
        broken = [r for r in records if self._ours(r) and sizes.get(r.shard.path) != r.shard.bytes]
        if (stale or broken) and self.fence is not None:
            self.fence.check(f"discard files under {self.uri}")
        if stale and self._manifest_is_stale():
            self.store.delete(MANIFEST_NAME)
        for record in stale + broken:
            self.store.delete(commit_record_key(record.shard.shard))
            self.store.delete(record.shard.path)
        if stale or broken:
            log.warning(
                "%s: discarded %d stale shards and %d with lost data",
                self.uri,
                len(stale),
                len(broken),
            )
        return {r.shard.shard: r.shard for r in records if self._ours(r) and r not in broken}

    def reset(self) -> None:
        """Delete the whole dataset: manifest first, so no reader sees a half-deleted one."""
        if self.fence is not None:
            self.fence.check(f"delete the dataset {self.uri}")
        self.store.delete(MANIFEST_NAME)
        self.store.delete_prefix("")

    # -- committing ----------------------------------------------------------------------

    def finalize(self, *, expected: Iterable[int | str] | None = None,
                 stats: Mapping[str, Any] | None = None) -> Manifest:
        """Merge every commit record into `_manifest.json`; call once all writers are done.

        `expected` names the shards that must be there; if any lacks a commit record,
        IncompleteDatasetError is raised and no manifest is written. Records of another
        run raise DatasetConflictError (call resume() first). `stats`, the workload's own
        statistics (a small JSON object, see `Manifest.stats`), is recorded in the manifest;
        ValueError, before anything is read or written, if it is not one. Idempotent.
        """
        checked_stats = check_stats(stats) if stats is not None else None
        listing = self.store.list("")
        records = self._records(listing)
        foreign = [r for r in records if not self._ours(r)]
        if foreign:
            first = foreign[0]
            raise DatasetConflictError(
                f"{self.uri}: shard {first.shard.shard!r} (and {len(foreign) - 1} more) was "
                f"committed by {_describe(first.producer)} with schema "
                f"{first.schema_name}/{first.schema_version}; this writer is "
                f"{_describe(self.producer)} with {self.schema.ref}; call resume() to discard them",
                self.uri,
            )
        shards = tuple(sorted((r.shard for r in records), key=lambda s: s.shard))
        if expected is not None:
            present = {s.shard for s in shards}
            missing = sorted({shard_name(e) for e in expected} - present)
            if missing:
                shown = ", ".join(missing[:10]) + (" …" if len(missing) > 10 else "")
                raise IncompleteDatasetError(
                    f"{self.uri}: {len(missing)} expected shards are not committed: {shown}",
                    self.uri,
                )
        if self.fence is not None:
            self.fence.check(f"commit the manifest of {self.uri}")
        manifest = Manifest(
            schema_name=self.schema.name,
            schema_version=self.schema.version,
            shards=shards,
            producer=self.producer,
            created_at=min((s.written_at for s in shards), default=utc_now()),
            committed_at=utc_now(),
            uri=self.uri,
            stats=checked_stats,
        )
        self.store.write_json(MANIFEST_NAME, manifest.to_dict())
        if self.fence is not None:
            self.fence.check(f"delete unreferenced files under {self.uri}")
        self._delete_unreferenced(listing, {s.path for s in shards})
        return manifest

    # -- internals -----------------------------------------------------------------------

    def _ours(self, record: CommitRecord) -> bool:
        if (record.schema_name, record.schema_version) != (self.schema.name, self.schema.version):
            return False
        if self.producer is None or record.producer is None:
            return self.producer is None and record.producer is None
        return record.producer.same_run(self.producer)

    def _records(self, listing: list[ObjectInfo] | None = None) -> list[CommitRecord]:
        """Every commit record, from `listing` (of the whole dataset) or a fresh listing."""
        if listing is None:
            listing = self.store.list(COMMITS_DIR)
        prefix = f"{COMMITS_DIR}/"
        keys = [o.key for o in listing if o.key.startswith(prefix) and o.key.endswith(".json")]
        if len(keys) <= 1:
            return [self._record(k) for k in keys]
        with ThreadPoolExecutor(max_workers=min(_READ_CONCURRENCY, len(keys))) as pool:
            return list(pool.map(self._record, keys))

    def _record(self, key: str) -> CommitRecord:
        where = self.store.uri_of(key)
        return CommitRecord.from_dict(parse_json(self.store.read_bytes(key), where), where)

    def _manifest_is_stale(self) -> bool:
        try:
            raw = self.store.read_bytes(MANIFEST_NAME)
            manifest = Manifest.from_dict(parse_json(raw, self.uri), self.uri)
        except ObjectNotFoundError:
            return False
        except ManifestError:
            return True
        same_schema = (manifest.schema_name, manifest.schema_version) == (
            self.schema.name,
            self.schema.version,
        )
        if self.producer is None or manifest.producer is None:
            return not (same_schema and self.producer is None and manifest.producer is None)
        return not (same_schema and manifest.producer.same_run(self.producer))

    def _delete_unreferenced(self, listing: list[ObjectInfo], referenced: set[str]) -> None:
        """Delete the data files in `listing` (taken before the manifest was written, so a
        file staged since is spared) that no committed shard refers to."""
        for info in listing:
            if "/" not in info.key and info.key.endswith(".parquet") and info.key not in referenced:
                self.store.delete(info.key)


def _describe(producer: Producer | None) -> str:
    if producer is None:
        return "no producer"
    name = f"{producer.kind or '?'}/{producer.name or '?'}"
    return f"{name} uid {producer.uid!r} generation {producer.generation}"
