"""Midtraining's mixture: 16K sequences, 30% new long-context data, 70% replay, long documents boosted.

RECIPE.md: 30% new long-context data (organic samples over 8K tokens, those over 16K
up-weighted, plus synthetic samples over 4K) and 70% replay of pretraining data. Our choices
(the report publishes no factors):

- New data is filtered by document length when its token cache is built: each dataset's
  ``minDocumentTokens``, by default organic documents from 8,192 tokens and synthetic ones
  from 4,096 (`tokenmill.api.training`). The filter is the lowest length
  bucket's lower end, so a shorter document lands in no bucket and is counted as filtered.
- ``DEFAULT_LONG_DOCUMENT_BOOSTS``: documents of 8,192 tokens or more are sampled 2x per token,
  those of 16,384 or more 4x (so over 16K is up-weighted 2x against 8K-16K). As in the API,
  the largest matching factor applies, and boosts apply to new data only; replay keeps the
  pretraining mixture's proportions.
- A boost cannot act inside a packed sequence, so a new dataset is split into length buckets
  (one token cache each, documents packed within their bucket) and each bucket becomes its own
  source with weight proportional to its sequences x its factor. The sampler then expresses
  the boost exactly, like any other share. A dataset's epoch limit applies to each bucket: no
  document is repeated more often than the dataset allows, boosted or not.
- The 30/70 split is enforced: `plan_for_stage` rescales a midtrain stage's weights with
  `scale_to_split` so new data is exactly 30% of the tokens and replay 70%, each role keeping
  the proportions of its weights. `stage_sources` turns a stage's components (with the sizes
  of their token caches) into the sampler's sources.
- Weights are shares of tokens: with the caches' real token counts (padding excluded), a
  bucket's weight is its tokens x factor, and the planner corrects each source's sequence
  share for the padding its sequences carry (see `plan`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal, Protocol

from tokenmill.api.training import ORGANIC_MIN_TOKENS
from tokenmill.trainer.data.plan import MixtureError, MixturePlan, SourceSpec, exact, plan_mixture

MIDTRAIN_SEQ_LEN = 16_384
MIDTRAIN_NEW_SHARE = Fraction(3, 10)
DEFAULT_LONG_DOCUMENT_BOOSTS: tuple[tuple[int, float], ...] = ((8_192, 2.0), (16_384, 4.0))

Role = Literal["new", "replay"]


class Boost(Protocol):
    """The API's `LongDocumentBoost` shape."""

    min_tokens: int
    factor: float


@dataclass(frozen=True)
class LengthBucket:
    """Documents with ``min_tokens <= length < max_tokens`` (no upper end when ``max_tokens`` is None)."""

    min_tokens: int
    max_tokens: int | None
    factor: Fraction = Fraction(1)

    @property
    def label(self) -> str:
        """A path-safe name: ``len-8192-16383`` or ``len-16384-up``."""
        upper = "up" if self.max_tokens is None else str(self.max_tokens - 1)
        return f"len-{self.min_tokens}-{upper}"

    def contains(self, length: int) -> bool:
        return length >= self.min_tokens and (self.max_tokens is None or length < self.max_tokens)


ALL_LENGTHS = LengthBucket(0, None)


def length_buckets(
    boosts: Sequence[Boost | tuple[int, float]], *, min_tokens: int = 0
) -> tuple[LengthBucket, ...]:
    """Buckets split at every boost threshold above ``min_tokens``; each takes the largest matching factor."""
    pairs = sorted(_boost_pair(boost) for boost in boosts)
    edges = sorted({min_tokens} | {threshold for threshold, _ in pairs if threshold > min_tokens})
    buckets = []
    for lower, upper in zip(edges, [*edges[1:], None]):
        factors = [factor for threshold, factor in pairs if threshold <= lower]
        buckets.append(LengthBucket(lower, upper, max(factors, default=Fraction(1))))
    return tuple(buckets)


