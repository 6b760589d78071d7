"""Faults injected by an HTTP proxy between the clients (boto3, pyarrow) and the S3 server."""

from __future__ import annotations

import os
import traceback

import pytest

from tests.fixtures.s3 import ACCESS_KEY_ID, SECRET_ACCESS_KEY
from tests.store.s3_fault_proxy import Fault, FaultProxy
from tests.store.samples import sample_table
from tokenmill.store import (
    DOCUMENTS,
    AccessDeniedError,
    BucketNotFoundError,
    CheckpointStore,
    DatasetWriter,
    InvalidCredentialsError,
    PermanentStoreError,
    Producer,
    TransientStoreError,
    open_dataset,
    open_store,
    read_manifest,
)

RUN = Producer(kind="SyntheticDataJob", name="math", uid="uid-9", generation=1, attempt=1)


def puts_to(proxy: FaultProxy, fragment: str) -> int:
    return sum(1 for method, path, _ in proxy.log if method == "PUT" and fragment in path)


def test_transient_faults_lose_no_data_and_duplicate_none(
    fault_proxy: FaultProxy, s3_bucket
) -> None:  # type: ignore[no-untyped-def]
    uri = f"{s3_bucket.uri}/out/data"
    fault_proxy.add(
        Fault.error(503, "SlowDown", "Please reduce your request rate."),
        method="PUT",
        every=3,
        times=None,
    )
    fault_proxy.add(Fault.error(500, "InternalError"), method="GET", every=4, times=None)
    fault_proxy.add(
        Fault.reset(after_forward=True),
        method="PUT",
        path_contains="/_commits/",
        every=2,
        times=None,
    )
    fault_proxy.add(Fault.reset(), every=7, times=None)
    fault_proxy.add(Fault.error(503, "ServiceUnavailable"), method="DELETE", times=2)
    fault_proxy.add(Fault.stall(1.5), method="PUT", path_contains="_manifest.json", times=1)

    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    for n in range(8):
        writer.write_shard(n, sample_table(DOCUMENTS, 9, 9 * n))
    writer.write_shard(3, sample_table(DOCUMENTS, 9, 27))  # a duplicate attempt of shard 3
    manifest = writer.finalize(expected=range(8))
    table = open_dataset(uri).read_all()

    assert fault_proxy.injected() >= 10, fault_proxy.log
    assert manifest.summary.rows == 72
    assert table.column("id").to_pylist() == [f"documents-{n:06d}" for n in range(72)]
    fault_proxy.clear()
    parquet = [o.key for o in open_store(uri).list() if o.key.endswith(".parquet")]
    assert sorted(parquet) == sorted(s.path for s in manifest.shards)


def test_commit_retried_after_a_lost_response_is_idempotent(
    fault_proxy: FaultProxy, s3_bucket
) -> None:  # type: ignore[no-untyped-def]
    uri = f"{s3_bucket.uri}/out/data"
    # The server stores the record and the manifest, but the client never hears so.
    fault_proxy.add(
        Fault.reset(after_forward=True), method="PUT", path_contains="/_commits/part-000000"
    )
    fault_proxy.add(Fault.reset(after_forward=True), method="PUT", path_contains="_manifest.json")
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    info = writer.write_shard(0, sample_table(DOCUMENTS, 5))
    manifest = writer.finalize()
    assert puts_to(fault_proxy, "/_commits/part-000000") == 2
    assert puts_to(fault_proxy, "_manifest.json") == 2
    assert manifest.shards == (info,) == read_manifest(uri).shards
    assert [o.key for o in open_store(uri).list("_commits")] == ["_commits/part-000000.json"]


