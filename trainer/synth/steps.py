"""The workflow's steps: each takes a batch of items and returns an outcome per item (kept or
dropped, with a reason); a step may also turn one item into several (seed selection, rewrite).

An `Item` is one sample in the making: its question, the current solution, the reference
answer, the conversation, and the trail of what every step asked and decided (its
provenance). Every request goes through `Context.generate`, which counts the step's tokens
and drops samples the engine failed on or answered with empty text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from tokenmill.trainer.generate.interface import (
    Completion,
    Engine,
    GenerationInputError,
    GenerationRequest,
    SamplingParams,
    stable_hash,
)
from tokenmill.trainer.oracles.math import extract_answer, normalise_answer
from tokenmill.trainer.synth import templates

DRAFT = "solve"
"""In a step's `templates`: the template that writes answers, which the dataset type chooses."""
KEPT = "kept"
DROPPED = "dropped"
PASS_SCORE = 4
"""A rubric criterion passes with a score of at least this (out of 5)."""
_SCORE = re.compile(r"^\s*[-*]?\s*(.+?)\s*:\s*(\d+(?:\.\d+)?)\s*/\s*5\b(.*)$", re.MULTILINE)
_COMPLEXITY = re.compile(r"complexity\s*:\s*(low|medium|high)", re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_CODE_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass
class Item:
    """One sample on its way through the workflow."""

    id: str
    seed_id: str
    question: str
    seed: dict[str, Any]
    solution: str | None = None
    answer: str | None = None
    code: str | None = None
    tests: list[str] | None = None
    messages: list[dict[str, str]] | None = None
    rejected: str | None = None
    """The worse response of a judged pair (datasetType preference); `solution` is the better."""
    judgement: dict[str, Any] | None = None
    """The judge's scores of `solution` and `rejected` and its scale."""
    trail: list[dict[str, Any]] = field(default_factory=list)

    def note(self, step: str, **outputs: Any) -> None:
        self.trail.append({"step": step, **outputs})


@dataclass(frozen=True)
class Outcome:
    item: Item
    kept: bool
    reason: str

    @property
    def verdict(self) -> str:
        return KEPT if self.kept else DROPPED


def keep(item: Item, reason: str) -> Outcome:
    return Outcome(item, True, reason)


def drop(item: Item, reason: str) -> Outcome:
    return Outcome(item, False, reason)


@dataclass
class Context:
    """What the steps share: the engine (behind the request cache), the base sampling
    parameters, and the counts of the step that is running."""

    engine: Engine
    sampling: SamplingParams
    tokens: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)
    after_call: Callable[[], None] | None = None
    """Called after every engine call (the workload commits the request cache there)."""
    draft: str = DRAFT
    """The template that writes an item's answer (its dataset type's; see `DatasetType.draft`)."""
    pairs: bool = False
    """The dataset type's rows are preference pairs (see `DatasetType.pairs`): the judge keeps
    the best and the worst response."""

    def ask(self, step: str, prompts: Sequence[str], n: int = 1, *, salt: str = "",
            history: Sequence[Sequence[dict[str, str]]] | None = None) -> list[list[Completion] | str]:
        """Each prompt as a user turn (after its history, if any), `n` samples each: per prompt
        its completions, or the reason it failed (`generation-failed`, `empty-generation`)."""
        if not prompts:
            return []
        sampling = self.sampling if not salt else replace(
            self.sampling, seed=int(stable_hash([self.sampling.seed, salt])[:12], 16))
        requests = []
        for position, prompt in enumerate(prompts):
            before = tuple(history[position]) if history is not None else ()
            requests.append(GenerationRequest(messages=(*before, {"role": "user", "content": prompt}), n=n,
                                              sampling=sampling))
        try:
            outputs: list[Any] = self.engine.generate(requests)
        except GenerationInputError:  # one bad prompt (too long for the model): find it, keep the rest
            outputs = []
            for request in requests:
                try:
                    outputs.extend(self.engine.generate([request]))
                except GenerationInputError:
                    outputs.append(None)
        if self.after_call is not None:
            self.after_call()
        answers: list[list[Completion] | str] = []
        for output in outputs:
            if output is None:
                answers.append("prompt-rejected")
                continue
            self.requests[step] += len(output.request.indices)
            self.tokens[step] += sum(c.completion_tokens for c in output.completions)
            if output.failures or len(output.completions) != n:
                answers.append("generation-failed")
            elif any(not c.text.strip() for c in output.completions):
                answers.append("empty-generation")
            else:
                answers.append(output.completions)
        return answers


