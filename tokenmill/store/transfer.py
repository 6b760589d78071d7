"""Copying objects between stores and between a store and a local directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tokenmill.store.backends.base import Store
from tokenmill.store.backends.local import FileStore
from tokenmill.store.backends.s3 import S3Store
from tokenmill.store.opener import open_store
from tokenmill.store.uri import StoreURI

DEFAULT_CONCURRENCY = 8


def copy_object(src: Store, src_key: str, dst: Store, dst_key: str) -> None:
    """Copy one object, server-side when both stores share an S3 account, else streaming."""
    if isinstance(dst, S3Store) and isinstance(src, S3Store) and dst.same_account(src):
        dst.copy_from(src, src_key, dst_key)
    elif isinstance(src, FileStore):
        dst.upload_file(src.local_path(src_key), dst_key)
    elif isinstance(dst, FileStore):
        src.download_file(src_key, dst.local_path(dst_key))
    else:
        with tempfile.TemporaryDirectory(prefix="tokenmill-copy-") as tmp:
            local = os.path.join(tmp, "object")
            src.download_file(src_key, local)
            dst.upload_file(local, dst_key)


def copy_tree(
    src: str | StoreURI | Store,
    dst: str | StoreURI | Store,
    *,
    last: Iterable[str] = (),
    concurrency: int = DEFAULT_CONCURRENCY,
) -> int:
    """Copy every object below `src` to the same keys below `dst`; returns the count.

    Keys named in `last` (a manifest, a commit marker) are copied after all the others
    have arrived, so the copy becomes visible to readers only once it is complete.
    """
    source, target = open_store(src), open_store(dst)
    final = set(last)
    keys = [info.key for info in source.list()]
    first = [k for k in keys if k not in final]
    _parallel(lambda key: copy_object(source, key, target, key), first, concurrency)
    for key in (k for k in keys if k in final):
        copy_object(source, key, target, key)
    return len(keys)


def upload_dir(
    local_dir: str | os.PathLike[str],
    dst: str | StoreURI | Store,
    *,
    last: Iterable[str] = (),
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[str]:
    """Upload every file below `local_dir` to the same relative keys; returns the keys."""
    target = open_store(dst)
    root = Path(local_dir)
    keys = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    final = set(last)
    _parallel(
        lambda key: target.upload_file(str(root / key), key),
        [k for k in keys if k not in final],
        concurrency,
    )
    for key in (k for k in keys if k in final):
        target.upload_file(str(root / key), key)
    return keys


def download_dir(
    src: str | StoreURI | Store,
    local_dir: str | os.PathLike[str],
    *,
    keys: Iterable[str] | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> Path:
    """Download every object below `src` (or just `keys`) into `local_dir`; returns it."""
    source = open_store(src)
    root = Path(local_dir)
    wanted = list(keys) if keys is not None else [info.key for info in source.list()]
    _parallel(lambda key: source.download_file(key, str(root / key)), wanted, concurrency)
    return root


def _parallel(fn: Callable[[str], object], items: list[str], concurrency: int) -> None:
    if len(items) <= 1 or concurrency <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()
