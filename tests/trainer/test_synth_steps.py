"""The SyntheticDataJob's steps with the scripted and the torch engines: what each keeps and why."""

from __future__ import annotations

import re
import shutil
from collections import Counter

import pytest

from tokenmill.trainer.generate import SamplingParams
from tokenmill.trainer.generate.scripted_engine import ScriptedEngine, correct_answer
from tokenmill.trainer.oracles.math import extract_answer, normalise_answer
from tokenmill.trainer.synth import steps, templates
from tokenmill.trainer.synth.steps import (
    AgreementFilter,
    Context,
    ExecutionCheck,
    InstructionReversal,
    Item,
    MultiTurn,
    SeedSelection,
    SelfRevision,
    agreement_reason,
    char_ngram,
    tally,
    token_jaccard,
)
from tokenmill.trainer.synth.workflow import (
    DATASET_TYPES,
    SynthInputError,
    Workflow,
    check_templates,
    check_workflow,
)

PROBLEMS = ["What is 17 + 25?", "Compute 3 * (4 + 5) - 2.", "Compute 12 * 7 + 5 * 3 - 9.", "What is 81 - 19?",
            "Compute (14 + 6) * (9 - 4).", "Lena has 40 stickers and gives away 13. How many are left?"]


def items(questions=PROBLEMS) -> list[Item]:
    return [Item(id=f"q{i}", seed_id=f"q{i}", question=q, seed={"id": f"q{i}", "question": q})
            for i, q in enumerate(questions)]


def context(mistake_rate: float, seed: int = 0) -> Context:
    return Context(ScriptedEngine(mistake_rate=mistake_rate), SamplingParams(seed=seed, max_tokens=256))


def solution(answer: str) -> str:
    return f"Step 1: it is {answer}.\nThe answer is \\boxed{{{answer}}}."


# -- agreement filter ---------------------------------------------------------------------------

def test_the_plurality_share_must_lie_strictly_inside_the_window() -> None:
    four_of_eight = tally([solution(a) for a in ["42", "42", "42", "42", "41", "40", "43", "44"]])
    assert (four_of_eight.plurality, four_of_eight.share) == ("42", 0.5)
    assert agreement_reason(four_of_eight, 0.25, 0.75) == (True, "agreement-in-window")
    assert agreement_reason(four_of_eight, 0.25, 0.5) == (False, "too-easy")  # at max: dropped
    assert agreement_reason(four_of_eight, 0.5, 0.75) == (False, "too-hard-or-ambiguous")  # at min: dropped
    everyone = tally([solution("7")] * 8)
    assert agreement_reason(everyone, 0.0, 1.0) == (False, "too-easy")
    nobody = tally([solution(str(n)) for n in range(8)])
    assert nobody.share == 1 / 8 and agreement_reason(nobody, 0.125, 1.0) == (False, "too-hard-or-ambiguous")
    assert agreement_reason(tally(["no idea"] * 8), 0.0, 1.0) == (False, "no-answer")


def test_answers_agree_after_the_math_oracles_normalisation() -> None:
    votes = tally(["The answer is \\boxed{1 000}.", "The answer is \\boxed{1000}", "The answer is $1000$.",
                   "The answer is \\boxed{999}."])
    assert votes.plurality == "1 000" and votes.share == 0.75 and votes.chosen == 0
    assert votes.votes == {normalise_answer("1000"): 3, "999": 1}


