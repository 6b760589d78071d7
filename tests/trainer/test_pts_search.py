"""Pivotal Token Search on policies with planted pivots: exactly the planted pivots are found,
at the expected cost, and every pair's tokens really move p the way they say."""

from __future__ import annotations

import json
import math
import random

import pytest

from tests.trainer.pts_planted import ALT_BASE, PlantedPolicy, step_values
from tokenmill.store.schemas import get_schema, validate_table
from tokenmill.trainer.oracles import OracleInputError, Verdict, make_oracle
from tokenmill.trainer.pts import (
    Continuation,
    OracleJudge,
    PTSInputError,
    SearchConfig,
    SearchProblem,
    cumulative_logprob_midpoint,
    resolution_warning,
    search,
)
from tokenmill.trainer.pts.stats import difference_standard_error

QUESTION = (1, 2, 3)
N = 800  # rollouts per estimate: a difference's standard error at p=0.5 is 0.025
P_GAP = 0.2
# Planted sizes stay at least 4 standard errors of a difference away from pGap.
ABOVE_GAP = (0.3, 0.35, 0.4)
BELOW_GAP = (0.03, 0.05, 0.08)
ALL_QUESTIONS = dict(min_success=0.0, max_success=1.0)


def planted(length: int, start: float, pivots: dict[int, float], seed: int = 0, **options) -> PlantedPolicy:
    reference = [100 + position for position in range(length)]
    return PlantedPolicy(QUESTION, reference, step_values(length, start, pivots), seed=seed, **options)


def run(policy: PlantedPolicy, **config):
    settings = dict(samples_per_estimate=N, p_gap=P_GAP, solutions_per_problem=1, **ALL_QUESTIONS)
    settings.update(config)
    return search([policy.problem()], policy, policy, SearchConfig(**settings), vocab_size=policy.vocab_size)


def random_monotone_design(rng: random.Random, length: int, big: int, small: int, rising: bool):
    positions = rng.sample(range(length), big + small)
    sizes = [rng.choice(ABOVE_GAP) for _ in range(big)] + [rng.choice(BELOW_GAP) for _ in range(small)]
    while sum(sizes) > 0.95:
        sizes[0] -= 0.05
        assert sizes[0] >= 0.3 or big == 0
    sign = 1.0 if rising else -1.0
    pivots = {position: sign * size for position, size in zip(positions, sizes)}
    start = 0.02 if rising else 0.98
    return pivots, start


def test_noise_bound_of_the_planted_sizes():
    margin = min(min(ABOVE_GAP) - P_GAP, P_GAP - max(BELOW_GAP))
    assert margin >= 4 * difference_standard_error(N) - 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_search_finds_exactly_the_planted_pivots_of_a_monotone_p(seed):
    rng = random.Random(seed)
    length = rng.choice((32, 64, 128))
    pivots, start = random_monotone_design(rng, length, big=2, small=2, rising=seed % 2 == 0)
    policy = planted(length, start, pivots, seed=seed)

    result = run(policy)

    found = result.problems[0].pivots[0]
    expected = sorted(position for position, size in pivots.items() if abs(size) >= P_GAP)
    assert [pivot.position for pivot in found] == expected
    for pivot in found:
        assert pivot.token_id == policy.reference[pivot.position]
        assert pivot.delta == pytest.approx(pivots[pivot.position], abs=4 * difference_standard_error(N))
    assert result.stats.pivotal_tokens == len(expected)


def test_every_pivot_of_a_monotone_p_is_found():
    pivots = {3: 0.24, 11: 0.24, 20: 0.24, 28: 0.24}  # each 0.12 above pGap: more than 4 standard errors
    policy = planted(32, 0.01, pivots, seed=3)
    found = run(policy, p_gap=0.12).problems[0].pivots[0]
    assert [(pivot.position, pivot.token_id) for pivot in found] == [(p, 100 + p) for p in sorted(pivots)]


def test_rises_and_falls_in_separate_segments_are_found():
    # up in the first half, down (smaller) in the second: the ends still differ by pGap.
    pivots = {5: 0.6, 45: -0.3}
    policy = planted(64, 0.2, pivots, seed=5)
    found = run(policy).problems[0].pivots[0]
    assert [(pivot.position, round(pivot.delta, 1)) for pivot in found] == [(5, 0.6), (45, -0.3)]


