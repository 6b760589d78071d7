"""Pivotal Token Search over one policy's solutions (RECIPE.md, "Pivotal Token Search").

For each question: sample solutions, estimate p(success | question) from them and the
rollouts at the question, and search only questions inside [minSuccess, maxSuccess]. Along
each solution, `subdivide` compares p at a segment's two ends and splits it at the
cumulative log-probability midpoint while they differ by pGap or more; single tokens whose
change of p is at least pGap are pivotal. Every p(success | prefix) is estimated once from
samplesPerEstimate rollouts and memoised under the prefix's token ids.

The subdivision runs level by level over all solutions of a question, and the questions run
side by side (`drive`): what they all need at the same step (their solutions; then the
prefixes of their current levels) is one call of a policy that batches (`sample_solutions_batch`,
`rollout_batch`: one engine call, the rows of every prefix decode together) instead of one call
per question and prefix. With a policy that draws a prompt's samples from that prompt's own seed
(EnginePolicy), a question's search is the same whatever it is run beside.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tokenmill.trainer.oracles import Verdict
from tokenmill.trainer.oracles.base import crashed
from tokenmill.trainer.pts.pairs import FullSolutionPair, PivotalTokenPair
from tokenmill.trainer.pts.policy import Continuation, Judge, Policy, SearchProblem, TokenIds
from tokenmill.trainer.pts.stats import SearchStats, resolution_warning

MAX_REPORTED_PROBLEMS = 10
T = TypeVar("T")


@dataclass(frozen=True)
class SolutionsWanted:
    """A question's search asks for `n` solutions to it; it is sent the Continuations."""

    question_ids: TokenIds
    n: int


@dataclass(frozen=True)
class RolloutsWanted:
    """A question's search asks for n rollouts of each (solution prefix, n); it is sent, for
    each, the continuations' token ids."""

    question_ids: TokenIds
    wanted: list[tuple[TokenIds, int]]


Asking = Generator["SolutionsWanted | RolloutsWanted", Any, T]
"""A question's search step by step: it yields what it needs from the policy and is sent the answer."""


class PTSInputError(ValueError):
    """A search that cannot start: the message names the field or problem, before any sampling."""


@dataclass(frozen=True)
class SearchConfig:
    """The search's settings (PTSJob spec names in the messages)."""

    samples_per_estimate: int = 64
    p_gap: float = 0.2
    min_success: float = 0.2
    max_success: float = 0.8
    solutions_per_problem: int = 4
    max_pivotal_tokens: int = 8
    judge_workers: int = 1
    """Completions judged at once (threads): the code oracle's sandboxed runs overlap."""
    reuse_rollouts: bool = True
    """Count a rollout drawn at a shorter prefix of the same solution that went on through this
    prefix as one of this prefix's samples (its tail is a draw from the policy at this prefix)."""

    def problems(self) -> list[str]:
        found = []
        if not (isinstance(self.p_gap, (int, float)) and 0.0 < self.p_gap < 1.0):
            found.append(f"pGap: must lie strictly between 0 and 1, got {self.p_gap!r}")
        if self.samples_per_estimate < 2:
            found.append(f"samplesPerEstimate: must be at least 2, got {self.samples_per_estimate}")
        if self.solutions_per_problem < 1:
            found.append(f"solutionsPerProblem: must be at least 1, got {self.solutions_per_problem}")
        if self.judge_workers < 1:
            found.append(f"judgeWorkers: must be at least 1, got {self.judge_workers}")
        if self.max_pivotal_tokens < 1:
            found.append(f"maxPivotalTokens: must be at least 1, got {self.max_pivotal_tokens}")
        if not 0.0 <= self.min_success <= self.max_success <= 1.0:
            found.append(f"queryFilter: need 0 <= minSuccess <= maxSuccess <= 1, got "
                         f"{self.min_success} and {self.max_success}")
        return found

    def check(self) -> None:
        found = self.problems()
        if found:
            raise PTSInputError("; ".join(found))

    def warnings(self) -> list[str]:
        warning = resolution_warning(self.samples_per_estimate, self.p_gap)
        return [warning] if warning else []

    @classmethod
    def from_spec(cls, spec) -> SearchConfig:  # a tokenmill.api.pts.PTSJobSpec
        return cls(
            samples_per_estimate=spec.samples_per_estimate,
            p_gap=spec.p_gap,
            min_success=spec.query_filter.min_success,
            max_success=spec.query_filter.max_success,
            solutions_per_problem=spec.solutions_per_problem,
            max_pivotal_tokens=spec.max_pivotal_tokens,
        )