class Step:
    """A named step of the workflow. `run` returns one outcome per output item."""

    type: ClassVar[str]
    templates: ClassVar[frozenset[str]] = frozenset()

    def run(self, items: list[Item], context: Context) -> list[Outcome]:
        raise NotImplementedError


def template_names(steps: Sequence[Step], draft: str = DRAFT) -> frozenset[str]:
    """The templates a workflow renders, with `draft` writing its answers."""
    return frozenset(draft if name == DRAFT else name for step in steps for name in step.templates)


def _final_answer(text: str) -> str | None:
    found = extract_answer(text)
    return found[0] if found else None


def _draft_missing(items: list[Item], context: Context, step: str) -> tuple[list[Item], list[Outcome]]:
    """Items without a solution get one worked solution; those the engine fails on are dropped."""
    needing = [item for item in items if item.solution is None]
    dropped: list[Outcome] = []
    answers = context.ask(step, [templates.render(context.draft, question=i.question) for i in needing])
    for item, answer in zip(needing, answers):
        if isinstance(answer, str):
            dropped.append(drop(item, answer))
        else:
            item.solution = answer[0].text
            item.note(step, draft=item.solution)
    lost = {id(outcome.item) for outcome in dropped}
    return [item for item in items if id(item) not in lost], dropped


# -- seed selection --------------------------------------------------------------------------

def passages(text: str, words: int) -> list[str]:
    split = text.split()
    return [" ".join(split[start:start + words]) for start in range(0, len(split), words)] or [""]


def parse_passage_scores(text: str) -> tuple[float, float, str] | None:
    scores = {name.lower(): float(value) for name, value, _ in _SCORE.findall(text)}
    complexity = _COMPLEXITY.search(text)
    if "educational value" not in scores or "reasoning" not in scores:
        return None
    return scores["educational value"], scores["reasoning"], (complexity.group(1).lower() if complexity else "unknown")


PassageKey = tuple[int, int]
"""A passage's place in the job: (its seed's position among the job's seeds, its number in the seed)."""


@dataclass(frozen=True)
class Cutoff:
    """Which scored passages are kept: every one scoring above `score`, and those scoring exactly
    `score` up to `last_tied` in job order (so ties are broken the same way on every run)."""

    score: float
    last_tied: PassageKey | None = None

    def keeps(self, score: float, key: PassageKey) -> bool:
        if score != self.score:
            return score > self.score
        return self.last_tied is not None and key <= self.last_tied


KEEP_NONE = Cutoff(math.inf)


def rank_cutoff(histograms: Sequence[Mapping[float, int]], keep_fraction: float,
                tied_keys: Callable[[int, float], Sequence[PassageKey]]) -> Cutoff:
    """The cutoff that keeps `ceil(keep_fraction x scored passages)` of the job's best passages.

    `histograms` hold the number of passages per score of each part of the job (shards, in job
    order: every key of a part precedes every key of the next); `tied_keys(part, score)` the
    keys of a part's passages with that score, read only for the one part the cut falls in."""
    total: Counter = Counter()
    for histogram in histograms:
        total.update(histogram)
    wanted = math.ceil(keep_fraction * sum(total.values()))
    if wanted == 0:
        return KEEP_NONE
    above = 0
    for score in sorted(total, reverse=True):
        if above + total[score] >= wanted:
            needed = wanted - above
            for part, histogram in enumerate(histograms):
                here = histogram.get(score, 0)
                if needed <= here:
                    return Cutoff(score, sorted(tied_keys(part, score))[needed - 1])
                needed -= here
        above += total[score]
    raise AssertionError("unreachable: the histograms hold at least `wanted` passages")


@dataclass(frozen=True)
class ScoredPassage:
    item: Item
    key: PassageKey
    score: float
    """Educational value + reasoning, each out of 5."""


