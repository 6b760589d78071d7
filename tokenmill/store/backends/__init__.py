"""Object-store backends: file:// (local.py) and s3:// (s3.py) behind one interface (base.py)."""

from tokenmill.store.backends.base import ObjectInfo, Store
from tokenmill.store.backends.local import FileStore
from tokenmill.store.backends.s3 import S3Store

__all__ = ["FileStore", "ObjectInfo", "S3Store", "Store"]
