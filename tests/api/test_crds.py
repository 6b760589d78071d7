"""The CRDs are generated from the models, structural, documented, and up to date."""

from __future__ import annotations

import json
from typing import Any

import celpy
import pytest
import yaml

from tests.conftest import REPO
from tokenmill.api import cel
from tokenmill.api.crd import all_crds, render_yaml
from tokenmill.cli import main


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _walk(item, f"{path}[{index}]")


def test_checked_in_crds_are_current(capsys):
    assert main(["crds", "--out", str(REPO / "crds"), "--check"]) == 0, capsys.readouterr().err


def test_stale_crd_is_detected(tmp_path, capsys):
    assert main(["crds", "--out", str(tmp_path)]) == 0
    victim = next(tmp_path.glob("trainingstages*.yaml"))
    victim.write_text(victim.read_text().replace("Tokens per training sequence.", "Old text."))
    assert main(["crds", "--out", str(tmp_path), "--check"]) == 1
    assert "trainingstages" in capsys.readouterr().err


@pytest.mark.parametrize("file_name", sorted(all_crds()))
def test_schema_is_structural_and_documented(file_name):
    crd = all_crds()[file_name]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = json.dumps(schema)
    for forbidden in ('"$ref"', '"anyOf"', '"oneOf"', '"patternProperties"', '"title"', '"additionalProperties": false'):
        assert forbidden not in text, forbidden
    for path, node in _schemas(schema["properties"]["spec"], "spec"):
        assert node.get("description"), f"{path} has no description"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: unbounded list makes CEL cost unbounded"
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path}: unbounded string"


def test_names_columns_and_status():
    crds = {crd["spec"]["names"]["kind"]: crd for crd in all_crds().values()}
    assert set(crds) == {"CorpusFilter", "SyntheticDataJob", "TrainingStage", "PTSJob"}
    for crd in crds.values():
        names, version = crd["spec"]["names"], crd["spec"]["versions"][0]
        assert names["categories"] == ["tokenmill"] and names["shortNames"]
        assert crd["spec"]["group"] == "tokenmill.dev" and version["name"] == "v1alpha1"
        assert version["subresources"] == {"status": {}}
        columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
        assert {"Phase", "Progress", "Age", "Reason"} <= set(columns)
        assert columns["Reason"]["priority"] == 1 and "priority" not in columns["Phase"]
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        assert status["conditions"]["x-kubernetes-list-type"] == "map"
        assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
        assert {"observedGeneration", "phase", "progress", "attempts", "rayJobName", "outputs", "startTime",
                "completionTime"} <= set(status)


def test_defaults_and_bounds_reach_the_schema():
    crd = all_crds()["trainingstages.tokenmill.dev.yaml"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["stage"]["enum"] == ["pretrain", "midtrain", "sft", "dpo"]
    assert spec["backoffLimit"]["default"] == 3
    assert spec["ray"]["default"] == {}
    weight = spec["datasets"]["items"]["properties"]["weight"]
    assert weight["minimum"] == 0 and weight["exclusiveMinimum"] is True
    assert spec["output"]["properties"]["uri"]["pattern"].startswith("^(s3://")


def _schemas(node: dict, path: str):
    """Every field schema below `node`, following properties and array items."""
    yield path, node
    for name, prop in node.get("properties", {}).items():
        yield from _schemas(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        for name, prop in node["items"].get("properties", {}).items():
            yield from _schemas(prop, f"{path}[].{name}")


def test_every_cel_rule_compiles():
    for crd in all_crds().values():
        for path, node in _walk(crd):
            for rule in node.get("x-kubernetes-validations", []):
                env = celpy.Environment()
                env.program(env.compile(rule["rule"]))
                assert rule["message"], path


def _immutability_rule(kind_file: str) -> str:
    schema = all_crds()[kind_file]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    (rule,) = schema["x-kubernetes-validations"]
    return rule["rule"]


def _evaluate(rule: str, new: dict, old: dict) -> bool:
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    return bool(program.evaluate({"self": celpy.json_to_cel(new), "oldSelf": celpy.json_to_cel(old)}))


def test_spec_is_immutable_once_started_except_suspend():
    rule = _immutability_rule("ptsjobs.tokenmill.dev.yaml")
    spec = {"model": {"uri": "s3://b/m"}, "problems": {"uri": "s3://b/p"}, "oracle": {"kind": "math"},
            "pGap": 0.2, "suspend": False}
    started = {"spec": spec, "status": {"startTime": "2026-01-01T00:00:00Z"}}
    not_started = {"spec": spec, "status": {"phase": "Waiting"}}
    changed = {"spec": {**spec, "pGap": 0.3}}
    suspended = {"spec": {**spec, "suspend": True}}
    added = {"spec": {**spec, "seed": 4}}
    assert _evaluate(rule, {**suspended, "status": started["status"]}, started)
    assert not _evaluate(rule, {**changed, "status": started["status"]}, started)
    assert not _evaluate(rule, {**added, "status": started["status"]}, started)
    assert _evaluate(rule, {**changed, "status": not_started["status"]}, not_started)


def test_python_models_enforce_the_same_rules():
    """The rule text in the CRD is the one the models evaluate, so the runner and the API server agree."""
    from tokenmill.api.training import Optimization

    rule = Optimization.cel_rules[0]
    schema = all_crds()["trainingstages.tokenmill.dev.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    crd_rules = schema["properties"]["spec"]["properties"]["optimization"]["x-kubernetes-validations"]
    assert crd_rules == [rule]
    assert not cel.check(rule["rule"], {"globalBatchSequences": 10, "microBatchSequences": 3})
    assert cel.check(rule["rule"], {"globalBatchSequences": 12, "microBatchSequences": 3})


def test_rendered_yaml_round_trips():
    for crd in all_crds().values():
        assert yaml.safe_load(render_yaml(crd)) == crd