@dataclass
class SeedSelection(Step):
    """Splits seeds into passages, has the teacher score each (educational value, reasoning) and
    tag its complexity, and keeps the top `keep_fraction` by the sum of the two scores.

    Within a workload the fraction is job-wide: a first pass scores every passage of the job
    (`score`), the driver computes the `cutoff` from the scores alone (`rank_cutoff`), and the
    workflow's pass asks again (answered by the request cache) and keeps what the cutoff keeps.
    Without a cutoff, `run` ranks the passages of its own batch."""

    keep_fraction: float
    passage_words: int
    cutoff: Cutoff | None = None
    type: ClassVar[str] = "seedSelection"
    templates: ClassVar[frozenset[str]] = frozenset({"score_passage"})

    def score(self, items: list[Item], context: Context) -> tuple[list[ScoredPassage], list[Outcome]]:
        """Every passage of `items`, scored, and the passages dropped on the way (with reasons).
        A passage's key uses its seed's `position` in the job (its place in `items` without one)."""
        pieces: list[tuple[Item, PassageKey]] = []
        for place, item in enumerate(items):
            position = int(item.seed.get("position", place))
            for number, passage in enumerate(passages(item.question, self.passage_words)):
                piece = Item(id=f"{item.id}-p{number}", seed_id=item.seed_id, question=passage, seed=item.seed,
                             answer=item.answer, tests=item.tests, trail=[dict(entry) for entry in item.trail])
                pieces.append((piece, (position, number)))
        answers = context.ask(self.type, [templates.render("score_passage", passage=p.question) for p, _ in pieces])
        scored: list[ScoredPassage] = []
        dropped: list[Outcome] = []
        for (piece, key), answer in zip(pieces, answers):
            if isinstance(answer, str):
                dropped.append(drop(piece, answer))
                continue
            parsed = parse_passage_scores(answer[0].text)
            if parsed is None:
                dropped.append(drop(piece, "unparseable-score"))
                continue
            value, reasoning, complexity = parsed
            piece.note(self.type, educationalValue=value, reasoning=reasoning, complexity=complexity)
            scored.append(ScoredPassage(piece, key, value + reasoning))
        return scored, dropped

    def run(self, items: list[Item], context: Context) -> list[Outcome]:
        scored, outcomes = self.score(items, context)
        cutoff = self.cutoff
        if cutoff is None:
            cutoff = rank_cutoff([Counter(p.score for p in scored)], self.keep_fraction,
                                 lambda _, score: [p.key for p in scored if p.score == score])
        for passage in scored:
            kept = cutoff.keeps(passage.score, passage.key)
            outcomes.append(keep(passage.item, "top-fraction") if kept else drop(passage.item, "low-score"))
        return outcomes


# -- agreement filter ------------------------------------------------------------------------

@dataclass(frozen=True)
class Agreement:
    """The votes of one question's samples: plurality answer (as first written), its share."""

    plurality: str | None
    share: float
    votes: dict[str, int]
    chosen: int | None
    """Index of the first sample that reached the plurality answer."""


def tally(solutions: Sequence[str]) -> Agreement:
    """Votes by normalised final answer; a sample without one votes for nothing (but counts)."""
    keys: list[str | None] = []
    first_written: dict[str, str] = {}
    for text in solutions:
        answer = _final_answer(text)
        key = normalise_answer(answer) if answer else None
        keys.append(key or None)
        if key and key not in first_written:
            first_written[key] = answer  # type: ignore[assignment]
    votes = Counter(key for key in keys if key)
    if not votes:
        return Agreement(None, 0.0, {}, None)
    best = max(votes.values())
    winner = next(key for key in keys if key and votes[key] == best)  # ties: the earliest sample's answer
    return Agreement(first_written[winner], best / len(solutions), dict(votes), keys.index(winner))


def agreement_reason(agreement: Agreement, min_agreement: float, max_agreement: float) -> tuple[bool, str]:
    """Kept only when min < share < max: at max or above all agree (too easy), at min or below
    none agree (too hard or ambiguous)."""
    if agreement.plurality is None:
        return False, "no-answer"
    if agreement.share >= max_agreement:
        return False, "too-easy"
    if agreement.share <= min_agreement:
        return False, "too-hard-or-ambiguous"
    return True, "agreement-in-window"


