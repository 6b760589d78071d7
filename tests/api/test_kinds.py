"""One descriptor per kind, and the typed walk over a spec's references."""

from __future__ import annotations

import dataclasses

import pytest

from tests.api.recipes import CORPUS, PRETRAIN, make
from tokenmill.api.loader import parse_resource
from tokenmill.api.resources import KINDS, by_cli_name, references
from tokenmill.resolve import resolve_spec
from tokenmill.api.status import OutputSummary

SYNTH = {
    "apiVersion": "tokenmill.dev/v1alpha1",
    "kind": "SyntheticDataJob",
    "metadata": {"name": "qa"},
    "spec": {
        "seeds": [{"ref": {"kind": "CorpusFilter", "name": "web"}}],
        "workflow": [{"type": "rewrite", "rewrite": {}}],
        "generator": {"engine": "vllm", "model": {"uri": "s3://bucket/teacher"}},
    },
}


def parsed(document):
    resource, problems = parse_resource(document)
    assert resource is not None, problems
    return resource


def test_every_kind_has_a_unique_prefix_cli_name_and_plural():
    for attribute in ("prefix", "cli_name", "plural"):
        values = [getattr(descriptor, attribute) for descriptor in KINDS.values()]
        assert len(set(values)) == len(values)
    assert by_cli_name("training-stage").kind == "TrainingStage"
    assert KINDS["TrainingStage"].workload_module == "tokenmill.trainer.train.workload"


def test_a_descriptor_must_say_what_every_source_field_holds():
    corpus = KINDS["CorpusFilter"]
    with pytest.raises(ValueError, match="spec.languages.model"):
        dataclasses.replace(corpus, file_fields=())
    with pytest.raises(ValueError, match="exactly once"):
        dataclasses.replace(corpus, model_fields=("spec.inputs",))


def test_gpus_are_a_function_of_the_spec():
    synth = parsed(SYNTH)
    assert KINDS["SyntheticDataJob"].needs_gpus(synth.spec)
    openai = make(SYNTH, generator={"engine": "openai", "endpoint": "https://api.example.com/v1",
                                    "modelName": "teacher", "apiKeySecret": {"name": "key", "key": "token"}})
    assert not KINDS["SyntheticDataJob"].needs_gpus(parsed(openai).spec)
    assert not KINDS["CorpusFilter"].needs_gpus(parsed(CORPUS).spec)
    assert KINDS["TrainingStage"].needs_gpus(parsed(PRETRAIN).spec)


def test_references_carry_paths_and_roles():
    stage = parsed(make(PRETRAIN, output={"uri": "s3://bucket/out/pretrain"}))
    found = [(item.path, item.role, item.ref and item.ref.name, item.uri) for item in references(stage)]
    assert found == [
        ("spec.output", "output", None, "s3://bucket/out/pretrain"),
        ("spec.datasets[0]", "dataset", "web", None),
        ("spec.datasets[1]", "dataset", None, "s3://bucket/code"),
    ]


def test_a_language_id_model_file_is_a_file_not_a_checkpoint():
    corpus = parsed(make(CORPUS, languages={"model": {"uri": "s3://bucket/lid.176.bin"}}))
    roles = {item.path: item.role for item in references(corpus)}
    assert roles["spec.languages.model"] == "file"


def test_resolution_follows_the_declared_role():
    synth = parsed(make(SYNTH, generator={"engine": "torch", "model": {"ref": {"kind": "TrainingStage", "name": "t"}}}))
    inputs = {
        ("CorpusFilter", "web"): OutputSummary(uri="s3://bucket/web", dataset="s3://bucket/web/data"),
        ("TrainingStage", "t"): OutputSummary(uri="s3://bucket/t", checkpoint="s3://bucket/t/checkpoints/step-00000010"),
    }
    resolved = resolve_spec(synth, inputs)
    assert resolved["seeds"] == [{"uri": "s3://bucket/web/data"}]
    assert resolved["generator"]["model"] == {"uri": "s3://bucket/t/checkpoints/step-00000010"}


def test_a_ref_names_a_registered_kind():
    document = make(PRETRAIN, datasets=[{"ref": {"kind": "Bogus", "name": "x"}, "weight": 1}])
    resource, problems = parse_resource(document)
    assert resource is None
    assert [problem.path for problem in problems] == ["spec.datasets[0].ref.kind"]
    assert "'CorpusFilter', 'SyntheticDataJob', 'TrainingStage' or 'PTSJob'" in problems[0].message


def test_refs_name_exactly_the_registered_kinds():
    from typing import get_args

    from tokenmill.api.common import KindName

    assert list(get_args(KindName)) == list(KINDS)


def test_the_crds_list_the_registered_kinds_for_refs():
    from tokenmill.api.crd import all_crds

    crd = all_crds()["trainingstages.tokenmill.dev.yaml"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["datasets"]["items"]["properties"]["ref"]["properties"]["kind"]["enum"] == list(KINDS)
