"""The file:// backend: a directory tree, every write a temp file renamed into place."""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

from tokenmill.store.backends.base import BytesLike, ObjectInfo, Store, run_producer
from tokenmill.store.errors import (
    AccessDeniedError,
    ObjectNotFoundError,
    StoreError,
    TransientStoreError,
)
from tokenmill.store.retry import RetryPolicy
from tokenmill.store.uri import StoreURI, parse_uri

if TYPE_CHECKING:
    import pyarrow.fs

_TMP_SUFFIX = ".tmp"
_COPY_CHUNK = 8 << 20
_WRITE_BUFFER = 1 << 20


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of the in-flight temp files atomic_write creates."""
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


def atomic_write(path: str, data: BytesLike, *, durable: bool = True) -> None:
    """Write `data` to `path` through a temp file in the same directory and a rename."""
    atomic_stream(path, lambda handle: handle.write(data), durable=durable)


def atomic_stream(
    path: str, produce: Callable[[BinaryIO], object], *, durable: bool = True
) -> None:
    """Let `produce` write a temp file in `path`'s directory, then rename it to `path`.

    With `durable`, the file is fsynced before the rename and the directory after it,
    so a commit marker written this way survives a power loss together with its data.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb", buffering=_WRITE_BUFFER) as handle:
            produce(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable:
        _fsync_dir(directory)


def atomic_copy(src: str, dst: str, *, durable: bool = True) -> None:
    """Copy a local file to `dst` through a temp file and a rename."""
    with open(src, "rb") as source:
        atomic_stream(dst, lambda target: shutil.copyfileobj(source, target, _COPY_CHUNK), durable=durable)


def fsync_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether file:// writes are fsynced: yes unless TOKENMILL_STORE_FSYNC is 0/false/no
    (for scratch runs that may lose their last writes to a power cut)."""
    value = (os.environ if environ is None else environ).get("TOKENMILL_STORE_FSYNC", "1")
    return value.strip().lower() not in ("0", "false", "no", "off")


class FileStore(Store):
    """A store over a local (or mounted) directory."""

    def __init__(self, root: StoreURI, retry: RetryPolicy | None = None) -> None:
        if root.scheme != "file":
            raise ValueError(f"FileStore needs a file:// URI, not {root}")
        super().__init__(root, retry)
        self.durable = fsync_enabled()

    @classmethod
    def from_uri(cls, uri: str, retry: RetryPolicy | None = None) -> FileStore:
        return cls(parse_uri(uri), retry)

    def __reduce__(self) -> tuple[Any, ...]:
        return (FileStore.from_uri, (self.uri, self.retry))

    def child(self, key: str) -> FileStore:
        return FileStore(self.root.join(key), self.retry)

    def local_path(self, key: str = "") -> str:
        """The absolute path of `key` on this machine."""
        return self.root.join(key).path

    def read_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            with open(self.local_path(key), "rb") as handle:
                return handle.read()

        return self._call("read", key, read)

    def write_bytes(self, key: str, data: BytesLike) -> None:
        self._call(
            "write", key, lambda: atomic_write(self.local_path(key), data, durable=self.durable)
        )

    def write_stream(self, key: str, produce: Callable[[BinaryIO], None]) -> None:
        self._call(
            "write",
            key,
            lambda: atomic_stream(
                self.local_path(key), lambda f: run_producer(produce, f), durable=self.durable
            ),
        )

    def exists(self, key: str) -> bool:
        return os.path.isfile(self.local_path(key))

    def size(self, key: str) -> int:
        return self._call("stat", key, lambda: os.stat(self.local_path(key)).st_size)

    def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        top = self.local_path(prefix)
        base = self.local_path()
        found: builtins.list[ObjectInfo] = []

        def walk() -> None:
            for directory, _, files in os.walk(top):
                for name in files:
                    if is_temp_name(name):
                        continue
                    path = os.path.join(directory, name)
                    try:
                        size = os.stat(path).st_size
                    except FileNotFoundError:
                        continue  # removed while we listed
                    found.append(ObjectInfo(os.path.relpath(path, base).replace(os.sep, "/"), size))

        self._call("list", prefix, walk)
        return sorted(found, key=lambda info: info.key)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        top = self.local_path(prefix)
        try:
            with os.scandir(top) as entries:
                return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: _unlink_quietly(self.local_path(key)))

    def delete_prefix(self, prefix: str = "") -> int:
        path = self.local_path(prefix)

        def remove() -> int:
            count = 0
            if os.path.isdir(path):
                count = sum(len(files) for _, _, files in os.walk(path))
                shutil.rmtree(path, ignore_errors=False)
            elif os.path.isfile(path):
                os.unlink(path)
                count = 1
            return count

        return self._call("delete", prefix, remove)

    def upload_file(self, local_path: str, key: str) -> None:
        self._call(
            "upload",
            key,
            lambda: atomic_copy(local_path, self.local_path(key), durable=self.durable),
        )

    def download_file(self, key: str, local_path: str) -> None:
        self._call(
            "download",
            key,
            lambda: atomic_copy(self.local_path(key), local_path, durable=self.durable),
        )

    def arrow_filesystem(self) -> pyarrow.fs.FileSystem:
        import pyarrow.fs

        return pyarrow.fs.LocalFileSystem()

    def arrow_path(self, key: str = "") -> str:
        return self.local_path(key)

    def _classify(self, exc: BaseException, uri: str, operation: str) -> StoreError:
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            return ObjectNotFoundError(f"{operation} {uri}: no such object", uri)
        if isinstance(exc, PermissionError):
            return AccessDeniedError(f"{operation} {uri}: permission denied", uri)
        if isinstance(exc, OSError) and exc.errno in (errno.EAGAIN, errno.EINTR, errno.EBUSY):
            return TransientStoreError(f"{operation} {uri}: {exc.strerror}", uri)
        if isinstance(exc, OSError):
            return StoreError(f"{operation} {uri}: {exc.strerror or exc}", uri)
        return StoreError(f"{operation} {uri}: {type(exc).__name__}: {exc}", uri)


def _temp_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