def test_a_rise_and_a_fall_that_cancel_are_not_looked_for():
    # The subdivision only opens a segment whose ends differ by pGap (the report's algorithm):
    # equal p at both ends of the solution means no search, and nothing false is reported.
    policy = planted(64, 0.3, {10: 0.4, 50: -0.4}, seed=1)
    result = run(policy)
    assert result.problems[0].pivots == [[]]
    assert result.stats.estimates == 2


@pytest.mark.parametrize(("length", "count"), [(64, 1), (128, 2), (256, 2), (256, 4), (512, 3)])
def test_estimates_grow_with_the_log_of_the_length(length, count):
    rng = random.Random(length * 10 + count)
    positions = sorted(rng.sample(range(length), count))
    pivots = {position: 0.9 / count for position in positions}
    policy = planted(length, 0.05, pivots, seed=count, uniform_logprobs=True)

    result = run(policy, p_gap=min(0.2, 0.9 / count - 0.1))

    assert [pivot.position for pivot in result.problems[0].pivots[0]] == positions
    budget = 2 * count * math.log2(length)
    assert result.stats.estimates <= budget + 2, (result.stats.estimates, budget)
    assert result.stats.rollouts + result.stats.rollouts_reused == result.stats.estimates * N
    assert len(policy.rollout_prefixes) <= result.stats.estimates


@pytest.mark.parametrize("seed", range(3))
def test_rollouts_that_went_on_through_a_prefix_are_its_samples(seed):
    pivots = {20: 0.4, 41: 0.35}
    fresh = run(planted(64, 0.1, pivots, seed=seed), reuse_rollouts=False)
    reused = run(planted(64, 0.1, pivots, seed=seed))
    assert fresh.problems[0].pivots[0] and fresh.stats.rollouts_reused == 0
    assert [p.position for p in reused.problems[0].pivots[0]] == [p.position for p in fresh.problems[0].pivots[0]]
    assert reused.stats.rollouts_reused > 0
    assert reused.stats.rollouts + reused.stats.rollouts_reused == reused.stats.estimates * N
    assert reused.stats.rollouts < fresh.stats.rollouts * reused.stats.estimates / fresh.stats.estimates
    assert reused.stats.tokens_generated < fresh.stats.tokens_generated
    for pair in reused.pairs:  # every estimate still stands on N samples
        assert pair.prefix_rollouts == N and N in (pair.chosen_rollouts, pair.rejected_rollouts)


def test_log_probability_split_isolates_unlikely_pivots_with_fewer_estimates():
    pivots = {37: 0.5, 201: 0.4}
    by_logprob = run(planted(256, 0.05, pivots, seed=2)).stats.estimates
    by_token_count = run(planted(256, 0.05, pivots, seed=2, uniform_logprobs=True)).stats.estimates
    assert by_logprob < by_token_count


def test_cumulative_logprob_midpoint():
    assert cumulative_logprob_midpoint([-1.0] * 8, 0, 8) == 4
    assert cumulative_logprob_midpoint([0.0] * 8, 2, 8) == 5  # all certain: token midpoint
    surprising = [-0.01] * 9 + [-5.0] + [-0.01] * 10
    assert cumulative_logprob_midpoint(surprising, 0, 20) == 10  # the unlikely token ends the left half
    assert cumulative_logprob_midpoint([-5.0, -0.1], 0, 2) == 1  # each side keeps a token


def test_prefixes_are_estimated_once_by_token_ids():
    pivots = {7: 0.3, 21: 0.3}
    policy = planted(32, 0.2, pivots, seed=4)
    one = run(policy).stats
    policy = planted(32, 0.2, pivots, seed=4)
    three = run(policy, solutions_per_problem=3).stats
    # the three sampled solutions are the same tokens: the second and third cost no rollouts.
    assert three.estimates == one.estimates
    assert three.estimate_reuses > one.estimate_reuses
    assert max(policy.rollout_prefixes.values()) == 1
    assert all(prefix[:3] == QUESTION for prefix in policy.rollout_prefixes)


