"""Bad TrainingStage input fails before any compute, with a clear message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.store import CHAT_SAMPLES, DOCUMENTS, CheckpointStore, DatasetWriter, read_progress
from tokenmill.trainer.train import workload
from tokenmill.trainer.train.prepare import TrainingInputError, prepare

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


def test_sequence_length_beyond_positions_without_rope_change(tmp_path, docs_uri, capsys, ray_cluster) -> None:
    err = run_bad(tmp_path, stage_spec(docs_uri, sequenceLength=512), capsys)
    assert "sequenceLength 512 is beyond the 256 positions" in err and "ropeBase" in err
    # With a RoPE change the same length is accepted.
    job = prepare({"output": (tmp_path / "ok").as_uri(),
                   "spec": stage_spec(docs_uri, sequenceLength=512, ropeBase=250000,
                                      optimization={**stage_spec(docs_uri)["optimization"], "totalTokens": 4 * 8 * 512})},
                  build_caches=True)
    assert job.model.max_positions == 512 and job.model.rope_theta == 250000


def test_missing_dataset(tmp_path, capsys) -> None:
    err = run_bad(tmp_path, stage_spec((tmp_path / "nowhere").as_uri()), capsys)
    assert "no committed dataset" in err and "_manifest.json" in err


def test_empty_dataset(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    DatasetWriter(empty.as_uri(), DOCUMENTS).finalize()
    err = run_bad(tmp_path, stage_spec(empty.as_uri()), capsys)
    assert "empty" in err


def test_dataset_of_another_schema(tmp_path, capsys) -> None:
    chats = tmp_path / "chats"
    writer = DatasetWriter(chats.as_uri(), CHAT_SAMPLES)
    writer.write_shard(0, [{"id": "c0", "messages": [{"role": "user", "content": "hi"}], "source": "t", "meta": "{}"}])
    writer.finalize()
    err = run_bad(tmp_path, stage_spec(chats.as_uri()), capsys)
    assert "schema 'chat_samples'" in err and "'documents' or 'token_sequences'" in err


def test_dataset_of_only_empty_documents(tmp_path, capsys, ray_cluster) -> None:
    blank = tmp_path / "blank"
    writer = DatasetWriter(blank.as_uri(), DOCUMENTS)
    writer.write_shard(0, [{"id": f"d{i}", "text": "", "source": "t", "lang": "en", "meta": "{}"} for i in range(3)])
    writer.finalize()
    err = run_bad(tmp_path, stage_spec(blank.as_uri()), capsys)
    assert "holds no text to train on" in err


def test_workers_refuse_a_missing_or_stale_token_cache(tmp_path, ray_cluster) -> None:
    docs = tmp_path / "docs"
    make_data.write(docs, 60)
    doc = {"output": (tmp_path / "out").as_uri(), "spec": stage_spec(docs.as_uri())}
    with pytest.raises(TrainingInputError, match="token cache of dataset 'docs' is not built"):
        prepare(doc)  # a worker: the driver has not built the cache
    built = prepare(doc, build_caches=True)
    assert prepare(doc).plan.fingerprint() == built.plan.fingerprint()
    make_data.write(docs, 61)  # the dataset is replaced under the run
    with pytest.raises(TrainingInputError, match="built from other data or settings"):
        prepare(doc)


def test_mixture_cannot_supply_tokens(tmp_path, docs_uri, capsys, ray_cluster) -> None:
    spec = stage_spec(docs_uri)
    spec["datasets"][0]["epochs"] = 1
    spec["optimization"]["totalTokens"] = 10**9
    err = run_bad(tmp_path, spec, capsys)
    assert "cannot supply" in err and "'docs'" in err


def test_prepare_raises_typed_error(docs_uri, tmp_path) -> None:
    with pytest.raises(TrainingInputError, match="unknown model config"):
        prepare({"output": tmp_path.as_uri(), "spec": stage_spec(docs_uri, model={"config": "nope"})})
