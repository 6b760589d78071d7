"""Loads and checks a whole recipe: schema, semantics, refs and cycles, every problem at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tokenmill.api.graph import topological_order
from tokenmill.api.loader import LoadedResource, load_recipe
from tokenmill.api.problems import Problem, RecipeError
from tokenmill.api.resources import AnyResource
from tokenmill.api.semantic import validate


def checked_recipe(
    path: str | Path,
    *,
    local: bool,
    extra_checks: Callable[[LoadedResource], list[Problem]] = lambda item: [],
) -> list[AnyResource]:
    """The recipe's resources in dependency order; raises RecipeError listing every problem found.

    `local` allows relative `file:` URIs (the local runner); `extra_checks` adds a caller's own rules.
    """
    loaded = load_recipe(path)
    resources = [item.resource for item in loaded]
    by_key = {resource.key: resource for resource in resources}
    problems = [
        problem.located(file=item.file)
        for item in loaded
        for problem in validate(item.resource, lambda kind, name: by_key.get((kind, name)), local=local)
    ]
    problems += [problem for item in loaded for problem in extra_checks(item)]
    try:
        ordered = topological_order(resources)
    except RecipeError as error:  # missing refs and cycles, reported with everything else
        raise RecipeError(problems + error.problems) from None
    if problems:
        raise RecipeError(problems)
    return ordered
