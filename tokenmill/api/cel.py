"""Evaluates the CRDs' CEL rules in Python, so the local runner enforces what the API server does.

Transition rules (those that mention `oldSelf`) only make sense on update and are left to
the API server.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import celpy


@lru_cache(maxsize=None)
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def is_transition_rule(rule: str) -> bool:
    return "oldSelf" in rule


def check(rule: str, value: Any) -> bool:
    """True when `rule` holds for `value` (the object as it appears on the wire)."""
    result = _program(rule).evaluate({"self": celpy.json_to_cel(value)})
    if isinstance(result, Exception):
        raise ValueError(f"CEL rule {rule!r} could not be evaluated: {result}")
    return bool(result)


def failed_messages(rules: tuple[dict[str, str], ...], value: Any) -> list[str]:
    """The messages of the non-transition rules that `value` breaks."""
    return [
        rule.get("message", f"must satisfy {rule['rule']}")
        for rule in rules
        if not is_transition_rule(rule["rule"]) and not check(rule["rule"], value)
    ]
