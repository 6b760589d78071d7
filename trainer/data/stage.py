"""A training stage's data: committed datasets to the sampler's sources, through the token cache.

Each dataset is cached under the stage's output at
``<output>/tokens/<dataset name>/<tokenizer>-L<seq_len>/<bucket label>/`` (see `cache`), built
in parallel on Ray and resumed after a failure. The result is what `midtrain.plan_for_stage`
and `loader.MicroBatchIterator` take: sources keyed by sampler source name, and each dataset's
sequence count (per bucket label for bucketed data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.store import join_uri
from tokenmill.trainer.data.cache import CacheSpec, bucket_uri, build_token_cache
from tokenmill.trainer.data.midtrain import ALL_LENGTHS, LengthBucket, bucket_source_name
from tokenmill.trainer.data.sources import Granularity, TokenCacheSource

Sizes = dict[str, int | dict[str, int]]


@dataclass(frozen=True)
class StageDataset:
    """A committed dataset of the stage, with the length buckets it is sampled in."""

    name: str
    uri: str
    buckets: tuple[LengthBucket, ...] = (ALL_LENGTHS,)


def token_cache_uri(output: str, dataset: str, tokenizer: str, seq_len: int) -> str:
    return join_uri(output, "tokens", dataset, f"{tokenizer}-L{seq_len}")


def build_stage_sources(
    datasets: Sequence[StageDataset],
    *,
    output: str,
    tokenizer: str,
    seq_len: int,
    use_ray: bool = True,
    granularity: Granularity = "shard",
    max_cached: int = 8,
) -> tuple[dict[str, TokenCacheSource], Sizes]:
    """Build (or reuse) every dataset's token cache; open its non-empty buckets as sources."""
    sources: dict[str, TokenCacheSource] = {}
    sizes: Sizes = {}
    for dataset in datasets:
        cache = token_cache_uri(output, dataset.name, tokenizer, seq_len)
        spec = CacheSpec(tokenizer=tokenizer, seq_len=seq_len, buckets=dataset.buckets, name=dataset.name)
        manifests = build_token_cache(dataset.uri, cache, spec, use_ray=use_ray)
        per_bucket = {label: manifest.summary.rows for label, manifest in manifests.items()}
        for bucket in dataset.buckets:
            if per_bucket[bucket.label]:
                name = bucket_source_name(dataset.name, bucket)
                uri = bucket_uri(cache, bucket)
                sources[name] = TokenCacheSource(uri, seq_len, granularity=granularity, max_cached=max_cached)
        bucketed = dataset.buckets != (ALL_LENGTHS,)
        sizes[dataset.name] = per_bucket if bucketed else per_bucket[ALL_LENGTHS.label]
    return sources, sizes