def test_agreement_filter_keeps_exactly_the_questions_inside_the_window_with_the_plurality_as_reference() -> None:
    shared = context(0.4)
    step = AgreementFilter(samples=8, min_agreement=0.4, max_agreement=0.7)
    outcomes = step.run(items(), shared)
    # the same samples, drawn again from the engine by hand, decide the same way
    engine = ScriptedEngine(mistake_rate=0.4)
    expected = {}
    for item in items():
        prompt = templates.render("solve", question=item.question)
        from tokenmill.trainer.generate import GenerationRequest

        [output] = engine.generate([GenerationRequest(messages=({"role": "user", "content": prompt},), n=8,
                                                      sampling=shared.sampling)])
        votes = Counter(normalise_answer(extract_answer(c.text)[0]) for c in output.completions)
        answer, count = votes.most_common(1)[0]
        share = count / 8
        expected[item.id] = (0.4 < share < 0.7, answer)
    kept = {o.item.id: o for o in outcomes if o.kept}
    assert {i for i, (k, _) in expected.items() if k} == set(kept)
    assert 0 < len(kept) < len(PROBLEMS)  # the window cuts both ways here
    for identifier, outcome in kept.items():
        assert normalise_answer(outcome.item.answer) == expected[identifier][1]
        assert extract_answer(outcome.item.solution)[0] == outcome.item.answer  # rejection sampling
        assert outcome.reason == "agreement-in-window"
    assert {o.reason for o in outcomes if not o.kept} == {"too-easy", "too-hard-or-ambiguous"}
    assert shared.requests["agreementFilter"] == 8 * len(PROBLEMS)


def test_a_teacher_that_never_slips_agrees_with_itself_so_every_question_is_too_easy() -> None:
    outcomes = AgreementFilter(samples=4, min_agreement=0.0, max_agreement=1.0).run(items(), context(0.0))
    assert [o.reason for o in outcomes] == ["too-easy"] * len(PROBLEMS)


# -- self-revision ------------------------------------------------------------------------------

RUBRIC = ["reasoning", "factual accuracy"]


def test_self_revision_stops_at_the_first_critique_when_every_criterion_passes() -> None:
    shared = context(0.0)
    outcomes = SelfRevision(rounds=3, rubric=RUBRIC).run(items(), shared)
    assert [o.reason for o in outcomes] == ["rubric-passed"] * len(PROBLEMS)
    # one draft and one critique per item; no revision asked for
    assert shared.requests["selfRevision"] == 2 * len(PROBLEMS)
    trail = outcomes[0].item.trail[-1]
    assert trail["revisions"] == 0 and len(trail["trail"]) == 1


def test_a_wrong_draft_is_critiqued_revised_and_kept_with_its_critique_trail() -> None:
    [item] = items(["What is 30 + 12?"])
    item.solution = solution("41")
    shared = context(0.0)
    [outcome] = SelfRevision(rounds=2, rubric=RUBRIC).run([item], shared)
    assert (outcome.kept, outcome.reason) == (True, "revised-and-passed")
    assert extract_answer(outcome.item.solution)[0] == "42"
    trail = outcome.item.trail[-1]["trail"]
    assert [t["round"] for t in trail] == [0, 1]
    assert trail[0]["scores"] == {"reasoning": 2.0, "factual accuracy": 2.0} and "41" in trail[0]["draft"]
    assert trail[1]["scores"] == {"reasoning": 5.0, "factual accuracy": 5.0}
    assert shared.requests["selfRevision"] == 3  # critique, revise, critique


def test_a_teacher_that_always_slips_runs_out_of_rounds() -> None:
    shared = context(1.0)
    outcomes = SelfRevision(rounds=2, rubric=RUBRIC).run(items(PROBLEMS[:3]), shared)
    assert [o.reason for o in outcomes] == ["rubric-not-met"] * 3
    # per item: a draft, then critiques at rounds 0, 1, 2 and revisions after 0 and 1
    assert shared.requests["selfRevision"] == 3 * (1 + 3 + 2)


# -- instruction reversal -----------------------------------------------------------------------

CODE = "def area(width, height):\n    total = width * height\n    return total"


def test_similarity_metrics() -> None:
    assert token_jaccard(CODE, CODE) == char_ngram(CODE, CODE) == 1.0
    assert token_jaccard("a b", "c d") == 0.0
    assert token_jaccard("x = 1", "x = 2") == pytest.approx(2 / 4)
    assert char_ngram("abcd", "abce") == pytest.approx(1 / 3)  # {abc, bcd} vs {abc, bce}


