"""Math answers: read the final answer from a solution and compare it with the ground truth.

The answer is the last `\\boxed{...}` (or `\\fbox{...}`), else what follows the last
"answer:" / "answer is", else the last number in the text. Two answers are equal when their
normalised strings are, or when HF's `math-verify` proves them equal (fractions and decimals,
reordered sums, sets, percentages, radicals...).
"""

from __future__ import annotations

import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from tokenmill.trainer.oracles.base import (
    CORRECT,
    NO_ANSWER,
    WRONG_ANSWER,
    Problem,
    Verdict,
)

KIND = "math"
# math-verify bounds its own parsing and comparison with SIGALRM, which only the main
# thread may use; elsewhere it runs unbounded.
VERIFY_TIMEOUT_SECONDS = 5

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?")
_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]


def extract_answer(text: str) -> tuple[str, str] | None:
    """The final answer in `text` and how it was found (boxed, answer-is, last-number)."""
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        rest = text[matches[-1].end():].split("\n", 1)[0]
        answer = _strip_decoration(rest)
        if answer:
            return answer, "answer-is"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1], "last-number"
    return None


def _last_boxed(text: str) -> str | None:
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    depth = 1
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:index]
    return None  # unbalanced: no complete box


def _strip_decoration(answer: str) -> str:
    previous = None
    while answer != previous:
        previous = answer
        answer = answer.strip().strip("$")
        if answer.endswith((".", ";", ":")):  # a sentence end, not a decimal point
            answer = answer[:-1]
    return answer


def _normalise(answer: str) -> str:
    return re.sub(r"\s+", "", _strip_decoration(answer)).replace("\\!", "").replace("\\,", "")


def _parsed(answer: str) -> list:
    timeout = VERIFY_TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    return parse(f"${answer}$", extraction_config=_EXTRACTION, parsing_timeout=timeout)


def equivalent(gold: str, candidate: str) -> bool:
    """Whether two final answers are mathematically the same."""
    if _normalise(gold) == _normalise(candidate):
        return True
    gold_parsed, candidate_parsed = _parsed(_strip_decoration(gold)), _parsed(_strip_decoration(candidate))
    if not gold_parsed or not candidate_parsed:
        return False
    timeout = VERIFY_TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    return bool(verify(gold_parsed, candidate_parsed, timeout_seconds=timeout))


class MathOracle:
    """Compares a solution's final answer with the problem's `answer` field."""

    kind = KIND

    def problem_error(self, problem: Problem) -> str | None:
        answer = problem.get("answer")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            return "answer: a math problem needs a ground-truth answer"
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            return f"answer: must be a string or a number, got {type(answer).__name__}"
        return None

    def check(self, problem: Problem, completion: str) -> Verdict:
        gold = str(problem["answer"])
        found = extract_answer(completion)
        if found is None:
            return Verdict(False, NO_ANSWER, "no boxed answer, 'answer:' line or number found")
        answer, method = found
        if equivalent(gold, answer):
            return Verdict(True, CORRECT, f"{method} answer equals the ground truth", answer)
        return Verdict(False, WRONG_ANSWER, f"{method} answer differs from the ground truth", answer)
