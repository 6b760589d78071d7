"""The object-store interface, the same assertions on file:// and on the S3 test server."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenmill.store import (
    BucketNotFoundError,
    FileStore,
    InvalidURIError,
    ObjectNotFoundError,
    S3Store,
    StoreError,
    copy_tree,
    download_dir,
    open_parent,
    open_store,
    upload_dir,
)
from tokenmill.store.backends.local import atomic_write, fsync_enabled


def test_open_store_picks_backend(base_uri: str, backend: str) -> None:
    store = open_store(base_uri)
    assert isinstance(store, FileStore if backend == "file" else S3Store)
    assert store.uri == base_uri
    assert open_store(store) is store


def test_bytes_and_json_round_trip(base_uri: str) -> None:
    store = open_store(base_uri)
    store.write_bytes("a/b/blob.bin", b"\x00\x01payload")
    store.write_json("a/doc.json", {"k": [1, 2], "text": "ünïcode"})
    assert store.read_bytes("a/b/blob.bin") == b"\x00\x01payload"
    assert store.read_json("a/doc.json") == {"k": [1, 2], "text": "ünïcode"}
    assert store.exists("a/b/blob.bin") and not store.exists("a/b") and not store.exists("nope")
    assert store.size("a/b/blob.bin") == 9
    store.write_bytes("a/b/blob.bin", b"replaced")
    assert store.read_bytes("a/b/blob.bin") == b"replaced"


def test_large_object_goes_through_bulk_path(base_uri: str) -> None:
    store = open_store(base_uri)
    payload = os.urandom(9 << 20)  # over the S3 bulk threshold: pyarrow multipart upload
    store.write_bytes("big.bin", payload)
    assert store.size("big.bin") == len(payload)
    assert store.read_bulk("big.bin") == payload
    assert store.read_bytes("big.bin") == payload


def test_missing_object_raises_not_found(base_uri: str) -> None:
    store = open_store(base_uri)
    for read in (store.read_bytes, store.read_bulk, store.read_json, store.size):
        with pytest.raises(ObjectNotFoundError) as caught:
            read("missing/thing")
        assert caught.value.uri == f"{base_uri}/missing/thing"
        assert base_uri in str(caught.value)


def test_list_list_dirs_delete(base_uri: str) -> None:
    store = open_store(base_uri)
    for key in ["x/1", "x/2", "x/sub/3", "y/4", "x-sibling/5"]:
        store.write_bytes(key, key.encode())
    assert [(o.key, o.size) for o in store.list("x")] == [("x/1", 3), ("x/2", 3), ("x/sub/3", 7)]
    assert [o.key for o in store.list()] == ["x-sibling/5", "x/1", "x/2", "x/sub/3", "y/4"]
    assert store.list_dirs() == ["x", "x-sibling", "y"]
    assert store.list_dirs("x") == ["sub"]
    assert store.list("nothing") == [] and store.list_dirs("nothing") == []
    store.delete("y/4")
    store.delete("y/4")  # deleting a missing object is fine
    assert not store.exists("y/4")
    assert store.delete_prefix("x") == 3
    assert [o.key for o in store.list()] == [
        "x-sibling/5"
    ]  # a prefix is a directory, not a string prefix


def test_child_store_is_rooted_below(base_uri: str) -> None:
    store = open_store(base_uri)
    child = store.child("deep/er")
    child.write_bytes("f", b"1")
    assert child.uri == f"{base_uri}/deep/er"
    assert store.read_bytes("deep/er/f") == b"1"
    assert [o.key for o in child.list()] == ["f"]


def test_store_pickles_without_credentials(base_uri: str, backend: str) -> None:
    store = open_store(base_uri)
    store.write_bytes("k", b"v")
    data = pickle.dumps(store)
    if backend == "s3":
        settings = store.settings  # type: ignore[attr-defined]
        assert settings.secret_access_key and settings.secret_access_key.encode() not in data
    clone = pickle.loads(data)
    assert clone == store and clone.read_bytes("k") == b"v"


def test_upload_download_and_copy_between_backends(tmp_path: Path, base_uri: str) -> None:
    source = tmp_path / "src"
    (source / "nested").mkdir(parents=True)
    (source / "a.bin").write_bytes(b"A" * 1000)
    (source / "nested" / "b.txt").write_bytes(b"B")
    (source / ".metadata").write_bytes(b"M")
    keys = upload_dir(source, f"{base_uri}/up")
    assert keys == [".metadata", "a.bin", "nested/b.txt"]
    target = tmp_path / "down"
    download_dir(f"{base_uri}/up", target)
    assert (target / "a.bin").read_bytes() == b"A" * 1000
    assert (target / "nested" / "b.txt").read_bytes() == b"B"
    # to the other backend (s3 -> file or file -> file) and back, marker last
    other = (tmp_path / "other").as_uri()
    assert copy_tree(f"{base_uri}/up", other, last=["nested/b.txt"]) == 3
    assert copy_tree(other, f"{base_uri}/copy") == 3
    assert open_store(f"{base_uri}/copy").read_bytes(".metadata") == b"M"


def test_same_store_copy_is_complete(base_uri: str) -> None:
    store = open_store(base_uri)
    for i in range(12):
        store.write_bytes(f"src/{i:02d}", bytes([i]) * (i + 1))
    assert copy_tree(store.child("src"), store.child("dst")) == 12
    assert [(o.key, o.size) for o in store.child("dst").list()] == [
        (f"{i:02d}", i + 1) for i in range(12)
    ]


def test_arrow_filesystem_reads_what_store_wrote(base_uri: str) -> None:
    store = open_store(base_uri)
    table = pa.table({"x": list(range(100))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    store.write_bytes("t.parquet", sink.getvalue())
    read = pq.read_table(store.arrow_path("t.parquet"), filesystem=store.arrow_filesystem())
    assert read.equals(table)


def test_file_writes_are_atomic_and_temp_files_hidden(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    store.write_bytes("d/obj", b"old")

    with pytest.raises(TypeError):
        atomic_write(str(tmp_path / "d" / "obj"), object())  # type: ignore[arg-type]
    assert store.read_bytes("d/obj") == b"old"  # the failed write left the old object whole
    assert sorted(os.listdir(tmp_path / "d")) == ["obj"]  # and no temp file behind
    # an in-flight temp file (a writer that crashed mid-write) is not an object
    (tmp_path / "d" / ".obj.abcdef.tmp").write_bytes(b"partial")
    assert [o.key for o in store.list()] == ["d/obj"]


def test_file_store_files_are_world_readable_like_other_files(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    store.write_bytes("f", b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_bucket_fails_fast_with_a_clear_error(s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = open_store("s3://no-such-bucket-here/x")
    for operation in (
        lambda: store.read_bytes("k"),
        lambda: store.exists("k"),
        lambda: store.write_bytes("k", b"1"),
        lambda: store.list(),
        lambda: store.write_bytes("big", bytes(9 << 20)),
    ):
        with pytest.raises(BucketNotFoundError) as caught:
            operation()
        assert "no-such-bucket-here" in str(caught.value)


def test_errors_are_store_errors(base_uri: str) -> None:
    with pytest.raises(StoreError):
        open_store(base_uri).read_json("absent.json")


def test_write_stream(base_uri: str, backend: str) -> None:
    store = open_store(base_uri)
    chunks = [os.urandom(1 << 20) for _ in range(3)]

    def produce(stream) -> None:  # type: ignore[no-untyped-def]
        for chunk in chunks:
            stream.write(chunk)

    store.write_stream("streamed.bin", produce)
    assert store.read_bulk("streamed.bin") == b"".join(chunks)

    class ProducerError(Exception):
        """The producer's own failure, which must reach the caller unchanged."""

    def broken(stream) -> None:  # type: ignore[no-untyped-def]
        stream.write(b"half")
        raise ProducerError("the producer's own error")

    # the producer's own exception comes out as it is, not as a StoreError
    with pytest.raises(ProducerError, match="the producer's own error"):
        store.write_stream("broken.bin", broken)
    if backend == "file":
        assert not store.exists("broken.bin")
        assert [o.key for o in store.list()] == ["streamed.bin"]
        assert sorted(os.listdir(store.local_path())) == ["streamed.bin"]  # type: ignore[attr-defined]


