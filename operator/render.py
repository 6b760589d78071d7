"""`tokenmill render FILE`: every RayJob the operator would create for a recipe, as YAML.

For review before `kubectl apply`: the resources are loaded and validated as the operator
validates them (cluster semantics: no relative file: URIs), ordered by their dependencies,
and each one's first-attempt RayJob is printed with the run spec URI it would read. The
ownerReference's uid is a placeholder: the API server assigns it on creation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tokenmill.api.loader import LoadedResource
from tokenmill.api.problems import Problem
from tokenmill.api.recipe import checked_recipe
from tokenmill.api.resources import AnyResource
from tokenmill.layout import run_spec_uri
from tokenmill.operator import rayjob
from tokenmill.operator.config import OperatorConfig
from tokenmill.resolve import output_uri


def render_recipe(path: str | Path, config: OperatorConfig, *, namespace: str = "default") -> list[dict[str, Any]]:
    """The RayJobs of the recipe at `path`, in dependency order; raises RecipeError listing every problem."""
    def needs_a_store(item: LoadedResource) -> list[Problem]:
        if item.resource.spec.output.uri or config.store:
            return []
        return [Problem(
            "required: no default store is configured (TOKENMILL_STORE or --store)",
            "spec.output.uri", "/".join(item.resource.key), item.file,
        )]

    def default_output(resource: AnyResource) -> str | None:
        return output_uri(resource, config.store, namespace=namespace) if config.store else None

    ordered = checked_recipe(path, local=False, default_output=default_output, extra_checks=needs_a_store)
    manifests = []
    for resource in ordered:
        target = resource.metadata.namespace or namespace
        if resource.metadata.namespace is None:
            resource = resource.model_copy(update={"metadata": resource.metadata.model_copy(update={"namespace": target})})
        output = resource.spec.output.uri or output_uri(resource, config.store or "")
        manifests.append(rayjob.render(resource, namespace=target, attempt=1, spec_uri=run_spec_uri(output),
                                       config=config, preview=True))
    return manifests


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    documents = []
    for manifest in manifests:
        labels = manifest["metadata"]["labels"]
        header = (f"# {labels['tokenmill.dev/kind']}/{manifest['metadata']['ownerReferences'][0]['name']}: "
                  f"RayJob {manifest['metadata']['name']} (attempt 1)\n")
        documents.append(header + yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False))
    return "---\n".join(documents)
