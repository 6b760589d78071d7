"""Stage sft: the data side. Chat datasets become masked token caches; the loop is pretraining's.

Each dataset of the stage must be a committed `chat_samples` dataset. The driver renders and
packs every dataset into its chat cache in the store (`trainer.data.chat`, one Ray task per
input shard) and prints how many samples each kept, truncated and dropped and why; a dataset
left with no sample to train on is an error. The workers open the committed caches, and the
pretraining loop trains on them with `ChatMicroBatchIterator`, whose labels are the assistant
tokens only: the loss is the mean over assistant tokens of the global batch, and the metrics'
`trained_token_share` is the share of the batch's positions that are trained on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tokenmill.api.training import SftSpec, TrainingStageSpec
from tokenmill.store import CHAT_SAMPLES, ManifestNotFoundError, StoreError, open_dataset
from tokenmill.trainer.data.chat import (
    KEPT,
    ChatCacheSpec,
    build_chat_cache,
    chat_cache_uri,
    describe_counts,
    open_chat_cache,
)
from tokenmill.trainer.data.sources import TokenCacheSource


class SftInputError(ValueError):
    """Input stage sft cannot train on (the caller turns it into a TrainingInputError)."""


def check_chat_dataset(uri: str | None, where: str) -> None:
    if not uri:
        raise SftInputError(f"{where}: no resolved uri (the run spec must carry committed URIs)")
    try:
        dataset = open_dataset(uri)
    except ManifestNotFoundError:
        raise SftInputError(f"{where}: no committed dataset at {uri} (its _manifest.json is missing)") from None
    except StoreError as error:
        raise SftInputError(f"{where}: cannot open dataset {uri}: {error}") from None
    if dataset.schema.name != CHAT_SAMPLES.name:
        raise SftInputError(
            f"{where}: dataset {uri} has schema {dataset.schema.name!r}; stage sft reads {CHAT_SAMPLES.name!r}"
        )
    if dataset.manifest.summary.rows == 0:
        raise SftInputError(f"{where}: dataset {uri} is empty (its manifest lists no rows)")


def sft_sources(
    spec: TrainingStageSpec, names: Sequence[str], output: str, tokenizer: str, *, build: bool
) -> tuple[dict[str, TokenCacheSource], dict[str, int], dict[str, Counter[str]]]:
    """The stage's chat caches (built first when `build`) as sources, their row counts and sample counts."""
    settings = spec.sft or SftSpec()
    sources: dict[str, TokenCacheSource] = {}
    sizes: dict[str, int] = {}
    counts: dict[str, Counter[str]] = {}
    for index, (dataset, name) in enumerate(zip(spec.datasets, names)):
        where = f"datasets[{index}] ({name})"
        check_chat_dataset(dataset.uri, where)
        cache = ChatCacheSpec(tokenizer=tokenizer, seq_len=spec.sequence_length, packing=settings.packing,
                              over_long=settings.over_long, name=name)
        uri = chat_cache_uri(output, cache)
        try:
            if build:
                build_chat_cache(str(dataset.uri), uri, cache, use_ray=True)
            source, counts[name] = open_chat_cache(str(dataset.uri), uri, cache)
        except StoreError as error:
            raise SftInputError(f"{where}: {error}") from None
        if not counts[name].get(KEPT) or not source.num_sequences:
            raise SftInputError(
                f"{where}: dataset {dataset.uri} has no sample to train on "
                f"({describe_counts(name, counts[name]).strip()})"
            )
        sources[name], sizes[name] = source, source.num_sequences
    return sources, sizes, counts


def describe_sft(counts: dict[str, Counter[str]]) -> list[str]:
    return ["samples per dataset:", *(describe_counts(name, c) for name, c in counts.items())]