@dataclass(frozen=True)
class Component:
    """A stage dataset, resolved: its weight, epochs, role and the size of its token cache.

    ``sequences`` is the number of packed sequences, or for bucketed data a mapping from bucket
    label to that bucket's number of sequences; ``tokens``, when known, the real tokens they
    hold, in the same shape.
    """

    name: str
    weight: Fraction | float
    epochs: Fraction | float | None
    role: Role
    sequences: int | Mapping[str, int]
    buckets: tuple[LengthBucket, ...] = field(default=(ALL_LENGTHS,))
    tokens: int | Mapping[str, int] | None = None


def bucket_source_name(component: str, bucket: LengthBucket) -> str:
    return component if bucket == ALL_LENGTHS else f"{component}/{bucket.label}"


def boosted_sources(component: Component) -> list[SourceSpec]:
    """One source per non-empty bucket, with the component's weight split by tokens x factor
    (sequences x factor when the tokens are not known)."""
    sizes = _bucket_sizes(component)
    tokens = None if component.tokens is None else _bucket_sizes(component, component.tokens)
    amounts = sizes if tokens is None else tokens
    mass = {bucket: amounts[bucket.label] * bucket.factor for bucket in component.buckets}
    total = sum(mass.values())
    if total == 0:
        raise MixtureError(f"source {component.name!r} is empty: none of its length buckets holds a sequence")
    weight = exact(component.weight)
    return [
        SourceSpec(
            name=bucket_source_name(component.name, bucket),
            weight=weight * mass[bucket] / total,
            num_sequences=sizes[bucket.label],
            epochs=component.epochs,
            tokens=None if tokens is None else tokens[bucket.label],
        )
        for bucket in component.buckets
        if sizes[bucket.label] > 0
    ]


def scale_to_split(
    components: Sequence[Component], new_share: Fraction | float = MIDTRAIN_NEW_SHARE
) -> list[Component]:
    """Components with weights rescaled so new data is exactly ``new_share`` and replay the rest.

    Proportions within each role are kept (replay keeps the pretraining table's proportions).
    """
    share = exact(new_share)
    if not 0 < share < 1:
        raise MixtureError(f"the new-data share must lie strictly between 0 and 1, got {new_share}")
    totals = {
        role: sum((exact(c.weight) for c in components if c.role == role), Fraction(0))
        for role in ("new", "replay")
    }
    for role, total in totals.items():
        if total == 0:
            raise MixtureError(f"a midtraining mixture needs {role} data; none of its datasets has role {role!r}")
    target = {"new": share, "replay": 1 - share}
    return [
        Component(
            c.name, exact(c.weight) * target[c.role] / totals[c.role], c.epochs, c.role, c.sequences, c.buckets,
            c.tokens,
        )
        for c in components
    ]


def new_data_share(sources: Sequence[SourceSpec], components: Sequence[Component]) -> Fraction:
    """The share of the mixture drawn from new data (after bucket expansion)."""
    new = {bucket_source_name(c.name, b) for c in components if c.role == "new" for b in c.buckets}
    weights = {spec.name: exact(spec.weight) for spec in sources}
    return sum((w for name, w in weights.items() if name in new), Fraction(0)) / sum(weights.values())


def stage_sources(components: Sequence[Component]) -> list[SourceSpec]:
    """The sampler's sources: new components expanded into boosted buckets, replay as they are."""
    sources: list[SourceSpec] = []
    for component in components:
        sources += boosted_sources(component)
    return sources


def midtrain_plan(
    components: Sequence[Component],
    *,
    total_tokens: int,
    global_batch_size: int,
    seq_len: int = MIDTRAIN_SEQ_LEN,
    new_share: Fraction | float | None = MIDTRAIN_NEW_SHARE,
) -> MixturePlan:
    """The midtraining plan; with ``new_share`` the weights are first rescaled to that exact split."""
    scaled = list(components) if new_share is None else scale_to_split(components, new_share)
    return plan_mixture(
        stage_sources(scaled), seq_len=seq_len, global_batch_size=global_batch_size, total_tokens=total_tokens
    )


