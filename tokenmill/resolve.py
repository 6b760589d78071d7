"""Turns a resource into the run spec its workload reads: refs replaced by committed URIs.

Shared by the operator and the local runner, so a workload sees the same document in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenmill.api.refs import node_at
from tokenmill.api.resources import API_VERSION, KINDS, AnyResource, references
from tokenmill.api.status import OutputSummary
from tokenmill.layout import join

RUN_SPEC_VERSION = 1


class UnresolvedInput(LookupError):
    """A ref whose target has not committed the output this resource needs."""


def output_uri(resource: AnyResource, store_root: str, *, namespace: str | None = None) -> str:
    """The resource's output prefix: spec.output.uri, else <store>/[<namespace>/]<kind>/<name>.

    `namespace` stands in for a resource that names none (the namespace it will be created in).
    """
    if resource.spec.output.uri:
        return resource.spec.output.uri
    namespace = resource.metadata.namespace or namespace
    parts = [namespace] if namespace else []
    return join(store_root, *parts, KINDS[resource.kind].plural, resource.name)


def resolve_spec(resource: AnyResource, inputs: Mapping[tuple[str, str], OutputSummary]) -> dict[str, Any]:
    """The spec on the wire with every `ref` replaced by the `uri` of the referenced output.

    Dataset refs resolve to the input's committed dataset; model refs (the fields the kind's
    descriptor declares as models) to its final checkpoint.
    """
    document = {"spec": resource.spec.to_wire()}
    for reference in references(resource):
        ref = reference.ref
        if ref is None:
            continue
        summary = inputs.get((ref.kind, ref.name))
        wants_model = reference.role == "model"
        uri = None if summary is None else (summary.checkpoint if wants_model else summary.dataset)
        if uri is None:
            what = "a committed checkpoint" if wants_model else "a committed dataset"
            raise UnresolvedInput(f"{ref.kind}/{ref.name} has no {what} yet")
        node = node_at(document, reference.location)
        del node["ref"]
        node["uri"] = uri
        if "weight" in node:  # a mixture component keeps the ref's name for its metrics
            node.setdefault("name", ref.name)
    return document["spec"]


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
