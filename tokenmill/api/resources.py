"""The registry of kinds: each kind's resource class and descriptor, collected from its API module.

Adding a kind: its API module (spec, resource class, DESCRIPTOR), its entries in `_DESCRIPTORS`
and `AnyResource` here and in `common.KindName` (the kinds a `ref` may name), and its workload
module. The CRDs, the loader, the operator and the local runner pick it up from the registry.
"""

from __future__ import annotations

from collections.abc import Iterator

from tokenmill.api import corpus, pts, synthetic, training
from tokenmill.api.corpus import CorpusFilter
from tokenmill.api.kinds import API_VERSION, CATEGORY, GROUP, VERSION, KindDescriptor, ObjectMeta, Resource
from tokenmill.api.pts import PTSJob
from tokenmill.api.refs import Reference
from tokenmill.api.synthetic import SyntheticDataJob
from tokenmill.api.training import TrainingStage

__all__ = [
    "API_VERSION", "CATEGORY", "GROUP", "KINDS", "VERSION", "AnyResource", "CorpusFilter", "KindDescriptor",
    "ObjectMeta", "PTSJob", "Resource", "SyntheticDataJob", "TrainingStage", "by_cli_name",
    "references",
]

AnyResource = CorpusFilter | SyntheticDataJob | TrainingStage | PTSJob

_DESCRIPTORS = (corpus.DESCRIPTOR, synthetic.DESCRIPTOR, training.DESCRIPTOR, pts.DESCRIPTOR)

KINDS: dict[str, KindDescriptor] = {descriptor.kind: descriptor for descriptor in _DESCRIPTORS}


def by_cli_name(cli_name: str) -> KindDescriptor:
    """The kind whose workload sub-command is `cli_name`."""
    for descriptor in KINDS.values():
        if descriptor.cli_name == cli_name:
            return descriptor
    raise KeyError(cli_name)


def references(resource: AnyResource) -> Iterator[Reference]:
    """Every reference in the resource's spec (refs, URIs, its output, Secrets), with field paths."""
    return KINDS[resource.kind].references(resource.spec)


def _check_unique() -> None:
    for attribute in ("plural", "prefix", "cli_name"):
        values = [getattr(descriptor, attribute) for descriptor in _DESCRIPTORS]
        if len(set(values)) != len(values):
            raise ValueError(f"two kinds share a {attribute}: {values}")


_check_unique()