@pytest.mark.parametrize(("start", "pivots"), [
    (0.2, {4: 0.35, 12: 0.04, 27: 0.3}),
    (0.9, {6: -0.35, 15: -0.05, 20: -0.3}),
])
def test_pairs_chosen_raises_and_rejected_lowers_p(start, pivots):
    policy = planted(32, start, pivots, seed=7)
    result = run(policy)
    pairs = result.pairs
    assert [pair.position for pair in pairs] == [p for p, size in sorted(pivots.items()) if abs(size) >= P_GAP]
    for pair in pairs:
        solution_prefix = pair.prompt_ids[len(QUESTION):]
        assert pair.prompt_ids[: len(QUESTION)] == QUESTION
        assert solution_prefix == tuple(policy.reference[: pair.position])
        p_prefix = policy.true_p(solution_prefix)
        p_chosen = policy.true_p(solution_prefix + (pair.chosen_id,))
        p_rejected = policy.true_p(solution_prefix + (pair.rejected_id,))
        assert p_chosen > p_prefix > p_rejected
        assert pair.chosen_id != pair.rejected_id
        assert pair.p_chosen > pair.p_prefix > pair.p_rejected
        # the counterpart is a first token of the rollouts already sampled at that prefix
        pivotal = policy.reference[pair.position]
        other = pair.rejected_id if pair.chosen_id == pivotal else pair.chosen_id
        assert other == ALT_BASE + pair.position
        other_rollouts = pair.rejected_rollouts if other == pair.rejected_id else pair.chosen_rollouts
        pivotal_rollouts = pair.chosen_rollouts if other == pair.rejected_id else pair.rejected_rollouts
        assert 0 < other_rollouts < N and pivotal_rollouts == N and pair.prefix_rollouts == N
    assert result.stats.pairs["pivotal"] == len(pairs) == 2


def test_pairs_fit_the_preference_pairs_schema():
    policy = planted(32, 0.3, {9: 0.4}, seed=8)
    result = run(policy, solutions_per_problem=2, samples_per_estimate=200)
    rows = [pair.to_row() for pair in result.pairs] + [pair.to_row() for pair in result.full_pairs]
    assert {json.loads(row["meta"])["kind"] for row in rows} == {"pivotal", "full-solution"}
    table = validate_table(rows, get_schema("preference_pairs"))
    assert table.num_rows == len(rows)
    pivotal = json.loads(rows[0]["meta"])
    assert (rows[0]["chosen_tokens"], rows[0]["rejected_tokens"]) == ([109], [ALT_BASE + 9])
    assert pivotal["rollouts"] == 200 and pivotal["p_chosen"] > pivotal["p_before"] > pivotal["p_rejected"]
    assert len({row["id"] for row in rows}) == len(rows)


def test_full_solution_pairs_are_correct_against_incorrect_of_the_same_question():
    verdicts: dict[tuple[int, ...], list[bool]] = {}
    policy = planted(16, 0.5, {8: 0.3}, seed=9)
    judge_check = policy.check

    def recording_check(problem, solution_ids):
        verdict = judge_check(problem, solution_ids)
        verdicts.setdefault(tuple(solution_ids), []).append(verdict.correct)
        return verdict

    policy.check = recording_check
    result = run(policy, samples_per_estimate=100)
    full = result.full_pairs
    assert full and all(pair.prompt_ids == QUESTION for pair in full)
    for pair in full:
        assert pair.chosen_ids != pair.rejected_ids
        assert True in verdicts[pair.chosen_ids] and False in verdicts[pair.rejected_ids]
    assert result.stats.pairs["full-solution"] == len(full)