@dataclass
class AgreementFilter(Step):
    samples: int
    min_agreement: float
    max_agreement: float
    type: ClassVar[str] = "agreementFilter"
    templates: ClassVar[frozenset[str]] = frozenset({DRAFT})

    def run(self, items: list[Item], context: Context) -> list[Outcome]:
        answers = context.ask(self.type, [templates.render(context.draft, question=i.question) for i in items],
                              n=self.samples)
        outcomes = []
        for item, answer in zip(items, answers):
            if isinstance(answer, str):
                outcomes.append(drop(item, answer))
                continue
            texts = [c.text for c in answer]
            agreement = tally(texts)
            kept, reason = agreement_reason(agreement, self.min_agreement, self.max_agreement)
            item.note(self.type, answers=[_final_answer(t) for t in texts], plurality=agreement.plurality,
                      share=round(agreement.share, 6))
            if kept:
                item.answer = agreement.plurality
                item.solution = texts[agreement.chosen]  # type: ignore[index]
            outcomes.append(Outcome(item, kept, reason))
        return outcomes


# -- rewrite ---------------------------------------------------------------------------------

_QA_LINE = re.compile(r"^\s*(?:\*\*)?(Q|Question|A|Answer)\s*\d*\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*(.*)$",
                      re.IGNORECASE)


def parse_qa_pairs(text: str) -> tuple[list[tuple[str, str]], int]:
    """The question-answer pairs of an extraction (`Q: ...` then `A: ...`, an answer running on
    over the lines that follow it), and how many were malformed (a question without an answer,
    an answer without a question, an empty side)."""
    pairs: list[tuple[str, str]] = []
    malformed = 0
    question: list[str] | None = None
    answer: list[str] | None = None

    def close() -> None:
        nonlocal malformed
        if question is None and answer is None:
            return
        asked, answered = " ".join(question or []).strip(), "\n".join(answer or []).strip()
        if asked and answered:
            pairs.append((asked, answered))
        else:
            malformed += 1

    for line in text.splitlines():
        found = _QA_LINE.match(line)
        if found and found.group(1)[0].upper() == "Q":
            close()
            question, answer = [found.group(2)], None
        elif found:  # an answer: closes the pair it belongs to, or stands alone (malformed)
            if question is None or answer is not None:
                close()
                question = None
            answer = [found.group(2)]
        elif answer is not None:
            answer.append(line)
        elif question is not None and line.strip():
            question.append(line.strip())
    close()
    return pairs, malformed


@dataclass(frozen=True)
class RewriteTarget:
    """A form a seed is rewritten into: the template that asks for it, and how the teacher's
    answer becomes items (question, solution or None) plus the reasons of what was dropped."""

    template: str
    parse: Callable[[str], tuple[list[tuple[str, str | None]], list[str]]]


def _restated(text: str) -> tuple[list[tuple[str, str | None]], list[str]]:
    return [(text.strip(), None)], []


def _extracted_pairs(text: str) -> tuple[list[tuple[str, str | None]], list[str]]:
    pairs, malformed = parse_qa_pairs(text)
    if not pairs:
        return [], ["unparseable-qa"]
    return list(pairs), ["malformed-qa-pair"] * malformed


REWRITE_TARGETS: dict[str, RewriteTarget] = {
    "exercise": RewriteTarget("rewrite", _restated),
    "discussion": RewriteTarget("rewrite", _restated),
    "structured-reasoning": RewriteTarget("rewrite", _restated),
    "qa": RewriteTarget("extract_qa", _extracted_pairs),
}
"""The targets of `rewrite` (the API's `rewrite.targets`): one item per seed from a restatement,
or one per question-answer pair extracted from the reasoning chains of the passage (`qa`)."""


@dataclass
class Rewrite(Step):
    targets: Sequence[str]
    instructions: str | None
    type: ClassVar[str] = "rewrite"

    @property  # type: ignore[override]
    def templates(self) -> frozenset[str]:
        return frozenset(REWRITE_TARGETS[target].template for target in self.targets)

    def run(self, items: list[Item], context: Context) -> list[Outcome]:
        made = [(item, target) for item in items for target in self.targets]
        prompts = [templates.render(REWRITE_TARGETS[target].template, question=item.question, target=target,
                                    instructions=self.instructions or "") for item, target in made]
        outcomes = []
        for (item, target), answer in zip(made, context.ask(self.type, prompts)):
            def derived(suffix: str) -> Item:
                return Item(id=f"{item.id}-{suffix}", seed_id=item.seed_id, question=item.question, seed=item.seed,
                            tests=item.tests, trail=[dict(entry) for entry in item.trail])

            if isinstance(answer, str):
                outcomes.append(drop(derived(target), answer))
                continue
            made_items, reasons = REWRITE_TARGETS[target].parse(answer[0].text)
            for number, (question, solution) in enumerate(made_items):
                new = derived(target if len(made_items) == 1 and solution is None else f"{target}{number}")
                new.question, new.solution = question, solution
                if solution is None:
                    new.note(self.type, target=target, rewritten=question)
                else:
                    new.note(self.type, target=target, extracted={"question": question, "answer": solution})
                outcomes.append(keep(new, f"rewritten-{target}"))
            for number, reason in enumerate(reasons):
                new = derived(f"{target}-dropped{number}")
                new.note(self.type, target=target, output=answer[0].text[:2000])
                outcomes.append(drop(new, reason))
        return outcomes


