"""Planning for the local runner: check the recipe, order it, make relative paths absolute."""

from __future__ import annotations

from pathlib import Path

from tokenmill.api.loader import parse_resource
from tokenmill.api.problems import RecipeError
from tokenmill.api.recipe import absolute_uri, checked_recipe, recipe_dir
from tokenmill.api.refs import node_at
from tokenmill.api.resources import AnyResource, references
from tokenmill.resolve import output_uri


def absolutise(resource: AnyResource, base_dir: Path) -> AnyResource:
    """Rewrite relative `file:` URIs (relative to the recipe's folder) to absolute `file:///` ones."""
    document = resource.model_dump(by_alias=True, exclude_none=True, mode="json")
    for reference in references(resource):
        if reference.uri is None:
            continue
        node_at(document, reference.location)["uri"] = absolute_uri(reference.uri, base_dir.resolve())
    parsed, problems = parse_resource(document)
    if parsed is None:
        raise RecipeError(problems)
    return parsed


def plan_recipe(path: str | Path, store: str | None = None) -> list[AnyResource]:
    """The recipe's resources in dependency order, paths made absolute; raises RecipeError with every problem.

    `store` is the store root outputs default to, so they can be checked against the outputs
    the recipe names.
    """
    ordered = checked_recipe(path, local=True,
                             default_output=lambda resource: output_uri(resource, store) if store else None)
    return [absolutise(resource, recipe_dir(path)) for resource in ordered]