def test_only_questions_inside_the_success_window_are_searched():
    problems, policies = [], {}
    for name, start in (("hard", 0.05), ("easy", 0.95), ("fair", 0.5)):
        policy = planted(16, start, {}, seed=len(name))
        policies[name] = policy
        problems.append(policy.problem(name))

    class Router:
        def sample_solutions(self, question_ids, n):
            return self.current.sample_solutions(question_ids, n)

        def rollout(self, question_ids, solution_prefix, n):
            return self.current.rollout(question_ids, solution_prefix, n)

        def problem_error(self, problem):
            self.current = policies[problem.id]
            return None

        def check(self, problem, solution_ids):
            self.current = policies[problem.id]
            return self.current.check(problem, solution_ids)

    router = Router()
    order = iter(problems)

    def sample_solutions(question_ids, n):
        router.current = policies[next(order).id]
        return router.current.sample_solutions(question_ids, n)

    router.sample_solutions = sample_solutions
    config = SearchConfig(samples_per_estimate=200, p_gap=P_GAP, solutions_per_problem=2)
    result = search(problems, router, router, config)
    assert [(r.problem_id, r.searched) for r in result.problems] == [
        ("hard", False), ("easy", False), ("fair", True)]
    assert abs(result.problems[2].p_question - 0.5) < 0.15
    stats = result.stats
    assert (stats.problems, stats.problems_searched, stats.problems_skipped_too_hard,
            stats.problems_skipped_too_easy) == (3, 1, 1, 1)
    assert stats.solutions_searched == 2


def test_statistics():
    pivots = {5: 0.45, 20: 0.35}
    result = run(planted(32, 0.1, pivots, seed=11), solutions_per_problem=2)
    figures = result.stats.to_dict()
    assert figures["pivotalTokens"] == 4  # two per solution (the same tokens twice)
    assert figures["pivotalPerSolution"] == {"2": 2}
    assert figures["deltaPHistogram"] == {"[0.3,0.4)": 2, "[0.4,0.5)": 2}
    assert figures["rollouts"] + figures["rolloutsReused"] == figures["estimates"] * N
    assert figures["tokensGenerated"] > figures["rollouts"]
    assert 0 < figures["estimateStandardError"]["mean"] <= figures["estimateStandardError"]["max"] <= 0.5 / math.sqrt(N) + 1e-9
    assert sum(figures["verdicts"].values()) == figures["rollouts"] + figures["solutionsSampled"]
    json.dumps(figures)


def test_at_most_max_pivotal_tokens_per_solution_keeping_the_largest():
    pivots = {2: 0.2, 9: 0.38, 17: 0.2, 25: 0.2}
    result = run(planted(32, 0.01, pivots, seed=12), p_gap=0.12, max_pivotal_tokens=1)
    assert [pivot.position for pivot in result.problems[0].pivots[0]] == [9]
    assert result.stats.pivotal_tokens_over_limit == 3
    assert result.stats.pivotal_tokens == 1


def test_warns_when_samples_cannot_resolve_the_gap():
    warning = resolution_warning(30, 0.2)
    assert "samplesPerEstimate=30" in warning and "0.129" in warning and "samplesPerEstimate >= 50" in warning
    assert resolution_warning(50, 0.2) is None
    assert resolution_warning(100, 0.1) is not None
    result = run(planted(8, 0.5, {}), samples_per_estimate=30)
    assert result.warnings == [warning]
    assert run(planted(8, 0.5, {})).warnings == []


# ---- bad input and crashes --------------------------------------------------------------------

@pytest.mark.parametrize("gap", [0.0, 1.0, -0.1, 1.5])
def test_p_gap_outside_zero_one_fails_before_sampling(gap):
    policy = planted(8, 0.5, {})
    with pytest.raises(PTSInputError, match="pGap: must lie strictly between 0 and 1"):
        run(policy, p_gap=gap)
    assert policy.solution_requests == 0 and not policy.rollout_prefixes


def test_problems_the_oracle_cannot_check_fail_before_sampling():
    policy = planted(8, 0.5, {})
    judge = OracleJudge(make_oracle("math"), decode=lambda ids: " ".join(map(str, ids)))
    problems = [policy.problem("with-answer", answer="7"), policy.problem("p2", prompt="no answer here")]
    with pytest.raises(PTSInputError, match=r"problems\[p2\]\.answer: a math problem needs"):
        search(problems, policy, judge, SearchConfig())
    code_judge = OracleJudge(make_oracle("code"), decode=str)
    with pytest.raises(PTSInputError, match=r"problems\[with-answer\]\.tests"):
        search(problems[:1], policy, code_judge, SearchConfig())
    assert policy.solution_requests == 0 and not policy.rollout_prefixes
    with pytest.raises(OracleInputError, match="unknown oracle 'llm-judge'"):
        make_oracle("llm-judge")


