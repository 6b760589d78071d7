"""Search statistics, and whether an estimate's noise can resolve pGap."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

DELTA_BINS = 20  # width 0.1 over [-1, 1]


def difference_standard_error(samples_per_estimate: int, p: float = 0.5) -> float:
    """Standard error of the difference of two independent estimates of p from N rollouts each."""
    return math.sqrt(2.0 * p * (1.0 - p) / samples_per_estimate)


def min_samples_to_resolve(p_gap: float) -> int:
    """Smallest N whose difference standard error at p = 0.5 is at most pGap / 2."""
    return math.ceil(2.0 / (p_gap * p_gap) - 1e-9)


def resolution_warning(samples_per_estimate: int, p_gap: float) -> str | None:
    """A warning with the figures when N rollouts cannot tell a pGap change from noise."""
    error = difference_standard_error(samples_per_estimate)
    if error <= p_gap / 2:
        return None
    return (
        f"samplesPerEstimate={samples_per_estimate} gives a standard error of {error:.3f} for the "
        f"difference of two estimates at p=0.5, above pGap/2={p_gap / 2:.3f}: changes near pGap "
        f"are decided by sampling noise; use samplesPerEstimate >= {min_samples_to_resolve(p_gap)}"
    )


def delta_bin(delta: float) -> int:
    return min(DELTA_BINS - 1, max(0, math.floor((delta + 1.0) * DELTA_BINS / 2.0 + 1e-9)))


def delta_bin_label(index: int) -> str:
    low = -1.0 + index * 2.0 / DELTA_BINS
    return f"[{low:.1f},{low + 2.0 / DELTA_BINS:.1f})"


@dataclass
class SearchStats:
    """What one search did; `merge` adds the figures of searches run apart (one per worker)."""

    problems: int = 0
    problems_searched: int = 0
    problems_skipped_too_hard: int = 0
    """p(success | question) below minSuccess."""
    problems_skipped_too_easy: int = 0
    """p(success | question) above maxSuccess."""
    solutions_sampled: int = 0
    solutions_searched: int = 0
    estimates: int = 0
    """p(success | prefix) estimates made (each costs samplesPerEstimate rollouts)."""
    estimate_reuses: int = 0
    """Estimates answered from the memo instead of new rollouts."""
    rollouts: int = 0
    """Rollouts drawn from the policy."""
    rollouts_reused: int = 0
    """Samples of an estimate that were rollouts drawn at a shorter prefix of the same solution
    and went on through this one (no new rollout)."""
    tokens_generated: int = 0
    """Tokens of sampled solutions and rollouts."""
    pivotal_tokens: int = 0
    pivotal_tokens_over_limit: int = 0
    """Pivotal tokens found beyond maxPivotalTokens in their solution (dropped)."""
    pivots_without_counterpart: int = 0
    """Pivotal tokens whose prefix's rollouts held no token moving p the other way (no pair)."""
    pairs: Counter = field(default_factory=Counter)
    """Pairs written, by kind."""
    pivotal_per_solution: Counter = field(default_factory=Counter)
    """Number of solutions by how many pivotal tokens they kept."""
    delta_p_histogram: list[int] = field(default_factory=lambda: [0] * DELTA_BINS)
    """Kept pivotal tokens by their change of p, in bins of 0.1 over [-1, 1]."""
    verdicts: Counter = field(default_factory=Counter)
    """Oracle verdicts by reason (correct, wrong-answer, timeout, oracle-crashed...)."""
    estimate_se_sum: float = 0.0
    estimate_se_max: float = 0.0

    def add_estimate(self, standard_error: float) -> None:
        self.estimates += 1
        self.estimate_se_sum += standard_error
        self.estimate_se_max = max(self.estimate_se_max, standard_error)

    def add_pivot(self, delta: float) -> None:
        self.pivotal_tokens += 1
        self.delta_p_histogram[delta_bin(delta)] += 1

    @property
    def estimate_se_mean(self) -> float:
        return self.estimate_se_sum / self.estimates if self.estimates else 0.0

    def merge(self, other: SearchStats) -> None:
        for name, value in vars(other).items():
            mine = getattr(self, name)
            if name == "estimate_se_max":
                setattr(self, name, max(mine, value))
            elif name == "delta_p_histogram":
                setattr(self, name, [a + b for a, b in zip(mine, value)])
            elif isinstance(value, Counter):
                mine.update(value)
            else:
                setattr(self, name, mine + value)

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON data (camelCase keys, like the API), for manifest and status."""
        return {
            "problems": self.problems,
            "problemsSearched": self.problems_searched,
            "problemsSkippedTooHard": self.problems_skipped_too_hard,
            "problemsSkippedTooEasy": self.problems_skipped_too_easy,
            "solutionsSampled": self.solutions_sampled,
            "solutionsSearched": self.solutions_searched,
            "estimates": self.estimates,
            "estimateReuses": self.estimate_reuses,
            "rollouts": self.rollouts,
            "rolloutsReused": self.rollouts_reused,
            "tokensGenerated": self.tokens_generated,
            "pivotalTokens": self.pivotal_tokens,
            "pivotalTokensOverLimit": self.pivotal_tokens_over_limit,
            "pivotsWithoutCounterpart": self.pivots_without_counterpart,
            "pairs": dict(sorted(self.pairs.items())),
            "pivotalPerSolution": {str(k): v for k, v in sorted(self.pivotal_per_solution.items())},
            "deltaPHistogram": {delta_bin_label(i): n for i, n in enumerate(self.delta_p_histogram) if n},
            "verdicts": dict(sorted(self.verdicts.items())),
            "estimateStandardError": {"mean": round(self.estimate_se_mean, 6),
                                      "max": round(self.estimate_se_max, 6)},
        }
