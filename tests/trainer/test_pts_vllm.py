"""The search through the vllm engine: the same Policy adapter (`EnginePolicy`) and token-id
prompts as with the torch engine, vLLM's automatic prefix caching on.

vLLM is an optional extra: where it is not importable (the plain CPU install has no vllm; the
CUDA wheel needs a GPU) the test skips and says so.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.generate_fixtures import TINY_GEN, needs_vllm
from tokenmill.trainer.generate import SamplingParams
from tokenmill.trainer.model import build_model
from tokenmill.trainer.model.hf import export_hf
from tokenmill.trainer.oracles import Verdict
from tokenmill.trainer.pts import SearchConfig, SearchProblem, search
from tokenmill.trainer.pts.engine_policy import EnginePolicy
from tokenmill.trainer.tokenizer import get_tokenizer

pytestmark = [pytest.mark.slow, needs_vllm]
BYTE = get_tokenizer("byte")
STOPS = {BYTE.eos_id, BYTE.eot_id}
CONFIG = SearchConfig(samples_per_estimate=12, p_gap=0.3, solutions_per_problem=2, min_success=0.0, max_success=1.0)
PROBLEM = SearchProblem("q0", tuple(BYTE.encode("question 0:")))


class EvenSum:
    """Correct when the solution's token ids (stop excluded) add up to an even number."""

    def problem_error(self, problem):
        return None

    def check(self, problem, solution_ids):
        even = sum(t for t in solution_ids if t not in STOPS) % 2 == 0
        return Verdict(even, "correct" if even else "wrong-answer")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tokenmill.trainer.generate.vllm_engine import VLLMEngine

    # vLLM's CPU attention needs a head dimension of at least 64: 2 heads of 64.
    config = TINY_GEN.__class__(**{**TINY_GEN.to_dict(), "hidden_size": 128, "num_heads": 2, "num_kv_heads": 1})
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)  # near-uniform next tokens: p stays near 1/2 along a solution
    directory = export_hf(model, config, tmp_path_factory.mktemp("pts-vllm"), dtype="float32")
    engine = VLLMEngine(f"file://{directory}", use_ray=False, dtype="float32", max_model_len=256,
                        gpu_memory_utilization=0.05)
    engine.check()
    yield engine
    engine.close()


def test_search_through_the_vllm_engine(engine):
    policy = EnginePolicy(engine, SamplingParams(temperature=1.0, max_tokens=12, seed=3), stop_token_ids=STOPS,
                          vocab_size=BYTE.vocab_size)
    result = search([PROBLEM], policy, EvenSum(), CONFIG, vocab_size=BYTE.vocab_size)
    stats = result.stats
    assert stats.problems_searched == 1 and stats.solutions_searched == 2
    assert stats.rollouts + stats.rollouts_reused == stats.estimates * CONFIG.samples_per_estimate
    solutions = policy.sample_solutions(PROBLEM.question_ids, CONFIG.solutions_per_problem)
    for pair in result.pairs:  # token-id prompts: the question, then the solution's tokens as sampled
        solution = solutions[pair.solution_index].token_ids
        assert pair.prompt_ids == PROBLEM.question_ids + solution[: pair.position]
        assert solution[pair.position] in (pair.chosen_id, pair.rejected_id)
    again = search([PROBLEM], EnginePolicy(engine, SamplingParams(temperature=1.0, max_tokens=12, seed=3),
                                           stop_token_ids=STOPS, vocab_size=BYTE.vocab_size),
                   EvenSum(), CONFIG, vocab_size=BYTE.vocab_size)
    assert [pair.to_row() for pair in again.pairs] == [pair.to_row() for pair in result.pairs]


def test_prefix_caching_is_on(engine):
    (runner,) = engine._start()
    config = getattr(runner.llm.llm_engine, "vllm_config", None) or runner.llm.llm_engine
    assert config.cache_config.enable_prefix_caching is True
