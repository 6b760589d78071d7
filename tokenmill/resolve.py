"""Turns a resource into the run spec its workload reads: refs replaced by committed URIs.

Shared by the operator and the local runner, so a workload sees the same document in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenmill.api.resources import API_VERSION, KINDS, AnyResource
from tokenmill.api.status import OutputSummary
from tokenmill.layout import join

RUN_SPEC_VERSION = 1
MODEL_FIELDS = {"model", "parent", "referenceModel"}


class UnresolvedInput(LookupError):
    """A ref whose target has not committed the output this resource needs."""


def output_uri(resource: AnyResource, store_root: str) -> str:
    """The resource's output prefix: spec.output.uri, else <store>/[<namespace>/]<kind>/<name>."""
    if resource.spec.output.uri:
        return resource.spec.output.uri
    parts = [resource.metadata.namespace] if resource.metadata.namespace else []
    return join(store_root, *parts, KINDS[resource.kind].plural, resource.name)


def resolve_spec(resource: AnyResource, inputs: Mapping[tuple[str, str], OutputSummary]) -> dict[str, Any]:
    """The spec on the wire with every `ref` replaced by the `uri` of the referenced output.

    Dataset refs resolve to the input's committed dataset; model refs (fields model, parent,
    referenceModel) to its final checkpoint.
    """
    return _replace_refs(resource.spec.to_wire(), inputs, field="")


def _replace_refs(node: Any, inputs: Mapping[tuple[str, str], OutputSummary], field: str) -> Any:
    if isinstance(node, list):
        return [_replace_refs(item, inputs, field) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _replace_refs(value, inputs, key) for key, value in node.items() if key != "ref"}
    ref = node.get("ref")
    if isinstance(ref, dict) and {"kind", "name"} <= ref.keys():
        summary = inputs.get((ref["kind"], ref["name"]))
        wants_model = field in MODEL_FIELDS
        uri = None if summary is None else (summary.checkpoint if wants_model else summary.dataset)
        if uri is None:
            what = "a committed checkpoint" if wants_model else "a committed dataset"
            raise UnresolvedInput(f"{ref['kind']}/{ref['name']} has no {what} yet")
        out["uri"] = uri
        if "weight" in node:  # a mixture component keeps the ref's name for its metrics
            out.setdefault("name", ref["name"])
    return out


def run_spec(resource: AnyResource, *, output: str, attempt: int, resolved: dict[str, Any]) -> dict[str, Any]:
    """The document written to <output>/_run/spec.json."""
    return {
        "runSpecVersion": RUN_SPEC_VERSION,
        "apiVersion": API_VERSION,
        "kind": resource.kind,
        "metadata": {
            "name": resource.name,
            "namespace": resource.metadata.namespace,
            "uid": resource.metadata.uid,
            "generation": resource.metadata.generation,
        },
        "attempt": attempt,
        "output": output,
        "spec": resolved,
    }