@pytest.mark.parametrize("metric", ["token-jaccard", "char-ngram"])
def test_instruction_reversal_keeps_a_pair_exactly_from_the_similarity_threshold(metric: str) -> None:
    def reverse(threshold: float):
        [item] = items([f"```python\n{CODE}\n```"])
        return InstructionReversal(threshold, metric).run([item], context(1.0))[0]

    probe = reverse(1.0)  # the teacher always drops a line of the regenerated code
    similarity = probe.item.trail[-1]["similarity"]
    assert 0 < similarity < 1 and (probe.kept, probe.reason) == (False, "dissimilar")
    at = reverse(similarity)
    assert (at.kept, at.reason) == (True, "similar")
    assert "area" in at.item.question and CODE in at.item.solution
    assert not reverse(similarity + 1e-6).kept
    exact = InstructionReversal(1.0, metric).run(items([CODE]), context(0.0))[0]
    assert exact.kept and exact.item.trail[-1]["similarity"] == 1.0


# -- execution check ----------------------------------------------------------------------------

def test_execution_check_keeps_code_that_passes_its_tests_and_drops_a_failing_one() -> None:
    good, bad = items(["double", "double"])
    good.solution = "```python\ndef double(x):\n    return 2 * x\n```"
    bad.solution = "```python\ndef double(x):\n    return x + 1\n```"
    for item in (good, bad):
        item.tests = ["assert double(3) == 6"]
    outcomes = ExecutionCheck(timeout_seconds=10, memory_mb=512).run([good, bad], context(0.0))
    assert [(o.kept, o.reason) for o in outcomes] == [(True, "tests-passed"), (False, "tests-test-failed")]
    assert outcomes[1].item.trail[-1]["passed"] is False


def test_execution_check_asks_the_teacher_for_tests_when_the_seed_has_none() -> None:
    [item] = items(["Write double."])
    item.solution = "```python\ndef double(x):\n    return 2 * x\n```"
    shared = context(0.0)
    [outcome] = ExecutionCheck(timeout_seconds=10, memory_mb=512).run([item], shared)
    assert outcome.kept and outcome.item.tests == ["assert callable(double)"]
    assert shared.requests["executionCheck"] == 1


# -- seed selection and multi-turn --------------------------------------------------------------

def test_seed_selection_keeps_the_top_fraction_of_passages_by_score() -> None:
    [document] = items(["Compute (3 + 4) * 5 The sky was blue all day She had 3 cats and dogs"])
    outcomes = SeedSelection(keep_fraction=0.5, passage_words=6).run([document], context(0.0))
    kept = [o for o in outcomes if o.kept]
    assert len(outcomes) == 3 and [o.item.id for o in kept] == ["q0-p0", "q0-p2"]  # ceil(0.5 x 3), best first
    assert kept[0].item.trail[-1] == {"step": "seedSelection", "educationalValue": 4.0, "reasoning": 3.0,
                                      "complexity": "medium"}
    assert [(o.item.question, o.reason) for o in outcomes if not o.kept] == [("The sky was blue all day", "low-score")]


def test_multi_turn_builds_conversations_and_revises_a_slipped_turn() -> None:
    shared = context(0.5)
    outcomes = MultiTurn(turns=3, revise_each_turn=True).run(items(PROBLEMS[:4]), shared)
    assert all(o.kept and o.reason == "conversation-complete" for o in outcomes)
    for outcome in outcomes:
        messages = outcome.item.messages
        assert [m["role"] for m in messages] == ["user", "assistant"] * 3
        assert messages[2]["content"].startswith("Now add")
    revised = [entry for o in outcomes for entry in o.item.trail if "critique" in entry]
    assert revised, "at a 50% slip rate some turn was critiqued and revised"


def test_multi_turn_without_revision_asks_no_critique() -> None:
    shared = context(1.0)
    outcomes = MultiTurn(turns=3, revise_each_turn=False).run(items(PROBLEMS[:2]), shared)
    assert [o.reason for o in outcomes] == ["conversation-complete"] * 2
    assert shared.requests["multiTurn"] == 2 * (1 + 2 * 2)  # a draft, then a follow-up and a reply per turn
    assert not [entry for o in outcomes for entry in o.item.trail if "critique" in entry]