def test_token_ids_outside_the_policys_vocabulary_fail_before_sampling():
    policy = planted(8, 0.5, {})
    problem = policy.problem()
    with pytest.raises(PTSInputError, match="outside the policy's vocabulary of 3"):
        search([problem], policy, policy, SearchConfig(), vocab_size=3)
    assert policy.solution_requests == 0


def test_a_crashing_oracle_counts_as_a_failure_with_its_reason():
    policy = planted(16, 0.6, {})
    honest = policy.check
    calls = {"n": 0}

    def flaky(problem, solution_ids):
        calls["n"] += 1
        if calls["n"] % 4 == 0:
            raise ValueError("could not parse the answer")
        return honest(problem, solution_ids)

    policy.check = flaky
    result = run(policy, samples_per_estimate=200)
    crashes = result.stats.verdicts["oracle-crashed"]
    assert crashes == calls["n"] // 4 > 0
    assert result.problems[0].searched
    assert abs(result.problems[0].p_question - 0.6 * 0.75) < 0.12  # crashes count as failures


def test_verdicts_from_the_oracle_pass_through():
    policy = planted(8, 0.5, {})
    policy.check = lambda problem, ids: Verdict(False, "timeout", "ran past the limit")
    result = run(policy, samples_per_estimate=10)
    assert set(result.stats.verdicts) == {"timeout"}


def test_judging_in_threads_finds_the_same_pivots():
    pivots = {6: 0.35, 19: 0.3}
    result = run(planted(32, 0.2, pivots, seed=13), judge_workers=4)
    assert [pivot.position for pivot in result.problems[0].pivots[0]] == [6, 19]
    assert sum(result.stats.verdicts.values()) == result.stats.rollouts + result.stats.solutions_sampled


class CharPolicy:
    """Token ids are character codes; rollouts alternate between two fixed completions."""

    def __init__(self, good: str, bad: str):
        self.good, self.bad = good, bad

    def sample_solutions(self, question_ids, n):
        return [self._continuation(self.good if i % 2 == 0 else self.bad) for i in range(n)]

    def rollout(self, question_ids, solution_prefix, n):
        return [self._continuation(self.good if i % 2 == 0 else self.bad) for i in range(n)]

    @staticmethod
    def _continuation(text):
        return Continuation(tuple(ord(c) for c in text), tuple(-0.5 for _ in text))


def test_an_oracle_judges_decoded_solutions():
    policy = CharPolicy("```python\ndef inc(x):\n    return x + 1\n```", "```python\ndef inc(x):\n    return x\n```")
    judge = OracleJudge(make_oracle("code", timeout_seconds=10, memory_mb=256),
                        decode=lambda ids: "".join(map(chr, ids)))
    problem = SearchProblem("inc", tuple(ord(c) for c in "Write inc."), {"tests": ["assert inc(1) == 2"]})
    config = SearchConfig(samples_per_estimate=4, p_gap=0.5, solutions_per_problem=2, judge_workers=2)
    result = search([problem], policy, judge, config, vocab_size=256)
    assert result.problems[0].p_question == 0.5 and result.problems[0].searched
    assert result.stats.verdicts["correct"] == result.stats.verdicts["test-failed"] > 0
    assert [pair.kind for pair in result.full_pairs] == ["full-solution"] * 3
    assert all("return x + 1" in "".join(map(chr, pair.chosen_ids)) for pair in result.full_pairs)


def test_a_rise_from_certain_failure_pairs_with_a_token_that_keeps_it_there():
    # p is 0 until token 5 makes success certain: no token can lower p(prefix) = 0, so the
    # counterpart is the alternative that keeps it at 0.
    policy = planted(16, 1e-9, {5: 1.0 - 1e-9}, seed=14)
    result = run(policy, samples_per_estimate=200)
    (pair,) = result.pairs
    assert (pair.position, pair.chosen_id, pair.rejected_id) == (5, 105, ALT_BASE + 5)
    assert (pair.p_prefix, pair.p_chosen, pair.p_rejected) == (0.0, 1.0, 0.0)


