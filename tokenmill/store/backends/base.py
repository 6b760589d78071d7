"""The object-store interface every backend implements.

A Store is rooted at a URI; every method takes a key relative to that root ("" is the root
itself). Keys use '/' on every backend and never contain '.' or '..' segments.
"""

from __future__ import annotations

import builtins
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from tokenmill.store.errors import StoreError
from tokenmill.store.retry import CallerError, RetryPolicy, call_with_retry
from tokenmill.store.uri import StoreURI

if TYPE_CHECKING:
    import pyarrow.fs

T = TypeVar("T")

#: Anything a write accepts: bytes, bytearray, memoryview or a pyarrow Buffer.
BytesLike = Any


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key relative to the store's root and its size in bytes."""

    key: str
    size: int


class Store(ABC):
    """Read, write, list and delete objects under one root URI."""

    #: Whether errors keep the client library's exception as their cause (see call_with_retry).
    chain_causes = True

    def __init__(self, root: StoreURI, retry: RetryPolicy | None = None) -> None:
        self.root = root
        self.retry = retry or RetryPolicy.from_env()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and type(other) is type(self) and other.root == self.root

    def __hash__(self) -> int:
        return hash((type(self), self.root))

    @property
    def uri(self) -> str:
        return str(self.root)

    def uri_of(self, key: str = "") -> str:
        return str(self.root.join(key))

    @abstractmethod
    def child(self, key: str) -> Store:
        """The store rooted at `key` below this one (same backend and credentials)."""

    # -- objects -------------------------------------------------------------------------

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object; ObjectNotFoundError when it does not exist."""

    def read_bulk(self, key: str) -> bytes:
        """Like read_bytes, for large objects; a backend may use a faster client for it."""
        return self.read_bytes(key)

    @abstractmethod
    def write_bytes(self, key: str, data: BytesLike) -> None:
        """Store `data` at `key` atomically: readers see the old object or the new one."""

    @abstractmethod
    def write_stream(self, key: str, produce: Callable[[BinaryIO], None]) -> None:
        """Store what `produce` writes into the stream it is given, atomically.

        Nothing is buffered whole: the bytes go to the file or to S3 (multipart, in the
        background) as they are produced. `produce` is called again if a transient error
        makes the write start over, so it must write the same bytes every time.
        """

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object (not a prefix) is stored at `key`."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; ObjectNotFoundError when it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        """Every object below `prefix` (as a directory), recursively, sorted by key."""

    @abstractmethod
    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """The names of the immediate sub-directories (common prefixes) of `prefix`, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; removing a missing object is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str = "") -> int:
        """Remove the object at `prefix` and everything below it; returns how many went."""

    # -- bulk transfer -------------------------------------------------------------------

    @abstractmethod
    def upload_file(self, local_path: str, key: str) -> None:
        """Copy a local file to `key`, streaming (no whole-file buffer), atomically."""

    @abstractmethod
    def download_file(self, key: str, local_path: str) -> None:
        """Copy `key` to a local file, streaming, replacing the file atomically."""

    @abstractmethod
    def arrow_filesystem(self) -> pyarrow.fs.FileSystem:
        """A pyarrow filesystem for bulk Parquet I/O (and Ray Data) on this store."""

    @abstractmethod
    def arrow_path(self, key: str = "") -> str:
        """The path of `key` as `arrow_filesystem()` spells it."""

    # -- JSON ----------------------------------------------------------------------------

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StoreError(
                f"{self.uri_of(key)} is not valid JSON: {exc}", self.uri_of(key)
            ) from exc

    def write_json(self, key: str, value: Any) -> None:
        text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        self.write_bytes(key, text.encode())

    # -- helpers for backends ------------------------------------------------------------

    @abstractmethod
    def _classify(self, exc: BaseException, uri: str, operation: str) -> StoreError:
        """The StoreError a backend exception stands for (transient or not)."""

    def _call(self, operation: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return call_with_retry(
                fn,
                policy=self.retry,
                classify=self._classify,
                uri=self.uri_of(key),
                operation=operation,
                chain=self.chain_causes,
            )
        except CallerError as wrapped:
            error = wrapped.error
        raise error  # outside the except block: the caller's exception exactly as raised


def run_producer(produce: Callable[[BinaryIO], None], stream: BinaryIO) -> None:
    """Call a write_stream producer, marking its own exceptions as not the store's."""
    try:
        produce(stream)
    except Exception as exc:
        raise CallerError(exc) from exc
