"""The search through the torch engine on a tiny random model: token-id prompts, one request per
prefix estimate, the engine's prefix cache shared by a solution's prefixes, reproducible runs."""

from __future__ import annotations

import math

import pytest

from tests.trainer.generate_fixtures import tiny_model
from tokenmill.trainer.generate import SamplingParams
from tokenmill.trainer.generate.torch_engine import TorchEngine
from tokenmill.trainer.oracles import Verdict, make_oracle
from tokenmill.trainer.pts import OracleJudge, SearchConfig, SearchProblem, search
from tokenmill.trainer.pts.engine_policy import EnginePolicy, solution_decoder
from tokenmill.trainer.pts.stats import SearchStats
from tokenmill.trainer.tokenizer import get_tokenizer

pytestmark = pytest.mark.slow  # generates with a model (a few CPU seconds per search)

BYTE = get_tokenizer("byte")
STOPS = {BYTE.eos_id, BYTE.eot_id}
MAX_TOKENS = 12


class EvenSum:
    """Correct when the solution's token ids (stop excluded) add up to an even number: p stays
    near 0.5 along a solution and jumps to 0 or 1 at its last tokens."""

    def problem_error(self, problem):
        return None

    def check(self, problem, solution_ids):
        even = sum(t for t in solution_ids if t not in STOPS) % 2 == 0
        return Verdict(even, "correct" if even else "wrong-answer")


def make_policy(seed: int = 3) -> EnginePolicy:
    engine = TorchEngine(tiny_model(0, sharpness=1.0), BYTE)
    sampling = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=seed)
    return EnginePolicy(engine, sampling, stop_token_ids=STOPS, vocab_size=BYTE.vocab_size)


CONFIG = SearchConfig(samples_per_estimate=12, p_gap=0.3, solutions_per_problem=2)
PROBLEM = SearchProblem("q0", tuple(BYTE.encode("question 0:")))


@pytest.fixture(scope="module")
def searched():
    policy = make_policy()
    return policy, search([PROBLEM], policy, EvenSum(), CONFIG, vocab_size=policy.vocab_size)


def test_search_through_the_torch_engine(searched):
    policy, result = searched
    stats = result.stats
    assert stats.problems_searched == 1 and stats.solutions_searched == 2
    # one request for the solutions, then at most one per estimate (the memo answers the rest),
    # none at the ends of the solutions, which continue with nothing, or where rollouts from
    # shorter prefixes that went on through the prefix were samples enough
    requests = policy.requests
    ends = {s.token_ids for s in policy.sample_solutions(PROBLEM.question_ids, CONFIG.solutions_per_problem)}
    assert 1 < requests <= 1 + stats.estimates - len(ends)
    assert stats.rollouts + stats.rollouts_reused == stats.estimates * CONFIG.samples_per_estimate
    assert stats.rollouts <= (requests - 1 + len(ends)) * CONFIG.samples_per_estimate  # an end's are empty
    assert stats.pivotal_tokens == len(result.pairs) > 0
    # the solutions' successive prefixes reuse their KV from the engine's prefix cache
    assert policy.engine.prefix_cache.hits > 0


def test_pairs_come_from_the_sampled_tokens(searched):
    policy, result = searched
    solutions = policy.sample_solutions(PROBLEM.question_ids, CONFIG.solutions_per_problem)
    for pair in result.pairs:
        solution = solutions[pair.solution_index].token_ids
        assert pair.prompt_ids == PROBLEM.question_ids + solution[: pair.position]
        pivotal = solution[pair.position]
        assert pivotal in (pair.chosen_id, pair.rejected_id)
        other = pair.rejected_id if pair.chosen_id == pivotal else pair.chosen_id
        # a rollout drawn at this prefix, or at a shorter one that went on through it, began with it
        reached = set()
        for start in range(pair.position, -1, -1):
            path = solution[start: pair.position]
            rollouts = policy.rollout(PROBLEM.question_ids, solution[:start], CONFIG.samples_per_estimate)
            reached |= {r.token_ids[len(path)] for r in rollouts
                        if len(r.token_ids) > len(path) and r.token_ids[: len(path)] == path}
            if other in reached:
                break
        assert other in reached