def test_multi_turn_with_revision_critiques_every_reply_and_revises_exactly_the_failing_ones() -> None:
    passing = context(0.0)
    outcomes = MultiTurn(turns=3, revise_each_turn=True).run(items(PROBLEMS[:2]), passing)
    assert passing.requests["multiTurn"] == 2 * (1 + 3 * 2)  # + a critique per reply; none fails
    assert not [entry for o in outcomes for entry in o.item.trail if "critique" in entry]
    for outcome in outcomes:  # a teacher that never slips answers each follow-up right
        follow_up, reply = outcome.item.messages[-2:]
        assert extract_answer(reply["content"])[0] == correct_answer(follow_up["content"])
    slipping = context(1.0)
    outcomes = MultiTurn(turns=3, revise_each_turn=True).run(items(PROBLEMS[:2]), slipping)
    assert slipping.requests["multiTurn"] == 2 * (1 + 4 * 2)  # + a revision per reply: each one fails
    for outcome in outcomes:
        revised = [entry for entry in outcome.item.trail if "critique" in entry]
        assert [entry["turn"] for entry in revised] == [2, 3]
        assert all("is wrong" in entry["critique"] for entry in revised)
        assert [m["content"] for m in outcome.item.messages[3::2]] != [entry["draft"] for entry in revised]


# -- rewrite ------------------------------------------------------------------------------------

def test_rewrite_restates_a_seed_once_per_target() -> None:
    outcomes = steps.Rewrite(["exercise", "discussion", "structured-reasoning"], None).run(items(PROBLEMS[:1]),
                                                                                          context(0.0))
    assert [(o.item.id, o.reason) for o in outcomes] == [
        ("q0-exercise", "rewritten-exercise"), ("q0-discussion", "rewritten-discussion"),
        ("q0-structured-reasoning", "rewritten-structured-reasoning")]
    assert all(PROBLEMS[0] in o.item.question and o.item.solution is None for o in outcomes)


def test_qa_extraction_keeps_one_item_per_question_answer_pair_of_the_reasoning_chain() -> None:
    shared = context(0.0)
    outcomes = steps.Rewrite(["qa"], None).run(items(["Compute 3 * (4 + 5) - 2.", "Write a poem about the sea."]),
                                               shared)
    kept = [o for o in outcomes if o.kept]
    assert [(o.item.id, o.item.question) for o in kept] == [
        ("q0-qa0", "What is 4 + 5?"), ("q0-qa1", "What is 3 * 9?"), ("q0-qa2", "What is 27 - 2?"),
        ("q0-qa3", "Compute 3 * (4 + 5) - 2.")]
    for outcome in kept:
        assert outcome.reason == "rewritten-qa"
        assert extract_answer(outcome.item.solution)[0] == correct_answer(outcome.item.question)
        assert outcome.item.trail[-1]["extracted"]["question"] == outcome.item.question
    # a passage without a reasoning chain: the teacher's prose holds no pair
    assert [(o.item.id, o.reason) for o in outcomes if not o.kept] == [("q1-qa-dropped0", "unparseable-qa")]
    assert shared.requests["rewrite"] == 2


def test_malformed_question_answer_pairs_are_dropped_and_counted_the_rest_kept() -> None:
    assert steps.parse_qa_pairs("Q1: What is 2 + 2?\nA1: 2 + 2 = 4.\nThe answer is 4.\n\n"
                                "**Question 2:** Why?\nA2: Because.") == (
        [("What is 2 + 2?", "2 + 2 = 4.\nThe answer is 4."), ("Why?", "Because.")], 0)
    assert steps.parse_qa_pairs("A: an answer to nothing\nQ: a question never answered\nQ: ok?\nA: yes\nQ: x\nA:") \
        == ([("ok?", "yes")], 3)
    assert steps.parse_qa_pairs("no pairs here") == ([], 0)

    class Sloppy(ScriptedEngine):
        def respond(self, prompt, rng):
            return "Q: What is 1 + 1?\nA: 2.\nQ: What is 2 + 2?\n" if "Task: extract-qa" in prompt else ""

    outcomes = steps.Rewrite(["qa"], None).run(items(PROBLEMS[:1]), Context(Sloppy(), SamplingParams(seed=0)))
    assert [(o.item.id, o.verdict, o.reason) for o in outcomes] == [
        ("q0-qa0", "kept", "rewritten-qa"), ("q0-qa-dropped0", "dropped", "malformed-qa-pair")]


