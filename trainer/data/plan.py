"""How many sequences each source of a mixture contributes (pure Python, exact arithmetic).

A source has a relative ``weight`` (its share of the stage's sequences is weight / sum of
weights), a number of unique packed sequences, and ``epochs``: the most times it may be
repeated. The plan draws ``draws`` sequences from each source:

- shares are exact: the draws are the largest-remainder apportionment of the total, so every
  source is within one sequence of ``share x total`` and the draws sum to the total;
- repeats are exact: a source with ``n`` unique sequences and ``draws`` draws is seen
  ``draws // n`` full epochs plus ``draws % n`` sequences of one more (shuffled) epoch, so its
  effective epochs are ``draws / n`` and never exceed ``epochs``;
- the total is either given (a token budget, checked against every source's supply, with a
  clear error naming each source that cannot supply its share) or follows from the mixture: the
  largest total at which no source exceeds its epochs (the binding source then runs exactly its
  epochs, the others fewer). With RECIPE.md's pretraining table this gives 9.84T tokens, code
  being the binding source at 2.4 epochs (the report says 9.8T).

The total is rounded down to whole global batches, so a stage is a whole number of steps.

Weights are shares of tokens. A source that knows its real ``tokens`` (text and end-of-text,
without padding) gets its sequence share corrected by its fill, ``tokens / (num_sequences x
seq_len)``: a source of many small shards ends each shard with a partly padded row, so each of
its sequences carries fewer tokens, and it is drawn that much more often to keep its share of
the tokens trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any


class MixtureError(ValueError):
    """A mixture that cannot be planned: raised before any compute is spent."""


def exact(value: int | float | str | Fraction) -> Fraction:
    """A decimal number as an exact fraction: 0.15 is 3/20, not the nearest binary float."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number here")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MixtureError(f"{value} is not a finite number")
        return Fraction(repr(value))
    return Fraction(value)


