"""One typed walk over a spec's references: the datasets, models and files it reads, its output,
and the Secrets it names, each with its field path.

A *source* is any object with the fields `ref` (another tokenmill resource) and `uri` (a
committed object in the store). What a source holds (a dataset, a model, an opaque file) is
declared by the kind's descriptor per field, so the walker never guesses from a field's name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from tokenmill.api.common import ObjectRef, OutputSpec, SecretKeyRef, SecretRef

Role = Literal["dataset", "model", "file", "output", "secret"]
Location = tuple[str | int, ...]


@dataclass(frozen=True)
class Reference:
    """One place in a spec that points outside it."""

    location: Location
    """Wire keys and list indices from the resource's root to the object holding `ref` and `uri`
    (or the Secret reference), e.g. ("spec", "datasets", 0)."""
    role: Role
    ref: ObjectRef | None = None
    uri: str | None = None
    secret: SecretRef | SecretKeyRef | None = None

    @property
    def path(self) -> str:
        """The field path as problems show it, e.g. spec.datasets[0]."""
        return format_location(self.location)

    @property
    def field(self) -> str:
        """The declared field the reference sits in: the path without list indices, e.g. spec.datasets."""
        return format_location(tuple(part for part in self.location if isinstance(part, str)))


def format_location(location: Location) -> str:
    out = ""
    for part in location:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def is_source_model(model: type[BaseModel]) -> bool:
    return {"ref", "uri"} <= model.model_fields.keys()


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes inside an annotation (through Optional, list, dict values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) is None:
        return []
    found: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        found += _models_in(arg)
    return found


def declared_fields(model: type[BaseModel], prefix: str = "spec") -> dict[str, str]:
    """Every field of `model` (a spec class) holding a source or a Secret, as path -> "source" | "secret".

    Used to check that a kind's descriptor declares what each such field holds.
    """
    out: dict[str, str] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}.{field.alias or name}"
        for nested in _models_in(field.annotation):
            if nested in (SecretRef, SecretKeyRef):
                out[path] = "secret"
            elif is_source_model(nested):
                out[path] = "source"
            else:
                out.update(declared_fields(nested, path))
    return out


def walk_spec(spec: BaseModel, roles: Mapping[str, Role]) -> Iterator[Reference]:
    """Every reference in `spec`, in field order.

    `roles` maps a declared source field (spec.inputs) to what it holds; the output's URI
    (when set) comes as role "output", Secrets as role "secret".
    """
    yield from _walk(spec, ("spec",), roles)


def _walk(value: Any, location: Location, roles: Mapping[str, Role]) -> Iterator[Reference]:
    if isinstance(value, (SecretRef, SecretKeyRef)):
        yield Reference(location, "secret", secret=value)
    elif isinstance(value, OutputSpec):
        if value.uri is not None:
            yield Reference(location, "output", uri=value.uri)
        yield from _walk_fields(value, location, roles)
    elif isinstance(value, BaseModel) and is_source_model(type(value)):
        field = format_location(tuple(part for part in location if isinstance(part, str)))
        role = roles.get(field)
        if role is None:
            raise KeyError(f"{field} holds a source but its kind does not declare what it holds")
        yield Reference(location, role, ref=getattr(value, "ref"), uri=getattr(value, "uri"))
    elif isinstance(value, BaseModel):
        yield from _walk_fields(value, location, roles)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, (*location, index), roles)


def _walk_fields(value: BaseModel, location: Location, roles: Mapping[str, Role]) -> Iterator[Reference]:
    for name, field in type(value).model_fields.items():
        yield from _walk(getattr(value, name), (*location, field.alias or name), roles)


def node_at(document: Any, location: Location) -> Any:
    """The part of a wire document (dicts and lists) at `location`, which starts at its root."""
    node = document
    for part in location:
        node = node[part]
    return node
