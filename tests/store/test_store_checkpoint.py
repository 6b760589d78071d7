"""Checkpoints: commit marker last, latest(), retention, copying; on file:// and S3."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.layout import checkpoint_uri
from tokenmill.store import (
    CheckpointError,
    CheckpointStore,
    open_store,
    retention_plan,
)


def save(checkpoints: CheckpointStore, step: int, payload: bytes = b"w") -> None:
    with checkpoints.staging(step, {"tokens_seen": step * 10, "rng": [1, 2]}) as directory:
        (directory / "__0_0.distcp").write_bytes(payload * 64)
        (directory / "__1_0.distcp").write_bytes(payload * 32)
        (directory / ".metadata").write_bytes(b"meta")


def test_committed_checkpoint_layout_and_state(base_uri: str) -> None:
    checkpoints = CheckpointStore.for_output(base_uri)
    save(checkpoints, 500)
    info = checkpoints.latest()
    assert info is not None and info.step == 500
    assert info.uri == checkpoint_uri(base_uri, 500) == f"{base_uri}/checkpoints/step-00000500"
    assert {f.path: f.bytes for f in info.files} == {
        "__0_0.distcp": 64,
        "__1_0.distcp": 32,
        ".metadata": 4,
        "state.json": info.files[-1].bytes,
    }
    assert checkpoints.read_state(500) == {"step": 500, "tokens_seen": 5000, "rng": [1, 2]}
    marker = open_store(info.uri).read_json("_COMMITTED")
    assert marker["step"] == 500 and marker["format"] == "tokenmill.checkpoint"
    assert checkpoints.verify(500) == info


def test_latest_ignores_uncommitted(base_uri: str) -> None:
    checkpoints = CheckpointStore.for_output(base_uri)
    assert checkpoints.latest() is None
    save(checkpoints, 100)
    save(checkpoints, 200)
    # a newer save that crashed before its marker: files are there, the marker is not
    with pytest.raises(RuntimeError), checkpoints.staging(300, {}) as directory:
        (directory / "__0_0.distcp").write_bytes(b"half")
        raise RuntimeError("preempted")
    open_store(checkpoints.uri).write_bytes("step-00000400/__0_0.distcp", b"half")
    assert checkpoints.steps(include_uncommitted=True)[-1] == 400
    assert checkpoints.steps() == [100, 200]
    assert checkpoints.latest().step == 200  # type: ignore[union-attr]
    assert not checkpoints.is_committed(400)
    with pytest.raises(CheckpointError, match="not committed"):
        checkpoints.read_state(400)


def test_marker_is_written_last(
    base_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = CheckpointStore.for_output(base_uri)
    local = tmp_path / "saved"
    local.mkdir()
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata"):
        (local / name).write_bytes(b"x" * 10)
    written: list[str] = []
    fail_once = ["__1_0.distcp"]
    backend = type(checkpoints.store)
    real_upload, real_write = backend.upload_file, backend.write_bytes

    def upload(self, local_path: str, key: str) -> None:  # type: ignore[no-untyped-def]
        if key in fail_once:
            fail_once.remove(key)
            raise OSError("node lost")
        real_upload(self, local_path, key)
        written.append(self.uri_of(key).rsplit("/", 1)[1])

    def write(self, key: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
        real_write(self, key, data)
        written.append(self.uri_of(key).rsplit("/", 1)[1])

    monkeypatch.setattr(backend, "upload_file", upload)
    monkeypatch.setattr(backend, "write_bytes", write)
    with pytest.raises(OSError, match="node lost"):
        checkpoints.save_dir(7, local, {"tokens_seen": 0})
    assert checkpoints.latest() is None and not checkpoints.is_committed(7)

    written.append("start")
    checkpoints.save_dir(7, local, {"tokens_seen": 0})
    after = written[written.index("start") + 1 :]
    assert sorted(after[:3]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert after[3].endswith(".json")  # the upload's record of sizes and checksums, after its files
    assert after[4:] == ["state.json", "_COMMITTED"]
    assert checkpoints.latest().step == 7  # type: ignore[union-attr]


def test_multi_rank_upload_then_commit(base_uri: str, tmp_path: Path) -> None:
    checkpoints = CheckpointStore.for_output(base_uri)
    checkpoints.prepare(40)
    for rank in range(2):  # each rank saved into its own node-local directory
        local = tmp_path / f"rank{rank}"
        local.mkdir()
        (local / f"__{rank}_0.distcp").write_bytes(bytes([rank]) * 100)
        if rank == 0:
            (local / ".metadata").write_bytes(b"plan")
        checkpoints.upload_dir(40, local)
    assert checkpoints.latest() is None  # nothing is committed before rank 0 says so
    info = checkpoints.commit(40, {"tokens_seen": 4})
    assert sorted(f.path for f in info.files) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "state.json",
    ]
    restored = checkpoints.download(40, tmp_path / "restore")
    assert (restored / "__1_0.distcp").read_bytes() == b"\x01" * 100


def test_prepare_refuses_a_committed_step_and_clears_leftovers(base_uri: str) -> None:
    checkpoints = CheckpointStore.for_output(base_uri)
    save(checkpoints, 10)
    with pytest.raises(CheckpointError, match="already committed"):
        save(checkpoints, 10)
    open_store(checkpoints.uri).write_bytes("step-00000020/stale.bin", b"from a crashed attempt")
    save(checkpoints, 20)
    assert "stale.bin" not in {f.path for f in checkpoints.get(20).files}
    with checkpoints.staging(10, {}, overwrite=True) as directory:
        (directory / "__0_0.distcp").write_bytes(b"new")
    assert {f.path for f in checkpoints.get(10).files} == {"__0_0.distcp", "state.json"}


def test_verify_detects_a_missing_file(base_uri: str) -> None:
    checkpoints = CheckpointStore.for_output(base_uri)
    save(checkpoints, 3)
    open_store(checkpoints.uri).delete("step-00000003/__1_0.distcp")
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is missing"):
        checkpoints.verify(3)


@pytest.mark.parametrize(
    ("steps", "keep_last", "keep_every", "deleted"),
    [
        ([100, 200, 300, 400, 500], 2, None, [100, 200, 300]),
        ([100, 200, 300, 400, 500], 2, 200, [100, 300]),
        ([100, 200, 300, 400, 500], 1, 1000, [100, 200, 300, 400]),
        ([100, 200], 5, None, []),
        ([], 1, None, []),
        ([250, 500, 750, 1000, 1250], 1, 500, [250, 750]),
    ],
)
def test_retention_plan(
    steps: list[int], keep_last: int, keep_every: int | None, deleted: list[int]
) -> None:
    assert retention_plan(steps, keep_last, keep_every) == deleted


def test_retention_plan_rejects_keeping_nothing() -> None:
    with pytest.raises(ValueError):
        retention_plan([1, 2], 0)


def test_apply_retention(base_uri: str) -> None:
    checkpoints = CheckpointStore.for_output(base_uri)
    for step in (100, 200, 300, 400):
        save(checkpoints, step)
    open_store(checkpoints.uri).write_bytes("step-00000150/__0_0.distcp", b"orphan")
    open_store(checkpoints.uri).write_bytes("step-00000450/__0_0.distcp", b"in progress")
    deleted = checkpoints.apply_retention(keep_last=1, keep_every=200)
    assert deleted == [100, 150, 300]
    assert checkpoints.steps() == [200, 400]
    # the newer uncommitted one may be a save in progress: it stays
    assert checkpoints.steps(include_uncommitted=True) == [200, 400, 450]
    assert open_store(checkpoints.uri).list("step-00000100") == []


def test_copy_between_stores(base_uri: str, tmp_path: Path) -> None:
    source = CheckpointStore.for_output(base_uri)
    save(source, 1, b"a")
    save(source, 2, b"b")
    open_store(source.uri).write_bytes("step-00000002/not-in-marker.bin", b"stray")
    target = CheckpointStore((tmp_path / "elsewhere").as_uri())
    assert source.copy_to(target) == [1, 2]
    assert target.steps() == [1, 2]
    assert target.read_state(2) == source.read_state(2)
    assert target.verify(2).files == source.get(2).files
    assert not target.store.exists("step-00000002/not-in-marker.bin")
    assert source.copy_to(target) == []  # already there
    back = CheckpointStore(f"{base_uri}/copy-back")
    assert target.copy_to(back, steps=[2]) == [2]
    assert back.latest().step == 2  # type: ignore[union-attr]


def test_local_dir_only_for_file_stores(base_uri: str, backend: str) -> None:
    checkpoints = CheckpointStore.for_output(base_uri)
    local = checkpoints.local_dir(5)
    if backend == "file":
        assert local is not None and str(local).endswith("checkpoints/step-00000005")
    else:
        assert local is None


def test_invalid_steps() -> None:
    checkpoints = CheckpointStore("/tmp/unused-ckpts")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            checkpoints.uri_for(bad)  # type: ignore[arg-type]
