"""Bad TrainingStage input fails before any compute, with a clear message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.store import DOCUMENTS, CheckpointStore, DatasetWriter, read_progress
from tokenmill.trainer.train import workload
from tokenmill.trainer.train.prepare import TrainingInputError, prepare
from tokenmill.workloads import NOT_BUILT_EXIT_CODE

from tests.trainer.test_train_stage import make_data, stage_spec, write_spec


@pytest.fixture(scope="module")
def docs_uri(tmp_path_factory) -> str:
    target = tmp_path_factory.mktemp("data") / "docs"
    make_data.write(target, 100)
    return target.as_uri()


def run_bad(tmp_path: Path, spec: dict, capsys) -> str:
    output = (tmp_path / "out").as_uri()
    code = workload.run(write_spec(output, spec))
    err = capsys.readouterr().err
    assert code == workload.EXIT_BAD_INPUT, err
    assert "nothing was trained" in err
    assert CheckpointStore.for_output(output).steps(include_uncommitted=True) == []
    assert read_progress(output) is None  # not even started
    return err


def test_unknown_model_config(tmp_path, docs_uri, capsys) -> None:
    err = run_bad(tmp_path, stage_spec(docs_uri, model={"config": "huge-9000"}), capsys)
    assert "unknown model config 'huge-9000'" in err and "tiny" in err


def test_sequence_length_beyond_positions_without_rope_change(tmp_path, docs_uri, capsys) -> None:
    err = run_bad(tmp_path, stage_spec(docs_uri, sequenceLength=512), capsys)
    assert "sequenceLength 512 is beyond the 256 positions" in err and "ropeBase" in err
    # With a RoPE change the same length is accepted.
    job = prepare({"output": (tmp_path / "ok").as_uri(),
                   "spec": stage_spec(docs_uri, sequenceLength=512, ropeBase=250000,
                                      optimization={**stage_spec(docs_uri)["optimization"], "totalTokens": 4 * 8 * 512})})
    assert job.model.max_positions == 512 and job.model.rope_theta == 250000


def test_missing_dataset(tmp_path, capsys) -> None:
    err = run_bad(tmp_path, stage_spec((tmp_path / "nowhere").as_uri()), capsys)
    assert "no committed dataset" in err and "_manifest.json" in err


def test_empty_dataset(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    DatasetWriter(empty.as_uri(), DOCUMENTS).finalize()
    err = run_bad(tmp_path, stage_spec(empty.as_uri()), capsys)
    assert "empty" in err


def test_mixture_cannot_supply_tokens(tmp_path, docs_uri, capsys) -> None:
    spec = stage_spec(docs_uri)
    spec["datasets"][0]["epochs"] = 1
    spec["optimization"]["totalTokens"] = 10**9
    err = run_bad(tmp_path, spec, capsys)
    assert "cannot supply" in err and "'docs'" in err


def test_post_training_stages_are_not_built(tmp_path, docs_uri, capsys) -> None:
    spec = stage_spec(docs_uri, stage="sft", model={"parent": {"uri": "file:///x/checkpoints/step-00000001"}})
    assert workload.run(write_spec((tmp_path / "sft").as_uri(), spec)) == NOT_BUILT_EXIT_CODE
    assert "not built yet" in capsys.readouterr().err


def test_prepare_raises_typed_error(docs_uri, tmp_path) -> None:
    with pytest.raises(TrainingInputError, match="unknown model config"):
        prepare({"output": tmp_path.as_uri(), "spec": stage_spec(docs_uri, model={"config": "nope"})})
