"""Random access to a committed token-sequence dataset (a token cache bucket) for the sampler.

Two ways to read, both limited to the shards the manifest lists:

- ``"shard"`` (default): whole shards, checksum-verified by the store, decoded to an int32
  array and kept in an LRU of ``max_cached`` shards. Right for tiny and local runs, and for
  any source whose shards fit in memory.
- ``"row_group"``: one Parquet row group (``CacheSpec.row_group_rows`` sequences) per miss
  through the store's Arrow filesystem (a range read on S3), kept in an LRU of ``max_cached``
  row groups. At scale a rank reads only a few sequences per step from anywhere in a source
  of hundreds of millions; a whole-shard read per sequence would be wasteful. Checksums
  cover whole objects, so these partial reads rely on Parquet's own page checks and on the
  row counts the manifest records (checked when a shard is first opened).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Generic, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokenmill.store import TOKEN_SEQUENCES, Dataset, IntegrityError, open_dataset
from tokenmill.trainer.data.midtrain import LengthBucket
from tokenmill.trainer.data.packing import TOKEN_DTYPE

Granularity = Literal["shard", "row_group"]
T = TypeVar("T")


class TokenCacheSource:
    """A `SequenceSource` over a committed ``token_sequences`` dataset of rows of ``seq_len + 1``."""

    def __init__(
        self,
        dataset: Dataset | str,
        seq_len: int,
        *,
        granularity: Granularity = "shard",
        max_cached: int = 8,
    ) -> None:
        opened = open_dataset(dataset) if isinstance(dataset, str) else dataset
        self.dataset = opened.expect_schema(TOKEN_SEQUENCES)
        self.seq_len = seq_len
        self.granularity = granularity
        self._shards = [s for s in self.dataset.shards if s.rows > 0]
        self._starts = np.cumsum([0] + [s.rows for s in self._shards], dtype=np.int64)
        self._cache: _Lru[np.ndarray] = _Lru(max_cached)
        self._files: _Lru[pq.ParquetFile] = _Lru(max_cached)
        self._row_groups: dict[int, np.ndarray] = {}

    @property
    def num_sequences(self) -> int:
        return int(self._starts[-1])

    @property
    def unique_tokens(self) -> int | None:
        """Text and EOT tokens the source holds (the manifest's token count)."""
        return self.dataset.manifest.summary.tokens

    def read(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_sequences):
            raise IndexError(f"sequence indices must lie in [0, {self.num_sequences}) in {self.dataset.uri}")
        out = np.empty((indices.size, self.seq_len + 1), dtype=TOKEN_DTYPE)
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        for shard in np.unique(shards):
            mine = np.flatnonzero(shards == shard)
            rows = indices[mine] - self._starts[shard]
            if self.granularity == "shard":
                out[mine] = self._shard_rows(int(shard))[rows]
            else:
                self._read_row_groups(int(shard), rows, mine, out)
        return out

    # -- whole shards ---------------------------------------------------------------------

    def _shard_rows(self, shard: int) -> np.ndarray:
        return self._cache.get(("shard", shard), lambda: self._load_shard(shard))

    def _load_shard(self, shard: int) -> np.ndarray:
        return self._decode(self.dataset.read_shard(self._shards[shard], ["tokens"]), shard)

    # -- row groups -----------------------------------------------------------------------

    def _read_row_groups(self, shard: int, rows: np.ndarray, slots: np.ndarray, out: np.ndarray) -> None:
        starts = self._row_group_starts(shard)
        groups = np.searchsorted(starts, rows, side="right") - 1
        for group in np.unique(groups):
            mine = np.flatnonzero(groups == group)
            key = ("group", shard, int(group))
            block = self._cache.get(key, lambda g=int(group): self._load_group(shard, g))
            out[slots[mine]] = block[rows[mine] - starts[group]]

    def _row_group_starts(self, shard: int) -> np.ndarray:
        if shard not in self._row_groups:
            metadata = self._parquet(shard).metadata
            sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            if sum(sizes) != self._shards[shard].rows:
                raise IntegrityError(
                    f"shard {self._shards[shard].shard!r} of {self.dataset.uri} has {sum(sizes)} rows, "
                    f"its commit says {self._shards[shard].rows}",
                    self.dataset.uri,
                )
            self._row_groups[shard] = np.cumsum([0, *sizes], dtype=np.int64)
        return self._row_groups[shard]

    def _load_group(self, shard: int, group: int) -> np.ndarray:
        return self._decode(self._parquet(shard).read_row_group(group, columns=["tokens"]), shard)

    def _parquet(self, shard: int) -> pq.ParquetFile:
        """The shard's Parquet file, kept open (its footer read once) while recently used."""
        return self._files.get(shard, lambda: self._open(shard))

    def _open(self, shard: int) -> pq.ParquetFile:
        store = self.dataset.store
        handle = store.arrow_filesystem().open_input_file(store.arrow_path(self._shards[shard].path))
        return pq.ParquetFile(handle)

    # -- decoding -------------------------------------------------------------------------

    def _decode(self, table: pa.Table, shard: int) -> np.ndarray:
        column = table.column("tokens")
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if lengths.size and (lengths != self.seq_len + 1).any():
            bad = int(lengths[lengths != self.seq_len + 1][0])
            raise IntegrityError(
                f"shard {self._shards[shard].shard!r} of {self.dataset.uri} holds sequences of {bad} "
                f"tokens; this source expects seq_len + 1 = {self.seq_len + 1}",
                self.dataset.uri,
            )
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        return values.astype(TOKEN_DTYPE, copy=False).reshape(-1, self.seq_len + 1)


def open_token_cache(
    output_uri: str,
    seq_len: int,
    buckets: Sequence[LengthBucket],
    **options: object,
) -> dict[str, TokenCacheSource]:
    """One source per bucket of a cache built by `build_token_cache`, keyed by bucket label."""
    from tokenmill.trainer.data.cache import bucket_uri

    return {
        b.label: TokenCacheSource(bucket_uri(output_uri, b), seq_len, **options)  # type: ignore[arg-type]
        for b in buckets
    }


def cache_sizes(sources: Mapping[str, TokenCacheSource]) -> dict[str, int]:
    """Sequences per bucket label: the sizes `midtrain.plan_for_stage` plans with."""
    return {label: source.num_sequences for label, source in sources.items()}


class _Lru(Generic[T]):
    """A tiny least-recently-used cache of computed values."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[Hashable, T] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value