@dataclass
class Estimate:
    """p(success | prefix) from the rollouts continued from that prefix."""

    rollouts: int = 0
    successes: int = 0
    next_tokens: dict[int, list[int]] = field(default_factory=dict)
    """For each first token of a rollout: [rollouts, successes] of the rollouts that began with it."""

    @property
    def p(self) -> float:
        return self.successes / self.rollouts

    @property
    def standard_error(self) -> float:
        return math.sqrt(self.p * (1.0 - self.p) / self.rollouts)

    def next_token_p(self, token: int) -> tuple[float, int]:
        rollouts, successes = self.next_tokens[token]
        return successes / rollouts, rollouts


@dataclass(frozen=True)
class Pivot:
    """A pivotal token: solution[position] moves p from p_before to p_after."""

    position: int
    token_id: int
    p_before: float
    p_after: float

    @property
    def delta(self) -> float:
        return self.p_after - self.p_before


@dataclass
class ProblemResult:
    problem_id: str
    p_question: float
    searched: bool
    pivots: list[list[Pivot]] = field(default_factory=list)
    """Kept pivotal tokens of each searched solution, in solution order."""
    pairs: list[PivotalTokenPair] = field(default_factory=list)
    full_pairs: list[FullSolutionPair] = field(default_factory=list)


@dataclass
class SearchResult:
    problems: list[ProblemResult]
    stats: SearchStats
    warnings: list[str]

    @property
    def pairs(self) -> list[PivotalTokenPair]:
        return [pair for result in self.problems for pair in result.pairs]

    @property
    def full_pairs(self) -> list[FullSolutionPair]:
        return [pair for result in self.problems for pair in result.full_pairs]


def cumulative_logprob_midpoint(logprobs: Sequence[float], start: int, end: int) -> int:
    """Where to split tokens [start, end): the cut whose left part holds the share of the
    segment's total log-probability closest to half (each side keeps at least one token)."""
    weights = [-float(value) for value in logprobs[start:end]]
    total = sum(weights)
    if not total > 0.0:  # every token certain: fall back to the token midpoint
        return (start + end) // 2
    best_cut, best_distance, running = start + 1, math.inf, 0.0
    for cut in range(start + 1, end):
        running += weights[cut - start - 1]
        distance = abs(running - total / 2.0)
        if distance < best_distance:
            best_cut, best_distance = cut, distance
    return best_cut


