"""Math answers: read the final answer from a solution and compare it with the ground truth.

The answer is the last `\\boxed{...}` (or `\\fbox{...}`), else what follows the last
"answer:" / "answer is", else the last number in the text. Two answers are equal when their
normalised strings are, or when HF's `math-verify` proves them equal (fractions and decimals,
reordered sums, sets, percentages, radicals...).
"""

from __future__ import annotations

import multiprocessing
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
# math-verify bounds its own parsing and comparison with SIGALRM, which only a main thread
# may use. Called from another thread, the comparison runs in a verifier process (whose main
# thread has the alarm), and a process that still does not answer is killed.
VERIFY_TIMEOUT_SECONDS = 5
VERIFIER_PROCESS_TIMEOUT_SECONDS = 4 * VERIFY_TIMEOUT_SECONDS
# Starting a verifier (a fresh interpreter importing math-verify and sympy) is not part of a
# comparison's time: on a loaded machine it alone can take longer than the comparison's bound.
VERIFIER_START_TIMEOUT_SECONDS = 300
_READY = "ready"

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


def normalise_answer(answer: str) -> str:
    """The answer as a comparison key: no spaces, `$`, thin spaces or closing period."""
    return re.sub(r"\s+", "", _strip_decoration(answer)).replace("\\!", "").replace("\\,", "")


def _parsed(answer: str) -> list:
    return parse(f"${answer}$", extraction_config=_EXTRACTION, parsing_timeout=VERIFY_TIMEOUT_SECONDS)


def _verified(gold: str, candidate: str) -> bool:
    """math-verify's decision; only on a main thread (its time bounds need SIGALRM)."""
    gold_parsed, candidate_parsed = _parsed(_strip_decoration(gold)), _parsed(_strip_decoration(candidate))
    if not gold_parsed or not candidate_parsed:
        return False
    return bool(verify(gold_parsed, candidate_parsed, timeout_seconds=VERIFY_TIMEOUT_SECONDS))


def equivalent(gold: str, candidate: str) -> bool:
    """Whether two final answers are mathematically the same (False when undecided in time)."""
    if normalise_answer(gold) == normalise_answer(candidate):
        return True
    if threading.current_thread() is threading.main_thread():
        return _verified(gold, candidate)
    return _VERIFIERS.equivalent(gold, candidate)


def _serve(connection) -> None:
    """A verifier process: answers (gold, candidate) pairs until its parent closes the pipe."""
    connection.send(_READY)  # its imports are done
    while True:
        try:
            gold, candidate = connection.recv()
        except (EOFError, OSError):
            return
        try:
            answer = _verified(gold, candidate)
        except Exception:  # noqa: BLE001 - an unparsable answer is not equal
            answer = False
        connection.send(answer)


class _VerifierProcesses:
    """Idle verifier processes, one taken per comparison, so threads compare in parallel."""

    def __init__(self) -> None:
        self._idle: list = []
        self._lock = threading.Lock()

    def _start(self):
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_serve, args=(child_end,), daemon=True,
                                  name="tokenmill-math-verifier")
        process.start()
        child_end.close()
        try:
            if parent_end.poll(VERIFIER_START_TIMEOUT_SECONDS) and parent_end.recv() == _READY:
                return process, parent_end
        except (EOFError, OSError):
            pass
        process.kill()
        process.join()
        parent_end.close()
        raise OSError(f"a math verifier process did not start within {VERIFIER_START_TIMEOUT_SECONDS} s")

    def equivalent(self, gold: str, candidate: str) -> bool:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        try:
            process, connection = worker or self._start()
        except OSError:
            return False
        try:
            connection.send((gold, candidate))
            if connection.poll(VERIFIER_PROCESS_TIMEOUT_SECONDS):
                answer = bool(connection.recv())
                with self._lock:
                    self._idle.append((process, connection))
                return answer
        except (EOFError, OSError):
            pass
        process.kill()  # stuck or dead: never reused
        process.join()
        connection.close()
        return False


_VERIFIERS = _VerifierProcesses()


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