# -- self-revision ---------------------------------------------------------------------------

def parse_critique(text: str, rubric: Sequence[str]) -> dict[str, float] | None:
    """The score per rubric criterion (None when one is missing)."""
    found = {name.strip().lower(): float(value) for name, value, _ in _SCORE.findall(text)}
    scores = {criterion: found.get(criterion.strip().lower()) for criterion in rubric}
    if any(value is None for value in scores.values()):
        return None
    return scores  # type: ignore[return-value]


@dataclass
class SelfRevision(Step):
    rounds: int
    rubric: Sequence[str]
    type: ClassVar[str] = "selfRevision"
    templates: ClassVar[frozenset[str]] = frozenset({DRAFT, "critique", "revise"})

    def run(self, items: list[Item], context: Context) -> list[Outcome]:
        alive, outcomes = _draft_missing(items, context, self.type)
        trails: dict[int, list[dict[str, Any]]] = {id(item): [] for item in alive}
        for round_number in range(self.rounds + 1):
            if not alive:
                break
            prompts = [templates.render("critique", question=i.question, draft=i.solution, rubric=list(self.rubric))
                       for i in alive]
            failing: list[tuple[Item, str]] = []
            for item, answer in zip(alive, context.ask(self.type, prompts, salt=f"critique-{round_number}")):
                if isinstance(answer, str):
                    outcomes.append(drop(item, answer))
                    continue
                scores = parse_critique(answer[0].text, self.rubric)
                if scores is None:
                    outcomes.append(drop(item, "unparseable-critique"))
                    continue
                trails[id(item)].append({"round": round_number, "draft": item.solution,
                                         "critique": answer[0].text, "scores": scores})
                if all(score >= PASS_SCORE for score in scores.values()):
                    item.note(self.type, revisions=round_number, trail=trails[id(item)])
                    outcomes.append(keep(item, "rubric-passed" if round_number == 0 else "revised-and-passed"))
                elif round_number == self.rounds:
                    item.note(self.type, revisions=round_number, trail=trails[id(item)])
                    outcomes.append(drop(item, "rubric-not-met"))
                else:
                    failing.append((item, answer[0].text))
            alive = []
            prompts = [templates.render("revise", question=i.question, draft=i.solution, critique=critique)
                       for i, critique in failing]
            for (item, _), answer in zip(failing, context.ask(self.type, prompts, salt=f"revise-{round_number}")):
                if isinstance(answer, str):
                    outcomes.append(drop(item, answer))
                    continue
                item.solution = answer[0].text
                alive.append(item)
        return outcomes


# -- instruction reversal --------------------------------------------------------------------

def code_of(text: str) -> str:
    blocks = [body for language, body in _FENCE.findall(text) if language.lower() in ("", "python", "py", "python3")]
    return (blocks[-1] if blocks else text).strip()


def token_jaccard(a: str, b: str) -> float:
    """Jaccard similarity of the sets of word and punctuation tokens."""
    left, right = set(_CODE_TOKEN.findall(a)), set(_CODE_TOKEN.findall(b))
    return 1.0 if not left and not right else len(left & right) / len(left | right)


def char_ngram(a: str, b: str, n: int = 3) -> float:
    """Jaccard similarity of the sets of character n-grams (n=3) after collapsing whitespace."""
    def grams(text: str) -> set[str]:
        flat = " ".join(text.split())
        return {flat[i:i + n] for i in range(max(1, len(flat) - n + 1))}
    left, right = grams(a), grams(b)
    return len(left & right) / len(left | right) if left | right else 1.0


