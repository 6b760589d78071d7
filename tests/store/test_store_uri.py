"""URIs, credential resolution and the retry schedule: pure functions, no server."""

from __future__ import annotations

import random

import pytest

from tokenmill.store import (
    InvalidCredentialsError,
    InvalidURIError,
    RetryPolicy,
    StoreError,
    TransientStoreError,
    join_uri,
    normalize_uri,
    parse_uri,
    resolve_s3_settings,
)
from tokenmill.store.retry import call_with_retry


@pytest.mark.parametrize(
    ("uri", "scheme", "bucket", "path", "canonical"),
    [
        ("s3://my-bucket", "s3", "my-bucket", "", "s3://my-bucket"),
        ("s3://my-bucket/", "s3", "my-bucket", "", "s3://my-bucket"),
        ("s3://my-bucket/a/b/", "s3", "my-bucket", "a/b", "s3://my-bucket/a/b"),
        ("s3://my.bucket-1/a//b", "s3", "my.bucket-1", "a/b", "s3://my.bucket-1/a/b"),
        ("file:///tmp/x/", "file", "", "/tmp/x", "file:///tmp/x"),
        ("file://localhost/tmp/x", "file", "", "/tmp/x", "file:///tmp/x"),
        ("file:///tmp/a%20b", "file", "", "/tmp/a b", "file:///tmp/a%20b"),
        ("/tmp/y/../z", "file", "", "/tmp/z", "file:///tmp/z"),
    ],
)
def test_parse_valid(uri: str, scheme: str, bucket: str, path: str, canonical: str) -> None:
    parsed = parse_uri(uri)
    assert (parsed.scheme, parsed.bucket, parsed.path) == (scheme, bucket, path)
    assert str(parsed) == canonical
    assert parse_uri(str(parsed)) == parsed


def test_relative_local_path_becomes_absolute(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    assert normalize_uri("runs/a") == (tmp_path / "runs" / "a").as_uri()


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "empty"),
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("http://host/x", "unsupported scheme 'http'"),
        ("s3://", "no bucket"),
        ("s3://Bad_Bucket/x", "invalid bucket name"),
        ("s3://ab/x", "invalid bucket name"),
        ("s3://10.0.0.1/x", "invalid bucket name"),
        ("s3://key:secret@bucket/x", "must not carry credentials"),
        ("s3://bucket/x?versionId=1", "query"),
        ("s3://bucket/a/../b", "'..'"),
        ("file://otherhost/x", "names host"),
        ("file:relative/x", "file:///absolute/path"),
        (" s3://bucket/x", "whitespace"),
    ],
)
def test_parse_invalid_names_uri_and_what_is_allowed(uri: str, fragment: str) -> None:
    with pytest.raises(InvalidURIError) as caught:
        parse_uri(uri)
    message = str(caught.value)
    assert fragment in message
    assert repr(uri) in message or uri.strip() in message or uri == ""
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, StoreError)


def test_unsupported_scheme_lists_allowed_forms() -> None:
    with pytest.raises(InvalidURIError, match=r"s3://bucket/prefix, file:///absolute/path"):
        parse_uri("azure://container/x")


def test_join() -> None:
    assert join_uri("s3://bkt", "a", "b/c/") == "s3://bkt/a/b/c"
    assert join_uri("s3://bkt/base/", "/x") == "s3://bkt/base/x"
    assert (
        join_uri("file:///tmp/r", "data", "_manifest.json") == "file:///tmp/r/data/_manifest.json"
    )
    with pytest.raises(InvalidURIError, match=r"\.\."):
        join_uri("s3://bkt/base", "../escape")


# -- credentials --------------------------------------------------------------------------


def test_settings_from_environment() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "AKIAENV",
        "AWS_SECRET_ACCESS_KEY": "envsecret",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000/",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    settings = resolve_s3_settings(env)
    assert (settings.access_key_id, settings.secret_access_key) == ("AKIAENV", "envsecret")
    assert settings.endpoint_url == "http://127.0.0.1:9000"
    assert settings.region == "eu-west-1"
    assert settings.addressing_style == "path"
    assert settings.source == "environment"
    assert "envsecret" not in repr(settings) and "AKIAENV" not in repr(settings)


