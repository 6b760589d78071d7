"""Hostile and malformed recipes: exit 2, a message naming file, field and reason, no traceback, no secret."""

from __future__ import annotations

import dataclasses

import pytest

from tokenmill.api.resources import KINDS
from tokenmill.cli import main

CORPUS = """\
apiVersion: tokenmill.dev/v1alpha1
kind: CorpusFilter
metadata: {name: web}
spec:
  inputs: [{name: raw, uri: "s3://bucket/raw"}]
"""


def validate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["validate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_markup_in_user_text_is_printed_as_written(write_recipe, capsys):
    folder = write_recipe(web=CORPUS + "  languages: {languages: ['[/oops]', '[bold]x']}\n")
    code, _, err = validate(capsys, str(folder))
    assert code == 2
    assert "spec.languages.languages[0]" in err and "[/oops]" in err
    assert "[bold]x" in err


def test_validate_says_which_mode_it_checked_in(write_recipe, capsys):
    folder = write_recipe(web=CORPUS.replace("s3://bucket/raw", "file:raw"))
    code, _, err = validate(capsys, str(folder))
    assert code == 2
    assert "cluster mode" in err and "relative file: URIs are only for the local runner" in err
    code, out, err = validate(capsys, "--local", str(folder))
    assert code == 0, err
    assert "valid in local mode" in out


def test_validate_and_render_warn_when_a_workload_is_not_built(write_recipe, capsys, monkeypatch):
    missing = dataclasses.replace(KINDS["CorpusFilter"], workload_module="tokenmill.trainer.no_such_package.workload")
    monkeypatch.setitem(KINDS, "CorpusFilter", missing)
    folder = write_recipe(web=CORPUS)
    code, _, err = validate(capsys, str(folder))
    assert code == 0
    assert "CorpusFilter/web: the corpus-filter workload is not built" in err
    code = main(["render", str(folder), "--store", "s3://bucket/tm"])
    captured = capsys.readouterr()
    assert code == 0 and "kind: RayJob" in captured.out
    assert "CorpusFilter/web: the corpus-filter workload is not built" in captured.err
    assert "not built" not in captured.out


def assert_rejected(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def billion_laughs() -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        previous = f"*l{level - 1}"
        lines.append(f"l{level}: &l{level} [{', '.join([previous] * 9)}]")
    return CORPUS + "  extra:\n" + "".join(f"    {line}\n" for line in lines)


def test_an_alias_bomb_is_refused_before_it_expands(write_recipe, capsys):
    code, _, err = validate(capsys, str(write_recipe(web=billion_laughs())))
    assert_rejected(code, err, "web.yaml:", "expands to more than")


def test_deep_nesting_is_refused(write_recipe, capsys):
    deep = CORPUS + "  extra: " + "[" * 5000 + "]" * 5000 + "\n"
    code, _, err = validate(capsys, str(write_recipe(web=deep)))
    assert_rejected(code, err, "web.yaml:6:", "nesting")
    block = CORPUS + "  extra:\n" + "".join("  " * (level + 2) + f"k{level}:\n" for level in range(100))
    code, _, err = validate(capsys, str(write_recipe(web=block)))
    assert_rejected(code, err, "nested more than 64 levels deep")


def test_a_file_over_the_size_limit_is_refused_unread(write_recipe, capsys):
    code, _, err = validate(capsys, str(write_recipe(web=CORPUS + "#" + "x" * (2 << 20) + "\n")))
    assert_rejected(code, err, "web.yaml: is 2,097,", "at most 1,048,576")


def test_a_duplicate_key_is_refused_not_silently_overwritten(write_recipe, capsys):
    duplicated = CORPUS.replace("metadata: {name: web}", "metadata: {name: web, name: other}")
    code, _, err = validate(capsys, str(write_recipe(web=duplicated)))
    assert_rejected(code, err, "web.yaml:3:", "duplicate key 'name'")


@pytest.mark.parametrize("weight", [".inf", ".nan", "-.inf"])
def test_a_mixture_weight_must_be_finite(write_recipe, capsys, weight):
    stage = f"""\
apiVersion: tokenmill.dev/v1alpha1
kind: TrainingStage
metadata: {{name: pretrain}}
spec:
  stage: pretrain
  model: {{config: tiny}}
  datasets: [{{uri: "s3://bucket/a", weight: {weight}}}, {{uri: "s3://bucket/b", weight: 1}}]
  sequenceLength: 128
  optimization: {{globalBatchSequences: 8, peakLearningRate: 0.001, totalTokens: 4096}}
  ray: {{workers: {{replicas: 1, gpusPerWorker: 0}}}}
"""
    code, _, err = validate(capsys, str(write_recipe(stage=stage)))
    assert_rejected(code, err, "stage.yaml", "spec.datasets[0].weight")


SYNTH = """\
apiVersion: tokenmill.dev/v1alpha1
kind: SyntheticDataJob
metadata: {name: synth}
spec:
  seeds: [{uri: "s3://bucket/seeds"}]
  workflow: [{type: rewrite, rewrite: {}}]
  output: {credentialsSecret: %(credentials)s}
  generator: {engine: openai, endpoint: "%(endpoint)s", modelName: m, apiKeySecret: %(key)s}
"""


def test_an_inline_secret_is_refused_and_never_echoed(write_recipe, capsys):
    synth = SYNTH % dict(credentials='"AKIAEXAMPLESECRET1"', endpoint="https://api.example.com/v1",
                         key="{name: key, value: sk-live-0123456789}")
    code, out, err = validate(capsys, str(write_recipe(synth=synth)))
    assert_rejected(code, err, "synth.yaml", "spec.output.credentialsSecret: must name a Secret",
                    "spec.generator.apiKeySecret.value: must name a Secret")
    assert "AKIAEXAMPLESECRET1" not in out + err and "sk-live-0123456789" not in out + err


def test_credentials_in_an_endpoint_are_refused_and_never_echoed(write_recipe, capsys):
    synth = SYNTH % dict(credentials="{name: s3}", endpoint="https://user:hunter2@api.example.com/v1",
                         key="{name: key, key: token}")
    code, out, err = validate(capsys, str(write_recipe(synth=synth)))
    assert_rejected(code, err, "synth.yaml", "spec.generator.endpoint: must not carry credentials")
    assert "hunter2" not in out + err


PLACED = """\
apiVersion: tokenmill.dev/v1alpha1
kind: CorpusFilter
metadata: {name: web%(metadata)s}
spec:
  inputs: [{name: raw, uri: "s3://bucket/raw"}]
  ray: {%(ray)s}
"""


@pytest.mark.parametrize(("ray", "field"), [
    ('head: {cpus: "-4"}', "spec.ray.head.cpus: must be a Kubernetes quantity"),
    ('head: {memory: "..."}', "spec.ray.head.memory: must be a Kubernetes quantity"),
    ('workers: {sharedMemory: "1 Gi"}', "spec.ray.workers.sharedMemory: must be a Kubernetes quantity"),
    ('nodeSelector: {pool: "gpu pool"}', "spec.ray.nodeSelector.pool: must be a label value"),
    ('nodeSelector: {"bad key!": gpu}', "spec.ray.nodeSelector"),
    ('tolerations: [{key: gpu, value: "-x-"}]', "spec.ray.tolerations[0].value: must be a label value"),
    ('queueName: "team queue"', "spec.ray.queueName: must be a label value"),
    ("queueName: " + "q" * 64, "spec.ray.queueName"),
    ('image: "tokenmill:1 "', "spec.ray.image: must be a container image reference without white space"),
])
def test_placement_the_api_server_would_refuse_is_refused(write_recipe, capsys, ray, field):
    folder = write_recipe(web=PLACED % dict(metadata="", ray=ray))
    code, _, err = validate(capsys, str(folder))
    assert_rejected(code, err, "web.yaml", field)
    code = main(["render", str(folder), "--store", "s3://bucket/tm"])
    captured = capsys.readouterr()
    assert code == 2 and "kind: RayJob" not in captured.out


def test_annotations_beyond_the_api_servers_limit_are_refused(write_recipe, capsys):
    big = "x" * (256 * 1024)
    folder = write_recipe(web=PLACED % dict(metadata=f", annotations: {{note: {big}}}", ray=""))
    code, _, err = validate(capsys, str(folder))
    assert_rejected(code, err, "web.yaml", "metadata.annotations", "at most 262,144")
