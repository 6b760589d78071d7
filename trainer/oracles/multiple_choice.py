"""Multiple choice: the option a completion chose, by letter or by the option's text.

A problem has `answer` (a letter such as "B", or the correct option's text) and optionally
`choices` (the options' texts in order, lettered A, B, ...). The completion's choice is the
last `\\boxed{X}`, else the letter after the last "answer is" / "answer:", else the last
parenthesised letter "(X)", else the last option text the completion quotes.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from tokenmill.trainer.oracles.base import CORRECT, NO_ANSWER, WRONG_ANSWER, Problem, Verdict

KIND = "multiple-choice"
MAX_OPTIONS = 26
DEFAULT_OPTIONS = 10  # A to J (MMLU-Pro's widest) when the problem lists no choices


def _letters(choices: Sequence[str] | None) -> str:
    return string.ascii_uppercase[: len(choices) if choices else DEFAULT_OPTIONS]


def _text_key(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().strip(".").casefold()


def gold_letter(problem: Problem) -> str | None:
    """The correct option's letter, or None when the answer is a text not among the choices."""
    answer, choices = str(problem["answer"]).strip(), problem.get("choices")
    if len(answer) == 1 and answer.upper() in _letters(choices):
        return answer.upper()
    if choices:
        for letter, choice in zip(string.ascii_uppercase, choices):
            if _text_key(choice) == _text_key(answer):
                return letter
    return None


def extract_choice(text: str, choices: Sequence[str] | None = None) -> str | None:
    """The letter the completion chose (upper case), or the quoted option text when it names none.

    A bare lower-case letter counts only where it ends the phrase ("answer: d."), so that
    "the answer is a prime" chooses nothing.
    """
    letters = _letters(choices)
    upper, lower = f"[{letters}]", f"[{letters.lower()}]"
    either = f"[{letters}{letters.lower()}]"
    patterns = (
        rf"\\boxed\s*\{{\s*(?:\\text\s*\{{)?\s*\(?({either})\)?\s*\}}?\s*\}}",
        rf"(?i:answer)\s*(?:(?i:is)|:)\s*(?:(?i:option)\s*)?"
        rf"(?:\(({either})\)|({upper})\b|({lower})(?=\s*(?:[.,;:)]|$)))",
        rf"\(({either})\)",
    )
    for pattern in patterns:
        found = re.findall(pattern, text, flags=re.MULTILINE)
        if found:
            last = found[-1]
            return (last if isinstance(last, str) else next(group for group in last if group)).upper()
    if choices:
        lowered, best, best_at = text.casefold(), None, -1
        for letter_text, choice in zip(letters, choices):
            at = lowered.rfind(_text_key(choice))
            if _text_key(choice) and at > best_at:
                best, best_at = letter_text, at
        return best
    return None


class MultipleChoiceOracle:
    kind = KIND

    def problem_error(self, problem: Problem) -> str | None:
        answer, choices = problem.get("answer"), problem.get("choices")
        if answer is None or not str(answer).strip():
            return "answer: a multiple-choice problem needs the correct option (letter or text)"
        if choices is not None:
            if (not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= MAX_OPTIONS
                    or not all(isinstance(c, str) and c.strip() for c in choices)):
                return f"choices: must be a list of 2 to {MAX_OPTIONS} non-empty option texts"
        if gold_letter(problem) is None and not choices:
            return f"answer: {str(answer)[:40]!r} is neither an option letter nor, without choices, checkable"
        if gold_letter(problem) is None:
            return f"answer: {str(answer)[:40]!r} is not one of the choices"
        return None

    def check(self, problem: Problem, completion: str) -> Verdict:
        choices = problem.get("choices")
        chosen = extract_choice(completion, choices)
        if chosen is None:
            return Verdict(False, NO_ANSWER, "no option chosen")
        if chosen == gold_letter(problem):
            return Verdict(True, CORRECT, "chose the correct option", chosen)
        return Verdict(False, WRONG_ANSWER, "chose another option", chosen)
