"""Dataset types, seeds, and the workflow over one batch of seeds: steps in order, every
outcome counted, output rows with their provenance.

A dataset type is one entry of `DATASET_TYPES`: the output schema, the steps that fit it, and
how a finished item becomes a row. The records' provenance (`meta.provenance`) holds the seed
id, the workflow (its steps and their parameters, and a hash of them), the template versions,
every step's intermediate outputs and verdicts.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.api.synthetic import misplaced_after_multi_turn
from tokenmill.store import CHAT_SAMPLES, DOCUMENTS, PREFERENCE_PAIRS, DatasetSchema
from tokenmill.trainer.generate.interface import stable_hash
from tokenmill.trainer.oracles.math import extract_answer, normalise_answer
from tokenmill.trainer.synth import templates
from tokenmill.trainer.synth.steps import DRAFT, DROPPED, KEPT, Context, Item, Outcome, Step, template_names

OUTPUT_STEP = "output"
PLACEHOLDERS = {"draft": "", "critique": "", "target": "exercise", "instructions": "", "rubric": ["reasoning"],
                "passage": "", "code": "", "instruction": "", "conversation": [], "response": "", "scale": 10}
"""Values of the step-made template fields when a template is checked against a seed."""


class SynthInputError(ValueError):
    """Input the SyntheticDataJob cannot run on; raised before any generation."""


@dataclass(frozen=True)
class DatasetType:
    """How items of one `datasetType` become rows, and which steps fit it."""

    name: str
    schema: DatasetSchema
    steps: frozenset[str]
    row: Callable[[Item], tuple[dict[str, Any] | None, str]]
    """The row for a finished item, or None and the reason it cannot become one."""
    draft: str = DRAFT
    """The template that writes an answer (the agreement filter's samples, self-revision's first
    draft, each multi-turn reply): `templates/<draft>.j2`."""
    pairs: bool = False
    """Rows are preference pairs: the workflow must end with a judge step, which keeps the best
    and the worst response of each question."""


def _qa_row(item: Item) -> tuple[dict[str, Any] | None, str]:
    """A question and its worked solution; the solution must reach the reference answer (the
    plurality of the agreement filter, or the seed's own), compared after normalisation."""
    if not item.solution:
        return None, "no-solution"
    found = extract_answer(item.solution)
    if found is None:
        return None, "no-answer"
    answer = item.answer or found[0]
    if normalise_answer(found[0]) != normalise_answer(answer):
        return None, "disagrees-with-reference"
    messages = [{"role": "user", "content": item.question}, {"role": "assistant", "content": item.solution}]
    return {"id": item.id, "messages": messages, "meta": {"answer": answer}}, "written"


def _chat_row(item: Item) -> tuple[dict[str, Any] | None, str]:
    """The conversation, or the question and its answer. The reference answer (of the first
    question) goes in `meta.answer` only for a single question: a reader such as a PTSJob
    takes it as the answer to the conversation's last user turn."""
    messages = item.messages or ([{"role": "user", "content": item.question},
                                  {"role": "assistant", "content": item.solution}] if item.solution else None)
    if not messages:
        return None, "no-solution"
    single = sum(message["role"] == "user" for message in messages) == 1
    return {"id": item.id, "messages": messages,
            "meta": {"answer": item.answer} if item.answer and single else {}}, "written"


def _code_row(item: Item) -> tuple[dict[str, Any] | None, str]:
    if not item.solution:
        return None, "no-solution"
    messages = [{"role": "user", "content": item.question}, {"role": "assistant", "content": item.solution}]
    return {"id": item.id, "messages": messages, "meta": {"tests": item.tests or []}}, "written"


def _document_row(item: Item) -> tuple[dict[str, Any] | None, str]:
    text = f"{item.question}\n\n{item.solution}" if item.solution else item.question
    if not text.strip():
        return None, "empty-document"
    return {"id": item.id, "text": text, "lang": "en", "meta": {}}, "written"


def _preference_row(item: Item) -> tuple[dict[str, Any] | None, str]:
    """A prompt with the judge's best response as chosen and its worst as rejected, in the
    `preference_pairs` text form (the DPO stage renders it in the chat format).

    After `multiTurn` the prompt is the conversation up to its final user turn and the pair
    its judged final assistant replies; the reference answer (of the first question) is then
    left out, since the pair answers the last."""
    if not item.rejected or item.judgement is None:
        return None, "no-pair"
    meta = {"chosenScore": item.judgement["chosenScore"], "rejectedScore": item.judgement["rejectedScore"],
            "scale": item.judgement["scale"]}
    if item.messages:
        if len(item.messages) < 2 or item.messages[-1]["role"] != "assistant" or item.messages[-2]["role"] != "user":
            return None, "no-pair"
        prompt, chosen = item.messages[:-1], item.messages[-1]["content"]
    else:
        if not item.solution:
            return None, "no-pair"
        prompt, chosen = [{"role": "user", "content": item.question}], item.solution
        if item.answer:
            meta["answer"] = item.answer
    return {"id": item.id, "prompt": prompt, "chosen": chosen, "rejected": item.rejected, "meta": meta}, "written"


DATASET_TYPES: dict[str, DatasetType] = {
    "math": DatasetType("math", CHAT_SAMPLES, frozenset(
        {"seedSelection", "rewrite", "agreementFilter", "selfRevision", "judge"}), _qa_row),
    "qa": DatasetType("qa", CHAT_SAMPLES, frozenset(
        {"seedSelection", "rewrite", "agreementFilter", "selfRevision", "judge"}), _qa_row),
    "chat": DatasetType("chat", CHAT_SAMPLES, frozenset(
        {"seedSelection", "rewrite", "agreementFilter", "selfRevision", "judge", "multiTurn"}), _chat_row),
    "code": DatasetType("code", CHAT_SAMPLES, frozenset(
        {"seedSelection", "rewrite", "selfRevision", "instructionReversal", "executionCheck"}), _code_row),
    "documents": DatasetType("documents", DOCUMENTS, frozenset({"seedSelection", "rewrite", "selfRevision"}),
                             _document_row),
    "preference": DatasetType("preference", PREFERENCE_PAIRS, frozenset(
        {"seedSelection", "rewrite", "agreementFilter", "multiTurn", "judge"}), _preference_row, pairs=True),
}


def dataset_type(name: str) -> DatasetType:
    if name not in DATASET_TYPES:
        raise SynthInputError(f"spec.datasetType: {name!r} is not produced by this workload yet; "
                              f"it produces {', '.join(sorted(DATASET_TYPES))}")
    return DATASET_TYPES[name]


def check_workflow(kind: DatasetType, steps: Sequence[Step]) -> None:
    for index, step in enumerate(steps):
        if step.type not in kind.steps:
            raise SynthInputError(f"spec.workflow[{index}].type: {step.type} does not fit datasetType {kind.name} "
                                  f"(its steps: {', '.join(sorted(kind.steps))})")
        if step.type == "seedSelection" and index != 0:
            raise SynthInputError(f"spec.workflow[{index}]: seedSelection splits the seeds, so it must come first")
        if misplaced_after_multi_turn([each.type for each in steps], index):
            raise SynthInputError(f"spec.workflow[{index}].type: {step.type} cannot follow multiTurn: it works on the "
                                  "first question and would leave the conversation as it is; after multiTurn only "
                                  "judge (which judges the conversation's final assistant turn) or another multiTurn")
    if kind.pairs and (not steps or steps[-1].type != "judge"):
        raise SynthInputError(f"spec.workflow: datasetType {kind.name} needs a judge step, last (it picks each "
                              "pair's chosen and rejected response)")


# -- seeds -----------------------------------------------------------------------------------

def seed_from_row(row: dict[str, Any], schema_name: str, where: str) -> dict[str, Any]:
    """A seed's fields: id, question (a document's text, or a conversation's last user turn),
    answer and tests (from meta), source, meta."""
    meta: dict[str, Any] = {}
    if row.get("meta"):
        try:
            parsed = json.loads(row["meta"])
        except ValueError:
            raise SynthInputError(f"{where}.meta: not JSON") from None
        meta = parsed if isinstance(parsed, dict) else {}
    if schema_name == DOCUMENTS.name:
        question = row["text"]
    else:
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        if not users:
            raise SynthInputError(f"{where}.messages: no user turn")
        question = users[-1]
    answer = meta.get("answer")
    tests = meta.get("tests")
    return {"id": str(row["id"]), "question": question, "source": row.get("source") or "",
            "answer": None if answer is None else str(answer),
            "tests": [tests] if isinstance(tests, str) else list(tests) if tests else None, "meta": meta}


def item_of(seed: dict[str, Any]) -> Item:
    return Item(id=seed["id"], seed_id=seed["id"], question=seed["question"], seed=seed,
                answer=seed.get("answer"), tests=seed.get("tests"))


def check_templates(steps: Sequence[Step], seeds: Sequence[dict[str, Any]], where: str, draft: str = DRAFT) -> None:
    """Renders every template the workflow uses (with `draft` writing answers) against every seed
    (no generation)."""
    names = template_names(steps, draft)
    for name in sorted(names):
        template = templates.get(name)
        for seed in seeds:
            context = {**PLACEHOLDERS, "question": seed["question"], "seed": seed}
            try:
                template.render(**context)
            except templates.TemplateFieldError as error:
                raise SynthInputError(f"{where} (seed {seed['id']}): {error}") from None


# -- statistics ------------------------------------------------------------------------------

@dataclass
class StepStats:
    """Per step: items in, kept, dropped by reason, samples requested, tokens generated."""

    records: Counter = field(default_factory=Counter)  # (step, verdict, reason) -> items
    items_in: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)
    seeds: int = 0

    def merge(self, other: StepStats) -> None:
        self.records.update(other.records)
        self.items_in.update(other.items_in)
        self.tokens.update(other.tokens)
        self.requests.update(other.requests)
        self.seeds += other.seeds

    @property
    def written(self) -> int:
        return sum(n for (step, verdict, _), n in self.records.items() if step == OUTPUT_STEP and verdict == KEPT)

    @property
    def tokens_generated(self) -> int:
        return sum(self.tokens.values())

    def to_dict(self, order: Sequence[str] = ()) -> dict[str, Any]:
        steps = [*order, *(s for s in sorted(self.items_in) if s not in order)]
        report = []
        for step in steps:
            kept = sum(n for (s, v, _), n in self.records.items() if s == step and v == KEPT)
            dropped = {r: n for (s, v, r), n in sorted(self.records.items()) if s == step and v == DROPPED}
            kept_reasons = {r: n for (s, v, r), n in sorted(self.records.items()) if s == step and v == KEPT}
            report.append({"step": step, "in": self.items_in[step], "kept": kept, "keptByReason": kept_reasons,
                           "droppedByReason": dropped, "requests": self.requests[step],
                           "tokensGenerated": self.tokens[step]})
        return {"seeds": self.seeds, "steps": report, "written": self.written,
                "tokensGenerated": self.tokens_generated}

    def to_data(self) -> dict[str, Any]:
        return {"records": [[s, v, r, n] for (s, v, r), n in self.records.items()],
                "itemsIn": dict(self.items_in), "tokens": dict(self.tokens), "requests": dict(self.requests),
                "seeds": self.seeds}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> StepStats:
        return cls(records=Counter({(s, v, r): n for s, v, r, n in data["records"]}),
                   items_in=Counter(data["itemsIn"]), tokens=Counter(data["tokens"]),
                   requests=Counter(data["requests"]), seeds=int(data["seeds"]))