def test_statistics_reach_prometheus():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tokenmill.store import Progress
    from tokenmill.trainer.metrics import ProgressCollector
    from tokenmill.trainer.pts.workload import progress_metrics

    stats = run(planted(32, 0.1, {5: 0.45, 20: 0.35}, seed=11)).stats
    progress = Progress(phase="searching", done=1, total=1, unit="problems", metrics=progress_metrics(stats))
    registry = CollectorRegistry()
    registry.register(ProgressCollector(lambda: progress, {"kind": "PTSJob", "namespace": "ns", "name": "pts"}))
    samples = {sample.name: sample for family in text_string_to_metric_families(generate_latest(registry).decode())
               for sample in family.samples}
    assert samples["tokenmill_pts_pivotal_tokens_total"].value == stats.pivotal_tokens == 2
    assert samples["tokenmill_pts_rollouts_total"].value == stats.rollouts
    assert samples["tokenmill_pts_pivotal_pairs_total"].labels == {"kind": "PTSJob", "namespace": "ns", "name": "pts"}
    assert samples["tokenmill_pts_problems_total"].value == 1
    assert samples["tokenmill_pts_problems_searched_total"].value == 1
    assert samples["tokenmill_pts_problems_skipped_too_hard_total"].value == 0
    assert samples["tokenmill_pts_rollouts_reused_total"].value == stats.rollouts_reused
    assert samples["tokenmill_pts_estimate_standard_error_max"].value == pytest.approx(stats.estimate_se_max)
    assert 0 < samples["tokenmill_pts_estimate_standard_error_mean"].value <= stats.estimate_se_max
    labelled = [(family.name, sample.labels, sample.value)
                for family in text_string_to_metric_families(generate_latest(registry).decode())
                for sample in family.samples if sample.name.endswith("_total")]
    by_delta = {labels["delta_p"]: value for name, labels, value in labelled
                if name == "tokenmill_pts_pivotal_tokens_by_delta_p"}
    assert by_delta == {"[0.3,0.4)": 1.0, "[0.4,0.5)": 1.0}
    by_count = {labels["pivotal_tokens"]: value for name, labels, value in labelled
                if name == "tokenmill_pts_solutions_by_pivotal_tokens"}
    assert by_count == {"2": 1.0}
    verdicts = {labels["reason"]: value for name, labels, value in labelled if name == "tokenmill_pts_verdicts"}
    assert verdicts == {reason: float(n) for reason, n in stats.verdicts.items()} and sum(verdicts.values()) > 0


def test_skipped_problems_and_figures_reach_the_manifest_and_status():
    from tokenmill.outputs import headline_counts

    easy, hard, searched = (planted(16, start, {8: 0.3} if start < 0.5 else {}, seed=13) for start in (0.95, 0.02, 0.3))
    stats = run(easy).stats
    stats.merge(run(hard, min_success=0.2, max_success=0.8).stats)
    stats.merge(run(searched, min_success=0.2, max_success=0.8).stats)
    figures = stats.to_dict()
    assert (figures["problems"], figures["problemsSearched"]) == (3, 2)
    assert (figures["problemsSkippedTooHard"], figures["problemsSkippedTooEasy"]) == (1, 0)
    assert figures["deltaPHistogram"] == {"[0.3,0.4)": 1} and figures["pivotalPerSolution"] == {"0": 1, "1": 1}
    assert set(figures["estimateStandardError"]) == {"mean", "max"}
    status = headline_counts({**figures, "warnings": []})
    assert {key: status[key] for key in ("problems", "problemsSearched", "problemsSkippedTooHard", "pivotalTokens",
                                         "rollouts", "rolloutsReused")} == {
        "problems": 3, "problemsSearched": 2, "problemsSkippedTooHard": 1, "pivotalTokens": 1,
        "rollouts": stats.rollouts, "rolloutsReused": stats.rollouts_reused}