def test_open_parent(base_uri: str) -> None:
    store, name = open_parent(f"{base_uri}/a/b/spec.json")
    assert (store.uri, name) == (f"{base_uri}/a/b", "spec.json")
    store.write_json(name, {"x": 1})
    assert open_store(base_uri).read_json("a/b/spec.json") == {"x": 1}
    with pytest.raises(InvalidURIError):
        open_parent("s3://bucket-only")


def test_importing_the_store_pulls_in_neither_torch_nor_ray() -> None:
    code = (
        "import sys, tokenmill.store\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'boto3') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""  # boto3 too is imported only when S3 is first used


def test_file_writes_are_fsynced_unless_switched_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    open_store(tmp_path.as_uri()).write_bytes("a", b"1")
    assert len(synced) == 2  # the file before its rename, the directory after it
    monkeypatch.setenv("TOKENMILL_STORE_FSYNC", "0")
    store = open_store(tmp_path.as_uri())
    store.write_bytes("b", b"2")
    store.write_stream("c", lambda stream: stream.write(b"3"))
    assert len(synced) == 2 and store.read_bytes("b") == b"2" and store.read_bytes("c") == b"3"
    assert fsync_enabled({}) and fsync_enabled({"TOKENMILL_STORE_FSYNC": "1"})
    assert not fsync_enabled({"TOKENMILL_STORE_FSYNC": "false"})