def test_s3_specific_endpoint_wins() -> None:
    env = {"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "https://b:2"}
    assert resolve_s3_settings(env).endpoint_url == "https://b:2"


def test_settings_from_mounted_secret_dir_win_over_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("AKIADIR\n")
    (tmp_path / "AWS_SECRET_ACCESS_KEY").write_text("dirsecret\n")
    (tmp_path / "AWS_ENDPOINT_URL").write_text("http://minio.storage:9000\n")
    env = {
        "TOKENMILL_S3_CREDENTIALS_DIR": str(tmp_path),
        "AWS_ACCESS_KEY_ID": "AKIAENV",
        "AWS_SECRET_ACCESS_KEY": "envsecret",
        "AWS_ENDPOINT_URL": "http://other:1",
    }
    settings = resolve_s3_settings(env)
    assert (settings.access_key_id, settings.secret_access_key) == ("AKIADIR", "dirsecret")
    assert settings.session_token is None
    assert settings.endpoint_url == "http://minio.storage:9000"
    assert settings.source == f"secret-dir:{tmp_path}"
    assert settings.redact("key AKIADIR secret dirsecret") == "key *** secret ***"


def test_secret_dir_missing_key_names_file_not_value(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("AKIADIR")
    with pytest.raises(InvalidCredentialsError, match="AWS_SECRET_ACCESS_KEY") as caught:
        resolve_s3_settings({"TOKENMILL_S3_CREDENTIALS_DIR": str(tmp_path)})
    assert "AKIADIR" not in str(caught.value)


def test_half_set_environment_credentials_are_rejected() -> None:
    with pytest.raises(InvalidCredentialsError, match="together"):
        resolve_s3_settings({"AWS_ACCESS_KEY_ID": "AKIAONLY"})


def test_no_credentials_means_default_chain() -> None:
    settings = resolve_s3_settings({})
    assert settings.access_key_id is None and settings.source == "default-chain"
    assert settings.endpoint_url is None and settings.addressing_style == "auto"


def test_endpoint_with_credentials_is_rejected_without_echoing_them() -> None:
    with pytest.raises(InvalidURIError) as caught:
        resolve_s3_settings({"AWS_ENDPOINT_URL": "http://user:hunter2@host:9000"})
    assert "hunter2" not in str(caught.value)


# -- retry ----------------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_s=0.1, max_delay_s=1.0)
    rng = random.Random(7)
    for retry, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = {policy.delay(retry, rng) for _ in range(50)}
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(delays) > 1  # jittered


def test_retry_policy_from_environment() -> None:
    policy = RetryPolicy.from_env(
        {"TOKENMILL_STORE_RETRY_ATTEMPTS": "3", "TOKENMILL_STORE_RETRY_BASE_S": "0.5"}
    )
    assert (policy.max_attempts, policy.base_delay_s, policy.max_delay_s) == (3, 0.5, 10.0)


def test_call_with_retry_retries_transient_then_gives_up() -> None:
    calls, sleeps = [], []

    def flaky() -> int:
        calls.append(1)
        raise ConnectionResetError("reset")

    def classify(exc: BaseException, uri: str, op: str) -> StoreError:
        return TransientStoreError(f"{op} {uri}: {exc}", uri)

    with pytest.raises(TransientStoreError, match="gave up after 4 attempts"):
        call_with_retry(
            flaky,
            policy=RetryPolicy(4, 0.01, 0.02),
            classify=classify,
            uri="s3://b/k",
            operation="read",
            sleep=sleeps.append,
        )
    assert len(calls) == 4 and len(sleeps) == 3


def test_call_with_retry_does_not_retry_permanent_errors() -> None:
    calls = []

    def denied() -> None:
        calls.append(1)
        raise PermissionError("no")

    with pytest.raises(StoreError, match="denied"):
        call_with_retry(
            denied,
            policy=RetryPolicy(5, 0, 0),
            classify=lambda e, u, o: StoreError(f"{o} {u}: denied", u),
            uri="s3://b/k",
            operation="read",
            sleep=lambda s: None,
        )
    assert len(calls) == 1


def test_call_with_retry_returns_after_recovery() -> None:
    outcomes = iter([TimeoutError("slow"), TimeoutError("slow"), 42])

    def sometimes() -> int:
        value = next(outcomes)
        if isinstance(value, Exception):
            raise value
        return value

    result = call_with_retry(
        sometimes,
        policy=RetryPolicy(5, 0, 0),
        classify=lambda e, u, o: TransientStoreError("t", u),
        uri="s3://b/k",
        operation="read",
        sleep=lambda s: None,
    )
    assert result == 42
