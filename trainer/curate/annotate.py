"""The quality annotator: an LLM scores a sample of the inputs; the scores train the classifier.

Prompt `educational-value-v1` asks, FineWeb-Edu style, for a passage's educational value and
the depth of reasoning it needs, each out of 5, in two lines `educational value: N/5` and
`reasoning: M/5`. The label is (N + M) / 10. The first line names the task (`Task: score`)
and the passage sits in a `### Passage` section, the layout every engine, the scripted
stand-in teacher included, is prompted with. Replies without both scores are counted and
left out; too few usable replies is an error naming the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

PROMPTS = {
    "educational-value-v1": (
        "Task: score\n"
        "Rate the passage below as teaching material for a student, from primary school to university.\n"
        "- educational value (0-5): 0 for spam, ads or navigation text; 1 for some relevant facts mixed "
        "with unrelated content; 2 for a coherent text on an educational topic; 3 for a clear "
        "introduction to key concepts; 4 for a focused lesson with examples or exercises; 5 for an "
        "outstanding lesson with no distractions.\n"
        "- reasoning (0-5): how many connected steps (calculations, deductions, explanations of cause) "
        "a reader must follow.\n"
        "Answer with exactly two lines: `educational value: N/5` and `reasoning: M/5`.\n"
        "### Passage\n{passage}\n"
    ),
}
PASSAGE_CHARS = 4000
MIN_USABLE = 10
_VALUE = re.compile(r"educational value:\s*([0-5])\s*/\s*5", re.IGNORECASE)
_REASONING = re.compile(r"reasoning:\s*([0-5])\s*/\s*5", re.IGNORECASE)


class AnnotatorError(ValueError):
    """The annotator's replies cannot train a classifier."""


def prompt_for(passage: str, version: str) -> str:
    return PROMPTS[version].format(passage=passage[:PASSAGE_CHARS])


def parse_score(reply: str) -> float | None:
    """(value + reasoning) / 10 from a reply, or None when either score is missing."""
    value, reasoning = _VALUE.search(reply), _REASONING.search(reply)
    if value is None or reasoning is None:
        return None
    return (int(value.group(1)) + int(reasoning.group(1))) / 10


@dataclass(frozen=True)
class Annotations:
    texts: list[str]
    labels: list[float]
    asked: int
    unusable: int


def annotate(texts: Sequence[str], engine, sampling, version: str) -> Annotations:
    """Score every text with one request each; returns the usable (text, label) pairs."""
    from tokenmill.trainer.generate import GenerationRequest

    requests = [GenerationRequest(messages=({"role": "user", "content": prompt_for(text, version)},), n=1,
                                  sampling=sampling) for text in texts]
    outputs = engine.generate(requests)
    kept_texts, labels = [], []
    for text, output in zip(texts, outputs):
        replies = [completion.text for completion in output.completions]
        score = parse_score(replies[0]) if replies else None
        if score is not None:
            kept_texts.append(text)
            labels.append(score)
    result = Annotations(kept_texts, labels, len(texts), len(texts) - len(kept_texts))
    if len(kept_texts) < MIN_USABLE:
        raise AnnotatorError(f"prompt {version}: only {len(kept_texts)} of {len(texts)} replies carried both "
                             f"scores (at least {MIN_USABLE} are needed); check the generator")
    return result
