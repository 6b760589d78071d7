"""Pure planning for the local runner: load, validate, absolutise paths, order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenmill.api.graph import topological_order
from tokenmill.api.loader import load_recipe, parse_resource
from tokenmill.api.problems import RecipeError
from tokenmill.api.resources import AnyResource
from tokenmill.api.semantic import validate


def absolutise(resource: AnyResource, base_dir: Path) -> AnyResource:
    """Rewrite relative `file:` URIs (relative to the recipe's folder) to absolute `file:///` ones."""
    document = resource.model_dump(by_alias=True, exclude_none=True, mode="json")
    document["spec"] = _rewrite(document["spec"], base_dir.resolve())
    parsed, problems = parse_resource(document)
    if parsed is None:
        raise RecipeError(problems)
    return parsed


def _rewrite(node: Any, base_dir: Path) -> Any:
    if isinstance(node, dict):
        return {
            key: (_absolute(value, base_dir) if key == "uri" and isinstance(value, str) else _rewrite(value, base_dir))
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewrite(item, base_dir) for item in node]
    return node


def _absolute(uri: str, base_dir: Path) -> str:
    if uri.startswith("file:") and not uri.startswith("file:///"):
        return (base_dir / uri.removeprefix("file:")).resolve().as_uri()
    return uri


def plan_recipe(path: str | Path) -> list[AnyResource]:
    """The recipe's resources in dependency order; raises RecipeError with every problem found."""
    path = Path(path)
    loaded = load_recipe(path)
    resources = [item.resource for item in loaded]
    by_key = {resource.key: resource for resource in resources}
    problems = [
        problem.located(file=item.file)
        for item in loaded
        for problem in validate(item.resource, lambda kind, name: by_key.get((kind, name)), local=True)
    ]
    try:
        ordered = topological_order(resources)
    except RecipeError as error:  # missing refs and cycles, reported with everything else
        raise RecipeError(problems + error.problems) from None
    if problems:
        raise RecipeError(problems)
    base_dir = path if path.is_dir() else path.parent
    return [absolutise(resource, base_dir) for resource in ordered]
