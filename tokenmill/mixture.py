"""Plans a weighted data mixture: how many tokens each source supplies and how often it repeats.

Pure arithmetic in tokens, for the validator (with declared sizes, before anything runs). The
trainer plans the same rule exactly in packed sequences once its token caches are built
(`tokenmill.trainer.data.plan`): a source's share of the budget is its weight over the total
weight, and it cannot be drawn more often than its epochs allow.
"""

from __future__ import annotations

from dataclasses import dataclass

# Relative slack for rounding in published tables (shares x budget vs unique x epochs).
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Source:
    name: str
    weight: float
    max_epochs: float
    unique_tokens: int | None = None


@dataclass(frozen=True)
class SourcePlan:
    name: str
    share: float
    tokens: int
    unique_tokens: int | None

    @property
    def epochs(self) -> float | None:
        """How many times the source is repeated under this plan."""
        return self.tokens / self.unique_tokens if self.unique_tokens else None


class MixtureError(ValueError):
    def __init__(self, index: int, message: str):
        self.index = index
        super().__init__(message)


def plan_mixture(total_tokens: int, sources: list[Source]) -> list[SourcePlan]:
    """Split `total_tokens` by weight; raise MixtureError for the first source that cannot supply its share."""
    total_weight = sum(source.weight for source in sources)
    plans = []
    for index, source in enumerate(sources):
        share = source.weight / total_weight
        tokens = round(total_tokens * share)
        if source.unique_tokens is not None:
            available = source.unique_tokens * source.max_epochs
            if source.unique_tokens == 0:
                raise MixtureError(index, f"source {source.name!r} is empty (0 tokens)")
            if tokens > available * (1 + _TOLERANCE):
                needed_epochs = tokens / source.unique_tokens
                raise MixtureError(
                    index,
                    f"source {source.name!r} cannot supply its share: {share:.2%} of {total_tokens:,} tokens "
                    f"is {tokens:,} tokens, but {source.unique_tokens:,} unique tokens x {source.max_epochs:g} epochs "
                    f"is {round(available):,}; allow at least {needed_epochs:.3f} epochs, lower its weight, "
                    f"or lower totalTokens",
                )
        plans.append(SourcePlan(source.name, share, tokens, source.unique_tokens))
    return plans
