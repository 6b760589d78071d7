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
