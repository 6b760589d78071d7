"""Run identity in the store: stale attempts are fenced, checkpoints name their producer and
their files' checksums, and a commit refuses a checkpoint DCP's metadata says is incomplete."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.store.samples import sample_table
from tokenmill.store import (
    DOCUMENTS,
    AttemptFence,
    CheckpointError,
    CheckpointStore,
    DatasetWriter,
    Producer,
    StaleAttemptError,
    open_store,
    read_manifest,
    write_run_spec,
)


def run_spec(output: str, attempt: int, *, uid: str = "uid-a", generation: int = 1) -> dict:
    return {"kind": "TrainingStage", "metadata": {"name": "pretrain", "uid": uid, "generation": generation},
            "output": output, "attempt": attempt, "spec": {}}


def test_a_stale_attempt_cannot_commit_or_garbage_collect_a_dataset(base_uri: str) -> None:
    write_run_spec(base_uri, run_spec(base_uri, 1))
    producer = Producer("CorpusFilter", "web", "uid-a", 1, 1)
    old = DatasetWriter(f"{base_uri}/data", DOCUMENTS, producer=producer, fence=AttemptFence(base_uri, 1))
    old.write_shard(0, sample_table(DOCUMENTS, 3))

    write_run_spec(base_uri, run_spec(base_uri, 2))  # the operator started attempt 2
    new = DatasetWriter(f"{base_uri}/data", DOCUMENTS, producer=Producer("CorpusFilter", "web", "uid-a", 1, 2),
                        fence=AttemptFence(base_uri, 2))
    staged = new.stage(1, sample_table(DOCUMENTS, 2))  # in flight: no commit record yet
    before = sorted(info.key for info in open_store(f"{base_uri}/data").list(""))
    with pytest.raises(StaleAttemptError, match="attempt 1 may not commit the manifest.*names attempt 2"):
        old.finalize(expected=[0])
    with pytest.raises(StaleAttemptError):
        old.reset()
    with pytest.raises(StaleAttemptError, match="attempt 1 may not commit shard part-000002"):
        old.write_shard(2, sample_table(DOCUMENTS, 4))
    after = sorted(info.key for info in open_store(f"{base_uri}/data").list(""))
    assert not [key for key in after if key.startswith("_commits/part-000002")]  # no commit record
    assert set(before) <= set(after)  # nothing deleted
    new.commit(staged)
    new.write_shard(0, sample_table(DOCUMENTS, 3))
    assert new.finalize(expected=[0, 1]).summary.shards == 2
    assert read_manifest(f"{base_uri}/data").producer.attempt == 2  # type: ignore[union-attr]


def test_a_stale_attempt_cannot_commit_or_prune_checkpoints(base_uri: str, tmp_path: Path) -> None:
    write_run_spec(base_uri, run_spec(base_uri, 1))
    old = CheckpointStore.for_run(run_spec(base_uri, 1))
    with old.staging(10, {"tokens_seen": 1}) as directory:
        (directory / "weights.bin").write_bytes(b"a" * 10)
    write_run_spec(base_uri, run_spec(base_uri, 2))
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "weights.bin").write_bytes(b"b" * 10)
    old_uploads = CheckpointStore.for_output(base_uri)  # a plain store to stage the files
    old_uploads.upload_dir(20, local)
    with pytest.raises(StaleAttemptError, match="names attempt 2"):
        old.commit(20, {"tokens_seen": 2})
    with pytest.raises(StaleAttemptError):
        old.apply_retention(keep_last=1)
    with pytest.raises(StaleAttemptError):
        old.prepare(10, overwrite=True)
    with pytest.raises(StaleAttemptError):
        old.delete(10)
    current = CheckpointStore.for_run(run_spec(base_uri, 2))
    assert [info.step for info in current.list()] == [10] and not current.is_committed(20)


def test_checkpoints_name_their_producer_and_another_run_never_sees_them(base_uri: str) -> None:
    first = run_spec(base_uri, 1, uid="uid-a")
    write_run_spec(base_uri, first)
    with CheckpointStore.for_run(first).staging(30, {"tokens_seen": 3}) as directory:
        (directory / "weights.bin").write_bytes(b"w" * 8)
    info = CheckpointStore.for_output(base_uri).latest()
    assert info is not None and info.producer == Producer("TrainingStage", "pretrain", "uid-a", 1, 1)

    # Deleted with Retain and created again under the same name (new uid), or its spec changed
    # (new generation): the old weights are not this run's.
    for other in (run_spec(base_uri, 1, uid="uid-b"), run_spec(base_uri, 1, uid="uid-a", generation=2)):
        write_run_spec(base_uri, other)
        assert CheckpointStore.for_run(other).latest() is None
    # A retry of the same run (a new attempt) resumes from it.
    retry = run_spec(base_uri, 2, uid="uid-a")
    write_run_spec(base_uri, retry)
    assert CheckpointStore.for_run(retry).latest().step == 30  # type: ignore[union-attr]


def test_commit_records_checksums(base_uri: str, tmp_path: Path) -> None:
    checkpoints = CheckpointStore.for_output(base_uri)
    checkpoints.prepare(5)
    for rank in (0, 1):
        local = tmp_path / f"rank{rank}"
        local.mkdir()
        (local / f"__{rank}_0.distcp").write_bytes(bytes([rank]) * (100 + rank))
        if rank == 0:
            (local / ".metadata").write_bytes(b"meta")
        checkpoints.upload_dir(5, local)
    info = checkpoints.commit(5, {"tokens_seen": 5})
    sums = {f.path: f.sha256 for f in checkpoints.get(5).files}
    assert sums["__1_0.distcp"] == hashlib.sha256(b"\x01" * 101).hexdigest()
    assert sums[".metadata"] == hashlib.sha256(b"meta").hexdigest()
    assert all(sums.values()) and {f.path for f in info.files} == {".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                   "state.json"}
    checkpoints.verify(5, checksums=True)
    open_store(checkpoints.uri).write_bytes("step-00000005/__1_0.distcp", b"\x02" * 101)  # same size, other bytes
    checkpoints.verify(5)  # sizes alone cannot tell
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp does not match the sha256"):
        checkpoints.verify(5, checksums=True)


def test_a_rank_that_failed_to_upload_never_yields_a_committed_checkpoint(base_uri: str, tmp_path: Path) -> None:
    checkpoints = CheckpointStore.for_output(base_uri)
    checkpoints.prepare(7)
    local = tmp_path / "rank0"
    local.mkdir()
    (local / "__0_0.distcp").write_bytes(b"x" * 64)
    (local / ".metadata").write_bytes(b"meta")
    checkpoints.upload_dir(7, local)  # rank 1's upload never happened
    expected = {".metadata": 0, "__0_0.distcp": 64, "__1_0.distcp": 64}  # what DCP's metadata addresses
    with pytest.raises(CheckpointError, match=r"incomplete.*__1_0\.distcp is missing"):
        checkpoints.commit(7, {"tokens_seen": 7}, expected_files=expected)
    assert not checkpoints.is_committed(7) and checkpoints.latest() is None
    short = {**expected, "__0_0.distcp": 128, "__1_0.distcp": 0}
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp has 64 bytes"):
        checkpoints.commit(7, {"tokens_seen": 7}, expected_files=short)
    assert not checkpoints.is_committed(7)


def test_a_local_run_with_a_changed_spec_does_not_resume_from_the_old_one(base_uri: str) -> None:
    """The local runner has no uid: its runs are told apart by their spec."""
    first = {**run_spec(base_uri, 1, uid=""), "spec": {"totalTokens": 1000}}
    write_run_spec(base_uri, first)
    with CheckpointStore.for_run(first).staging(10, {}) as directory:
        (directory / "weights.bin").write_bytes(b"w")
    again = {**first, "attempt": 2}
    write_run_spec(base_uri, again)
    assert CheckpointStore.for_run(again).latest().step == 10  # type: ignore[union-attr]
    changed = {**first, "attempt": 3, "spec": {"totalTokens": 2000}}
    write_run_spec(base_uri, changed)
    assert CheckpointStore.for_run(changed).latest() is None
