"""The operator reads a kind's facts from its descriptor: input checks, RayJob names, Secret keys."""

from __future__ import annotations

from tests.api.recipes import CORPUS, make
from tokenmill.api.loader import parse_resource
from tokenmill.operator.reconcile import input_uris


def test_only_datasets_and_models_are_checked_as_committed_inputs():
    document = make(CORPUS, languages={"model": {"uri": "s3://bucket/lid.176.bin"}})
    resource, problems = parse_resource(document)
    assert resource is not None, problems
    # A language-identification model is an opaque file: it has no commit marker to look for.
    assert input_uris(resource) == [("spec.inputs[0].uri", "s3://bucket/raw", "dataset")]