def test_extracted_pairs_become_math_records_whose_answer_is_their_own() -> None:
    workflow = Workflow(DATASET_TYPES["math"], [steps.Rewrite(["qa"], None)], [{"type": "rewrite"}])
    seeds = [{"id": "q0", "question": "Compute 12 * 7 + 5 * 3 - 9.", "source": "test", "answer": None,
              "tests": None, "meta": {}}]
    rows, stats = workflow.run(seeds, context(0.0))
    import json

    assert [row["messages"][0]["content"] for row in rows] == [
        "What is 12 * 7?", "What is 5 * 3?", "What is 84 + 15?", "What is 99 - 9?", "Compute 12 * 7 + 5 * 3 - 9."]
    assert [json.loads(row["meta"])["answer"] for row in rows] == ["84", "15", "99", "90", "90"]
    assert json.loads(rows[0]["meta"])["provenance"]["templates"] == {"extract_qa": 1}
    assert stats.records[("rewrite", "kept", "rewritten-qa")] == 5


# -- revision in provenance ---------------------------------------------------------------------

def test_a_record_carries_its_critique_trail_and_stops_where_the_rubric_passed() -> None:
    import json

    workflow = Workflow(DATASET_TYPES["math"], [SelfRevision(3, RUBRIC)], [{"type": "selfRevision"}])
    seeds = [{"id": f"q{i}", "question": q, "source": "test", "answer": None, "tests": None, "meta": {}}
             for i, q in enumerate(PROBLEMS)]
    rows, stats = workflow.run(seeds, context(0.5))
    assert rows and stats.records[("selfRevision", "kept", "revised-and-passed")] > 0
    for row in rows:
        [revision] = [e for e in json.loads(row["meta"])["provenance"]["steps"] if "trail" in e]
        trail = revision["trail"]
        assert revision["revisions"] == len(trail) - 1  # stopped at the first critique that passed
        assert all(min(t["scores"].values()) < steps.PASS_SCORE for t in trail[:-1])
        assert min(trail[-1]["scores"].values()) >= steps.PASS_SCORE
        assert trail[-1]["draft"] == row["messages"][1]["content"] and all(t["critique"] for t in trail)


# -- the torch engine ---------------------------------------------------------------------------

@pytest.mark.slow
def test_steps_drop_a_real_models_malformed_generations_with_their_reasons(tmp_path) -> None:
    """A random tiny model writes no final answers and no parseable critique: every item is dropped,
    and each drop is counted with its reason."""
    from dataclasses import replace

    from tests.trainer.generate_fixtures import TINY_GEN
    from tokenmill.trainer.generate import load_torch_engine
    from tokenmill.trainer.model.hf import export_hf

    config = replace(TINY_GEN, max_position_embeddings=1024)  # room for the critique prompt
    from tokenmill.trainer.model import build_model

    model = build_model(config, seed=0).eval()
    export_hf(model, config, tmp_path / "hf", dtype="float32")
    engine = load_torch_engine((tmp_path / "hf").as_uri())
    shared = Context(engine, SamplingParams(seed=0, max_tokens=12, temperature=1.0))
    agreement = AgreementFilter(samples=4, min_agreement=0.0, max_agreement=1.0).run(items(PROBLEMS[:3]), shared)
    for outcome in agreement:
        answers = outcome.item.trail[-1]["answers"]
        votes = Counter(normalise_answer(a) for a in answers if a)
        share = max(votes.values()) / 4 if votes else 0.0
        expected = "no-answer" if not votes else "too-easy" if share >= 1.0 else "agreement-in-window"
        assert outcome.reason == expected
    revision = SelfRevision(rounds=1, rubric=RUBRIC).run(items(PROBLEMS[:3]), shared)
    assert [o.reason for o in revision] == ["unparseable-critique"] * 3
    assert shared.tokens["selfRevision"] > 0 and shared.requests["agreementFilter"] == 12


