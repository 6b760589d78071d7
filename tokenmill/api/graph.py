"""The recipe as a DAG: which resources each resource reads, in which order they can run."""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.api.common import ObjectRef
from tokenmill.api.problems import Problem, RecipeError
from tokenmill.api.resources import AnyResource
from tokenmill.api.resources import references as all_references

Key = tuple[str, str]


def references(resource: AnyResource) -> list[tuple[str, ObjectRef]]:
    """Every (field path, ref) in the resource's spec, in field order."""
    return [(f"{item.path}.ref", item.ref) for item in all_references(resource) if item.ref is not None]


def dependencies(resource: AnyResource) -> list[Key]:
    seen: list[Key] = []
    for _, ref in references(resource):
        if (ref.kind, ref.name) not in seen:
            seen.append((ref.kind, ref.name))
    return seen


def topological_order(resources: Sequence[AnyResource]) -> list[AnyResource]:
    """Resources ordered so that each comes after everything it reads.

    Raises RecipeError naming every missing ref and the resources of the first cycle found.
    Ties keep the order the resources were given in, so runs are reproducible.
    """
    by_key = {resource.key: resource for resource in resources}
    problems = [
        Problem(
            f"refers to {ref.kind}/{ref.name}, which is not in the recipe",
            path,
            "/".join(resource.key),
        )
        for resource in resources
        for path, ref in references(resource)
        if (ref.kind, ref.name) not in by_key
    ]
    if problems:
        raise RecipeError(problems)

    ordered: list[AnyResource] = []
    state: dict[Key, str] = {}

    def visit(key: Key, trail: list[Key]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "active":
            cycle = trail[trail.index(key):] + [key]
            raise RecipeError(
                [
                    Problem(
                        "the recipe has a cycle: " + " -> ".join("/".join(k) for k in cycle),
                        resource="/".join(key),
                    )
                ]
            )
        state[key] = "active"
        for dependency in dependencies(by_key[key]):
            visit(dependency, trail + [key])
        state[key] = "done"
        ordered.append(by_key[key])

    for resource in resources:
        visit(resource.key, [])
    return ordered
