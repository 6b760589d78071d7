"""Oracles: decide whether a completion solves a problem (math answers, code against unit
tests in a sandbox, multiple choice). Shared by Pivotal Token Search and the synthetic-data
execution check."""

from __future__ import annotations

from collections.abc import Iterable

from tokenmill.trainer.oracles.base import (
    ORACLE_CRASHED,
    Oracle,
    OracleInputError,
    Problem,
    Verdict,
    crashed,
)

ORACLE_KINDS = ("math", "code", "multiple-choice")
MAX_REPORTED_PROBLEMS = 10


def make_oracle(kind: str, *, timeout_seconds: float = 10.0, memory_mb: int = 1024,
                output_bytes: int = 1 << 20) -> Oracle:
    """The oracle of `kind`; the limits apply to `code` only."""
    if kind == "math":
        from tokenmill.trainer.oracles.math import MathOracle

        return MathOracle()
    if kind == "code":
        from tokenmill.trainer.oracles.code import CodeOracle, SandboxLimits

        return CodeOracle(SandboxLimits(timeout_seconds, memory_mb, output_bytes))
    if kind == "multiple-choice":
        from tokenmill.trainer.oracles.multiple_choice import MultipleChoiceOracle

        return MultipleChoiceOracle()
    raise OracleInputError(f"oracle.kind: unknown oracle {kind!r} (known: {', '.join(ORACLE_KINDS)})")


def check_problems(oracle: Oracle, problems: Iterable[tuple[str, Problem]], where: str = "problems") -> int:
    """Raises OracleInputError naming every problem (by id, up to ten) the oracle cannot check.

    `problems` yields (id, problem) pairs; returns how many were checked.
    """
    bad: list[str] = []
    count = 0
    for count, (problem_id, problem) in enumerate(problems, start=1):
        error = oracle.problem_error(problem)
        if error is not None:
            bad.append(f"{where}[{problem_id}].{error}")
    if bad:
        shown = "\n  ".join(bad[:MAX_REPORTED_PROBLEMS])
        more = f"\n  ... and {len(bad) - MAX_REPORTED_PROBLEMS} more" if len(bad) > MAX_REPORTED_PROBLEMS else ""
        raise OracleInputError(f"{len(bad)} of {count} problems cannot be checked by the {oracle.kind} oracle:\n  {shown}{more}")
    return count


def safe_check(oracle: Oracle, problem: Problem, completion: str) -> Verdict:
    """The oracle's verdict; a check that raises is a failure carrying the error as its reason."""
    try:
        return oracle.check(problem, completion)
    except Exception as error:  # noqa: BLE001 - a crashing check never fails the job
        return crashed(error)


__all__ = [
    "ORACLE_CRASHED",
    "ORACLE_KINDS",
    "Oracle",
    "OracleInputError",
    "Problem",
    "Verdict",
    "check_problems",
    "make_oracle",
    "safe_check",
]
