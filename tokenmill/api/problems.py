"""One problem found in a recipe: where it is, what was found, what is allowed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# user:password@ (or token@) in a URL: never shown back, even in an error about that URL.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


@dataclass(frozen=True)
class Problem:
    message: str
    path: str = ""
    """Field path inside the resource, such as spec.optimization.peakLearningRate."""
    resource: str = ""
    """Kind/name of the resource, when known."""
    file: str = ""
    """File (and line) the resource came from, when known."""
    found: Any = None
    has_found: bool = False

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.resource, self.path) if part)
        found = f" (found {_show(self.found)})" if self.has_found else ""
        return f"{where}: {self.message}{found}" if where else f"{self.message}{found}"

    def located(self, *, file: str = "", resource: str = "") -> "Problem":
        return Problem(
            self.message,
            self.path,
            resource or self.resource,
            file or self.file,
            self.found,
            self.has_found,
        )


def found(message: str, path: str, value: Any) -> Problem:
    return Problem(message, path, found=value, has_found=True)


def redact(text: str) -> str:
    """`text` with credentials in URLs' userinfo replaced by ***."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def _show(value: Any) -> str:
    text = redact(repr(value))
    return text if len(text) <= 120 else text[:117] + "..."


class RecipeError(Exception):
    """Raised when a recipe has problems; carries all of them."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))
