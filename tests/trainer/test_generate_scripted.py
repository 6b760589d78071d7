"""The scripted stand-in teacher: worked solutions, slips at the set rate, critiques, revisions,
a problem stream, all through the engine interface and the request cache."""

from __future__ import annotations

import pytest

from tokenmill.trainer.generate import GenerationRequest, SamplingParams, build_engine
from tokenmill.trainer.generate.cache import CachedEngine, RequestCache
from tokenmill.trainer.generate.scripted_engine import ScriptedEngine, arithmetic_problems, correct_answer
from tokenmill.trainer.oracles.math import extract_answer


def ask(engine, text: str, n: int = 1, seed: int | None = 0) -> list[str]:
    request = GenerationRequest(messages=({"role": "user", "content": text},), n=n,
                                sampling=SamplingParams(seed=seed, max_tokens=512))
    return [c.text for c in engine.generate([request])[0].completions]


@pytest.mark.parametrize(("problem", "answer"), [
    ("What is 17 + 25?", "42"),
    ("Compute 3 * (4 + 5) - 2.", "25"),
    ("Tom has 5 apples and buys 7 more. How many apples does he have?", "12"),
    ("A shop has 4 boxes of 6 pencils each. How many pencils?", "24"),
    ("Share 10 sweets equally among 4 children.", "5/2"),
])
def test_without_mistakes_every_worked_solution_reaches_the_true_answer(problem: str, answer: str) -> None:
    engine = ScriptedEngine(mistake_rate=0.0)
    [solution] = ask(engine, f"Task: solve\n### Problem\n{problem}")
    assert solution.startswith("Step 1:")
    assert extract_answer(solution) == (answer, "boxed")
    assert correct_answer(problem) == answer


def test_mistakes_come_at_the_set_rate_and_are_reproducible() -> None:
    engine = ScriptedEngine(mistake_rate=0.3)
    solutions = ask(engine, "Task: solve\n### Problem\nCompute 12 * 7 + 5.", n=400)
    wrong = sum(extract_answer(s)[0] != "89" for s in solutions)
    assert 80 <= wrong <= 160  # 120 expected; binomial sd about 9
    assert ask(engine, "Task: solve\n### Problem\nCompute 12 * 7 + 5.", n=400) == solutions
    assert ask(engine, "Task: solve\n### Problem\nCompute 12 * 7 + 5.", n=400, seed=1) != solutions


def test_the_critique_fails_exactly_the_wrong_drafts_and_revision_can_fix_them() -> None:
    engine = ScriptedEngine(mistake_rate=0.5)
    problem = "What is 30 + 12?"
    rubric = "### Rubric\n- reasoning\n- factual accuracy\n- clarity"
    right = "Step 1: 30 + 12 = 42.\nThe answer is \\boxed{42}."
    wrong = "Step 1: 30 + 12 = 41.\nThe answer is \\boxed{41}."
    [on_right] = ask(engine, f"Task: critique\n### Problem\n{problem}\n### Draft\n{right}\n{rubric}")
    [on_wrong] = ask(engine, f"Task: critique\n### Problem\n{problem}\n### Draft\n{wrong}\n{rubric}")
    assert on_right.splitlines() == ["reasoning: 5/5 - sound", "factual accuracy: 5/5 - sound", "clarity: 5/5 - sound"]
    assert on_wrong.splitlines()[0].startswith("reasoning: 2/5")
    assert on_wrong.splitlines()[2] == "clarity: 5/5 - sound"
    revisions = ask(engine, f"Task: revise\n### Problem\n{problem}\n### Draft\n{wrong}\n### Critique\n{on_wrong}", n=20)
    assert {extract_answer(r)[0] for r in revisions} >= {"42"}


def test_the_problem_stream_pairs_each_problem_with_a_worked_solution_through_the_cache(tmp_path) -> None:
    counted = ScriptedEngine(mistake_rate=0.0)
    cache_uri = (tmp_path / "generations").as_uri()
    engine = CachedEngine(counted, RequestCache(cache_uri).load())
    problems = list(arithmetic_problems(engine, 10, seed=4))
    assert len(problems) == 10 and len({p["problem"] for p in problems}) > 5
    for item in problems:
        assert extract_answer(item["solution"])[0] == item["answer"] == correct_answer(item["problem"])
    engine.close()
    assert counted.answered == 20
    again = CachedEngine(ScriptedEngine(mistake_rate=0.0), RequestCache(cache_uri).load())
    assert list(arithmetic_problems(again, 10, seed=4)) == problems
    assert again.engine.answered == 0  # every request served from the cache


def test_the_factory_builds_it_only_by_name_and_it_counts_words_as_tokens() -> None:
    engine = build_engine("scripted", mistake_rate=0.0)
    assert engine.engine_name == "scripted" and "scripted" in engine.model_identity
    request = GenerationRequest(messages=({"role": "user", "content": "Task: solve\n### Problem\nWhat is 2 + 2?"},),
                                sampling=SamplingParams(max_tokens=5))
    [completion] = engine.generate([request])[0].completions
    assert completion.finish_reason == "length" and completion.completion_tokens == 5
    assert completion.text == "Step 1: 2 +"
    [unknown] = ask(engine, "Task: sing\nA song please.")
    assert unknown == ""
