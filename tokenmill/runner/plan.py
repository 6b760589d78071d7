"""Planning for the local runner: check the recipe, order it, make relative paths absolute."""

from __future__ import annotations

from pathlib import Path

from tokenmill.api.loader import parse_resource
from tokenmill.api.problems import RecipeError
from tokenmill.api.recipe import checked_recipe
from tokenmill.api.refs import node_at
from tokenmill.api.resources import AnyResource, references


def absolutise(resource: AnyResource, base_dir: Path) -> AnyResource:
    """Rewrite relative `file:` URIs (relative to the recipe's folder) to absolute `file:///` ones."""
    document = resource.model_dump(by_alias=True, exclude_none=True, mode="json")
    for reference in references(resource):
        if reference.uri is None:
            continue
        node_at(document, reference.location)["uri"] = _absolute(reference.uri, base_dir.resolve())
    parsed, problems = parse_resource(document)
    if parsed is None:
        raise RecipeError(problems)
    return parsed


def _absolute(uri: str, base_dir: Path) -> str:
    if uri.startswith("file:") and not uri.startswith("file:///"):
        return (base_dir / uri.removeprefix("file:")).resolve().as_uri()
    return uri


def plan_recipe(path: str | Path) -> list[AnyResource]:
    """The recipe's resources in dependency order, paths made absolute; raises RecipeError with every problem."""
    path = Path(path)
    ordered = checked_recipe(path, local=True)
    base_dir = path if path.is_dir() else path.parent
    return [absolutise(resource, base_dir) for resource in ordered]
