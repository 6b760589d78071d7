"""Every class of bad input gets one clear message (file, resource, field path, what is allowed), exit 2, nothing run."""

from __future__ import annotations

import pytest

from tokenmill.cli import main

GOOD_CORPUS = """\
apiVersion: tokenmill.dev/v1alpha1
kind: CorpusFilter
metadata: {name: web}
spec:
  inputs: [{name: raw, uri: "s3://bucket/raw"}]
"""

STAGE = """\
apiVersion: tokenmill.dev/v1alpha1
kind: TrainingStage
metadata: {name: %(name)s}
spec:
  stage: %(stage)s
  model: %(model)s
  datasets: [{ref: {kind: %(input_kind)s, name: %(input)s}, weight: 1}]
  sequenceLength: 128
  optimization: {globalBatchSequences: 4, peakLearningRate: 0.001, totalTokens: 4096}
  ray: {workers: {replicas: 1, gpusPerWorker: 0}}
"""


def stage(name="pre", stage="pretrain", model="{config: tiny}", input_kind="CorpusFilter", input="web"):
    return STAGE % dict(name=name, stage=stage, model=model, input_kind=input_kind, input=input)


def run_validate(capsys, folder) -> tuple[int, list[str]]:
    code = main(["validate", str(folder)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    return code, lines


def test_malformed_yaml_names_file_and_line(write_recipe, capsys):
    folder = write_recipe(broken="apiVersion: tokenmill.dev/v1alpha1\nkind: [CorpusFilter\nmetadata: {}\n")
    code, lines = run_validate(capsys, folder)
    assert code == 2 and len(lines) == 1
    assert "broken.yaml:3:" in lines[0] and "malformed YAML" in lines[0]


def test_unknown_kind_lists_allowed_kinds(write_recipe, capsys):
    folder = write_recipe(x=GOOD_CORPUS.replace("kind: CorpusFilter", "kind: CorpusFiltre"))
    code, lines = run_validate(capsys, folder)
    assert code == 2 and len(lines) == 1
    assert "x.yaml: CorpusFiltre/web: kind: unknown kind; allowed kinds are CorpusFilter, SyntheticDataJob, " \
           "TrainingStage, PTSJob (found 'CorpusFiltre')" in lines[0]


def test_wrong_api_version(write_recipe, capsys):
    folder = write_recipe(x=GOOD_CORPUS.replace("v1alpha1", "v1"))
    code, lines = run_validate(capsys, folder)
    assert code == 2 and "apiVersion: apiVersion must be tokenmill.dev/v1alpha1 (found 'tokenmill.dev/v1')" in lines[0]


def test_unknown_field_lists_allowed_fields(write_recipe, capsys):
    folder = write_recipe(x=GOOD_CORPUS + "  dedupe: {enabled: false}\n")
    code, lines = run_validate(capsys, folder)
    assert code == 2 and len(lines) == 1
    assert "CorpusFilter/web: spec.dedupe: unknown field; allowed fields here: " in lines[0]
    assert "dedup," in lines[0] and "decontamination" in lines[0]


def test_wrong_type_and_out_of_range_reported_together(write_recipe, capsys):
    text = stage().replace("sequenceLength: 128", "sequenceLength: long").replace(
        "peakLearningRate: 0.001", "peakLearningRate: -1")
    folder = write_recipe(web=GOOD_CORPUS, pre=text)
    code, lines = run_validate(capsys, folder)
    assert code == 2 and len(lines) == 2
    assert any("TrainingStage/pre: spec.sequenceLength: Input should be a valid integer" in line
               and "(found 'long')" in line for line in lines)
    assert any("spec.optimization.peakLearningRate: Input should be greater than 0 (found -1)" in line
               for line in lines)


def test_negative_chosen_nll_weight_is_refused(write_recipe, capsys):
    dpo = stage(name="dpo", stage="dpo", model="{parent: {uri: 's3://bkt/sft'}}", input_kind="PTSJob", input="pts")
    dpo += "  dpo: {referenceModel: {uri: 's3://bkt/sft'}, chosenNllWeight: -0.5}\n"
    code, lines = run_validate(capsys, write_recipe(dpo=dpo))
    assert code == 2
    assert any("TrainingStage/dpo: spec.dpo.chosenNllWeight: Input should be greater than or equal to 0 (found -0.5)"
               in line for line in lines), lines


def test_enum_lists_allowed_values(write_recipe, capsys):
    folder = write_recipe(web=GOOD_CORPUS, pre=stage(stage="pretraining"))
    code, lines = run_validate(capsys, folder)
    assert code == 2
    assert "spec.stage: Input should be 'pretrain', 'midtrain', 'sft' or 'dpo' (found 'pretraining')" in lines[0]


def test_cross_field_rule_names_the_object(write_recipe, capsys):
    folder = write_recipe(web=GOOD_CORPUS.replace('uri: "s3://bucket/raw"',
                                                  'uri: "s3://bucket/raw", ref: {kind: CorpusFilter, name: x}'))
    code, lines = run_validate(capsys, folder)
    assert code == 2
    assert "spec.inputs[0]: set exactly one of ref (another tokenmill resource) or uri" in lines[0]


def test_bad_uri_pattern(write_recipe, capsys):
    folder = write_recipe(web=GOOD_CORPUS.replace("s3://bucket/raw", "http://bucket/raw"))
    code, lines = run_validate(capsys, folder)
    assert code == 2 and "spec.inputs[0].uri: must be a store URI: s3://bucket/prefix" in lines[0]
    assert "(found 'http://bucket/raw')" in lines[0]


def test_missing_ref(write_recipe, capsys):
    folder = write_recipe(pre=stage(input="nowhere"))
    code, lines = run_validate(capsys, folder)
    assert code == 2 and len(lines) == 1
    assert "TrainingStage/pre: spec.datasets[0].ref: refers to CorpusFilter/nowhere, which is not in the recipe" \
        in lines[0]


def test_cycle_is_named(write_recipe, capsys):
    a = stage(name="a", stage="midtrain", model="{parent: {ref: {kind: TrainingStage, name: b}}}")
    b = stage(name="b", stage="midtrain", model="{parent: {ref: {kind: TrainingStage, name: a}}}")
    folder = write_recipe(web=GOOD_CORPUS, a=a, b=b)
    code, lines = run_validate(capsys, folder)
    assert code == 2
    assert any("the recipe has a cycle: TrainingStage/a -> TrainingStage/b -> TrainingStage/a" in l for l in lines)


def test_duplicate_names(write_recipe, capsys):
    folder = write_recipe(one=GOOD_CORPUS, two=GOOD_CORPUS)
    code, lines = run_validate(capsys, folder)
    assert code == 2 and "CorpusFilter/web: metadata.name: duplicate resource; also defined in" in lines[0]


def test_run_refuses_bad_recipe_and_runs_nothing(write_recipe, capsys, tmp_path):
    folder = write_recipe(web=GOOD_CORPUS, pre=stage(input="nowhere"))
    store = tmp_path / "store"
    assert main(["run", str(folder), "--store", store.as_uri(), "--no-ray"]) == 2
    assert "nothing was run" in capsys.readouterr().err
    assert not store.exists()


@pytest.mark.parametrize("missing", ["no-such-dir", "empty"])
def test_missing_or_empty_path(tmp_path, capsys, missing):
    (tmp_path / "empty").mkdir()
    assert main(["validate", str(tmp_path / missing)]) == 2
    assert str(tmp_path / missing) in capsys.readouterr().err