SIMILARITY = {"token-jaccard": token_jaccard, "char-ngram": char_ngram}


@dataclass
class InstructionReversal(Step):
    similarity_threshold: float
    metric: str
    type: ClassVar[str] = "instructionReversal"
    templates: ClassVar[frozenset[str]] = frozenset({"instruct", "implement"})

    def run(self, items: list[Item], context: Context) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for item in items:
            item.code = item.code or code_of(item.question)
        answers = context.ask(self.type, [templates.render("instruct", code=i.code) for i in items])
        described = []
        for item, answer in zip(items, answers):
            if isinstance(answer, str):
                outcomes.append(drop(item, answer))
            else:
                described.append((item, answer[0].text.strip()))
        prompts = [templates.render("implement", instruction=instruction) for _, instruction in described]
        measure = SIMILARITY[self.metric]
        for (item, instruction), answer in zip(described, context.ask(self.type, prompts)):
            if isinstance(answer, str):
                outcomes.append(drop(item, answer))
                continue
            regenerated = code_of(answer[0].text)
            similarity = measure(item.code or "", regenerated)
            kept = similarity >= self.similarity_threshold
            item.note(self.type, instruction=instruction, regenerated=regenerated, metric=self.metric,
                      similarity=similarity)
            if kept:
                item.question = instruction
                item.solution = f"```python\n{item.code}\n```"
            outcomes.append(Outcome(item, kept, "similar" if kept else "dissimilar"))
        return outcomes


# -- multi-turn ------------------------------------------------------------------------------

