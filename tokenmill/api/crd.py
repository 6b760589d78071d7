"""Generates the CustomResourceDefinitions from the typed models (the one source of truth).

Pydantic writes JSON Schema (draft 2020-12); Kubernetes wants a structural OpenAPI v3
schema: no $ref, no anyOf for optional fields, boolean exclusive bounds, no `title`,
no `additionalProperties: false` (unknown fields are pruned by the API server).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from tokenmill.api.common import MUTABLE_AFTER_START
from tokenmill.api.resources import CATEGORY, GROUP, KINDS, VERSION, KindDescriptor
from tokenmill.api.status import ResourceStatus

_DROPPED_KEYS = {"title", "propertyNames", "discriminator", "examples"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = dict(defs[node["$ref"].rsplit("/", 1)[-1]])
        for key, value in node.items():
            if key != "$ref":
                target[key] = value  # a field's own description and default win over the class's
        return _resolve(target, defs)
    if "anyOf" in node:
        branches = [branch for branch in node["anyOf"] if branch.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union of {len(branches)} types structurally: {node}")
        merged = {key: value for key, value in node.items() if key != "anyOf"}
        merged = {**_resolve(branches[0], defs), **merged}
        if merged.get("default", 0) is None:
            del merged["default"]
        return _resolve(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or key == "$defs":
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
            continue
        if key == "patternProperties":
            # Structural schemas cannot constrain map keys; the Python model still does.
            (value_schema,) = value.values()
            out["additionalProperties"] = _resolve(value_schema, defs)
            continue
        if key == "properties":
            out[key] = {name: _resolve(prop, defs) for name, prop in value.items()}
            continue
        out[key] = _resolve(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _default_objects(node: dict[str, Any], model: type[BaseModel]) -> None:
    """Give object fields created by default_factory an empty default, so the API server
    materialises them and applies their own fields' defaults."""
    for name, field in model.model_fields.items():
        prop = node.get("properties", {}).get(field.alias or name)
        if prop is None:
            continue
        annotation = field.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if field.default_factory is not None and "default" not in prop:
            value = field.default_factory()  # type: ignore[call-arg]
            prop["default"] = {} if isinstance(value, BaseModel) else value
        if nested is not None:
            _default_objects(prop, nested)


def _check_described(node: dict[str, Any], path: str) -> None:
    if path and "description" not in node:
        raise ValueError(f"{path} has no description; every field of the API must teach kubectl explain")
    for name, prop in node.get("properties", {}).items():
        _check_described(prop, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        _check_described_items(node["items"], f"{path}[]")


def _check_described_items(node: dict[str, Any], path: str) -> None:
    for name, prop in node.get("properties", {}).items():
        _check_described(prop, f"{path}.{name}")


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema = _resolve(raw, raw.get("$defs", {}))
    _default_objects(schema, model)
    return schema


def _immutable_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """The wire path below spec of every field that must not change once started: each field not in
    MUTABLE_AFTER_START, descending into objects (always present: defaulted to {}) that hold mutable fields."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        if path in MUTABLE_AFTER_START:
            continue
        nested = field.annotation
        if any(mutable.startswith(f"{path}.") for mutable in MUTABLE_AFTER_START):
            if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
                raise ValueError(f"spec.{path} holds mutable fields but is not a plain object")
            out += _immutable_fields(nested, f"{path}.")
            continue
        out.append(path)
    return out


def _immutability_rules(info: KindDescriptor) -> list[dict[str, str]]:
    """Per field: once an attempt has started, the field keeps its value (MUTABLE_AFTER_START excepted)."""
    started = "!has(oldSelf.status) || !has(oldSelf.status.startTime)"
    mutable = ", ".join(f"spec.{path}" for path in sorted(MUTABLE_AFTER_START))
    rules = []
    for path in _immutable_fields(info.spec_model):
        new, old = f"self.spec.{path}", f"oldSelf.spec.{path}"
        clause = f"has({new}) == has({old}) && (!has({new}) || {new} == {old})"
        rules.append({
            "rule": f"{started} || ({clause})",
            "message": f"spec.{path} cannot change once the resource has started (only {mutable} can); "
                       "delete and re-create the resource to change it",
            "fieldPath": f".spec.{path}",
        })
    return rules


def crd_for(info: KindDescriptor) -> dict[str, Any]:
    spec_schema = structural_schema(info.spec_model)
    spec_schema["description"] = (info.spec_model.__doc__ or "").strip()
    status_schema = structural_schema(ResourceStatus)
    status_schema["description"] = "Observed state, written by the operator."
    schema = {
        "type": "object",
        "description": (info.resource_model.model_fields["spec"].annotation.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion defines the versioned schema of this object."},
            "kind": {"type": "string", "description": "Kind is the REST resource this object represents."},
            "metadata": {"type": "object", "description": "Standard object metadata."},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": _immutability_rules(info),
    }
    _check_described(schema, "")
    columns = [
        *info.extra_columns,
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
        {"name": "Attempts", "type": "integer", "jsonPath": ".status.attempts", "priority": 1},
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
        {"name": "RayJob", "type": "string", "jsonPath": ".status.rayJobName", "priority": 1},
        {"name": "Started", "type": "date", "jsonPath": ".status.startTime", "priority": 1},
        {"name": "Completed", "type": "date", "jsonPath": ".status.completionTime", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": info.crd_name, "labels": {"app.kubernetes.io/part-of": "tokenmill"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": [CATEGORY, "all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name → CRD, for every kind."""
    return {f"{info.crd_name}.yaml": crd_for(info) for info in KINDS.values()}


def render_yaml(crd: dict[str, Any]) -> str:
    header = "# Generated by `tokenmill crds` from tokenmill/api; do not edit.\n"
    return header + yaml.safe_dump(crd, sort_keys=False, width=120)

