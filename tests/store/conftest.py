"""Fixtures for tokenmill.store tests: a store URI on each backend, fast retries, a fault proxy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.s3 import S3Bucket
from tests.store.s3_fault_proxy import FaultProxy


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry delays of milliseconds so that fault tests stay fast; same schedule otherwise."""
    monkeypatch.setenv("TOKENMILL_STORE_RETRY_ATTEMPTS", "10")
    monkeypatch.setenv("TOKENMILL_STORE_RETRY_BASE_S", "0.005")
    monkeypatch.setenv("TOKENMILL_STORE_RETRY_MAX_S", "0.1")


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def base_uri(backend: str, request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A fresh, empty output URI on the backend under test."""
    if backend == "file":
        return (tmp_path / "out").as_uri()
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket.uri}/out"


@pytest.fixture
def fault_proxy(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the test server; the environment points at it.

    Short timeouts make injected stalls look like a hung connection to both clients.
    """
    proxy = FaultProxy(s3_bucket.endpoint_url).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
    monkeypatch.setenv("TOKENMILL_S3_READ_TIMEOUT_S", "1")
    monkeypatch.setenv("TOKENMILL_S3_CONNECT_TIMEOUT_S", "1")
    try:
        yield proxy
    finally:
        proxy.stop()