@dataclass(frozen=True)
class SourceSpec:
    """One source of a mixture: a token cache of ``num_sequences`` packed sequences."""

    name: str
    weight: Fraction | float | int
    num_sequences: int
    epochs: Fraction | float | int | None = None
    """Most repeats; ``None`` means unlimited (only with an explicit budget)."""
    tokens: int | None = None
    """Real tokens in the unique sequences (padding excluded); ``None``: every sequence is full."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SourceSpec:
        return cls(
            name=str(data["name"]),
            weight=data["weight"],
            num_sequences=int(data["num_sequences"]),
            epochs=data.get("epochs"),
            tokens=None if data.get("tokens") is None else int(data["tokens"]),
        )


@dataclass(frozen=True)
class SourcePlan:
    """A planned source: ``draws`` sequences from ``num_sequences`` unique ones."""

    name: str
    share: Fraction
    num_sequences: int
    draws: int
    max_epochs: Fraction | None
    tokens: int | None = None
    """Real tokens in the unique sequences (padding excluded), when known."""

    @property
    def trained_tokens(self) -> float | None:
        """Real tokens the draws carry in expectation (None when the source's tokens are unknown)."""
        return None if self.tokens is None else self.draws * self.tokens / self.num_sequences

    @property
    def epochs(self) -> float:
        """Effective epochs: draws / unique sequences."""
        return self.draws / self.num_sequences

    @property
    def full_epochs(self) -> int:
        return self.draws // self.num_sequences

    @property
    def partial_draws(self) -> int:
        """Sequences drawn from the last, incomplete epoch."""
        return self.draws % self.num_sequences


@dataclass(frozen=True)
class MixturePlan:
    """Draws per source for a stage of ``total_sequences`` sequences of ``seq_len`` tokens."""

    sources: tuple[SourcePlan, ...]
    seq_len: int
    global_batch_size: int

    @property
    def total_sequences(self) -> int:
        return sum(source.draws for source in self.sources)

    @property
    def total_tokens(self) -> int:
        """Token positions the stage trains on (sequences x seq_len)."""
        return self.total_sequences * self.seq_len

    @property
    def num_steps(self) -> int:
        return self.total_sequences // self.global_batch_size

    @property
    def draws(self) -> tuple[int, ...]:
        return tuple(source.draws for source in self.sources)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(source.name for source in self.sources)

    def source(self, name: str) -> SourcePlan:
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(f"no source {name!r} in the plan; sources: {', '.join(self.names)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (shares as strings of exact fractions)."""
        return {
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "total_sequences": self.total_sequences,
            "total_tokens": self.total_tokens,
            "num_steps": self.num_steps,
            "sources": [
                {
                    "name": source.name,
                    "share": str(source.share),
                    "num_sequences": source.num_sequences,
                    "draws": source.draws,
                    "max_epochs": None if source.max_epochs is None else str(source.max_epochs),
                    "epochs": source.epochs,
                    "tokens": source.tokens,
                }
                for source in self.sources
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MixturePlan:
        sources = tuple(
            SourcePlan(
                name=item["name"],
                share=Fraction(item["share"]),
                num_sequences=int(item["num_sequences"]),
                draws=int(item["draws"]),
                max_epochs=None if item["max_epochs"] is None else Fraction(item["max_epochs"]),
                tokens=item.get("tokens"),
            )
            for item in data["sources"]
        )
        return cls(sources, int(data["seq_len"]), int(data["global_batch_size"]))

    def fingerprint(self) -> str:
        """A short hash of what decides the sample order (names, sizes, draws, seq_len)."""
        key = [self.seq_len, self.global_batch_size]
        key += [[s.name, s.num_sequences, s.draws] for s in self.sources]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def plan_mixture(
    sources: Iterable[SourceSpec | Mapping[str, Any]],
    *,
    seq_len: int,
    global_batch_size: int = 1,
    total_tokens: int | None = None,
) -> MixturePlan:
    """The draws per source; see the module docstring. Raises `MixtureError` on bad input."""
    specs = [s if isinstance(s, SourceSpec) else SourceSpec.from_mapping(s) for s in sources]
    _validate(specs, seq_len, global_batch_size)
    shares = _shares(specs, seq_len)
    caps = [_supply(spec) for spec in specs]
    if total_tokens is None:
        total = _largest_total(specs, shares, caps)
    else:
        total = _budget_sequences(total_tokens, seq_len)
    total -= total % global_batch_size
    if total == 0:
        raise MixtureError(_too_small_message(total_tokens, seq_len, global_batch_size, specs, shares, caps))
    _check_supply(specs, shares, caps, total, seq_len, global_batch_size, total_tokens)
    draws = apportion(shares, total)
    planned = tuple(
        SourcePlan(spec.name, share, spec.num_sequences, count, _epochs(spec), spec.tokens)
        for spec, share, count in zip(specs, shares, draws, strict=True)
    )
    return MixturePlan(planned, seq_len, global_batch_size)


def apportion(shares: Sequence[Fraction], total: int) -> list[int]:
    """Largest-remainder apportionment: integers summing to ``total``, each within 1 of its quota.

    Ties go to the earlier source, so the result is deterministic.
    """
    quotas = [share * total for share in shares]
    counts = [math.floor(quota) for quota in quotas]
    left = total - sum(counts)
    order = sorted(range(len(shares)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def max_total_tokens(
    sources: Iterable[SourceSpec | Mapping[str, Any]], *, seq_len: int, global_batch_size: int = 1
) -> int:
    """The largest token budget the mixture can supply without exceeding any source's epochs."""
    return plan_mixture(sources, seq_len=seq_len, global_batch_size=global_batch_size).total_tokens


def _validate(specs: Sequence[SourceSpec], seq_len: int, global_batch_size: int) -> None:
    if not specs:
        raise MixtureError("the mixture has no sources")
    if seq_len < 1:
        raise MixtureError(f"seq_len must be at least 1, got {seq_len}")
    if global_batch_size < 1:
        raise MixtureError(f"global_batch_size must be at least 1, got {global_batch_size}")
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise MixtureError(f"source names must be unique; repeated: {', '.join(duplicates)}")
    for spec in specs:
        if not spec.name:
            raise MixtureError("every source needs a name")
        if exact(spec.weight) <= 0:
            raise MixtureError(f"source {spec.name!r}: weight must be positive, got {spec.weight}")
        if spec.num_sequences < 0:
            raise MixtureError(f"source {spec.name!r}: num_sequences must be >= 0, got {spec.num_sequences}")
        if spec.num_sequences == 0:
            raise MixtureError(f"source {spec.name!r} is empty: it has no token sequences to draw from")
        if spec.epochs is not None and exact(spec.epochs) <= 0:
            raise MixtureError(f"source {spec.name!r}: epochs must be positive, got {spec.epochs}")
        if spec.tokens is not None and spec.tokens < 1:
            raise MixtureError(f"source {spec.name!r}: tokens must be positive, got {spec.tokens}")


def fill(spec: SourceSpec, seq_len: int) -> Fraction:
    """Real tokens per token position of the source's sequences (1 when unknown)."""
    if spec.tokens is None:
        return Fraction(1)
    return Fraction(spec.tokens, spec.num_sequences * seq_len)


def _shares(specs: Sequence[SourceSpec], seq_len: int) -> list[Fraction]:
    """Each source's share of the sequences: its token weight over its fill, normalised."""
    weights = [exact(spec.weight) / fill(spec, seq_len) for spec in specs]
    total = sum(weights)
    return [weight / total for weight in weights]


def _epochs(spec: SourceSpec) -> Fraction | None:
    return None if spec.epochs is None else exact(spec.epochs)


def _supply(spec: SourceSpec) -> int | None:
    """Most sequences a source can give: floor(unique x epochs); None when unlimited."""
    epochs = _epochs(spec)
    return None if epochs is None else math.floor(spec.num_sequences * epochs)


def _largest_total(specs: Sequence[SourceSpec], shares: Sequence[Fraction], caps: Sequence[int | None]) -> int:
    unlimited = [spec.name for spec, cap in zip(specs, caps, strict=True) if cap is None]
    if unlimited:
        raise MixtureError(
            "without a token budget every source needs epochs (the budget follows from them); "
            f"missing for: {', '.join(unlimited)}"
        )
    return min(math.floor(cap / share) for cap, share in zip(caps, shares, strict=True))


def _budget_sequences(total_tokens: int, seq_len: int) -> int:
    if total_tokens < 1:
        raise MixtureError(f"the token budget must be positive, got {total_tokens}")
    return total_tokens // seq_len


def _check_supply(
    specs: Sequence[SourceSpec],
    shares: Sequence[Fraction],
    caps: Sequence[int | None],
    total: int,
    seq_len: int,
    global_batch_size: int,
    budget_tokens: int | None,
) -> None:
    problems = []
    for spec, share, cap in zip(specs, shares, caps, strict=True):
        quota = share * total
        if cap is not None and quota > cap:
            problems.append(_shortfall(spec, share, quota, cap, total, seq_len))
    if problems:
        hint = ""
        if None not in caps:
            limit = _largest_total(specs, shares, caps)
            limit -= limit % global_batch_size
            hint = f" The most this mixture can supply is {_tokens(limit * seq_len)} tokens."
        budget = total * seq_len if budget_tokens is None else budget_tokens
        raise MixtureError(
            f"the mixture cannot supply {_tokens(budget)} tokens at the given epochs: "
            + " ".join(problems)
            + hint
            + " Lower the budget, raise those epochs, or add data."
        )


def _shortfall(spec: SourceSpec, share: Fraction, quota: Fraction, cap: int, total: int, seq_len: int) -> str:
    needed = math.ceil(quota) * seq_len
    available = cap * seq_len
    return (
        f"source {spec.name!r} needs {_tokens(needed)} tokens ({float(share):.2%} of the budget) "
        f"but has {_tokens(spec.num_sequences * seq_len)} unique tokens and at most "
        f"{float(_epochs(spec)):g} epochs allowed, so {_tokens(available)} tokens available "
        f"(it would need {float(quota / spec.num_sequences):.3g} epochs)."
    )


def _too_small_message(
    total_tokens: int | None,
    seq_len: int,
    global_batch_size: int,
    specs: Sequence[SourceSpec],
    shares: Sequence[Fraction],
    caps: Sequence[int | None],
) -> str:
    step = _tokens(seq_len * global_batch_size)
    if total_tokens is not None:
        return f"a budget of {_tokens(total_tokens)} tokens is less than one global batch ({step} tokens)"
    binding = min(range(len(specs)), key=lambda i: caps[i] / shares[i])
    return (
        f"the mixture supplies less than one global batch ({step} tokens): source "
        f"{specs[binding].name!r} allows only {_tokens(caps[binding] * seq_len)} tokens "
        f"for its {float(shares[binding]):.2%} share"
    )


def _tokens(count: int) -> str:
    return f"{count:,}"
