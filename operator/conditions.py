"""Conditions as the Kubernetes API conventions describe them, on the wire (camelCase dicts).

One condition per type; `lastTransitionTime` changes only when `status` changes (a new reason
or message alone keeps it); `observedGeneration` is the generation the condition was computed
from. Conditions are kept in a fixed order so that a status computed twice is equal.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

VALID = "Valid"
INPUTS_READY = "InputsReady"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
ACTION_FAILED = "ActionFailed"
ORDER = (VALID, INPUTS_READY, RUNNING, SUCCEEDED, FAILED, SUSPENDED, ACTION_FAILED)

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"
MAX_MESSAGE = 32768


def rfc3339(moment: datetime) -> str:
    """`2025-01-02T03:04:05Z`: UTC, whole seconds, as Kubernetes writes times."""
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 time as Kubernetes and KubeRay write it; None when absent or malformed."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def find(conditions: Iterable[Mapping[str, Any]] | None, kind: str) -> Mapping[str, Any] | None:
    for condition in conditions or ():
        if condition.get("type") == kind:
            return condition
    return None


def is_true(conditions: Iterable[Mapping[str, Any]] | None, kind: str) -> bool:
    condition = find(conditions, kind)
    return condition is not None and condition.get("status") == TRUE


class Conditions:
    """A mutable view of a status's conditions that stamps times and generations."""

    def __init__(self, existing: Iterable[Mapping[str, Any]] | None, *, now: datetime, generation: int | None):
        self._items: dict[str, dict[str, Any]] = {}
        for condition in existing or ():
            kind = condition.get("type")
            if kind in ORDER:
                self._items[kind] = copy.deepcopy(dict(condition))
        self._now = rfc3339(now)
        self._generation = generation

    def set(self, kind: str, status: str, reason: str, message: str = "") -> None:
        previous = self._items.get(kind)
        changed = previous is None or previous.get("status") != status
        condition: dict[str, Any] = {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message[:MAX_MESSAGE],
            "lastTransitionTime": self._now if changed else previous.get("lastTransitionTime", self._now),
        }
        if self._generation is not None:
            condition["observedGeneration"] = self._generation
        self._items[kind] = condition

    def get(self, kind: str) -> Mapping[str, Any] | None:
        return self._items.get(kind)

    def is_true(self, kind: str) -> bool:
        condition = self._items.get(kind)
        return condition is not None and condition["status"] == TRUE

    def to_list(self) -> list[dict[str, Any]]:
        return [self._items[kind] for kind in ORDER if kind in self._items]
