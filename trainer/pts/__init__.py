"""Pivotal Token Search: find the tokens of a policy's solutions that change its chance of
success by at least pGap, and turn each into a one-token preference pair."""

from tokenmill.trainer.pts.pairs import FullSolutionPair, PivotalTokenPair
from tokenmill.trainer.pts.policy import (
    Continuation,
    Judge,
    OracleJudge,
    Policy,
    SearchProblem,
)
from tokenmill.trainer.pts.search import (
    Estimate,
    Pivot,
    ProblemResult,
    PTSInputError,
    SearchConfig,
    SearchResult,
    cumulative_logprob_midpoint,
    search,
)
from tokenmill.trainer.pts.stats import SearchStats, resolution_warning

__all__ = [
    "Continuation",
    "Estimate",
    "FullSolutionPair",
    "Judge",
    "OracleJudge",
    "PTSInputError",
    "Pivot",
    "PivotalTokenPair",
    "Policy",
    "ProblemResult",
    "SearchConfig",
    "SearchProblem",
    "SearchResult",
    "SearchStats",
    "cumulative_logprob_midpoint",
    "resolution_warning",
    "search",
]
