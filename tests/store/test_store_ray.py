"""Datasets written by concurrent Ray tasks and read back as a Ray Data dataset."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import ray

from tests.fixtures.s3 import MotoS3Server, s3_environment
from tests.store.samples import sample_table
from tests.store.workers import write_document_shards
from tokenmill.store import (
    DOCUMENTS,
    TOKEN_SEQUENCES,
    DatasetWriter,
    Producer,
    open_dataset,
    open_store,
)


pytestmark = pytest.mark.slow

RUN = Producer(kind="CorpusFilter", name="ray", uid="uid-ray", generation=1, attempt=1)


@pytest.fixture(scope="module")
def local_ray(moto_s3_server: MotoS3Server) -> Iterator[None]:
    # Workers get the S3 test server's environment; the driver gets it from s3_bucket.
    env = {
        **s3_environment(moto_s3_server.endpoint_url),
        "TOKENMILL_STORE_RETRY_BASE_S": "0.005",
        "TOKENMILL_STORE_RETRY_MAX_S": "0.1",
    }
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
        ignore_reinit_error=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_tasks_write_concurrently_and_ray_data_reads_committed_shards(
    local_ray: None, base_uri: str
) -> None:
    uri = f"{base_uri}/data"
    write = ray.remote(write_document_shards)
    shares = [list(range(k, 12, 3)) for k in range(3)]
    paths = ray.get([write.remote(uri, RUN, share, 5) for share in shares])
    assert sum(len(p) for p in paths) == 12

    writer = DatasetWriter(uri, DOCUMENTS, producer=RUN)
    writer.stage(99, sample_table(DOCUMENTS, 5, 1000))  # staged, never committed: invisible
    manifest = writer.finalize(expected=range(12))
    assert manifest.summary.rows == 60

    dataset = open_dataset(uri).to_ray()
    rows = dataset.take_all()
    assert sorted(r["id"] for r in rows) == [f"documents-{n:06d}" for n in range(60)]
    projected = open_dataset(uri).to_ray(columns=["id", "lang"])
    assert set(projected.columns()) == {"id", "lang"} and projected.count() == 60


def test_ray_data_read_verifies_checksums(local_ray: None, base_uri: str) -> None:
    uri = f"{base_uri}/data"
    writer = DatasetWriter(uri, TOKEN_SEQUENCES, producer=RUN)
    victim = writer.write_shard(0, sample_table(TOKEN_SEQUENCES, 20))
    writer.write_shard(1, sample_table(TOKEN_SEQUENCES, 20, 20))
    writer.finalize()
    assert open_dataset(uri).to_ray().count() == 40
    store = open_store(uri)
    data = bytearray(store.read_bytes(victim.path))
    data[-20] ^= 0x55
    store.write_bytes(victim.path, bytes(data))
    with pytest.raises(Exception, match=r"part-000000.*corrupt"):
        open_dataset(uri).to_ray().materialize()


def test_env_reaches_workers(local_ray: None) -> None:
    @ray.remote
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray.get(endpoint.remote()).startswith("http://127.0.0.1:")  # type: ignore[union-attr]
