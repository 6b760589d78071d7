"""Midtraining's mixture: 16K sequences, 30% new long-context data, 70% replay, long documents boosted.

RECIPE.md: 30% new long-context data (organic samples over 8K tokens, those over 16K
up-weighted, plus synthetic samples over 4K) and 70% replay of pretraining data. Our choices
(the report publishes no factors):

- New data is filtered by document length when its token cache is built: organic documents
  from ``ORGANIC_MIN_TOKENS`` (8,192), synthetic from ``SYNTHETIC_MIN_TOKENS`` (4,096).
- ``DEFAULT_LONG_DOCUMENT_BOOSTS``: documents of 8,192 tokens or more are sampled 2x per token,
  those of 16,384 or more 4x (so over 16K is up-weighted 2x against 8K-16K). As in the API,
  the largest matching factor applies, and boosts apply to new data only; replay keeps the
  pretraining mixture's proportions.
- A boost cannot act inside a packed sequence, so a new dataset is split into length buckets
  (one token cache each, documents packed within their bucket) and each bucket becomes its own
  source with weight proportional to its sequences x its factor. The sampler then expresses
  the boost exactly, like any other share. A dataset's epoch limit applies to each bucket: no
  document is repeated more often than the dataset allows, boosted or not.
- The 30/70 split is the sum of the new components' weights against the replay components'.
  `scale_to_split` rescales weights to an exact split; `stage_sources` turns a stage's
  components (with the sizes of their token caches) into the sampler's sources.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal, Protocol

from tokenmill.trainer.data.plan import MixtureError, MixturePlan, SourceSpec, exact, plan_mixture

MIDTRAIN_SEQ_LEN = 16_384
MIDTRAIN_NEW_SHARE = Fraction(3, 10)
ORGANIC_MIN_TOKENS = 8_192
SYNTHETIC_MIN_TOKENS = 4_096
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

    ``sequences`` is the number of packed sequences, or for new data under boosts a mapping
    from bucket label to that bucket's number of sequences.
    """

    name: str
    weight: Fraction | float
    epochs: Fraction | float | None
    role: Role
    sequences: int | Mapping[str, int]
    buckets: tuple[LengthBucket, ...] = field(default=(ALL_LENGTHS,))


def bucket_source_name(component: str, bucket: LengthBucket) -> str:
    return component if bucket == ALL_LENGTHS else f"{component}/{bucket.label}"


def boosted_sources(component: Component) -> list[SourceSpec]:
    """One source per non-empty bucket, with the component's weight split by sequences x factor."""
    sizes = _bucket_sizes(component)
    mass = {bucket: sizes[bucket.label] * bucket.factor for bucket in component.buckets}
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
            c.name, exact(c.weight) * target[c.role] / totals[c.role], c.epochs, c.role, c.sequences, c.buckets
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
    spec: Any, sequences: Mapping[str, int | Mapping[str, int]], names: Sequence[str]
) -> list[Component]:
    """Components of a `TrainingStageSpec`-shaped object (``datasets``, ``long_document_boost``).

    ``names`` are the resolved dataset names in the spec's order; ``sequences`` their token-cache
    sizes (per bucket label for new data when the stage is midtrain with boosts).
    """
    midtrain = getattr(spec, "stage", None) == "midtrain"
    components = []
    for dataset, name in zip(spec.datasets, names, strict=True):
        role = getattr(dataset, "role", "new") if midtrain else "new"
        buckets = dataset_buckets(spec, dataset)
        components.append(Component(name, dataset.weight, dataset.epochs, role, sequences[name], buckets))
    return components


def dataset_buckets(spec: Any, dataset: Any) -> tuple[LengthBucket, ...]:
    """The length buckets a stage's dataset is cached and sampled in.

    New data of a midtrain stage with long-document boosts is split at the boost thresholds;
    everything else is one bucket of all lengths.
    """
    boosts = list(getattr(spec, "long_document_boost", None) or [])
    midtrain = getattr(spec, "stage", None) == "midtrain"
    if midtrain and getattr(dataset, "role", "new") == "new" and boosts:
        return length_buckets(boosts)
    return (ALL_LENGTHS,)


def _bucket_sizes(component: Component) -> dict[str, int]:
    if isinstance(component.sequences, int):
        if len(component.buckets) != 1:
            raise MixtureError(f"source {component.name!r} has length buckets: give its sequences per bucket")
        return {component.buckets[0].label: component.sequences}
    sizes = {bucket.label: int(component.sequences.get(bucket.label, 0)) for bucket in component.buckets}
    unknown = sorted(set(component.sequences) - set(sizes))
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
    spec: Any, sequences: Mapping[str, int | Mapping[str, int]], names: Sequence[str]
) -> MixturePlan:
    """The plan of a `TrainingStageSpec`-shaped stage: its weights as given, its token budget and batch."""
    components = components_from_spec(spec, sequences, names)
    return plan_mixture(
        stage_sources(components),
        seq_len=spec.sequence_length,
        global_batch_size=spec.optimization.global_batch_sequences,
        total_tokens=spec.optimization.total_tokens,
    )
