"""Loads and checks a whole recipe: schema, semantics, refs, cycles and outputs, every problem at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tokenmill.api.graph import topological_order
from tokenmill.api.loader import LoadedResource, load_recipe
from tokenmill.api.output_prefix import ClaimedOutput
from tokenmill.api.problems import Problem, RecipeError
from tokenmill.api.resources import AnyResource
from tokenmill.api.semantic import output_overlaps, validate

DefaultOutput = Callable[[AnyResource], str | None]


def absolute_uri(uri: str, base_dir: Path) -> str:
    """A relative `file:` URI made absolute against `base_dir`; other URIs unchanged."""
    if uri.startswith("file:") and not uri.startswith("file:///"):
        return (base_dir / uri.removeprefix("file:")).resolve().as_uri()
    return uri


def recipe_dir(path: str | Path) -> Path:
    """The folder relative `file:` URIs of the recipe at `path` are relative to."""
    path = Path(path)
    return (path if path.is_dir() else path.parent).resolve()


def checked_recipe(
    path: str | Path,
    *,
    local: bool,
    default_output: DefaultOutput = lambda resource: None,
    extra_checks: Callable[[LoadedResource], list[Problem]] = lambda item: [],
) -> list[AnyResource]:
    """The recipe's resources in dependency order; raises RecipeError listing every problem found.

    `local` allows relative `file:` URIs (the local runner); `default_output` gives the output
    of a resource that names none (None when unknown), so outputs can be checked for overlaps;
    `extra_checks` adds a caller's own rules.
    """
    loaded = load_recipe(path)
    resources = [item.resource for item in loaded]
    by_key = {resource.key: resource for resource in resources}
    problems = [
        problem.located(file=item.file)
        for item in loaded
        for problem in validate(item.resource, lambda kind, name: by_key.get((kind, name)), local=local)
    ]
    problems += _overlapping_outputs(loaded, recipe_dir(path), default_output)
    problems += [problem for item in loaded for problem in extra_checks(item)]
    try:
        ordered = topological_order(resources)
    except RecipeError as error:  # missing refs and cycles, reported with everything else
        raise RecipeError(problems + error.problems) from None
    if problems:
        raise RecipeError(problems)
    return ordered


def _overlapping_outputs(loaded: list[LoadedResource], base_dir: Path, default_output: DefaultOutput) -> list[Problem]:
    outputs: list[tuple[LoadedResource, str]] = []
    for item in loaded:
        uri = item.resource.spec.output.uri
        output = absolute_uri(uri, base_dir) if uri else default_output(item.resource)
        if output is not None:
            outputs.append((item, output))
    problems = []
    for item, output in outputs:
        claimed = [ClaimedOutput("/".join(other.resource.key), other_output)
                   for other, other_output in outputs if other is not item]
        problems += [problem.located(file=item.file, resource="/".join(item.resource.key))
                     for problem in output_overlaps(item.resource, output, claimed)]
    return problems
