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
        assert names["categories"] == ["tokenmill", "all"] and names["shortNames"]
        assert crd["spec"]["group"] == "tokenmill.dev" and version["name"] == "v1alpha1"
        assert version["subresources"] == {"status": {}}
        columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
        assert {"Phase", "Progress", "Age", "Reason", "RayJob", "Started", "Completed"} <= set(columns)
        assert columns["Reason"]["priority"] == 1 and "priority" not in columns["Phase"]
        assert columns["Started"] == {"name": "Started", "type": "date", "jsonPath": ".status.startTime", "priority": 1}
        assert columns["Completed"]["jsonPath"] == ".status.completionTime"
        assert columns["RayJob"]["jsonPath"] == ".status.rayJobName"
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        assert status["conditions"]["x-kubernetes-list-type"] == "map"
        assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
        assert {"observedGeneration", "phase", "progress", "attempts", "rayJobName", "outputs", "startTime",
                "completionTime"} <= set(status)
        assert status["startTime"]["format"] == status["completionTime"]["format"] == "date-time"
        condition = status["conditions"]["items"]["properties"]
        assert condition["lastTransitionTime"]["format"] == "date-time"
        assert "enum" not in condition["type"] and "pattern" in condition["type"]


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


def _immutability_rules(kind_file: str) -> list[dict]:
    schema = all_crds()[kind_file]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema["x-kubernetes-validations"]


def _refused(rules: list[dict], new: dict, old: dict) -> list[str]:
    """The fieldPaths of the rules the update from `old` to `new` breaks."""
    return [rule["fieldPath"] for rule in rules if not _evaluate(rule["rule"], new, old)]


def _evaluate(rule: str, new: dict, old: dict) -> bool:
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    return bool(program.evaluate({"self": celpy.json_to_cel(new), "oldSelf": celpy.json_to_cel(old)}))


PTS_SPEC = {"model": {"uri": "s3://b/m"}, "problems": {"uri": "s3://b/p"}, "oracle": {"kind": "math"},
            "pGap": 0.2, "suspend": False, "backoffLimit": 3, "output": {"deletePolicy": "Retain"},
            "ray": {"image": "img:1", "head": {"cpus": "4"}, "preRunningDeadlineSeconds": 1800}}
STARTED = {"startTime": "2026-01-01T00:00:00Z"}


def _update(**changes: Any) -> dict:
    spec = json.loads(json.dumps(PTS_SPEC))
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = spec
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return {"spec": spec, "status": STARTED}


def test_what_a_resource_produces_is_immutable_once_started():
    rules = _immutability_rules("ptsjobs.tokenmill.dev.yaml")
    started = {"spec": PTS_SPEC, "status": STARTED}
    assert _refused(rules, _update(pGap=0.3), started) == [".spec.pGap"]
    assert _refused(rules, _update(seed=4), started) == [".spec.seed"]
    assert _refused(rules, _update(ray__image="img:2"), started) == [".spec.ray.image"]
    assert _refused(rules, _update(ray__head={"cpus": "8"}), started) == [".spec.ray.head"]
    assert _refused(rules, _update(output__uri="s3://b/elsewhere"), started) == [".spec.output.uri"]
    message = next(rule["message"] for rule in rules if rule["fieldPath"] == ".spec.pGap")
    assert "spec.pGap cannot change once the resource has started" in message


def test_retries_deadlines_queue_and_suspension_can_change_on_a_running_resource():
    rules = _immutability_rules("ptsjobs.tokenmill.dev.yaml")
    started = {"spec": PTS_SPEC, "status": STARTED}
    for update in (_update(suspend=True), _update(backoffLimit=10), _update(ray__queueName="urgent"),
                   _update(ray__activeDeadlineSeconds=7200), _update(ray__preRunningDeadlineSeconds=600),
                   _update(output__deletePolicy="Delete")):
        assert _refused(rules, update, started) == []


def test_anything_can_change_before_the_first_attempt():
    rules = _immutability_rules("ptsjobs.tokenmill.dev.yaml")
    waiting = {"spec": PTS_SPEC, "status": {"phase": "Waiting"}}
    changed = {**_update(pGap=0.3, ray__image="img:2"), "status": waiting["status"]}
    assert _refused(rules, changed, waiting) == []
    assert _refused(rules, {"spec": changed["spec"]}, {"spec": PTS_SPEC}) == []


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