@dataclass
class MultiTurn(Step):
    turns: int
    revise_each_turn: bool
    rubric: Sequence[str] = ("reasoning", "factual accuracy")
    type: ClassVar[str] = "multiTurn"
    templates: ClassVar[frozenset[str]] = frozenset({DRAFT, "follow_up", "critique", "revise"})

    def run(self, items: list[Item], context: Context) -> list[Outcome]:
        alive, outcomes = _draft_missing(items, context, self.type)
        for item in alive:
            item.messages = item.messages or [{"role": "user", "content": item.question},
                                              {"role": "assistant", "content": item.solution or ""}]
        for turn in range(2, self.turns + 1):
            if not alive:
                break
            asked = context.ask(self.type, [templates.render("follow_up", conversation=i.messages) for i in alive],
                                salt=f"follow-up-{turn}")
            next_alive: list[tuple[Item, str]] = []
            for item, answer in zip(alive, asked):
                if isinstance(answer, str):
                    outcomes.append(drop(item, answer))
                else:
                    next_alive.append((item, answer[0].text.strip()))
            solved = context.ask(self.type, [templates.render(context.draft, question=q) for _, q in next_alive],
                                 salt=f"turn-{turn}", history=[i.messages or [] for i, _ in next_alive])
            alive = []
            for (item, question), answer in zip(next_alive, solved):
                if isinstance(answer, str):
                    outcomes.append(drop(item, answer))
                    continue
                reply = answer[0].text
                if self.revise_each_turn:
                    reply = self._revised(item, question, reply, context, turn)
                item.messages = [*(item.messages or []), {"role": "user", "content": question},
                                 {"role": "assistant", "content": reply}]
                alive.append(item)
        for item in alive:
            item.note(self.type, turns=len(item.messages or []) // 2)
            outcomes.append(keep(item, "conversation-complete"))
        return outcomes

    def _revised(self, item: Item, question: str, reply: str, context: Context, turn: int) -> str:
        [critique] = context.ask(self.type, [templates.render("critique", question=question, draft=reply,
                                                              rubric=list(self.rubric))], salt=f"critique-{turn}")
        if isinstance(critique, str):
            return reply
        scores = parse_critique(critique[0].text, self.rubric)
        if scores is None or all(score >= PASS_SCORE for score in scores.values()):
            return reply
        [revised] = context.ask(self.type, [templates.render("revise", question=question, draft=reply,
                                                             critique=critique[0].text)], salt=f"revise-{turn}")
        item.note(self.type, turn=turn, draft=reply, critique=critique[0].text)
        return reply if isinstance(revised, str) else revised[0].text


# -- execution check -------------------------------------------------------------------------

@dataclass
class ExecutionCheck(Step):
    timeout_seconds: float
    memory_mb: int
    type: ClassVar[str] = "executionCheck"
    templates: ClassVar[frozenset[str]] = frozenset({"tests"})

    def run(self, items: list[Item], context: Context) -> list[Outcome]:
        from tokenmill.trainer.oracles.code import SandboxLimits, run_candidate

        outcomes: list[Outcome] = []
        for item in items:
            item.code = code_of(item.solution) if item.solution else (item.code or code_of(item.question))
        needing = [item for item in items if not item.tests]
        answers = context.ask(self.type, [templates.render("tests", question=i.question, code=i.code)
                                          for i in needing])
        lost = set()
        for item, answer in zip(needing, answers):
            if isinstance(answer, str):
                outcomes.append(drop(item, answer))
                lost.add(id(item))
            else:
                item.tests = [code_of(answer[0].text)]
        limits = SandboxLimits(timeout_seconds=self.timeout_seconds, memory_mb=self.memory_mb)
        for item in items:
            if id(item) in lost:
                continue
            verdict = run_candidate(item.code or "", item.tests or [], limits)
            item.note(self.type, tests=item.tests, passed=verdict.correct, reason=verdict.reason,
                      detail=verdict.detail[:500])
            outcomes.append(keep(item, "tests-passed") if verdict.correct else drop(item, f"tests-{verdict.reason}"))
        return outcomes


# -- judge -----------------------------------------------------------------------------------

_JUDGE_SCORE = re.compile(r"\bscore\s*:\s*(\d+(?:\.\d+)?)\s*/\s*(\d+)", re.IGNORECASE)


def parse_judgement(text: str, scale: int) -> float | None:
    """The score of the judge's last `Score: <n>/<scale>` line; None when there is none, it is
    out of another scale, or n lies outside 0..scale."""
    found = _JUDGE_SCORE.findall(text)
    if not found:
        return None
    value, out_of = found[-1]
    score = float(value)
    if int(out_of) != scale or score > scale:
        return None
    return score


def _in_conversation(item: Item) -> bool:
    """The item is a conversation (multi-turn) ending in an assistant reply."""
    messages = item.messages or []
    return len(messages) >= 2 and messages[-1]["role"] == "assistant" and messages[-2]["role"] == "user"


@dataclass
class Judge(Step):
    """Has the generator, as judge, score candidate responses against the rubric (a reply
    without a readable score leaves that candidate out) and keeps the best.

    The candidates answer the item's question or, for a conversation (after `multiTurn`), its
    last user turn, as its final assistant turn. A response the item already has (a solution
    from an earlier step, a conversation's final reply) is candidate 0, with `responses - 1`
    fresh ones; an item without one gets `responses` fresh ones. A conversation's fresh
    replies are drawn with its earlier turns as context, and each candidate is judged with
    those turns shown; the winner replaces the final turn (the earlier turns stay).

    Best-of-n (chat, qa, math): the best candidate becomes the solution (or the final turn).
    Pairs (`Context.pairs`, datasetType preference): the best becomes the solution and the
    worst `rejected`, kept only when the best score exceeds the worst by at least `min_margin`.
    Ties go to the earlier candidate for the best and to the later for the worst. Provenance
    holds every candidate, its score and the judge's verdict, and which one was chosen."""

    responses: int
    rubric: Sequence[str]
    scale: int
    min_margin: float
    type: ClassVar[str] = "judge"
    templates: ClassVar[frozenset[str]] = frozenset({DRAFT, "judge"})

    def run(self, items: list[Item], context: Context) -> list[Outcome]:
        outcomes: list[Outcome] = []
        candidates: list[tuple[Item, list[str]]] = []
        for has_own in (False, True):
            group = [item for item in items if (_own_response(item) is not None) == has_own]
            fresh = self.responses - 1 if has_own else self.responses
            drawn: list[list[Completion] | str] = [[] for _ in group]
            if group and fresh > 0:
                drawn = context.ask(self.type, [templates.render(context.draft, question=_question(i)) for i in group],
                                    n=fresh, salt="judge-responses", history=[_earlier_turns(i) for i in group])
            for item, answer in zip(group, drawn):
                if isinstance(answer, str):
                    outcomes.append(drop(item, answer))
                    continue
                own = _own_response(item)
                candidates.append((item, [*([own] if own is not None else []),
                                          *(completion.text for completion in answer)]))
        prompts = [templates.render("judge", question=_question(item), conversation=_earlier_turns(item),
                                    response=text, rubric=list(self.rubric), scale=self.scale)
                   for item, texts in candidates for text in texts]
        verdicts = iter(context.ask(self.type, prompts, salt="judge"))
        for item, texts in candidates:
            outcomes.append(self._decide(item, texts, [next(verdicts) for _ in texts], context.pairs))
        return outcomes

    def _decide(self, item: Item, texts: list[str], replies: list[list[Completion] | str], pairs: bool) -> Outcome:
        scores = [None if isinstance(reply, str) else parse_judgement(reply[0].text, self.scale)
                  for reply in replies]
        failed = [reply for reply in replies if isinstance(reply, str)]
        scored = [(index, score) for index, score in enumerate(scores) if score is not None]
        best = worst = None
        if scored:
            top = max(score for _, score in scored)
            bottom = min(score for _, score in scored)
            best = next(index for index, score in scored if score == top)
            worst = next(index for index, score in reversed(scored) if score == bottom)
        conversation = _in_conversation(item)
        trail: dict[str, Any] = {
            "responses": texts, "ownResponse": _own_response(item) is not None, "scores": scores, "scale": self.scale,
            "verdicts": [reply if isinstance(reply, str) else reply[0].text for reply in replies], "chosen": best,
            "unparseable": sum(1 for reply, score in zip(replies, scores)
                               if score is None and not isinstance(reply, str)),
        }
        if conversation:
            trail["turn"] = len(item.messages or []) // 2
        if pairs:
            trail["rejected"] = worst
        item.note(self.type, **trail)
        if best is None or worst is None or len(scored) < (2 if pairs else 1):
            return drop(item, failed[0] if failed else "unparseable-judgement")
        top, bottom = scores[best], scores[worst]
        if conversation:
            item.messages = [*(item.messages or [])[:-1], {"role": "assistant", "content": texts[best]}]
        else:
            item.solution = texts[best]
        item.judgement = {"chosenScore": top, "scale": self.scale, "scores": scores}
        if not pairs:
            return keep(item, "best-of-n")
        if top - bottom < self.min_margin:  # type: ignore[operator]
            return drop(item, "no-margin")
        if texts[best].strip() == texts[worst].strip():
            return drop(item, "identical-responses")
        item.rejected = texts[worst]
        item.judgement["rejectedScore"] = bottom
        return keep(item, "pair-with-margin")


def _question(item: Item) -> str:
    """What the judged responses answer: a conversation's last user turn, else the question."""
    return (item.messages or [])[-2]["content"] if _in_conversation(item) else item.question


def _earlier_turns(item: Item) -> list[dict[str, str]]:
    """A conversation's turns before its last user turn (none for a single-turn item)."""
    return (item.messages or [])[:-2] if _in_conversation(item) else []


def _own_response(item: Item) -> str | None:
    """The response the item already has: a conversation's final reply, else its solution."""
    return ((item.messages or [])[-1]["content"] if _in_conversation(item) else item.solution) or None


def build(step: Any, spec_seed: int = 0) -> Step:
    """The step for one entry of `spec.workflow` (the API's WorkflowStep)."""
    kind = step.type
    if kind == "seedSelection":
        p = step.seed_selection
        return SeedSelection(p.keep_fraction, p.passage_words)
    if kind == "agreementFilter":
        p = step.agreement_filter
        return AgreementFilter(p.samples, p.min_agreement, p.max_agreement)
    if kind == "rewrite":
        p = step.rewrite
        return Rewrite(list(p.targets), p.instructions)
    if kind == "selfRevision":
        p = step.self_revision
        return SelfRevision(p.rounds, list(p.rubric))
    if kind == "instructionReversal":
        p = step.instruction_reversal
        return InstructionReversal(p.similarity_threshold, p.metric)
    if kind == "multiTurn":
        p = step.multi_turn
        return MultiTurn(p.turns, p.revise_each_turn)
    if kind == "executionCheck":
        p = step.execution_check
        return ExecutionCheck(p.timeout_seconds, p.memory_mb)
    if kind == "judge":
        p = step.judge
        return Judge(p.responses, list(p.rubric), p.scale, p.min_margin)
    raise ValueError(f"unknown step type {kind!r}")