@pytest.mark.slow
def test_a_prompt_too_long_for_the_model_is_dropped_and_counted_not_fatal(tmp_path) -> None:
    from tests.trainer.generate_fixtures import export_tiny
    from tokenmill.trainer.generate import load_torch_engine

    engine = load_torch_engine(export_tiny(tmp_path / "hf").as_uri())  # a 256-token context
    shared = Context(engine, SamplingParams(seed=0, max_tokens=4))
    outcomes = AgreementFilter(2, 0.0, 1.0).run(items(["What is 1 + 1?", "What is 1 + 1? " * 40]), shared)
    assert outcomes[1].reason == "prompt-rejected" and outcomes[0].reason != "prompt-rejected"


def bigram_teacher(directory, chain: str, *, positions: int = 2048):
    """A real torch model that, greedily, writes `chain` after the prompt (and then cycles on):
    every block adds nothing to the residual stream, so each token alone decides the next, and
    each character of `chain` is mapped to the one after it (the prompt's last token,
    `<|im_sep|>`, to the first). The characters of `chain` must each have one successor."""
    from dataclasses import replace

    import torch

    from tests.trainer.generate_fixtures import TINY_GEN
    from tokenmill.trainer.generate import load_torch_engine
    from tokenmill.trainer.model import build_model
    from tokenmill.trainer.model.hf import export_hf
    from tokenmill.trainer.tokenizer.byte import ByteTokenizer

    config = replace(TINY_GEN, max_position_embeddings=positions)
    model = build_model(config, seed=0).eval()
    im_sep = ByteTokenizer().special_tokens["<|im_sep|>"]
    successors: dict[int, int] = {}
    tokens = [im_sep, *chain.encode()]
    for here, following in zip(tokens, tokens[1:]):
        assert successors.setdefault(here, following) == following, "a character with two successors"
    slots = {token: slot for slot, token in enumerate(sorted(successors))}
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.embed.weight.zero_()
        model.lm_head.weight.zero_()
        for token, slot in slots.items():
            model.embed.weight[token, slot] = 1.0
            model.lm_head.weight[successors[token], slot] = 10.0
    export_hf(model, config, directory, dtype="float32")
    return load_torch_engine(directory.as_uri())


@pytest.mark.slow
def test_qa_extraction_with_the_torch_engine_keeps_the_well_formed_pair_and_counts_the_rest(tmp_path) -> None:
    engine = bigram_teacher(tmp_path / "hf", "Q: 7\nA:")  # then cycles: "Q: 7\nA: 7\nA: 7\nA..."
    assert engine.generate([steps.GenerationRequest(messages=({"role": "user", "content": "x"},),
                                                    sampling=SamplingParams(temperature=0.0, max_tokens=10))]
                           )[0].completions[0].text == "Q: 7\nA: 7\n"
    shared = Context(engine, SamplingParams(seed=0, temperature=0.0, max_tokens=15))
    outcomes = steps.Rewrite(["qa", "exercise"], None).run(items(PROBLEMS[:2]), shared)
    assert [(o.item.id, o.reason) for o in outcomes] == [
        ("q0-qa0", "rewritten-qa"), ("q0-qa-dropped0", "malformed-qa-pair"),  # "A: 7\nA: 7": an answer to nothing
        ("q0-exercise", "rewritten-exercise"),
        ("q1-qa0", "rewritten-qa"), ("q1-qa-dropped0", "malformed-qa-pair"), ("q1-exercise", "rewritten-exercise")]
    assert (outcomes[0].item.question, outcomes[0].item.solution) == ("7", "7")
    assert shared.requests["rewrite"] == 4 and shared.tokens["rewrite"] == 4 * 15


