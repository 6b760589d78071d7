"""Outputs that could destroy data are rejected by `tokenmill validate`, the local runner's plan and render."""

from __future__ import annotations

import pytest

from tokenmill.api.problems import RecipeError
from tokenmill.cli import main
from tokenmill.runner.plan import plan_recipe

CORPUS = """\
apiVersion: tokenmill.dev/v1alpha1
kind: CorpusFilter
metadata: {name: %(name)s}
spec:
  inputs: [{name: raw, uri: "%(input)s"}]
%(output)s
"""


def corpus(name="web", output=None, input="s3://bucket/raw"):
    return CORPUS % dict(name=name, input=input, output=f"  output: {{uri: \"{output}\"}}" if output else "")


def errors(capsys, *args) -> tuple[int, str]:
    code = main(["validate", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("output", ["s3://bucket", "s3://bucket/", "s3://bucket//", "file:///"])
def test_a_root_is_not_an_output(write_recipe, capsys, output):
    code, err = errors(capsys, str(write_recipe(web=corpus(output=output))))
    assert code == 2
    assert "spec.output.uri" in err and "root" in err


@pytest.mark.parametrize("uri", ["s3://bucket/a/../b", "s3://bucket/a/./b", "file:///data/../etc"])
def test_dot_segments_are_rejected_in_outputs_and_inputs(write_recipe, capsys, uri):
    code, err = errors(capsys, str(write_recipe(web=corpus(output=uri, input=uri))))
    assert code == 2
    assert "spec.output.uri" in err and "spec.inputs[0].uri" in err and "'..' segments" in err


@pytest.mark.parametrize("second", ["s3://bucket/out", "s3://bucket/out/", "s3://bucket/out/inner"])
def test_equal_or_nested_outputs_are_rejected(write_recipe, capsys, second):
    folder = write_recipe(a=corpus("a", output="s3://bucket/out"), b=corpus("b", output=second))
    code, err = errors(capsys, str(folder))
    assert code == 2
    assert "CorpusFilter/a: spec.output.uri: output s3://bucket/out overlaps the output of CorpusFilter/b" in err


def test_siblings_sharing_a_name_prefix_do_not_overlap(write_recipe, capsys):
    folder = write_recipe(a=corpus("a", output="s3://bucket/out"), b=corpus("b", output="s3://bucket/output"))
    code, err = errors(capsys, str(folder))
    assert code == 0, err


def test_an_output_holding_the_stores_default_outputs_is_rejected(write_recipe, capsys):
    folder = write_recipe(a=corpus("a", output="s3://bucket/tm/default"), b=corpus("b"))
    code, err = errors(capsys, "--store", "s3://bucket/tm", str(folder))
    assert code == 2
    assert "overlaps the output of CorpusFilter/b (s3://bucket/tm/default/corpusfilters/b)" in err


def test_the_local_runner_checks_outputs_against_its_store(write_recipe, tmp_path):
    store = (tmp_path / "store").as_uri()
    folder = write_recipe(a=corpus("a", output=f"{store}/corpusfilters"), b=corpus("b"))
    with pytest.raises(RecipeError) as error:
        plan_recipe(folder, store=store)
    assert any("overlaps the output of CorpusFilter/b" in str(problem) for problem in error.value.problems)


def test_relative_outputs_are_compared_once_made_absolute(write_recipe, tmp_path):
    folder = write_recipe(a=corpus("a", output="file:out"), b=corpus("b", output="file:out/b"))
    with pytest.raises(RecipeError) as error:
        plan_recipe(folder, store=(tmp_path / "store").as_uri())
    assert "overlaps" in str(error.value)


def test_render_rejects_overlapping_outputs(write_recipe, capsys):
    folder = write_recipe(a=corpus("a", output="s3://bucket/tm/default/corpusfilters"), b=corpus("b"))
    code = main(["render", str(folder), "--store", "s3://bucket/tm"])
    assert code == 2
    assert "overlaps the output of CorpusFilter/b" in capsys.readouterr().err