def components_from_spec(
    spec: Any,
    sequences: Mapping[str, int | Mapping[str, int]],
    names: Sequence[str],
    tokens: Mapping[str, int | Mapping[str, int]] | None = None,
) -> list[Component]:
    """Components of a `TrainingStageSpec`-shaped object (``datasets``, ``long_document_boost``).

    ``names`` are the resolved dataset names in the spec's order; ``sequences`` their token-cache
    sizes (per bucket label for bucketed data), ``tokens`` the real tokens in the same shape.
    """
    midtrain = getattr(spec, "stage", None) == "midtrain"
    components = []
    for dataset, name in zip(spec.datasets, names, strict=True):
        role = getattr(dataset, "role", "new") if midtrain else "new"
        buckets = dataset_buckets(spec, dataset)
        held = None if tokens is None else tokens[name]
        components.append(Component(name, dataset.weight, dataset.epochs, role, sequences[name], buckets, held))
    return components


def min_document_tokens(spec: Any, dataset: Any) -> int:
    """The shortest document a stage's dataset trains on (0: no filter).

    Unset, new data of a midtrain stage keeps the organic default; the API fills in the
    synthetic one from the dataset's ref before the ref is resolved to a URI.
    """
    value = getattr(dataset, "min_document_tokens", None)
    if value is not None:
        return int(value)
    midtrain = getattr(spec, "stage", None) == "midtrain"
    return ORGANIC_MIN_TOKENS if midtrain and getattr(dataset, "role", "new") == "new" else 0


def dataset_buckets(spec: Any, dataset: Any) -> tuple[LengthBucket, ...]:
    """The length buckets a stage's dataset is cached and sampled in.

    The lowest bucket starts at the dataset's minimum document length. New data of a midtrain
    stage with long-document boosts is split at the boost thresholds above it; without a
    minimum or boosts a dataset is one bucket of all lengths.
    """
    boosts = list(getattr(spec, "long_document_boost", None) or [])
    midtrain = getattr(spec, "stage", None) == "midtrain"
    minimum = min_document_tokens(spec, dataset)
    if not (midtrain and getattr(dataset, "role", "new") == "new"):
        boosts = []
    if boosts or minimum:
        return length_buckets(boosts, min_tokens=minimum)
    return (ALL_LENGTHS,)


def _bucket_sizes(component: Component, counts: int | Mapping[str, int] | None = None) -> dict[str, int]:
    """``counts`` (the component's sequences by default) per bucket label."""
    counts = component.sequences if counts is None else counts
    if isinstance(counts, int):
        if len(component.buckets) != 1:
            raise MixtureError(f"source {component.name!r} has length buckets: give its sizes per bucket")
        return {component.buckets[0].label: counts}
    sizes = {bucket.label: int(counts.get(bucket.label, 0)) for bucket in component.buckets}
    unknown = sorted(set(counts) - set(sizes))
    if unknown:
        raise MixtureError(f"source {component.name!r}: sizes for unknown length buckets {', '.join(unknown)}")
    return sizes


def _boost_pair(boost: Boost | tuple[int, float]) -> tuple[int, Fraction]:
    if isinstance(boost, tuple):
        threshold, factor = boost
    else:
        threshold, factor = boost.min_tokens, boost.factor
    if threshold < 1 or exact(factor) <= 0:
        raise MixtureError(
            f"a long-document boost needs min_tokens >= 1 and a positive factor, got {threshold}, {factor}"
        )
    return int(threshold), exact(factor)


def plan_for_stage(
    spec: Any,
    sequences: Mapping[str, int | Mapping[str, int]],
    names: Sequence[str],
    tokens: Mapping[str, int | Mapping[str, int]] | None = None,
) -> MixturePlan:
    """The plan of a `TrainingStageSpec`-shaped stage: its weights, token budget and batch.

    A midtrain stage's weights are rescaled to the exact 30/70 split of new and replay data.
    """
    components = components_from_spec(spec, sequences, names, tokens)
    if getattr(spec, "stage", None) == "midtrain":
        components = scale_to_split(components, MIDTRAIN_NEW_SHARE)
    return plan_mixture(
        stage_sources(components),
        seq_len=spec.sequence_length,
        global_batch_size=spec.optimization.global_batch_sequences,
        total_tokens=spec.optimization.total_tokens,
    )
