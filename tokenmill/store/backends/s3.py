"""The s3:// backend: boto3 for control operations, pyarrow's S3FileSystem for bulk bytes.

Clients are cached per process and per resolved settings. A pickled S3Store carries only
its URI and retry policy; it resolves endpoint and credentials again where it is
unpickled (a Ray worker), so secrets never travel inside task arguments.
"""

from __future__ import annotations

import builtins
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

from tokenmill.store.backends.base import BytesLike, ObjectInfo, Store, run_producer
from tokenmill.store.backends.local import _temp_name, _unlink_quietly
from tokenmill.store.backends.s3_errors import (
    TRANSIENT_CODES,
    classify_s3_exception,
    describe_exception,
)
from tokenmill.store.credentials import S3Settings, resolve_s3_settings
from tokenmill.store.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ObjectNotFoundError,
    PermanentStoreError,
    StoreError,
    TransientStoreError,
)
from tokenmill.store.retry import RetryPolicy
from tokenmill.store.uri import StoreURI, parse_uri

if TYPE_CHECKING:
    import pyarrow.fs

#: Objects at least this large go through pyarrow (parallel multipart) instead of one PUT.
BULK_THRESHOLD = 8 << 20
_STREAM_CHUNK = 8 << 20
_DELETE_BATCH = 1000
# pyarrow retries single requests itself (cheap, per multipart part); our retry wraps
# the whole operation on top of it.
_ARROW_REQUEST_ATTEMPTS = 3


