"""Prompt templates: versioned Jinja2 files in `templates/`, rendered strictly.

Each file starts with `{#- version: N -#}`; the version goes into every record's provenance.
A template naming a variable its context lacks raises `TemplateFieldError` naming the file
and the field (rendering is strict: nothing renders as an empty string by accident). Output
is plain text: no escaping, and user text is never interpreted as a template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"
SUFFIX = ".j2"
_VERSION = re.compile(r"^\{#-?\s*version:\s*(\d+)\s*-?#\}")
_MISSING = re.compile(r"'([^']+)' is undefined|has no attribute '([^']+)'")


class TemplateFieldError(ValueError):
    """A template names a field its context does not have."""


@dataclass(frozen=True)
class Template:
    name: str
    version: int
    path: Path
    compiled: jinja2.Template

    def render(self, **context: Any) -> str:
        try:
            return self.compiled.render(**context).strip()
        except jinja2.UndefinedError as error:
            found = _MISSING.search(str(error))
            field = next((g for g in found.groups() if g), str(error)) if found else str(error)
            raise TemplateFieldError(f"template {self.path.name} (version {self.version}) names the field "
                                     f"{field!r}, which its context lacks ({error})") from None


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
                              autoescape=False, keep_trailing_newline=False)


@lru_cache(maxsize=64)
def get(name: str) -> Template:
    """The template `templates/<name>.j2`; its first line must declare its version."""
    path = TEMPLATE_DIR / f"{name}{SUFFIX}"
    if not path.is_file():
        raise TemplateFieldError(f"template {path.name}: no such file in {TEMPLATE_DIR}")
    source = path.read_text(encoding="utf-8")
    found = _VERSION.match(source)
    if found is None:
        raise TemplateFieldError(f"template {path.name}: the first line must be {{#- version: N -#}}")
    try:
        compiled = _environment().get_template(path.name)
    except jinja2.TemplateSyntaxError as error:
        raise TemplateFieldError(f"template {path.name}, line {error.lineno}: {error.message}") from None
    return Template(name, int(found.group(1)), path, compiled)


def render(name: str, **context: Any) -> str:
    return get(name).render(**context)


def versions(names: set[str] | frozenset[str]) -> dict[str, int]:
    return {name: get(name).version for name in sorted(names)}