@pytest.mark.slow
def test_every_step_drops_a_random_models_malformed_output_with_its_reason(tmp_path) -> None:
    """A random tiny model writes no score, no question-answer pair, no code that matches and no
    passing program: each step drops (or, for free-form text, keeps) with the reason it says."""
    from dataclasses import replace

    from tests.trainer.generate_fixtures import TINY_GEN
    from tokenmill.trainer.generate import load_torch_engine
    from tokenmill.trainer.model import build_model
    from tokenmill.trainer.model.hf import export_hf

    config = replace(TINY_GEN, max_position_embeddings=1024)
    export_hf(build_model(config, seed=0).eval(), config, tmp_path / "hf", dtype="float32")
    engine = load_torch_engine((tmp_path / "hf").as_uri())
    shared = Context(engine, SamplingParams(seed=0, max_tokens=12, temperature=1.0))

    def reasons(outcomes) -> Counter:
        return Counter((o.verdict, o.reason) for o in outcomes)

    selection = SeedSelection(keep_fraction=1.0, passage_words=12).run(items(PROBLEMS[:3]), shared)
    assert reasons(selection) == {("dropped", "unparseable-score"): 3}
    extraction = steps.Rewrite(["qa"], None).run(items(PROBLEMS[:3]), shared)
    assert reasons(extraction) == {("dropped", "unparseable-qa"): 3}
    reversal = InstructionReversal(0.8, "char-ngram").run(items([f"```python\n{CODE}\n```"] * 2), shared)
    assert reasons(reversal) == {("dropped", "dissimilar"): 2}
    assert all(o.item.trail[-1]["similarity"] < 0.8 for o in reversal)
    conversation = MultiTurn(turns=2, revise_each_turn=True).run(items(PROBLEMS[:2]), shared)
    assert reasons(conversation) == {("kept", "conversation-complete"): 2}  # free text; no critique to act on
    assert shared.requests["multiTurn"] == 2 * (1 + 3)
    assert all(len(o.item.messages) == 4 for o in conversation)
    [draft] = items(["double"])
    draft.tests = ["assert double(3) == 6"]
    draft.solution = engine.generate([steps.GenerationRequest(messages=({"role": "user", "content": "def"},),
                                                              sampling=shared.sampling)])[0].completions[0].text
    [checked] = ExecutionCheck(timeout_seconds=10, memory_mb=512).run([draft], shared)
    assert not checked.kept and checked.reason.startswith("tests-") and checked.reason != "tests-passed"


# -- checks before generation -------------------------------------------------------------------

def test_a_workflow_that_does_not_fit_the_dataset_type_is_refused() -> None:
    with pytest.raises(SynthInputError, match=r"workflow\[1\]\.type: instructionReversal does not fit datasetType math"):
        check_workflow(DATASET_TYPES["math"], [SelfRevision(1, RUBRIC), InstructionReversal(0.8, "char-ngram")])
    with pytest.raises(SynthInputError, match="seedSelection .* must come first"):
        check_workflow(DATASET_TYPES["qa"], [SelfRevision(1, RUBRIC), SeedSelection(0.5, 20)])


@pytest.fixture
def edited_templates(tmp_path, monkeypatch):
    """A copy of the templates in use; `edit(name, extra)` appends `extra` to one of them."""
    copied = tmp_path / "templates"
    shutil.copytree(templates.TEMPLATE_DIR, copied)
    monkeypatch.setattr(templates, "TEMPLATE_DIR", copied)

    def edit(name: str, extra: str) -> None:
        (copied / name).write_text((copied / name).read_text() + extra)
        templates.get.cache_clear()
        templates._environment.cache_clear()

    yield edit
    templates.get.cache_clear()
    templates._environment.cache_clear()