class _ProblemSearch:
    """The search of one question; owns the memo of its prefix estimates."""

    def __init__(self, problem: SearchProblem, judge: Judge, config: SearchConfig, stats: SearchStats,
                 pool: ThreadPoolExecutor | None):
        self.problem, self.judge = problem, judge
        self.config, self.stats, self.pool = config, stats, pool
        self.memo: dict[TokenIds, Estimate] = {}
        self.drawn: dict[TokenIds, list[tuple[TokenIds, bool]]] = {}
        """The rollouts drawn at each solution prefix: (continuation, correct)."""

    def verdict(self, solution_ids: TokenIds) -> Verdict:
        try:
            return self.judge.check(self.problem, solution_ids)
        except Exception as error:  # noqa: BLE001 - a crashing check is a failed rollout
            return crashed(error)

    def judged(self, solutions: list[TokenIds]) -> list[bool]:
        """Whether each complete solution is correct, in order; verdicts counted by reason."""
        verdicts = list(self.pool.map(self.verdict, solutions) if self.pool else map(self.verdict, solutions))
        for verdict in verdicts:
            self.stats.verdicts[verdict.reason] += 1
        return [verdict.correct for verdict in verdicts]

    def estimate_all(self, solution_prefixes: Sequence[TokenIds]) -> Asking[None]:
        """Estimates every prefix not memoised yet, their rollouts asked for at once."""
        pending: dict[TokenIds, list[tuple[TokenIds, bool]]] = {}
        for prefix in solution_prefixes:
            if self.problem.question_ids + prefix in self.memo or prefix in pending:
                self.stats.estimate_reuses += 1
                continue
            pending[prefix] = self.passing_through(prefix) if self.config.reuse_rollouts else []
            self.stats.rollouts_reused += len(pending[prefix])
        wanted = [(prefix, self.config.samples_per_estimate - len(samples))
                  for prefix, samples in pending.items() if len(samples) < self.config.samples_per_estimate]
        drawn_at = (yield RolloutsWanted(self.problem.question_ids, wanted)) if wanted else []
        verdicts = iter(self.judged([prefix + tokens for (prefix, _), tokens_list in zip(wanted, drawn_at)
                                     for tokens in tokens_list]))
        for (prefix, _), tokens_list in zip(wanted, drawn_at, strict=True):
            drawn = [(tokens, next(verdicts)) for tokens in tokens_list]
            self.stats.rollouts += len(drawn)
            self.stats.tokens_generated += sum(len(tokens) for tokens, _ in drawn)
            self.drawn[prefix] = drawn
            pending[prefix] = pending[prefix] + drawn
        for prefix, samples in pending.items():
            estimate = Estimate()
            for continuation, correct in samples:
                estimate.rollouts += 1
                estimate.successes += correct
                if continuation:
                    counts = estimate.next_tokens.setdefault(continuation[0], [0, 0])
                    counts[0] += 1
                    counts[1] += correct
            if estimate.rollouts == 0:
                raise RuntimeError(f"problem {self.problem.id}: the policy returned no rollouts")
            self.stats.add_estimate(estimate.standard_error)
            self.memo[self.problem.question_ids + prefix] = estimate

    def passing_through(self, solution_prefix: TokenIds) -> list[tuple[TokenIds, bool]]:
        """Up to samplesPerEstimate rollouts drawn at shorter prefixes that went on through
        `solution_prefix`, as (the part after it, correct); from the nearest prefix first."""
        found: list[tuple[TokenIds, bool]] = []
        wanted = self.config.samples_per_estimate
        for start in sorted({len(p) for p in self.drawn if len(p) < len(solution_prefix)}, reverse=True):
            ancestor, path = solution_prefix[:start], solution_prefix[start:]
            for continuation, correct in self.drawn.get(ancestor, ()):
                if continuation[:len(path)] == path:
                    found.append((continuation[len(path):], correct))
                    if len(found) == wanted:
                        return found
        return found

    def subdivide(self, solutions: list[TokenIds], logprobs: list[Sequence[float]]) -> Asking[list[list[Pivot]]]:
        """Every solution's pivotal tokens (in no particular order): its segments compared and
        split level by level, each level's prefixes estimated together."""
        found: list[list[Pivot]] = [[] for _ in solutions]
        level = [(index, 0, len(tokens)) for index, tokens in enumerate(solutions) if tokens]
        while level:
            yield from self.estimate_all([solutions[index][:at] for index, start, end in level for at in (start, end)])
            deeper = []
            for index, start, end in level:
                solution = solutions[index]
                p_start = self.memo[self.problem.question_ids + solution[:start]].p
                p_end = self.memo[self.problem.question_ids + solution[:end]].p
                if abs(p_end - p_start) < self.config.p_gap:
                    continue
                if end - start == 1:
                    found[index].append(Pivot(start, solution[start], p_start, p_end))
                    continue
                cut = cumulative_logprob_midpoint(logprobs[index], start, end)
                deeper += [(index, start, cut), (index, cut, end)]
            level = deeper
        return found

    def run(self) -> Asking[ProblemResult]:
        """The search of this question; yields what it needs from the policy, and is sent the answer."""
        config, stats = self.config, self.stats
        solutions = list((yield SolutionsWanted(self.problem.question_ids, config.solutions_per_problem)))
        stats.solutions_sampled += len(solutions)
        sampled = [tuple(int(t) for t in solution.token_ids) for solution in solutions]
        stats.tokens_generated += sum(len(tokens) for tokens in sampled)
        judged_solutions = list(zip(sampled, self.judged(sampled)))
        yield from self.estimate_all([()])
        complete = judged_solutions + self.drawn.get((), [])  # the solutions and the rollouts at the question
        p_question = sum(correct for _, correct in complete) / len(complete)
        result = ProblemResult(self.problem.id, p_question, searched=False)
        if p_question < config.min_success:
            stats.problems_skipped_too_hard += 1
            return result
        if p_question > config.max_success:
            stats.problems_skipped_too_easy += 1
            return result
        result.searched = True
        stats.problems_searched += 1
        kept_all = yield from self.search_solutions(solutions)
        for index, (solution, kept) in enumerate(zip(solutions, kept_all, strict=True)):
            result.pivots.append(kept)
            for pivot in kept:
                pair = self.pair(index, solution, pivot)
                if pair is None:
                    stats.pivots_without_counterpart += 1
                else:
                    result.pairs.append(pair)
        result.full_pairs = self.full_solution_pairs(complete)
        stats.pairs[PivotalTokenPair.kind] += len(result.pairs)
        stats.pairs[FullSolutionPair.kind] += len(result.full_pairs)
        return result

    def search_solutions(self, solutions: list[Continuation]) -> Asking[list[list[Pivot]]]:
        """The kept pivotal tokens of each solution, in solution order."""
        sampled = [tuple(int(t) for t in solution.token_ids) for solution in solutions]
        for solution, tokens in zip(solutions, sampled, strict=True):
            if solution.logprobs is None or len(solution.logprobs) != len(tokens):
                raise RuntimeError(f"problem {self.problem.id}: the policy returned a solution without "
                                   "a log-probability for every token")
        found = yield from self.subdivide(sampled, [solution.logprobs for solution in solutions])
        kept_all = []
        for tokens, pivots in zip(sampled, found, strict=True):
            if not tokens:
                kept_all.append([])
                continue
            self.stats.solutions_searched += 1
            kept = sorted(pivots, key=lambda pivot: (-abs(pivot.delta), pivot.position))
            kept = sorted(kept[: self.config.max_pivotal_tokens], key=lambda pivot: pivot.position)
            self.stats.pivotal_tokens_over_limit += len(pivots) - len(kept)
            self.stats.pivotal_per_solution[len(kept)] += 1
            for pivot in kept:
                self.stats.add_pivot(pivot.delta)
            kept_all.append(kept)
        return kept_all

    def pair(self, solution_index: int, solution: Continuation, pivot: Pivot) -> PivotalTokenPair | None:
        """Chosen raises p, rejected lowers it; the pivotal token is one of them, the other is the
        first token of rollouts already sampled at the same prefix that moved p the other way.

        Where p(prefix) is already 0 (before a rise) or 1 (before a fall), nothing can move it
        further that way, and a token that leaves it there is the counterpart."""
        prefix = tuple(int(t) for t in solution.token_ids[: pivot.position])
        before = self.memo[self.problem.question_ids + prefix]
        after = self.memo[self.problem.question_ids + prefix + (pivot.token_id,)]
        raises = pivot.delta > 0
        at_bound = before.p == (0.0 if raises else 1.0)
        others = []
        for token, (rollouts, successes) in before.next_tokens.items():
            p = successes / rollouts
            moved_away = (p < before.p) if raises else (p > before.p)
            if token != pivot.token_id and (moved_away or (at_bound and p == before.p)):
                # the best-supported such token; among equals, the one moving p furthest
                others.append((rollouts, abs(p - before.p), -token, token, p))
        if not others:
            return None
        rollouts, _, _, other, p_other = max(others)
        pivotal = (pivot.token_id, after.p, after.rollouts)
        counterpart = (other, p_other, rollouts)
        chosen, rejected = (pivotal, counterpart) if raises else (counterpart, pivotal)
        return PivotalTokenPair(
            problem_id=self.problem.id,
            solution_index=solution_index,
            position=pivot.position,
            prompt_ids=self.problem.question_ids + prefix,
            chosen_id=chosen[0],
            rejected_id=rejected[0],
            p_prefix=before.p,
            prefix_rollouts=before.rollouts,
            p_chosen=chosen[1],
            chosen_rollouts=chosen[2],
            p_rejected=rejected[1],
            rejected_rollouts=rejected[2],
        )

    def full_solution_pairs(self, complete: list[tuple[TokenIds, bool]]) -> list[FullSolutionPair]:
        correct = [tokens for tokens, ok in complete if ok]
        incorrect = [tokens for tokens, ok in complete if not ok]
        distinct = [(chosen, rejected) for chosen, rejected in zip(correct, incorrect) if chosen != rejected]
        return [
            FullSolutionPair(self.problem.id, self.problem.question_ids, chosen, rejected, index)
            for index, (chosen, rejected) in enumerate(distinct)
        ]


