"""Datasets: round trips, the commit protocol, concurrency, resume and integrity checks,
on file:// and on the S3 test server."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import pickle
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.store.samples import sample_table
from tests.store.workers import die_while_uploading, write_document_shards
from tokenmill.store import (
    CHAT_SAMPLES,
    DOCUMENTS,
    PREFERENCE_PAIRS,
    SCHEMAS,
    TOKEN_SEQUENCES,
    ChecksumMismatchError,
    DatasetConflictError,
    DatasetSchema,
    DatasetWriter,
    IncompleteDatasetError,
    IntegrityError,
    ManifestError,
    ManifestNotFoundError,
    MissingShardError,
    Producer,
    SchemaValidationError,
    open_dataset,
    open_store,
    read_manifest,
    shard_name,
)

RUN = Producer(kind="CorpusFilter", name="web", uid="uid-1", generation=3, attempt=1)


def ids_of(table: pa.Table) -> list[str]:
    return table.column("id").to_pylist()


def data_files(uri: str) -> list[str]:
    return [o.key for o in open_store(uri).list() if o.key.endswith(".parquet")]


@pytest.mark.parametrize("schema", list(SCHEMAS.values()), ids=lambda s: s.name)
def test_round_trip_each_schema(base_uri: str, schema: DatasetSchema) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, schema, producer=RUN)
    parts = [sample_table(schema, 40, 0), sample_table(schema, 25, 40)]
    for index, part in enumerate(parts):
        writer.write_shard(index, part)
    manifest = writer.finalize(expected=[0, 1])

    dataset = open_dataset(uri)
    assert dataset.schema is schema and dataset.manifest == manifest
    table = dataset.read_all()
    expected = pa.concat_tables(parts)
    assert table.schema.equals(schema.arrow, check_metadata=False)
    assert table.to_pylist() == expected.to_pylist()
    assert manifest.summary.rows == 65 and manifest.summary.shards == 2
    if schema.token_column:
        lengths = pc.list_value_length(expected.column(schema.token_column))
        assert manifest.summary.tokens == pc.sum(lengths).as_py() > 0
    else:
        assert manifest.summary.tokens is None
    assert [b.num_rows for b in dataset.iter_batches(batch_size=16)] == [16, 16, 8, 16, 9]
    first_column = schema.arrow.names[0]
    assert dataset.read_all(columns=[first_column]).column_names == [first_column]


def test_manifest_records_everything(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, TOKEN_SEQUENCES, producer=RUN)
    info = writer.write_shard("math-00", sample_table(TOKEN_SEQUENCES, 10))
    writer.write_shard(7, sample_table(TOKEN_SEQUENCES, 10, 10), tokens=12345)
    writer.finalize()
    raw = open_store(uri).read_json("_manifest.json")
    assert raw["format"] == "tokenmill.dataset" and raw["format_version"] == 1
    assert raw["schema"] == {"name": "token_sequences", "version": 1}
    assert raw["producer"] == {
        "kind": "CorpusFilter",
        "name": "web",
        "uid": "uid-1",
        "generation": 3,
        "attempt": 1,
    }
    assert raw["created_at"] <= raw["committed_at"]
    assert [s["shard"] for s in raw["shards"]] == ["math-00", "part-000007"]
    first = raw["shards"][0]
    assert set(first) == {
        "shard",
        "path",
        "rows",
        "bytes",
        "sha256",
        "tokens",
        "attempt",
        "written_at",
    }
    assert raw["shards"][1]["tokens"] == 12345  # the caller's count wins when given
    stored = open_store(uri).read_bytes(first["path"])
    assert first["bytes"] == len(stored) == info.bytes
    assert first["sha256"] == hashlib.sha256(stored).hexdigest()
    assert raw["summary"] == {
        "shards": 2,
        "rows": 20,
        "bytes": sum(s["bytes"] for s in raw["shards"]),
        "tokens": first["tokens"] + 12345,
    }
    assert read_manifest(uri).summary.as_dict() == raw["summary"]
    parquet = pq.ParquetFile(pa.BufferReader(stored))
    assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
    assert parquet.schema_arrow.metadata[b"tokenmill.schema"] == b"token_sequences/1"


def test_large_shard_records_the_size_and_sha256_of_its_bytes(base_uri: str) -> None:
    """Past the first MiB the hash runs in a second thread; the recorded hash is still that
    of every stored byte, in order."""
    import secrets

    uri = f"{base_uri}/large"
    texts = [secrets.token_hex(32 << 10) for _ in range(48)]  # 3 MiB of hex digits: about 1.5 MiB stored
    rows = [{"id": f"d{n}", "text": text, "source": "s", "lang": "en", "meta": "{}"} for n, text in enumerate(texts)]
    info = DatasetWriter(uri, DOCUMENTS).write_shard(0, rows)
    stored = open_store(uri).read_bytes(info.path)
    assert info.bytes == len(stored) > 1 << 20
    assert info.sha256 == hashlib.sha256(stored).hexdigest()


def test_manifest_carries_the_workloads_stats(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    writer.write_shard(0, sample_table(DOCUMENTS, 5))
    funnel = {"kept": 4, "bytesIn": 900, "languages": {"en": 4, "fr": 1},
              "documents": [{"step": "quality", "verdict": "dropped", "reason": "low", "documents": 1}]}
    manifest = writer.finalize(expected=[0], stats=funnel)
    assert manifest.stats == funnel
    assert open_store(uri).read_json("_manifest.json")["stats"] == funnel
    assert read_manifest(uri).stats == funnel and read_manifest(uri) == manifest
    assert open_dataset(uri).read_all().num_rows == 5


def test_manifest_without_stats_reads_as_before(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    writer.write_shard(0, sample_table(DOCUMENTS, 5))
    manifest = writer.finalize()
    raw = open_store(uri).read_json("_manifest.json")
    assert "stats" not in raw and raw["format_version"] == 1  # byte-for-byte the earlier layout
    assert manifest.stats is None and read_manifest(uri).stats is None


@pytest.mark.parametrize(
    ("stats", "reason"),
    [
        ([1, 2], "mapping"),
        ({"when": object()}, "JSON-serialisable"),
        ({"mean": float("nan")}, "JSON-serialisable"),
        ({"blob": "x" * (64 * 1024)}, "at most"),
    ],
    ids=["not-a-mapping", "not-json", "nan", "too-large"],
)
def test_finalize_rejects_bad_stats_before_writing(base_uri: str, stats: object, reason: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    writer.write_shard(0, sample_table(DOCUMENTS, 5))
    with pytest.raises(ValueError, match=reason):
        writer.finalize(stats=stats)  # type: ignore[arg-type]
    with pytest.raises(ManifestNotFoundError):
        read_manifest(uri)


def test_manifest_with_stats_that_are_not_an_object_is_an_error(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    writer.write_shard(0, sample_table(DOCUMENTS, 5))
    raw = writer.finalize().to_dict()
    open_store(uri).write_json("_manifest.json", {**raw, "stats": ["kept", 4]})
    with pytest.raises(ManifestError, match="stats"):
        read_manifest(uri)


def test_crash_between_shard_write_and_commit_leaves_nothing_visible(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    staged = writer.stage(0, sample_table(DOCUMENTS, 10))
    assert data_files(uri) == [staged.path]  # the bytes are there …
    del writer  # … and the worker dies before committing

    again = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    assert again.committed() == {} and not again.is_committed(0)
    with pytest.raises(ManifestNotFoundError, match="no committed dataset"):
        open_dataset(uri)
    manifest = again.finalize()
    assert manifest.shards == ()
    assert open_dataset(uri).read_all().num_rows == 0
    assert data_files(uri) == []  # the orphan is collected once the manifest is written


def test_process_killed_mid_upload_leaves_nothing_visible(base_uri: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    uri = f"{base_uri}/data"
    ready = tmp_path / "ready"
    process = multiprocessing.get_context("spawn").Process(
        target=die_while_uploading, args=(uri, RUN, str(ready))
    )
    process.start()
    deadline = time.monotonic() + 60
    while not ready.exists() and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the writer never reached its upload"
    process.kill()  # SIGKILL: no cleanup, no exception handler, an upload in flight
    process.join()

    with pytest.raises(ManifestNotFoundError):
        open_dataset(uri)
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    assert sorted(writer.resume()) == ["part-000000"]
    manifest = writer.finalize()
    assert [s.shard for s in manifest.shards] == ["part-000000"]
    assert ids_of(open_dataset(uri).read_all()) == [f"documents-{n:06d}" for n in range(5)]
    assert data_files(uri) == [manifest.shards[0].path]


def test_commit_without_finalize_is_resumable_but_not_readable(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    writer.write_shard(0, sample_table(DOCUMENTS, 5))
    writer.finalize()
    writer.write_shard(
        1, sample_table(DOCUMENTS, 5, 5)
    )  # committed, the driver dies before finalize
    writer.stage(2, sample_table(DOCUMENTS, 5, 10))  # staged only
    assert ids_of(open_dataset(uri).read_all()) == [f"documents-{n:06d}" for n in range(5)]
    assert sorted(DatasetWriter(uri, DOCUMENTS, producer=RUN).committed()) == [
        "part-000000",
        "part-000001",
    ]


def test_resume_skips_committed_shards(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    first = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    before = {n: first.write_shard(n, sample_table(DOCUMENTS, 4, 4 * n)) for n in range(3)}
    # attempt 1 dies here; attempt 2 of the same run resumes
    retry = Producer(**{**RUN.to_dict(), "attempt": 2})
    second = DatasetWriter(uri, DOCUMENTS, producer=retry)
    done = second.resume()
    assert done == {info.shard: info for info in before.values()}
    written = []
    for n in range(5):
        if shard_name(n) not in done:
            written.append(n)
            second.write_shard(n, sample_table(DOCUMENTS, 4, 4 * n))
    assert written == [3, 4]
    manifest = second.finalize(expected=range(5))
    assert [s.attempt for s in manifest.shards] == [1, 1, 1, 2, 2]
    assert [s.path for s in manifest.shards[:3]] == [before[n].path for n in range(3)]
    assert manifest.producer == retry
    table = open_dataset(uri).read_all()
    assert ids_of(table) == [f"documents-{n:06d}" for n in range(20)]


def test_resume_rewrites_a_committed_shard_whose_data_was_lost(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    infos = [writer.write_shard(n, sample_table(DOCUMENTS, 4, 4 * n)) for n in range(3)]
    store = open_store(uri)
    store.delete(infos[0].path)  # gone
    store.write_bytes(infos[2].path, store.read_bytes(infos[2].path)[:10])  # torn by a crash
    done = DatasetWriter(uri, DOCUMENTS, producer=RUN).resume()
    assert sorted(done) == ["part-000001"]
    assert sorted(o.key for o in store.list("_commits")) == ["_commits/part-000001.json"]
    for n in (0, 2):
        writer.write_shard(n, sample_table(DOCUMENTS, 4, 4 * n))
    assert writer.finalize(expected=range(3)).summary.rows == 12
    assert ids_of(open_dataset(uri).read_all()) == [f"documents-{n:06d}" for n in range(12)]


def test_rewriting_a_shard_replaces_it(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    writer.write_shard(0, sample_table(DOCUMENTS, 3))
    second = writer.write_shard(0, sample_table(DOCUMENTS, 2, 100))
    manifest = writer.finalize()
    assert [s.path for s in manifest.shards] == [second.path]
    assert data_files(uri) == [second.path]
    assert ids_of(open_dataset(uri).read_all()) == ["documents-000100", "documents-000101"]
    assert writer.finalize().shards == manifest.shards  # finalize is idempotent


def test_new_generation_discards_stale_data_on_resume(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    old = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    for n in range(3):
        old.write_shard(n, sample_table(DOCUMENTS, 2, 2 * n))
    old.finalize()

    new_run = Producer(**{**RUN.to_dict(), "generation": 4})
    new = DatasetWriter(uri, DOCUMENTS, producer=new_run)
    assert new.committed() == {}
    new.write_shard(0, sample_table(DOCUMENTS, 1, 50))
    with pytest.raises(DatasetConflictError, match="generation 3") as caught:
        new.finalize()  # shards 1 and 2 of generation 3 must not leak into generation 4
    assert "resume()" in str(caught.value)

    assert new.resume() == {"part-000000": new.committed()["part-000000"]}
    with pytest.raises(ManifestNotFoundError):
        read_manifest(uri)  # the stale manifest went first
    manifest = new.finalize()
    assert [s.shard for s in manifest.shards] == ["part-000000"]
    assert ids_of(open_dataset(uri).read_all()) == ["documents-000050"]
    assert len(data_files(uri)) == 1


def test_other_schema_is_stale_too(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    DatasetWriter(uri, TOKEN_SEQUENCES, producer=RUN).write_shard(
        0, sample_table(TOKEN_SEQUENCES, 2)
    )
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    assert not writer.is_committed(0)
    with pytest.raises(DatasetConflictError, match="token_sequences/1"):
        writer.finalize()


def test_finalize_refuses_an_incomplete_dataset(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    writer.write_shard(0, sample_table(DOCUMENTS, 2))
    writer.write_shard(2, sample_table(DOCUMENTS, 2, 2))
    with pytest.raises(IncompleteDatasetError, match="part-000001"):
        writer.finalize(expected=range(3))
    with pytest.raises(ManifestNotFoundError):
        read_manifest(uri)


def test_invalid_table_is_rejected_before_anything_is_written(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    with pytest.raises(SchemaValidationError, match=r"'text'.*documents/1"):
        writer.write_shard(0, {"id": ["a", "b"], "text": ["x", None]})
    with pytest.raises(SchemaValidationError, match="no column"):
        writer.write_shard(0, pa.table({"id": ["a"], "text": ["x"], "body": ["y"]}))
    assert open_store(uri).list() == []


@pytest.mark.parametrize(
    ("schema", "rows", "where"),
    [
        (CHAT_SAMPLES, [{"id": "a", "messages": [{"role": "user", "content": None}]}], r"'messages\[\]\.content'"),
        (CHAT_SAMPLES, [{"id": "a", "messages": [None]}], r"'messages\[\]'"),
        (TOKEN_SEQUENCES, [{"id": "a", "tokens": [1, 2]}, {"id": "b", "tokens": [3, None]}], r"'tokens\[\]'"),
        (TOKEN_SEQUENCES, [{"id": "a", "tokens": [1], "loss_mask": [True, None]}], r"'loss_mask\[\]'"),
    ],
    ids=["content", "message", "token", "mask"],
)
def test_a_null_nested_where_the_schema_forbids_it_is_rejected(
    base_uri: str, schema: DatasetSchema, rows: list[dict], where: str
) -> None:
    with pytest.raises(SchemaValidationError, match=where):
        DatasetWriter(f"{base_uri}/data", schema).write_shard(0, rows)


def test_nulls_the_schema_allows_are_kept(base_uri: str) -> None:
    """A null list or message list where the column is nullable, and list items past a null
    parent, are not errors."""
    rows = [{"id": "a", "tokens": [1, 2], "loss_mask": None}, {"id": "b", "tokens": [3], "loss_mask": [True]}]
    DatasetWriter(f"{base_uri}/tokens", TOKEN_SEQUENCES).write_shard(0, rows)
    pairs = [{"id": "p", "prompt": None, "chosen_tokens": [1], "rejected_tokens": [2], "prompt_tokens": [0]}]
    DatasetWriter(f"{base_uri}/pairs", PREFERENCE_PAIRS).write_shard(0, pairs)
    table = pa.table({"id": ["a", "b"], "messages": pa.array(
        [[{"role": "user", "content": "hi"}], [{"role": "user", "content": None}]],
        type=CHAT_SAMPLES.arrow.field("messages").type)}).slice(0, 1)  # the null is outside the slice
    info = DatasetWriter(f"{base_uri}/chat", CHAT_SAMPLES).write_shard(0, table)
    assert info.rows == 1


def test_corrupted_shard_is_detected(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    writer.write_shard(0, sample_table(DOCUMENTS, 50))
    victim = writer.write_shard(1, sample_table(DOCUMENTS, 50, 50))
    writer.finalize()
    store = open_store(uri)
    data = bytearray(store.read_bytes(victim.path))
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern, same length
    store.write_bytes(victim.path, bytes(data))

    dataset = open_dataset(uri)
    assert dataset.read_shard(0).num_rows == 50  # the intact shard still reads
    with pytest.raises(ChecksumMismatchError, match=r"part-000001.*corrupt") as caught:
        dataset.read_shard(1)
    assert victim.path in caught.value.uri
    with pytest.raises(ChecksumMismatchError):
        dataset.read_all()
    with pytest.raises(ChecksumMismatchError):
        dataset.verify()

    store.write_bytes(victim.path, bytes(data[:-10]))  # truncated
    with pytest.raises(IntegrityError, match=f"part-000001.*{len(data) - 10} bytes"):
        dataset.read_shard(1)


def test_missing_shard_is_an_error_never_skipped(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    lost = writer.write_shard(0, sample_table(DOCUMENTS, 5))
    writer.write_shard(1, sample_table(DOCUMENTS, 5, 5))
    writer.finalize()
    open_store(uri).delete(lost.path)
    dataset = open_dataset(uri)
    with pytest.raises(MissingShardError, match="part-000000") as caught:
        list(dataset.iter_tables())
    assert lost.path in str(caught.value)


def test_malformed_manifest_is_an_error(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    store = open_store(uri)
    store.write_bytes("_manifest.json", b"{not json")
    with pytest.raises(ManifestError):
        open_dataset(uri)
    store.write_json(
        "_manifest.json",
        {
            "format": "tokenmill.dataset",
            "format_version": 99,
            "schema": {"name": "documents", "version": 1},
            "shards": [],
        },
    )
    with pytest.raises(ManifestError, match="format_version 99"):
        read_manifest(uri)
    store.write_json(
        "_manifest.json",
        {
            "format": "tokenmill.dataset",
            "format_version": 1,
            "schema": {"name": "documents", "version": 1},
            "shards": [
                {
                    "shard": "x",
                    "path": "../../etc/passwd",
                    "rows": 1,
                    "bytes": 1,
                    "sha256": "0" * 64,
                }
            ],
        },
    )
    with pytest.raises(ManifestError, match="path"):
        read_manifest(uri)


def test_writer_survives_pickling(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = pickle.loads(pickle.dumps(DatasetWriter(uri, DOCUMENTS, producer=RUN)))
    writer.write_shard(0, sample_table(DOCUMENTS, 3))
    assert writer.finalize().summary.rows == 3


def test_invalid_shard_ids() -> None:
    assert shard_name(3) == "part-000003" and shard_name("web-0001") == "web-0001"
    for bad in ["", "a/b", "../x", "x.json", -1, True, "-lead"]:
        with pytest.raises(ValueError):
            shard_name(bad)  # type: ignore[arg-type]


# -- concurrency ---------------------------------------------------------------------------


def test_concurrent_writer_threads_lose_nothing(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    barrier = threading.Barrier(3)
    shares = [[0, 2, 4, 6, 8, 10, 5], [1, 3, 5, 7, 9, 11], [12, 13, 14, 15, 5]]  # 5 written thrice

    def work(share: list[int]) -> None:
        barrier.wait()
        write_document_shards(uri, RUN, share, 7)

    threads = [threading.Thread(target=work, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    manifest = DatasetWriter(uri, DOCUMENTS, producer=RUN).finalize(expected=range(16))
    assert manifest.summary.shards == 16 and manifest.summary.rows == 16 * 7
    assert ids_of(open_dataset(uri).read_all()) == [f"documents-{n:06d}" for n in range(16 * 7)]
    assert len(data_files(uri)) == 16  # the two superseded copies of shard 5 were collected


def test_concurrent_writer_processes_lose_nothing(base_uri: str) -> None:
    uri = f"{base_uri}/data"
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        results = [
            pool.apply_async(write_document_shards, (uri, RUN, list(range(k, 10, 2)), 11))
            for k in (0, 1)
        ]
        paths = [r.get(timeout=120) for r in results]
    assert len(paths[0]) == len(paths[1]) == 5
    manifest = DatasetWriter(uri, DOCUMENTS, producer=RUN).finalize(expected=range(10))
    assert sorted(s.path for s in manifest.shards) == sorted(paths[0] + paths[1])
    table = open_dataset(uri).read_all()
    assert ids_of(table) == [f"documents-{n:06d}" for n in range(110)]
    assert json.loads(table.column("meta")[0].as_py()) == {"n": 0}
