"""What the search needs from a model and an oracle: two small protocols an engine adapter fills.

Everything is token ids: a prefix is the question's token ids followed by a solution's first
tokens, exactly as sampled, never decoded and re-tokenised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tokenmill.trainer.oracles import Oracle, Verdict

TokenIds = tuple[int, ...]


@dataclass(frozen=True)
class Continuation:
    """Tokens a policy generated after a prompt, with the log-probability of each when asked."""

    token_ids: TokenIds
    logprobs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class SearchProblem:
    """One question as token ids, with what its oracle needs (answer, tests, choices...)."""

    id: str
    question_ids: TokenIds
    data: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol):
    """The model being searched.

    `sample_solutions` draws complete solutions to a question with per-token log-probs (the
    model's own distribution). `rollout` draws `n` continuations of the question followed by
    `solution_prefix` to the end of a solution (within the solution's own token budget); a
    prefix that already ends a solution (its stop token) continues with nothing. Rollouts of
    one prefix, and prefixes that extend each other, are where an engine's prefix cache pays.
    A policy may also offer `rollout_batch(wanted)`, the rollouts of several (question_ids,
    solution_prefix, n) at once (one engine call, each prefix's samples as `rollout` draws
    them), and `sample_solutions_batch(wanted)`, the solutions of several (question_ids, n);
    the search then asks for what all its questions need at the same step together (the
    solutions of every question, then the prefixes of a subdivision level of every question).
    """

    def sample_solutions(self, question_ids: TokenIds, n: int) -> Sequence[Continuation]: ...

    def rollout(self, question_ids: TokenIds, solution_prefix: TokenIds, n: int) -> Sequence[Continuation]: ...


class Judge(Protocol):
    """Decides whether a complete solution (the tokens after the question) is correct."""

    def problem_error(self, problem: SearchProblem) -> str | None:
        """Why this problem cannot be judged (no answer, no tests...), or None."""
        ...

    def check(self, problem: SearchProblem, solution_ids: TokenIds) -> Verdict: ...


class OracleJudge:
    """A judge from an oracle and the policy's detokenizer (the oracle reads text)."""

    def __init__(self, oracle: Oracle, decode: Callable[[Sequence[int]], str]):
        self.oracle = oracle
        self.decode = decode

    def problem_error(self, problem: SearchProblem) -> str | None:
        return self.oracle.problem_error(problem.data)

    def check(self, problem: SearchProblem, solution_ids: TokenIds) -> Verdict:
        return self.oracle.check(problem.data, self.decode(solution_ids))
