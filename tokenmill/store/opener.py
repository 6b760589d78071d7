"""Opening the store behind a URI."""

from __future__ import annotations

from tokenmill.store.backends.base import Store
from tokenmill.store.backends.local import FileStore
from tokenmill.store.backends.s3 import S3Store
from tokenmill.store.errors import InvalidURIError
from tokenmill.store.retry import RetryPolicy
from tokenmill.store.uri import StoreURI, parse_uri


def open_store(uri: str | StoreURI | Store, *, retry: RetryPolicy | None = None) -> Store:
    """The store rooted at `uri` (s3://bucket/prefix, file:///path or a local path).

    S3 endpoint and credentials are resolved now (see tokenmill.store.credentials);
    nothing is contacted until the first operation. A Store passes through unchanged.
    """
    if isinstance(uri, Store):
        return uri
    root = parse_uri(uri)
    if root.scheme == "s3":
        return S3Store(root, retry)
    return FileStore(root, retry)


def open_parent(uri: str | StoreURI) -> tuple[Store, str]:
    """The store of `uri`'s parent and the object's name in it: how to read or write one
    object known by its full URI, e.g. `store, name = open_parent(uri); store.read_json(name)`."""
    parsed = parse_uri(uri)
    parent, _, name = str(parsed).rpartition("/")
    if not name or parent in ("s3:/", "file:/", "file://"):
        raise InvalidURIError(f"{parsed} names no object inside a store", str(parsed))
    return open_store(parent), name
