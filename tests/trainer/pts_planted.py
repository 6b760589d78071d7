"""A policy with planted pivots: the true p(success | prefix) along its solution is a known step
function, and its judge draws success with exactly that probability.

The solution is `reference` (token ids). At position j (0-based) the policy emits the reference
token with probability pi_j, otherwise an alternative token `ALT_BASE + j` that ends the
solution; a solution ending after an alternative at j succeeds with probability alt_j, the full
reference with probability values[T]. pi_j and alt_j are chosen so that the chance of success
after the first i reference tokens is exactly values[i]:
values[j] = pi_j * values[j + 1] + (1 - pi_j) * alt_j.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

from tokenmill.trainer.oracles import Verdict
from tokenmill.trainer.pts import Continuation, SearchProblem

ALT_BASE = 10_000
FLAT_FOLLOW = 0.9  # chance of the reference token where p does not change


def step_values(length: int, start: float, pivots: dict[int, float]) -> list[float]:
    """values[i] for i = 0..length: `start`, changed by pivots[j] after token j."""
    values = [start]
    for position in range(length):
        values.append(values[-1] + pivots.get(position, 0.0))
    assert all(-1e-9 <= v <= 1 + 1e-9 for v in values), values
    return [min(1.0, max(0.0, v)) for v in values]


class PlantedPolicy:
    """Both the Policy and the Judge of one planted problem."""

    def __init__(self, question_ids: Sequence[int], reference: Sequence[int], values: Sequence[float],
                 seed: int = 0, vocab_size: int = 2 * ALT_BASE, uniform_logprobs: bool = False):
        assert len(values) == len(reference) + 1
        self.question_ids = tuple(question_ids)
        self.reference = tuple(reference)
        self.values = list(values)
        self.vocab_size = vocab_size
        self.uniform_logprobs = uniform_logprobs
        """Report the same log-prob for every solution token (the split falls at token midpoints)."""
        self.follow: list[float] = []
        self.alt: list[float] = []
        for j in range(len(reference)):
            before, after = values[j], values[j + 1]
            if after > before + 1e-12:
                self.alt.append(0.0)
                self.follow.append(before / after)
            elif after < before - 1e-12:
                self.alt.append(1.0)
                self.follow.append((1.0 - before) / (1.0 - after))
            else:
                self.alt.append(before)
                self.follow.append(FLAT_FOLLOW)
        self.sample_rng = random.Random(seed)
        self.judge_rng = random.Random(seed + 1)
        self.rollout_prefixes: Counter = Counter()
        self.solution_requests = 0

    def problem(self, problem_id: str = "planted", **data) -> SearchProblem:
        return SearchProblem(problem_id, self.question_ids, data or {"answer": "planted"})

    # --- Policy
    def sample_solutions(self, question_ids, n):
        assert tuple(question_ids) == self.question_ids
        self.solution_requests += 1
        logprobs = tuple(-1.0 if self.uniform_logprobs else math.log(p) for p in self.follow)
        return [Continuation(self.reference, logprobs) for _ in range(n)]

    def rollout(self, question_ids, solution_prefix, n):
        prefix_ids = tuple(question_ids) + tuple(solution_prefix)
        self.rollout_prefixes[prefix_ids] += 1
        start = len(self.question_ids)
        solution = prefix_ids[start:]
        assert prefix_ids[:start] == self.question_ids, "rollouts continue the question"
        if solution and solution[-1] == ALT_BASE + len(solution) - 1:  # an alternative ended the solution
            assert solution[:-1] == self.reference[: len(solution) - 1]
            return [Continuation(()) for _ in range(n)]
        assert solution == self.reference[: len(solution)], "the search only rolls out from prefixes of its solutions"
        rollouts = []
        for _ in range(n):
            tokens, logprobs = [], []
            for j in range(len(solution), len(self.reference)):
                if self.sample_rng.random() < self.follow[j]:
                    tokens.append(self.reference[j])
                    logprobs.append(math.log(self.follow[j]))
                else:
                    tokens.append(ALT_BASE + j)
                    logprobs.append(math.log(1.0 - self.follow[j]))
                    break
            rollouts.append(Continuation(tuple(tokens), tuple(logprobs)))
        return rollouts

    # --- Judge
    def problem_error(self, problem):
        return None

    def check(self, problem, solution_ids):
        return Verdict(self.judge_rng.random() < self.true_p(solution_ids), "correct", "")

    def true_p(self, solution_ids: Sequence[int]) -> float:
        """The exact chance of success after `solution_ids` (a reference prefix, optionally
        followed by one alternative token)."""
        for j, token in enumerate(solution_ids):
            if token != self.reference[j]:
                assert token == ALT_BASE + j and j == len(solution_ids) - 1
                return self.alt[j]
        return self.values[len(solution_ids)]