def test_a_template_naming_a_field_the_seeds_lack_is_refused_naming_file_and_field(edited_templates) -> None:
    edited_templates("solve.j2", "Difficulty: {{ seed.difficulty }}\n")
    seeds = [{"id": "q0", "question": "What is 1 + 1?", "source": "", "answer": None, "tests": None, "meta": {}}]
    with pytest.raises(SynthInputError, match=r"seed q0.*solve\.j2 .*'difficulty'"):
        check_templates([AgreementFilter(4, 0.0, 1.0)], seeds, "spec.seeds")
    check_templates([steps.Rewrite(["qa"], None)], seeds, "spec.seeds")  # does not use solve.j2


def test_the_workload_refuses_a_template_naming_a_missing_field_before_any_request(tmp_path, edited_templates, capfd):
    from tests.trainer.synth_fixtures import spec, write_seeds, write_spec
    from tokenmill.store import open_store
    from tokenmill.trainer.synth import workload

    edited_templates("critique.j2", "Audience: {{ seed.audience }}\n")
    output = (tmp_path / "out").as_uri()
    seeds = write_seeds((tmp_path / "seeds").as_uri())
    assert workload.run(write_spec(output, spec(seeds))) == workload.EXIT_BAD_INPUT
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(r"spec\.seeds \(seed q0\): template critique\.j2 \(version 1\) names the field 'audience'", err)
    assert err.endswith("nothing was generated")
    assert not open_store(output).list("generations/") and not open_store(output).list("data/")


@pytest.mark.parametrize(("row", "message"), [
    ({"id": "a", "messages": [{"role": "assistant", "content": "hi"}], "meta": "{}"}, r"row a\.messages: no user turn"),
    ({"id": "a", "messages": [{"role": "user", "content": "hi"}], "meta": "{oops"}, r"row a\.meta: not JSON"),
])
def test_a_seed_row_that_cannot_be_read_is_refused_naming_it(row, message) -> None:
    from tokenmill.trainer.synth.workflow import seed_from_row

    with pytest.raises(SynthInputError, match=message):
        seed_from_row(row, "chat_samples", "spec.seeds[0] (s3://b/seeds) row a")


def test_every_template_declares_its_version_and_renders_with_the_workflows_fields() -> None:
    names = {path.stem for path in templates.TEMPLATE_DIR.glob("*.j2")}
    assert {"solve", "critique", "revise", "rewrite", "score_passage", "instruct", "implement", "tests",
            "follow_up"} <= names
    for name in names:
        assert templates.get(name).version >= 1


def test_a_workflow_records_provenance_and_counts_every_item_once_per_step() -> None:
    workflow = Workflow(DATASET_TYPES["math"], [AgreementFilter(6, 0.2, 1.0), SelfRevision(2, RUBRIC)],
                        [{"type": "agreementFilter"}, {"type": "selfRevision"}])
    seeds = [{"id": f"q{i}", "question": q, "source": "test", "answer": None, "tests": None, "meta": {}}
             for i, q in enumerate([*PROBLEMS, "Write a poem about the sea."])]
    rows, stats = workflow.run(seeds, context(0.3))
    for step in ("agreementFilter", "selfRevision", "output"):
        decided = sum(n for (s, _, _), n in stats.records.items() if s == step)
        assert decided == stats.items_in[step]
    assert stats.records[("agreementFilter", "dropped", "no-answer")] == 1
    assert len(rows) == stats.written > 0
    import json

    meta = json.loads(rows[0]["meta"])
    assert meta["answer"] == extract_answer(rows[0]["messages"][1]["content"])[0]
    # with 6 samples and a 30% slip rate the plurality is the true answer for these seeds
    for row in rows:
        question = row["messages"][0]["content"]
        assert json.loads(row["meta"])["answer"] == correct_answer(question)
    provenance = meta["provenance"]
    assert provenance["seedId"] == rows[0]["id"] and provenance["templates"] == {"critique": 1, "revise": 1, "solve": 1}
    assert provenance["workflowVersion"] == workflow.version
    assert [entry["step"] for entry in provenance["steps"] if "verdict" in entry] == ["agreementFilter", "selfRevision"]