def drive(searches: list[Asking[ProblemResult]], policy: Policy) -> list[ProblemResult]:
    """Runs the searches of several questions side by side: whatever they ask for at the same
    step is one policy call (`sample_solutions_batch` for solutions, `rollout_batch` for
    rollouts, where the policy has them; else a call per question or prefix). Each answer is
    what the question alone would have got: a policy draws a prompt's samples whatever it is
    batched with."""
    results: list[ProblemResult | None] = [None] * len(searches)
    asking: dict[int, SolutionsWanted | RolloutsWanted] = {}

    def advance(index: int, answer: Any) -> None:
        try:
            asking[index] = searches[index].send(answer)
        except StopIteration as finished:
            results[index] = finished.value

    for index in range(len(searches)):
        advance(index, None)
    while asking:
        now = sorted(asking.items())
        asking.clear()
        answers = _solutions([(i, a) for i, a in now if isinstance(a, SolutionsWanted)], policy)
        answers |= _rollouts([(i, a) for i, a in now if isinstance(a, RolloutsWanted)], policy)
        for index, _ in now:
            advance(index, answers[index])
    return results  # type: ignore[return-value]


def _solutions(asked: list[tuple[int, SolutionsWanted]], policy: Policy) -> dict[int, list[Continuation]]:
    batch = getattr(policy, "sample_solutions_batch", None)
    if batch is not None and asked:
        drawn = batch([(ask.question_ids, ask.n) for _, ask in asked])
    else:
        drawn = [policy.sample_solutions(ask.question_ids, ask.n) for _, ask in asked]
    return {index: list(solutions) for (index, _), solutions in zip(asked, drawn, strict=True)}