def test_the_same_seed_gives_the_same_search(searched):
    _, first = searched
    policy = make_policy()
    again = search([PROBLEM], policy, EvenSum(), CONFIG, vocab_size=policy.vocab_size)
    assert [pair.to_row() for pair in again.pairs] == [pair.to_row() for pair in first.pairs]
    assert again.stats.to_dict() == first.stats.to_dict()


def test_a_finished_solution_rolls_out_nothing():
    policy = make_policy()
    ended = policy.rollout((1, 2), (65, BYTE.eot_id), 3)
    assert [r.token_ids for r in ended] == [(), (), ()]
    full = policy.rollout((1, 2), tuple(range(65, 65 + MAX_TOKENS)), 2)
    assert [r.token_ids for r in full] == [(), ()]
    assert policy.requests == 0
    budget = policy.rollout((1, 2), (65,) * (MAX_TOKENS - 2), 4)
    assert all(len(r.token_ids) <= 2 for r in budget)


def test_the_oracle_reads_decoded_text_without_the_stop_token():
    decode = solution_decoder(BYTE.decode, STOPS)
    assert decode(list(b"The answer is 4") + [BYTE.eot_id]) == "The answer is 4"
    judge = OracleJudge(make_oracle("math"), decode)
    problem = SearchProblem("m", (1,), {"answer": "4"})
    assert judge.check(problem, tuple(b"so \\boxed{4}") + (BYTE.eot_id,)).correct


class OneCallPerPrefix:
    """The same engine policy without `rollout_batch`: the search asks for each prefix's rollouts
    in an engine call of its own."""

    def __init__(self, policy: EnginePolicy):
        self.policy = policy

    def sample_solutions(self, question_ids, n):
        return self.policy.sample_solutions(question_ids, n)

    def rollout(self, question_ids, solution_prefix, n):
        return self.policy.rollout(question_ids, solution_prefix, n)


def test_the_prefixes_of_a_level_share_one_engine_call():
    policy, alone = make_policy(), make_policy()
    batched = search([PROBLEM], policy, EvenSum(), CONFIG, vocab_size=policy.vocab_size)
    unbatched = search([PROBLEM], OneCallPerPrefix(alone), EvenSum(), CONFIG, vocab_size=alone.vocab_size)
    # the same samples (each prefix's seed comes from its own token ids), so the same search
    assert [pair.to_row() for pair in batched.pairs] == [pair.to_row() for pair in unbatched.pairs]
    assert batched.stats.to_dict() == unbatched.stats.to_dict()
    assert policy.requests == alone.requests
    # in fewer engine calls: one for the solutions, then at most one per level of the subdivision
    # (a solution of MAX_TOKENS tokens has at most 2 + log2(MAX_TOKENS) levels)
    assert alone.calls == alone.requests
    assert policy.calls <= 1 + 2 + math.ceil(math.log2(MAX_TOKENS)) < alone.calls


QUESTIONS = [SearchProblem(f"q{index}", tuple(BYTE.encode(f"question {index}:"))) for index in range(3)]


def test_the_questions_of_a_search_share_engine_calls():
    policy = make_policy()
    together = search(QUESTIONS, policy, EvenSum(), CONFIG, vocab_size=policy.vocab_size)
    apart_rows, apart_stats, apart_calls, apart_requests = [], SearchStats(), [], 0
    for problem in QUESTIONS:
        alone = make_policy()
        result = search([problem], alone, EvenSum(), CONFIG, vocab_size=alone.vocab_size)
        apart_rows += [pair.to_row() for pair in result.pairs]
        apart_stats.merge(result.stats)
        apart_calls.append(alone.calls)
        apart_requests += alone.requests
    # each question's samples are its own whatever it is batched with: the same search
    assert together.pairs and [pair.to_row() for pair in together.pairs] == apart_rows
    assert together.stats.to_dict() == apart_stats.to_dict()
    assert policy.requests == apart_requests
    # what the questions ask for at the same step is one engine call: the solutions of all three
    # in one, then their rollouts side by side
    assert policy.calls < sum(apart_calls)
    assert policy.calls <= max(apart_calls) + len(QUESTIONS)