# -- the workflow over one batch -------------------------------------------------------------

@dataclass
class Workflow:
    kind: DatasetType
    steps: list[Step]
    description: list[dict[str, Any]]
    """The spec's workflow as JSON (types and parameters), recorded in provenance."""

    @property
    def version(self) -> str:
        return stable_hash(self.description)[:16]

    @property
    def template_versions(self) -> dict[str, int]:
        return templates.versions(template_names(self.steps, self.kind.draft))

    def run(self, seeds: Sequence[dict[str, Any]], context: Context) -> tuple[list[dict[str, Any]], StepStats]:
        """The rows (in the output schema's shape, meta as JSON) of one batch of seeds."""
        stats = StepStats(seeds=len(seeds))
        items = [item_of(seed) for seed in seeds]
        context.draft = self.kind.draft
        context.pairs = self.kind.pairs
        for step in self.steps:
            if not items:
                break
            stats.items_in[step.type] += len(items)
            before = Counter(context.tokens), Counter(context.requests)
            outcomes: list[Outcome] = step.run(items, context)
            stats.tokens[step.type] += context.tokens[step.type] - before[0][step.type]
            stats.requests[step.type] += context.requests[step.type] - before[1][step.type]
            items = []
            for outcome in outcomes:
                stats.records[(step.type, outcome.verdict, outcome.reason)] += 1
                outcome.item.trail.append({"step": step.type, "verdict": outcome.verdict, "reason": outcome.reason})
                if outcome.kept:
                    items.append(outcome.item)
        rows = []
        stats.items_in[OUTPUT_STEP] += len(items)
        versions, version = self.template_versions, self.version
        for item in items:
            row, reason = self.kind.row(item)
            stats.records[(OUTPUT_STEP, KEPT if row is not None else DROPPED, reason)] += 1
            if row is None:
                continue
            meta = row.pop("meta")
            meta["provenance"] = {"seedId": item.seed_id, "seedSource": item.seed.get("source", ""),
                                  "datasetType": self.kind.name, "workflow": self.description,
                                  "workflowVersion": version, "templates": versions, "steps": item.trail}
            row["meta"] = json.dumps(meta, ensure_ascii=False)
            row["source"] = f"synthetic/{self.kind.name}"
            rows.append(row)
        return rows, stats
