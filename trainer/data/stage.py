"""A training stage's data: committed datasets to the sampler's sources, through the token cache.

Each dataset is cached under the stage's output at
``<output>/tokens/<dataset name>/<tokenizer>-L<seq_len>/<bucket label>/`` (see `cache`). The
driver builds every cache once, in parallel on Ray and resumed after a failure
(`build_stage_caches`); each training worker then opens the committed caches
(`open_stage_sources`), which checks that every bucket was built from the dataset's current
shards with the stage's tokenizer, length and buckets. The result is what
`midtrain.plan_for_stage` and `loader.MicroBatchIterator` take: sources keyed by sampler source
name, and each dataset's sequence count (per bucket label for bucketed data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tokenmill.layout import token_cache_uri
from tokenmill.store import ManifestNotFoundError, StoreError, open_dataset
from tokenmill.trainer.data.cache import CacheSpec, bucket_uri, build_token_cache, cache_key, filtered_counts
from tokenmill.trainer.data.midtrain import ALL_LENGTHS, LengthBucket, bucket_source_name
from tokenmill.trainer.data.sources import Granularity, TokenCacheSource

Sizes = dict[str, int | dict[str, int]]

WHOLE_SHARD_LIMIT_BYTES = 256 * 1024 * 1024
"""A bucket at most this large on the store is read in whole shards and kept in memory; a
larger one is read a Parquet row group at a time (see `sources`)."""


class TokenCacheMismatchError(StoreError):
    """A committed token cache that was not built from the stage's data and settings."""


@dataclass(frozen=True)
class StageDataset:
    """A committed dataset of the stage, with the length buckets it is sampled in."""

    name: str
    uri: str
    buckets: tuple[LengthBucket, ...] = (ALL_LENGTHS,)


def cache_spec(dataset: StageDataset, tokenizer: str, seq_len: int) -> CacheSpec:
    return CacheSpec(tokenizer=tokenizer, seq_len=seq_len, buckets=dataset.buckets, name=dataset.name)


def build_stage_caches(
    datasets: Sequence[StageDataset], *, output: str, tokenizer: str, seq_len: int, use_ray: bool = True
) -> None:
    """Build (or finish) every dataset's token cache; committed shards are reused."""
    for dataset in datasets:
        cache = token_cache_uri(output, dataset.name, tokenizer, seq_len)
        build_token_cache(dataset.uri, cache, cache_spec(dataset, tokenizer, seq_len), use_ray=use_ray)


def open_stage_sources(
    datasets: Sequence[StageDataset],
    *,
    output: str,
    tokenizer: str,
    seq_len: int,
    granularity: Granularity | None = None,
    max_cached: int = 8,
) -> tuple[dict[str, TokenCacheSource], Sizes]:
    """Open the committed caches' non-empty buckets as sources (granularity by size unless given)."""
    sources: dict[str, TokenCacheSource] = {}
    sizes: Sizes = {}
    for dataset in datasets:
        cache = token_cache_uri(output, dataset.name, tokenizer, seq_len)
        key = cache_key(open_dataset(dataset.uri).manifest, cache_spec(dataset, tokenizer, seq_len))
        per_bucket: dict[str, int] = {}
        for bucket in dataset.buckets:
            uri = bucket_uri(cache, bucket)
            try:
                committed = open_dataset(uri)
            except ManifestNotFoundError:
                raise TokenCacheMismatchError(
                    f"the token cache of dataset {dataset.name!r} is not built at {uri}", uri
                ) from None
            producer = committed.manifest.producer
            if producer is None or producer.uid != key:
                raise TokenCacheMismatchError(
                    f"the token cache at {uri} was built from other data or settings than dataset "
                    f"{dataset.name!r} at {dataset.uri} (did the dataset change during the run?)",
                    uri,
                )
            summary = committed.manifest.summary
            per_bucket[bucket.label] = summary.rows
            if summary.rows:
                mode = granularity or ("shard" if summary.bytes <= WHOLE_SHARD_LIMIT_BYTES else "row_group")
                source = TokenCacheSource(committed, seq_len, granularity=mode, max_cached=max_cached)
                sources[bucket_source_name(dataset.name, bucket)] = source
        bucketed = dataset.buckets != (ALL_LENGTHS,)
        sizes[dataset.name] = per_bucket if bucketed else per_bucket[ALL_LENGTHS.label]
    return sources, sizes


def stage_tokens(sources: Mapping[str, object], sizes: Sizes) -> Sizes | None:
    """The real tokens (padding excluded) of every dataset, in the shape of ``sizes``.

    None when a source does not know its tokens. An empty bucket has no source and 0 tokens.
    """
    tokens: Sizes = {}
    for name, size in sizes.items():
        keys = {name: name} if not isinstance(size, dict) else {label: f"{name}/{label}" for label in size}
        counts: dict[str, int] = {}
        for label, key in keys.items():
            held = getattr(sources.get(key), "unique_tokens", None) if key in sources else 0
            if held is None:
                return None
            counts[label] = int(held)
        tokens[name] = counts if isinstance(size, dict) else counts[name]
    return tokens


def filter_report(datasets: Sequence[StageDataset], *, output: str, tokenizer: str, seq_len: int) -> list[str]:
    """Lines for the driver log: what each dataset's length filter kept and left out."""
    lines = []
    for dataset in datasets:
        cache = token_cache_uri(output, dataset.name, tokenizer, seq_len)
        spec = cache_spec(dataset, tokenizer, seq_len)
        try:
            left_out = filtered_counts(dataset.uri, cache, spec)
        except StoreError as error:
            lines.append(f"  {dataset.name}: the length filter's counts cannot be read ({error})")
            continue
        if left_out is None:
            continue
        kept = sum(open_dataset(bucket_uri(cache, bucket)).manifest.summary.tokens or 0 for bucket in dataset.buckets)
        total = kept + left_out.tokens
        minimum = min(bucket.min_tokens for bucket in dataset.buckets)
        lines.append(
            f"  {dataset.name}: length filter >= {minimum:,} tokens kept {kept:,} tokens; filtered out "
            f"{left_out.documents:,} documents, {left_out.tokens:,} tokens ({left_out.tokens / max(total, 1):.1%})"
        )
    return lines