def _rollouts(asked: list[tuple[int, RolloutsWanted]], policy: Policy) -> dict[int, list[list[TokenIds]]]:
    flat = [(ask.question_ids, prefix, n) for _, ask in asked for prefix, n in ask.wanted]
    batch = getattr(policy, "rollout_batch", None)
    if batch is not None and flat:
        drawn = batch(flat)
    else:
        drawn = [policy.rollout(question, prefix, n) for question, prefix, n in flat]
    as_ids = iter([[tuple(int(t) for t in c.token_ids) for c in continuations] for continuations in drawn])
    return {index: [next(as_ids) for _ in ask.wanted] for index, ask in asked}


def check_problems(problems: Sequence[SearchProblem], judge: Judge, vocab_size: int | None) -> None:
    """Raises PTSInputError naming every problem that cannot be searched (up to ten)."""
    bad: list[str] = []
    seen: set[str] = set()
    for problem in problems:
        where = f"problems[{problem.id}]"
        if problem.id in seen:
            bad.append(f"{where}: the id appears twice")
        seen.add(problem.id)
        if not problem.question_ids:
            bad.append(f"{where}: the question has no tokens")
        elif vocab_size is not None and not all(0 <= t < vocab_size for t in problem.question_ids):
            bad.append(f"{where}: token ids outside the policy's vocabulary of {vocab_size} "
                       "(the problems were tokenized with another tokenizer)")
        error = judge.problem_error(problem)
        if error is not None:
            bad.append(f"{where}.{error}")
    if bad:
        more = f"\n  ... and {len(bad) - MAX_REPORTED_PROBLEMS} more" if len(bad) > MAX_REPORTED_PROBLEMS else ""
        raise PTSInputError(f"{len(bad)} problems cannot be searched:\n  "
                            + "\n  ".join(bad[:MAX_REPORTED_PROBLEMS]) + more)


def search(problems: Iterable[SearchProblem], policy: Policy, judge: Judge, config: SearchConfig,
           vocab_size: int | None = None) -> SearchResult:
    """Pivotal Token Search over `problems`. Every input is checked before the first sample."""
    config.check()
    problems = list(problems)
    check_problems(problems, judge, vocab_size)
    stats = SearchStats()
    pool = ThreadPoolExecutor(config.judge_workers) if config.judge_workers > 1 else None
    try:
        stats.problems += len(problems)
        results = drive([_ProblemSearch(problem, judge, config, stats, pool).run() for problem in problems], policy)
    finally:
        if pool is not None:
            pool.shutdown()
    return SearchResult(results, stats, config.warnings())
