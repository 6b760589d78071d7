"""What every oracle returns and how it says a problem cannot be checked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

# Reasons a verdict can carry; every workload counts them.
CORRECT = "correct"
WRONG_ANSWER = "wrong-answer"
NO_ANSWER = "no-answer"
TEST_FAILED = "test-failed"
ERROR = "error"
TIMEOUT = "timeout"
MEMORY_LIMIT = "memory-limit"
OUTPUT_LIMIT = "output-limit"
ORACLE_CRASHED = "oracle-crashed"

DETAIL_CHARS = 2000


class OracleInputError(ValueError):
    """A problem set or oracle setting that no oracle can check; raised before any sampling."""


@dataclass(frozen=True)
class Verdict:
    """The oracle's decision on one completion."""

    correct: bool
    reason: str
    """One of the reason constants above."""
    detail: str = ""
    """A short human-readable explanation (capped at DETAIL_CHARS)."""
    extracted: str | None = None
    """The final answer the oracle read from the completion, when it reads one."""
    network_isolated: bool | None = None
    """code: whether the candidate ran without network access (None for other oracles)."""

    def __post_init__(self) -> None:
        if len(self.detail) > DETAIL_CHARS:
            object.__setattr__(self, "detail", self.detail[: DETAIL_CHARS - 3] + "...")


Problem = Mapping[str, Any]


class Oracle(Protocol):
    """Checks completions of one problem kind."""

    kind: str

    def problem_error(self, problem: Problem) -> str | None:
        """Why this problem cannot be checked (a missing or malformed field), or None."""
        ...

    def check(self, problem: Problem, completion: str) -> Verdict:
        """Whether `completion` solves `problem`."""
        ...


def crashed(error: BaseException) -> Verdict:
    """The verdict for a completion whose check raised: a failure that names the error."""
    return Verdict(False, ORACLE_CRASHED, f"{type(error).__name__}: {error}")
