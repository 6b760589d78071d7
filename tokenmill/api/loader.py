"""Reads recipes (YAML files or directories of them) into typed resources, listing every problem."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from tokenmill.api.fields import PATTERN_MEANINGS
from tokenmill.api.problems import Problem, RecipeError
from tokenmill.api.refs import declared_fields
from tokenmill.api.resources import API_VERSION, KINDS, AnyResource
from tokenmill.api.yaml_input import YamlInputError, read_yaml_documents

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LoadedResource:
    resource: AnyResource
    file: str


def recipe_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in YAML_SUFFIXES and p.is_file())
    return [path]


def load_recipe(path: str | Path) -> list[LoadedResource]:
    """All resources under `path`; raises RecipeError listing every problem found."""
    path = Path(path)
    if not path.exists():
        raise RecipeError([Problem(f"no such file or directory: {path}")])
    files = recipe_files(path)
    if not files:
        raise RecipeError([Problem(f"no {' or '.join(YAML_SUFFIXES)} files in {path}")])
    loaded: list[LoadedResource] = []
    problems: list[Problem] = []
    for file in files:
        file_loaded, file_problems = _load_file(file)
        loaded += file_loaded
        problems += file_problems
    problems += _duplicates(loaded)
    if problems:
        raise RecipeError(problems)
    return loaded


def parse_resource(document: Any, *, file: str = "") -> tuple[AnyResource | None, list[Problem]]:
    """One YAML/JSON document → a typed resource, or the problems that prevent it."""
    if not isinstance(document, dict):
        return None, [Problem(f"expected a mapping with apiVersion, kind, metadata and spec, found {type(document).__name__}", file=file)]
    kind = document.get("kind")
    name = (document.get("metadata") or {}).get("name") if isinstance(document.get("metadata"), dict) else None
    label = f"{kind}/{name}" if kind and name else str(kind or "<no kind>")
    if document.get("apiVersion") != API_VERSION:
        return None, [
            Problem(
                f"apiVersion must be {API_VERSION}",
                "apiVersion",
                label,
                file,
                document.get("apiVersion"),
                True,
            )
        ]
    if kind not in KINDS:
        allowed = ", ".join(KINDS)
        return None, [Problem(f"unknown kind; allowed kinds are {allowed}", "kind", label, file, kind, True)]
    model = KINDS[kind].resource_model
    try:
        return model.model_validate(document), []  # type: ignore[return-value]
    except ValidationError as error:
        secrets = _secret_fields(kind)
        return None, [
            _problem_from_error(item, model, secrets).located(file=file, resource=label) for item in error.errors()
        ]


@functools.cache
def _secret_fields(kind: str) -> tuple[str, ...]:
    """Paths of the kind's fields that name a Secret."""
    return tuple(path for path, what in declared_fields(KINDS[kind].spec_model).items() if what == "secret")


def _load_file(file: Path) -> tuple[list[LoadedResource], list[Problem]]:
    try:
        documents = read_yaml_documents(file)
    except YamlInputError as error:
        return [], [Problem(error.reason, file=error.where)]
    loaded, problems = [], []
    for index, document in enumerate(documents):
        if document is None:
            continue
        where = f"{file}" if len(documents) == 1 else f"{file}#{index + 1}"
        resource, found = parse_resource(document, file=where)
        problems += found
        if resource is not None:
            loaded.append(LoadedResource(resource, where))
    return loaded, problems


def _duplicates(loaded: list[LoadedResource]) -> list[Problem]:
    seen: dict[tuple[str, str], str] = {}
    problems = []
    for item in loaded:
        key = item.resource.key
        if key in seen:
            problems.append(
                Problem(f"duplicate resource; also defined in {seen[key]}", "metadata.name", "/".join(key), item.file)
            )
        seen.setdefault(key, item.file)
    return problems


def _problem_from_error(error: dict[str, Any], model: type[BaseModel], secrets: tuple[str, ...] = ()) -> Problem:
    loc = [part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
    path = _format_path(loc)
    kind = error["type"]
    value = error.get("input")
    field = _format_path([part for part in loc if isinstance(part, str)])
    if any(field == secret or field.startswith(f"{secret}.") for secret in secrets) and not isinstance(value, dict):
        # Whatever was written where a Secret's name belongs may be the secret itself: never echo it.
        return Problem("must name a Secret ({name: <secret>} or {name: <secret>, key: <key>}); a secret's value "
                       "never goes in a spec (the value given is not shown)", path)
    if kind == "extra_forbidden":
        allowed = _allowed_fields(model, loc[:-1])
        hint = f"; allowed fields here: {', '.join(allowed)}" if allowed else ""
        return Problem(f"unknown field{hint}", path)
    if kind == "missing":
        return Problem("required field is missing", path)
    message = error["msg"].removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        message = PATTERN_MEANINGS.get((error.get("ctx") or {}).get("pattern", ""), message)
    if isinstance(value, (dict, list)) and kind == "value_error":
        return Problem(message, path)
    return Problem(message, path, found=value, has_found=True)


def _format_path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_fields(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """Wire names of the fields of the model found by following `loc` from `model`."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        current = _unwrap(current)
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = next(
            (f for name, f in current.model_fields.items() if (f.alias or name) == part or name == part), None
        )
        if field is None:
            return []
        current = field.annotation
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [field.alias or name for name, field in current.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """The model class inside Optional[...] or list[...]."""
    while get_origin(annotation) is not None:
        candidates = [arg for arg in get_args(annotation) if arg is not type(None)]
        models = [arg for arg in candidates if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if models:
            return models[0]
        if not candidates:
            return annotation
        annotation = candidates[-1]
    return annotation
