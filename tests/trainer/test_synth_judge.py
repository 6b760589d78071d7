"""The judge step: several responses per question, each scored by the generator as judge; the
best kept (best-of-n) or the best and the worst written as a DPO preference pair."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

import pytest

from tests.trainer.synth_fixtures import PROBLEMS, spec, write_seeds, write_spec
from tokenmill.api.loader import parse_resource
from tokenmill.layout import dataset_uri
from tokenmill.store import PREFERENCE_PAIRS, ManifestNotFoundError, open_dataset, open_store, read_manifest
from tokenmill.trainer.data.pairs import KEPT, load_pairs
from tokenmill.trainer.generate import SamplingParams
from tokenmill.trainer.generate.scripted_engine import ScriptedEngine, correct_answer, judge
from tokenmill.trainer.oracles.math import extract_answer
from tokenmill.trainer.synth import workload
from tokenmill.trainer.synth.steps import AgreementFilter as AgreementFilterStep
from tokenmill.trainer.synth.steps import Context, Item, Judge, MultiTurn, parse_judgement
from tokenmill.trainer.synth.workflow import (
    DATASET_TYPES,
    SynthInputError,
    Workflow,
    check_templates,
    check_workflow,
)
from tokenmill.trainer.tokenizer import get_tokenizer

ARITHMETIC = [p for p in PROBLEMS if correct_answer(p) is not None]
JUDGE = {"type": "judge", "judge": {"responses": 4, "rubric": ["correctness"], "scale": 10, "minMargin": 3}}
MULTI_TURN = {"type": "multiTurn", "multiTurn": {"turns": 2, "reviseEachTurn": False}}


def context(mistake_rate: float, *, pairs: bool) -> Context:
    return Context(ScriptedEngine(mistake_rate=mistake_rate), SamplingParams(seed=3, max_tokens=256),
                   pairs=pairs)


def items(questions: Sequence[str] = ARITHMETIC) -> list[Item]:
    return [Item(id=f"q{i}", seed_id=f"q{i}", question=q, seed={"id": f"q{i}", "question": q})
            for i, q in enumerate(questions)]


def final(text: str) -> str | None:
    found = extract_answer(text)
    return found[0] if found else None


# -- the scripted judge ----------------------------------------------------------------------

def test_the_scripted_judge_scores_sound_arithmetic_above_a_slip():
    sound = "Step 1: 3 * 4 = 12.\nStep 2: 12 + 5 = 17.\nThe answer is \\boxed{17}."
    slipped = "Step 1: 3 * 4 = 13.\nStep 2: 13 + 5 = 18.\nThe answer is \\boxed{18}."
    scores = [parse_judgement(judge(text, 10), 10) for text in (sound, slipped, "I cannot tell.")]
    assert scores[0] == 10 and 0 < scores[1] < 10 and scores[2] == 0
    assert parse_judgement(judge(sound, 7), 7) == 7


def test_a_judgement_is_read_only_on_its_own_scale():
    assert parse_judgement("weighs things\nScore: 6/10", 10) == 6
    assert parse_judgement("Score: 2/10 at first, then Score: 8.5/10", 10) == 8.5
    assert parse_judgement("Score: 6/5", 10) is None
    assert parse_judgement("Score: 12/10", 10) is None
    assert parse_judgement("a fine answer", 10) is None


# -- the step with the scripted teacher ------------------------------------------------------

def test_pairs_are_kept_with_the_chosen_response_scoring_higher():
    batch = items()
    outcomes = Judge(responses=3, rubric=["correctness"], scale=10, min_margin=1).run(
        batch, context(0.3, pairs=True))
    assert len(outcomes) == len(batch)
    for outcome in outcomes:
        [trail] = [entry for entry in outcome.item.trail if entry["step"] == "judge"]
        assert len(trail["responses"]) == len(trail["scores"]) == 3 and None not in trail["scores"]
        margin = max(trail["scores"]) - min(trail["scores"])
        assert outcome.reason == ("pair-with-margin" if margin >= 1 else "no-margin")
    kept = [o.item for o in outcomes if o.kept]
    assert kept and len(kept) < len(batch)  # a teacher slipping at 0.3 sometimes writes three alike
    for item in kept:
        judgement = item.judgement
        assert judgement["chosenScore"] - judgement["rejectedScore"] >= 1
        assert final(item.solution) == correct_answer(item.question) != final(item.rejected)


def test_the_margin_boundary_is_inclusive():
    batch_margins = {}
    for outcome in Judge(6, ["correctness"], 10, 0).run(items(), context(0.5, pairs=True)):
        judgement = outcome.item.judgement
        batch_margins[outcome.item.id] = judgement["chosenScore"] - judgement["rejectedScore"]
    question_id, margin = max(batch_margins.items(), key=lambda entry: entry[1])
    assert margin > 0
    [question] = [q for i, q in enumerate(ARITHMETIC) if f"q{i}" == question_id]

    def reason(min_margin: float) -> str:
        [outcome] = Judge(6, ["correctness"], 10, min_margin).run(items([question]), context(0.5, pairs=True))
        return outcome.reason

    assert reason(margin) == "pair-with-margin"
    assert reason(margin + 0.5) == "no-margin"


def test_a_solution_from_an_earlier_step_competes_with_the_fresh_responses():
    def judged(solution: str, mistake_rate: float) -> tuple[Item, dict]:
        [item] = items(["What is 17 + 25?"])
        item.solution = solution
        [outcome] = Judge(3, ["correctness"], 10, 0).run([item], context(mistake_rate, pairs=False))
        assert outcome.kept
        [entry] = [e for e in outcome.item.trail if e["step"] == "judge"]
        assert entry["ownResponse"] and entry["responses"][0] == solution and len(entry["responses"]) == 3
        return outcome.item, entry

    sound = "Step 1: 17 + 25 = 42.\nThe answer is \\boxed{42}."
    kept, entry = judged(sound, 1.0)  # every fresh response slips: the earlier solution wins
    assert entry["chosen"] == 0 and kept.solution == sound
    assert all(final(text) != "42" for text in entry["responses"][1:])
    slipped = "Step 1: 17 + 25 = 43.\nThe answer is \\boxed{43}."
    replaced, entry = judged(slipped, 0.0)  # a teacher that never slips: a fresh response wins
    assert entry["chosen"] == 1 and final(replaced.solution) == "42"
    assert entry["scores"][0] < entry["scores"][1]


@pytest.mark.slow  # builds and runs a torch model
def test_unparseable_judge_replies_are_left_out_and_counted(tmp_path):
    """A random tiny model's judgements hold no `Score: n/10`: every response is left out and
    counted, and the question is dropped as unparseable."""
    from dataclasses import replace

    from tests.trainer.generate_fixtures import TINY_GEN
    from tokenmill.trainer.generate import load_torch_engine
    from tokenmill.trainer.model import build_model
    from tokenmill.trainer.model.hf import export_hf

    config = replace(TINY_GEN, max_position_embeddings=1024)
    export_hf(build_model(config, seed=0).eval(), config, tmp_path / "hf", dtype="float32")
    engine = load_torch_engine((tmp_path / "hf").as_uri())
    shared = Context(engine, SamplingParams(seed=0, max_tokens=12, temperature=1.0))
    outcomes = Judge(3, ["correctness"], 10, 1).run(items(ARITHMETIC[:2]), shared)
    assert [(o.kept, o.reason) for o in outcomes] == [(False, "unparseable-judgement")] * 2
    for outcome in outcomes:
        assert outcome.item.trail[-1]["unparseable"] == 3 and outcome.item.trail[-1]["scores"] == [None] * 3
    assert shared.requests["judge"] == 2 * 3 + 2 * 3  # the responses, then one judgement each


def test_best_of_n_keeps_the_best_response_as_the_solution():
    kind = DATASET_TYPES["math"]
    steps = [Judge(responses=6, rubric=["correctness"], scale=10, min_margin=1)]
    check_workflow(kind, steps)
    workflow = Workflow(kind, steps, [JUDGE])
    seeds = [{"id": f"q{i}", "question": q, "source": "t", "answer": None, "tests": None}
             for i, q in enumerate(ARITHMETIC)]
    rows, stats = workflow.run(seeds, context(0.5, pairs=False))
    assert len(rows) == len(ARITHMETIC)  # six samples at a 0.5 slip rate: at least one sound one each
    for row in rows:
        question, answer = row["messages"][0]["content"], row["messages"][-1]["content"]
        assert final(answer) == correct_answer(question)
        steps_trail = json.loads(row["meta"])["provenance"]["steps"]
        [judged] = [entry for entry in steps_trail if entry["step"] == "judge" and "scores" in entry]
        assert len(judged["scores"]) == len(judged["verdicts"]) == 6 and answer == judged["responses"][judged["chosen"]]
    assert stats.records[("judge", "kept", "best-of-n")] == len(ARITHMETIC)


class ObservedTeacher(ScriptedEngine):
    """The scripted teacher, keeping every request it is sent."""

    def __init__(self, mistake_rate: float) -> None:
        super().__init__(mistake_rate=mistake_rate)
        self.seen: list = []

    def generate(self, requests):
        self.seen.extend(requests)
        return super().generate(requests)


def judge_entry(row: dict) -> dict:
    [entry] = [e for e in json.loads(row["meta"])["provenance"]["steps"] if e["step"] == "judge" and "scores" in e]
    return entry


def test_a_judge_after_multi_turn_keeps_the_conversation_with_the_best_final_reply():
    """The judged candidates are the conversation's final assistant turn: its own reply and
    fresh replies drawn with the earlier turns as context, each judged with the conversation
    shown; the row is the conversation ending in the winner, every candidate's score and
    verdict in provenance."""
    kind = DATASET_TYPES["chat"]
    steps = [MultiTurn(turns=2, revise_each_turn=False), Judge(responses=4, rubric=["correctness"], scale=10,
                                                               min_margin=0)]
    check_workflow(kind, steps)
    check_templates(steps, [{"id": "q0", "question": "What is 1 + 1?"}], "spec.seeds")
    own = {o.item.id: o.item.messages
           for o in MultiTurn(turns=2, revise_each_turn=False).run(items(), context(0.5, pairs=False))}
    teacher = ObservedTeacher(mistake_rate=0.5)
    seeds = [{"id": f"q{i}", "question": q, "source": "t", "answer": None, "tests": None}
             for i, q in enumerate(ARITHMETIC)]
    rows, stats = Workflow(kind, steps, [MULTI_TURN, JUDGE]).run(
        seeds, Context(teacher, SamplingParams(seed=3, max_tokens=256)))
    assert len(rows) == len(ARITHMETIC) and stats.records[("judge", "kept", "best-of-n")] == len(ARITHMETIC)
    right_before = right_after = 0
    for row in rows:
        messages, conversation = row["messages"], own[row["id"]]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2
        assert messages[:-1] == conversation[:-1]  # the earlier turns and the last question stay
        judged = judge_entry(row)
        assert judged["responses"][0] == conversation[-1]["content"]  # the conversation's own reply competes
        assert len(judged["responses"]) == len(judged["scores"]) == len(judged["verdicts"]) == 4
        assert [parse_judgement(v, 10) for v in judged["verdicts"]] == judged["scores"]  # losers' too
        chosen = judged["chosen"]
        assert messages[-1] == {"role": "assistant", "content": judged["responses"][chosen]}
        assert judged["scores"][chosen] == max(judged["scores"])
        sound = [final(text) == correct_answer(messages[-2]["content"]) for text in judged["responses"]]
        assert sound[chosen] or not any(sound)  # the scripted judge finds a sound reply when there is one
        right_before += sound[0]
        right_after += sound[chosen]
    assert right_after > right_before, "at a 0.5 slip rate some conversation's own final reply is beaten"

    prompts = [(len(r.messages), r.messages[-1]["content"]) for r in teacher.seen]
    for row in rows:
        first_question, last_question = row["messages"][0]["content"], row["messages"][2]["content"]
        # the fresh replies answer the last question with the earlier turns as context
        fresh = [length for length, p in prompts if p.startswith("Task: solve") and last_question in p]
        assert fresh and all(length == 3 for length in fresh)
        # every candidate is judged with the conversation before it shown
        judged = [p for _, p in prompts if p.startswith("Task: judge") and last_question in p]
        assert len(judged) == 4 and all(first_question in p for p in judged)


PAIR_JUDGE = {"type": "judge", "judge": {"responses": 4, "rubric": ["correctness"], "scale": 10, "minMargin": 3}}


def test_a_multi_turn_preference_pair_is_the_conversation_with_its_best_and_worst_final_reply(tmp_path):
    """After multiTurn, the pair's prompt is the conversation up to its final user turn (the
    earlier assistant turn included) and chosen/rejected the best/worst judged final replies;
    a conversation whose replies score within the margin gives no pair. The DPO stage's loader
    renders the prompt as those turns in the chat format, then the assistant header."""
    kind = DATASET_TYPES["preference"]
    steps = [MultiTurn(turns=2, revise_each_turn=False), Judge(responses=4, rubric=["correctness"], scale=10,
                                                               min_margin=3)]
    check_workflow(kind, steps)
    check_templates(steps, [{"id": "q0", "question": "What is 1 + 1?"}], "spec.seeds")

    # the judge's verdict on each conversation, and why
    conversations = [o.item for o in MultiTurn(turns=2, revise_each_turn=False).run(items(), context(0.5, pairs=True))]
    own = {item.id: [dict(m) for m in item.messages] for item in conversations}
    outcomes = Judge(4, ["correctness"], 10, 3).run(conversations, context(0.5, pairs=True))
    for outcome in outcomes:
        [entry] = [e for e in outcome.item.trail if e["step"] == "judge"]
        assert entry["turn"] == 2 and entry["ownResponse"]
        assert entry["responses"][0] == own[outcome.item.id][-1]["content"]  # the conversation's own final reply
        margin = max(entry["scores"]) - min(entry["scores"])
        assert outcome.reason == ("pair-with-margin" if margin >= 3 else "no-margin"), entry["scores"]
    reasons = Counter(o.reason for o in outcomes)
    assert reasons["pair-with-margin"] and reasons["no-margin"]  # some conversations' four replies all alike

    teacher = ObservedTeacher(mistake_rate=0.5)
    seeds = [{"id": f"q{i}", "question": q, "source": "t", "answer": None, "tests": None}
             for i, q in enumerate(ARITHMETIC)]
    rows, stats = Workflow(kind, steps, [MULTI_TURN, PAIR_JUDGE]).run(
        seeds, Context(teacher, SamplingParams(seed=3, max_tokens=256)))
    assert len(rows) == reasons["pair-with-margin"] == stats.records[("judge", "kept", "pair-with-margin")]
    assert stats.records[("judge", "dropped", "no-margin")] == reasons["no-margin"]
    for row in rows:
        prompt, meta = row["prompt"], json.loads(row["meta"])
        assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
        assert prompt == own[row["id"]][:-1]  # the whole conversation before the judged reply
        judged = judge_entry(row)
        assert judged["turn"] == 2 and judged["ownResponse"] and len(judged["responses"]) == 4
        assert row["chosen"] == judged["responses"][judged["chosen"]]
        assert row["rejected"] == judged["responses"][judged["rejected"]]
        assert meta["chosenScore"] == judged["scores"][judged["chosen"]] == max(judged["scores"])
        assert meta["rejectedScore"] == judged["scores"][judged["rejected"]] == min(judged["scores"])
        assert meta["chosenScore"] - meta["rejectedScore"] >= 3 and meta["scale"] == 10
        # the scripted judge scores sound arithmetic for the last question above a slip
        assert final(row["chosen"]) == correct_answer(prompt[-1]["content"]) != final(row["rejected"])
        assert "answer" not in meta  # a reference answer would be the first question's
        # every candidate was judged with the earlier turns shown
        judge_prompts = [r.messages[-1]["content"] for r in teacher.seen
                         if r.messages[-1]["content"].startswith("Task: judge") and prompt[-1]["content"] in
                         r.messages[-1]["content"]]
        assert len(judge_prompts) == 4 and all(prompt[0]["content"] in p and prompt[1]["content"] in p
                                               for p in judge_prompts)

    from tokenmill.store import DatasetWriter
    from tokenmill.trainer.tokenizer.special import IM_END, IM_SEP, IM_START

    uri = (tmp_path / "pairs").as_uri()
    writer = DatasetWriter(uri, PREFERENCE_PAIRS)
    writer.write_shard(0, rows)
    writer.finalize()
    tokenizer = get_tokenizer("byte")
    pairs = load_pairs(uri, "multi-turn", tokenizer, tokenizer.vocab_size, 4096)
    assert pairs.counts[KEPT] == len(rows) and pairs.ids == [row["id"] for row in rows]
    start, sep, end = (tokenizer.token_id(t) for t in (IM_START, IM_SEP, IM_END))
    for row, prompt_ids, chosen_ids in zip(rows, pairs.prompts, pairs.chosen):
        expected = [token for message in row["prompt"] for token in (
            start, *tokenizer.encode(message["role"]), sep, *tokenizer.encode(message["content"]), end)]
        assert prompt_ids.tolist() == [*expected, start, *tokenizer.encode("assistant"), sep]
        assert chosen_ids.tolist() == [*tokenizer.encode(row["chosen"]), end]


def test_an_agreement_filter_before_multi_turn_answers_its_first_turn():
    """The agreement filter's solution is the conversation's first reply; the pair judges the last."""
    from tokenmill.trainer.synth.steps import AgreementFilter

    kind = DATASET_TYPES["preference"]
    steps = [AgreementFilter(4, 0.0, 1.0), MultiTurn(turns=2, revise_each_turn=False), Judge(4, ["correctness"], 10, 1)]
    check_workflow(kind, steps)
    seeds = [{"id": f"q{i}", "question": q, "source": "t", "answer": None, "tests": None}
             for i, q in enumerate(ARITHMETIC)]
    description = [{"type": "agreementFilter", "agreementFilter": {"samples": 4, "maxAgreement": 1.0}}, MULTI_TURN,
                   PAIR_JUDGE]
    rows, stats = Workflow(kind, steps, description).run(seeds, context(0.5, pairs=True))
    assert rows and stats.records[("agreementFilter", "kept", "agreement-in-window")] >= len(rows)
    for row in rows:
        trail = json.loads(row["meta"])["provenance"]["steps"]
        [agreement] = [e for e in trail if e["step"] == "agreementFilter" and "plurality" in e]
        assert row["prompt"][0]["content"] == seeds[int(row["id"][1:])]["question"]
        assert final(row["prompt"][1]["content"]) == agreement["plurality"]
        assert "answer" not in json.loads(row["meta"])


def test_a_multi_turn_chat_row_carries_no_reference_answer_of_its_first_question():
    """A reader takes `meta.answer` as the answer to the last user turn (a PTSJob's ground
    truth), so a conversation of several questions has none; the first question's stays in
    the provenance. A single question keeps it."""
    from tokenmill.trainer.synth.steps import AgreementFilter

    kind = DATASET_TYPES["chat"]
    seeds = [{"id": f"q{i}", "question": q, "source": "t", "answer": None, "tests": None}
             for i, q in enumerate(ARITHMETIC)]
    agreement = {"type": "agreementFilter", "agreementFilter": {"samples": 4, "maxAgreement": 1.0}}
    single, _ = Workflow(kind, [AgreementFilter(4, 0.0, 1.0)], [agreement]).run(seeds, context(0.5, pairs=False))
    assert single and all(json.loads(row["meta"])["answer"] == final(row["messages"][1]["content"]) for row in single)
    rows, _ = Workflow(kind, [AgreementFilter(4, 0.0, 1.0), MultiTurn(turns=2, revise_each_turn=False)],
                       [agreement, MULTI_TURN]).run(seeds, context(0.5, pairs=False))
    assert rows
    for row in rows:
        meta = json.loads(row["meta"])
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * 2 and "answer" not in meta
        [entry] = [e for e in meta["provenance"]["steps"] if e["step"] == "agreementFilter" and "plurality" in e]
        assert entry["plurality"] == final(row["messages"][1]["content"])


@pytest.mark.parametrize(("workflow", "message"), [
    ([MultiTurn(2, False), AgreementFilterStep(4, 0.0, 1.0), Judge(2, ["c"], 10, 1)],
     r"spec\.workflow\[1\]\.type: agreementFilter cannot follow multiTurn"),
    ([MultiTurn(2, False), Judge(2, ["c"], 10, 1), MultiTurn(2, False)], "needs a judge step, last"),
])
def test_a_multi_turn_preference_workflow_out_of_order_is_refused(workflow, message):
    with pytest.raises(SynthInputError, match=message):
        check_workflow(DATASET_TYPES["preference"], workflow)


def test_the_api_accepts_multi_turn_for_preference_pairs_and_chat_followed_by_a_judge_only():
    from tokenmill.api.semantic import validate

    def problems(dataset_type: str, workflow: list[dict] | None = None) -> list[str]:
        document = {"apiVersion": "tokenmill.dev/v1alpha1", "kind": "SyntheticDataJob", "metadata": {"name": "pairs"},
                    "spec": spec("s3://bucket/seeds", dataset_type=dataset_type,
                                 workflow=workflow or [MULTI_TURN, PAIR_JUDGE])}
        resource, parse_problems = parse_resource(document)
        assert resource is not None, parse_problems
        return [f"{problem.path} {problem.message}" for problem in validate(resource)]

    assert problems("preference") == [] and problems("chat") == []
    assert any("spec.workflow[0].type step multiTurn needs datasetType chat or preference" in problem
               for problem in problems("math")), problems("math")
    rewrite_after = problems("preference", [MULTI_TURN, {"type": "rewrite", "rewrite": {}}, PAIR_JUDGE])
    assert any(problem.startswith("spec.workflow[1].type cannot follow multiTurn") for problem in rewrite_after), \
        rewrite_after


def test_a_preference_workflow_without_a_judge_step_is_refused():
    kind = DATASET_TYPES["preference"]
    with pytest.raises(SynthInputError, match="datasetType preference needs a judge step"):
        check_workflow(kind, [])
    from tokenmill.trainer.synth.steps import AgreementFilter
    with pytest.raises(SynthInputError, match="needs a judge step, last"):
        check_workflow(kind, [Judge(2, ["c"], 10, 1), AgreementFilter(4, 0.0, 1.0)])
    check_templates([Judge(2, ["c"], 10, 1)], [{"id": "q0", "question": "What is 1 + 1?"}], "spec.seeds")

    document = {"apiVersion": "tokenmill.dev/v1alpha1", "kind": "SyntheticDataJob", "metadata": {"name": "pairs"},
                "spec": spec("s3://bucket/seeds", dataset_type="preference",
                             workflow=[{"type": "rewrite", "rewrite": {}}])}
    resource, problems = parse_resource(document)
    assert resource is None
    assert any("datasetType preference needs a judge step" in problem.message for problem in problems), problems
    document["spec"]["workflow"] = [JUDGE]
    resource, problems = parse_resource(document)
    assert resource is not None, problems


@pytest.mark.parametrize(("step", "message"), [
    ({"type": "judge"}, "judge must be set exactly when type is judge"),
    ({"type": "judge", "judge": {"responses": 1}}, "responses"),
    ({"type": "judge", "judge": {"minMargin": -1}}, "minMargin"),
    ({"type": "judge", "judge": {"scale": 1}}, "scale"),
])
def test_a_bad_judge_step_is_refused_by_the_api(step, message):
    document = {"apiVersion": "tokenmill.dev/v1alpha1", "kind": "SyntheticDataJob", "metadata": {"name": "pairs"},
                "spec": spec("s3://bucket/seeds", dataset_type="preference", workflow=[step])}
    resource, problems = parse_resource(document)
    assert resource is None
    assert any(message in f"{problem.path} {problem.message}" for problem in problems), problems


# -- the workload ----------------------------------------------------------------------------

def test_preference_without_a_judge_step_fails_before_any_generation(tmp_path, capfd):
    seeds = write_seeds((tmp_path / "seeds").as_uri(), ARITHMETIC)
    body = spec(seeds, dataset_type="preference",
                workflow=[{"type": "agreementFilter", "agreementFilter": {"samples": 4}}])
    output = (tmp_path / "out").as_uri()
    assert workload.run(write_spec(output, body)) == workload.EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert "Traceback" not in err and "datasetType preference needs a judge step" in err, err
    with pytest.raises(ManifestNotFoundError):
        read_manifest(dataset_uri(output))
    assert not open_store(output).list("generations/")


@pytest.mark.slow  # starts Ray
def test_the_workload_writes_preference_pairs_the_dpo_stage_reads(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(workload, "SEEDS_PER_SHARD", 3)
    monkeypatch.setenv(workload.WORKERS_ENV, "1")
    seeds = write_seeds((tmp_path / "seeds").as_uri(), PROBLEMS)
    output = (tmp_path / "out").as_uri()
    body = spec(seeds, dataset_type="preference", workflow=[
        {"type": "judge", "judge": {"responses": 6, "rubric": ["correctness"], "scale": 10, "minMargin": 3}}],
        generator={"engine": "scripted", "mistakeRate": 0.5, "sampling": {"temperature": 1.0, "maxTokens": 256}})
    # and multi-turn pairs, from the same seeds on the same cluster
    multi_turn_output = (tmp_path / "multi-turn").as_uri()
    multi_turn_body = {**body, "workflow": [MULTI_TURN, *body["workflow"]]}
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert workload.run(write_spec(output, body)) == 0
        assert workload.run(write_spec(multi_turn_output, multi_turn_body)) == 0
    finally:
        ray.shutdown()
    dataset = open_dataset(dataset_uri(output))
    assert dataset.schema.ref == PREFERENCE_PAIRS.ref
    rows = dataset.read_all().to_pylist()
    stats = open_store(output).read_json(workload.STATS_KEY)
    [judged] = [step for step in stats["steps"] if step["step"] == "judge"]
    assert judged["in"] == judged["kept"] + sum(judged["droppedByReason"].values()) == len(PROBLEMS)
    assert rows and stats["written"] == len(rows) == judged["kept"]
    assert judged["droppedByReason"].get("no-margin", 0) >= 1  # the poem: every response scores 0
    for row in rows:
        meta = json.loads(row["meta"])
        assert meta["chosenScore"] - meta["rejectedScore"] >= 3
        assert row["prompt"][-1]["role"] == "user"
        assert final(row["chosen"]) == correct_answer(row["prompt"][-1]["content"])
        assert meta["provenance"]["datasetType"] == "preference"

    tokenizer = get_tokenizer("byte")
    pairs = load_pairs(dataset_uri(output), "judge-pairs", tokenizer, tokenizer.vocab_size, 1024)
    assert pairs.counts[KEPT] == len(rows) == len(pairs.ids)

    rows = open_dataset(dataset_uri(multi_turn_output)).read_all().to_pylist()
    stats = open_store(multi_turn_output).read_json(workload.STATS_KEY)
    assert [step["step"] for step in stats["steps"]] == ["multiTurn", "judge", "output"]
    [judged] = [step for step in stats["steps"] if step["step"] == "judge"]
    assert rows and stats["written"] == len(rows) == judged["kept"] == judged["keptByReason"]["pair-with-margin"]
    for row in rows:
        meta, entry = json.loads(row["meta"]), judge_entry(row)
        assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
        assert row["prompt"][0]["content"] == PROBLEMS[int(row["id"][1:])]
        assert entry["turn"] == 2 and entry["ownResponse"] and len(entry["responses"]) == 6
        assert (row["chosen"], row["rejected"]) == (entry["responses"][entry["chosen"]],
                                                    entry["responses"][entry["rejected"]])
        assert meta["chosenScore"] - meta["rejectedScore"] >= 3
        assert final(row["chosen"]) == correct_answer(row["prompt"][-1]["content"])
    pairs = load_pairs(dataset_uri(multi_turn_output), "multi-turn-pairs", tokenizer, tokenizer.vocab_size, 4096)
    assert pairs.counts[KEPT] == len(rows) == len(pairs.ids)