class _Clients:
    """The boto3 client and pyarrow filesystem for one set of settings in one process."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._boto: Any = None
        self._arrow: pyarrow.fs.S3FileSystem | None = None
        self.verified_buckets: set[str] = set()

    @property
    def boto(self) -> Any:
        with self._lock:
            if self._boto is None:
                self._boto = _make_boto_client(self.settings)
            return self._boto

    @property
    def arrow(self) -> pyarrow.fs.S3FileSystem:
        with self._lock:
            if self._arrow is None:
                self._arrow = _make_arrow_fs(self.settings)
            return self._arrow


_CACHE: dict[tuple[int, str], _Clients] = {}
_CACHE_LOCK = threading.Lock()


def _clients_for(settings: S3Settings) -> _Clients:
    key = (os.getpid(), settings.cache_key())
    with _CACHE_LOCK:
        clients = _CACHE.get(key)
        if clients is None:
            clients = _CACHE[key] = _Clients(settings)
        return clients


def _make_boto_client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=settings.region,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        retries={"total_max_attempts": 1},
        s3={"addressing_style": settings.addressing_style},
        max_pool_connections=32,
        # Trailing-checksum uploads (botocore >= 1.36) break many S3-compatible servers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
        region_name=settings.region,
    )
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


def _make_arrow_fs(settings: S3Settings) -> pyarrow.fs.S3FileSystem:
    import pyarrow.fs

    kwargs: dict[str, Any] = {
        "region": settings.region,
        "connect_timeout": settings.connect_timeout_s,
        "request_timeout": settings.read_timeout_s,
        "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(
            max_attempts=_ARROW_REQUEST_ATTEMPTS
        ),
        "force_virtual_addressing": settings.addressing_style == "virtual",
    }
    if settings.access_key_id:
        kwargs.update(
            access_key=settings.access_key_id,
            secret_key=settings.secret_access_key,
            session_token=settings.session_token,
        )
    if settings.endpoint_url:
        parts = urlsplit(settings.endpoint_url)
        kwargs["scheme"] = parts.scheme
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
    return pyarrow.fs.S3FileSystem(**kwargs)


class S3Store(Store):
    """A store under `s3://bucket/prefix` on AWS S3 or any S3-compatible server."""

    chain_causes = False  # the server's own words travel only redacted, in our message

    def __init__(
        self, root: StoreURI, retry: RetryPolicy | None = None, settings: S3Settings | None = None
    ) -> None:
        if root.scheme != "s3":
            raise ValueError(f"S3Store needs an s3:// URI, not {root}")
        super().__init__(root, retry)
        self.settings = settings or resolve_s3_settings()
        self._clients = _clients_for(self.settings)

    @classmethod
    def from_uri(cls, uri: str, retry: RetryPolicy | None = None) -> S3Store:
        return cls(parse_uri(uri), retry)

    def __reduce__(self) -> tuple[Any, ...]:
        return (S3Store.from_uri, (self.uri, self.retry))

    def child(self, key: str) -> S3Store:
        return S3Store(self.root.join(key), self.retry, self.settings)

    @property
    def bucket(self) -> str:
        return self.root.bucket

    def full_key(self, key: str = "") -> str:
        return self.root.join(key).path

    def same_account(self, other: Store) -> bool:
        """Whether a server-side copy from `other` to this store is possible."""
        return (
            isinstance(other, S3Store) and other.settings.cache_key() == self.settings.cache_key()
        )

    # -- objects -------------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            response = self._boto.get_object(Bucket=self.bucket, Key=self.full_key(key))
            with response["Body"] as body:
                return body.read()

        return self._call_checked("read", key, read)

    def read_bulk(self, key: str) -> bytes:
        """Like read_bytes, through pyarrow's S3 client: faster for large objects."""

        def read() -> bytes:
            # A random-access file reads in one ranged GET; a stream's readall() crawls.
            with self._clients.arrow.open_input_file(self.arrow_path(key)) as source:
                return source.read()

        return self._call_checked("read", key, read)

    def write_bytes(self, key: str, data: BytesLike) -> None:
        if memoryview(data).nbytes >= BULK_THRESHOLD:

            def put() -> None:
                with self._clients.arrow.open_output_stream(self.arrow_path(key)) as stream:
                    stream.write(data)
        else:

            def put() -> None:
                self._boto.put_object(Bucket=self.bucket, Key=self.full_key(key), Body=bytes(data))

        self._call_checked("write", key, put)

    def write_stream(self, key: str, produce: Callable[[BinaryIO], None]) -> None:
        # An exception inside `produce` still completes the upload (pyarrow cannot abort
        # one): the partial object sits under the given key, so callers stream only to
        # keys that nothing refers to until they commit them.
        def put() -> None:
            with self._clients.arrow.open_output_stream(self.arrow_path(key)) as stream:
                run_producer(produce, stream)

        self._call_checked("write", key, put)

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        base = self.full_key()
        found: builtins.list[ObjectInfo] = []
        for page in self._pages(prefix, delimiter=None):
            for item in page.get("Contents", []):
                relative = item["Key"][len(base) + 1 :] if base else item["Key"]
                found.append(ObjectInfo(relative, int(item["Size"])))
        return sorted(found, key=lambda info: info.key)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        names: builtins.list[str] = []
        for page in self._pages(prefix, delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                names.append(common["Prefix"].rstrip("/").rsplit("/", 1)[-1])
        return sorted(names)

    def delete(self, key: str) -> None:
        self._call_checked(
            "delete",
            key,
            lambda: self._boto.delete_object(Bucket=self.bucket, Key=self.full_key(key)),
        )

    def delete_prefix(self, prefix: str = "") -> int:
        keys = [info.key for info in self.list(prefix)]
        if prefix and self.exists(prefix):
            keys.append(prefix)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            self._call_checked("delete", prefix, lambda b=batch: self._delete_batch(b))
        return len(keys)

    # -- bulk transfer -------------------------------------------------------------------

    def upload_file(self, local_path: str, key: str) -> None:
        def upload() -> None:
            with (
                open(local_path, "rb") as source,
                self._clients.arrow.open_output_stream(self.arrow_path(key)) as target,
            ):
                while chunk := source.read(_STREAM_CHUNK):
                    target.write(chunk)

        self._call_checked("upload", key, upload)

    def download_file(self, key: str, local_path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)

        def download() -> None:
            tmp = _temp_name(os.path.abspath(local_path))
            try:
                with (
                    self._clients.arrow.open_input_file(self.arrow_path(key)) as source,
                    open(tmp, "xb") as target,
                ):
                    while chunk := source.read(_STREAM_CHUNK):
                        target.write(chunk)
                os.replace(tmp, local_path)
            except BaseException:
                _unlink_quietly(tmp)
                raise

        self._call_checked("download", key, download)

    def copy_from(self, source: S3Store, source_key: str, key: str) -> None:
        """Server-side copy (multipart for large objects) from a store with the same account."""
        self._call_checked(
            "copy",
            key,
            lambda: self._boto.copy(
                {"Bucket": source.bucket, "Key": source.full_key(source_key)},
                self.bucket,
                self.full_key(key),
            ),
        )

    def arrow_filesystem(self) -> pyarrow.fs.S3FileSystem:
        return self._clients.arrow

    def arrow_path(self, key: str = "") -> str:
        full = self.full_key(key)
        return f"{self.bucket}/{full}" if full else self.bucket

    # -- internals -----------------------------------------------------------------------

    @property
    def _boto(self) -> Any:
        return self._clients.boto

    def _classify(self, exc: BaseException, uri: str, operation: str) -> StoreError:
        error = classify_s3_exception(exc, uri, operation)
        detail = self.settings.redact(describe_exception(exc))
        message = self.settings.redact(str(error)) + (f" [{detail}]" if detail else "")
        return type(error)(message, uri)

    def _call_checked(self, operation: str, key: str, fn: Any) -> Any:
        """_call, turning 'not found' into BucketNotFoundError when the bucket is missing.

        S3 answers a HEAD (and pyarrow a read) on a missing bucket with a bare 404, which
        would read as a missing object; one HEAD on the bucket per process tells them apart.
        """
        try:
            return self._call(operation, key, fn)
        except ObjectNotFoundError:
            self._check_bucket()
            raise

    def _check_bucket(self) -> None:
        if self.bucket in self._clients.verified_buckets:
            return
        try:
            self._call("check bucket of", "", lambda: self._boto.head_bucket(Bucket=self.bucket))
        except ObjectNotFoundError:
            raise BucketNotFoundError(
                f"bucket {self.bucket!r} of {self.uri} does not exist (NoSuchBucket)", self.uri
            ) from None
        except AccessDeniedError:
            pass  # object-level permissions may still allow what was asked
        self._clients.verified_buckets.add(self.bucket)

    def _head(self, key: str) -> dict[str, Any]:
        return self._call_checked(
            "stat", key, lambda: self._boto.head_object(Bucket=self.bucket, Key=self.full_key(key))
        )

    def _pages(self, prefix: str, delimiter: str | None) -> Any:
        full = self.full_key(prefix)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": f"{full}/" if full else ""}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        while True:
            page = self._call("list", prefix, lambda: self._boto.list_objects_v2(**kwargs))
            yield page
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def _delete_batch(self, keys: builtins.list[str]) -> None:
        response = self._boto.delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": self.full_key(k)} for k in keys], "Quiet": True},
        )
        errors = response.get("Errors") or []
        if errors:
            codes = sorted({str(e.get("Code", "?")) for e in errors})
            uri = f"s3://{self.bucket}/{errors[0].get('Key', '')}"
            message = f"delete {uri}: {len(errors)} objects not deleted ({', '.join(codes)})"
            if all(code in TRANSIENT_CODES for code in codes):
                raise TransientStoreError(message, uri)
            raise PermanentStoreError(message, uri)