def test_bulk_transfers_survive_faults(fault_proxy: FaultProxy, s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = open_store(f"{s3_bucket.uri}/bulk")
    payload = os.urandom(11 << 20)  # multipart upload through pyarrow
    fault_proxy.add(
        Fault.error(503, "SlowDown"), method="PUT", query_contains="partNumber", times=4
    )
    fault_proxy.add(Fault.reset(), method="POST", query_contains="uploadId", times=1)
    fault_proxy.add(Fault.error(500, "InternalError"), method="GET", times=2)
    fault_proxy.add(Fault.reset(), method="GET", times=1)
    store.write_bytes("blob", payload)
    assert store.read_bulk("blob") == payload
    assert fault_proxy.injected() == 8


def test_slow_response_times_out_and_is_retried(fault_proxy: FaultProxy, s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = open_store(f"{s3_bucket.uri}/slow")
    store.write_json("x.json", {"v": 1})
    fault_proxy.add(Fault.stall(2.5), method="GET", times=1)
    fault_proxy.add(Fault.stall(2.5, after_forward=False), method="PUT", times=1)
    assert store.read_json("x.json") == {"v": 1}
    store.write_json("y.json", {"v": 2})
    assert store.read_json("y.json") == {"v": 2}
    assert [m for m, _, outcome in fault_proxy.log if outcome.startswith("stall")] == ["GET", "PUT"]
    # Each stalled request timed out on the client and was sent again (a client that waited
    # out the stall would have sent it once).
    for method in ("GET", "PUT"):
        stalled = next(i for i, (m, _, outcome) in enumerate(fault_proxy.log) if m == method and outcome.startswith("stall"))
        path = fault_proxy.log[stalled][1]
        assert (method, path, "forward") in fault_proxy.log[stalled + 1:]


def test_checkpoint_commit_survives_a_lost_marker_response(
    fault_proxy: FaultProxy, s3_bucket, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    checkpoints = CheckpointStore.for_output(f"{s3_bucket.uri}/out")
    fault_proxy.add(Fault.reset(after_forward=True), method="PUT", path_contains="_COMMITTED")
    fault_proxy.add(Fault.error(503, "SlowDown"), method="PUT", path_contains="state.json")
    with checkpoints.staging(100, {"tokens_seen": 1}) as directory:
        (directory / "__0_0.distcp").write_bytes(b"weights" * 100)
    latest = checkpoints.latest()
    assert latest is not None and latest.step == 100
    assert {f.path for f in latest.files} == {"__0_0.distcp", "state.json"}
    assert checkpoints.read_state(100) == {"step": 100, "tokens_seen": 1}


def test_retries_give_up_with_a_transient_error(fault_proxy: FaultProxy, s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = open_store(f"{s3_bucket.uri}/x")
    fault_proxy.add(Fault.error(503, "SlowDown"), times=None)
    with pytest.raises(TransientStoreError, match="gave up after 10 attempts") as caught:
        store.read_bytes("k")
    assert f"{s3_bucket.uri}/x/k" in str(caught.value)
    assert len(fault_proxy.log) == 10  # our retries only: botocore's own are switched off


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (403, "AccessDenied", AccessDeniedError),
        (403, "InvalidAccessKeyId", InvalidCredentialsError),
        (403, "SignatureDoesNotMatch", InvalidCredentialsError),
        (404, "NoSuchBucket", BucketNotFoundError),
    ],
)
def test_permanent_errors_fail_fast_without_secrets(
    fault_proxy: FaultProxy,
    s3_bucket,
    status: int,
    code: str,
    error: type,  # type: ignore[no-untyped-def]
) -> None:
    uri = f"{s3_bucket.uri}/out/data"
    # Real S3 echoes the key id in such bodies; none of it may reach our message.
    fault_proxy.add(
        Fault.error(status, code, f"rejected {ACCESS_KEY_ID} {SECRET_ACCESS_KEY}"), times=None
    )
    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    with pytest.raises(PermanentStoreError) as caught:
        writer.write_shard(0, sample_table(DOCUMENTS, 3))
    assert isinstance(caught.value, error)
    assert len(fault_proxy.log) == 1  # fails fast: not retried
    message = str(caught.value)
    assert code in message and uri in message
    rendered = "".join(traceback.format_exception(caught.value))
    for secret in (SECRET_ACCESS_KEY, ACCESS_KEY_ID):
        assert secret not in message and secret not in rendered


def test_head_forbidden_on_bulk_read_is_access_denied(fault_proxy: FaultProxy, s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = open_store(f"{s3_bucket.uri}/x")
    store.write_bytes("k", b"v")
    fault_proxy.log.clear()
    fault_proxy.add(Fault.error(403, "AccessDenied"), times=None)
    with pytest.raises(AccessDeniedError, match=f"{s3_bucket.uri}/x/k"):
        store.read_bulk("k")
    assert len(fault_proxy.log) == 1


def test_streamed_write_starts_over_after_a_fault(fault_proxy: FaultProxy, s3_bucket) -> None:  # type: ignore[no-untyped-def]
    store = open_store(f"{s3_bucket.uri}/stream")
    payload = os.urandom(12 << 20)
    calls = []

    def produce(stream) -> None:  # type: ignore[no-untyped-def]
        calls.append(1)
        for start in range(0, len(payload), 1 << 20):
            stream.write(payload[start : start + (1 << 20)])

    # More failures in a row than pyarrow's own per-request retries absorb (3 attempts):
    # the whole upload fails, and our retry starts it over, producing the bytes again.
    fault_proxy.add(
        Fault.error(500, "InternalError"), method="POST", query_contains="uploadId", times=3
    )
    store.write_stream("obj", produce)
    assert len(calls) == 2
    assert store.read_bulk("obj") == payload
