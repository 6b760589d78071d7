"""tokenmill.store: the one way workloads, the local runner and the operator touch data.

- URIs: `s3://bucket/prefix`, `file:///abs/path` or a local path (parse_uri, join_uri).
- Objects: open_store(uri) -> Store with read/write bytes and JSON, exists, list,
  delete_prefix, upload/download, and a pyarrow filesystem for bulk I/O; copy_tree between
  stores. S3 credentials: see tokenmill.store.credentials (env or a mounted Secret dir).
- Datasets: DatasetWriter (shards committed one by one, manifest written last),
  open_dataset / Dataset (reads only committed, checksum-verified shards; Ray Data),
  read_manifest(uri).summary for status.
- Checkpoints: CheckpointStore (commit marker last, latest(), retention, copy).
- Run records: resolved spec, progress, DriverLogUploader.

Transient S3 errors are retried with backoff (RetryPolicy); permanent ones raise a
StoreError subclass at once, naming the URI and never a secret. Nothing here imports torch,
and Ray only inside Dataset.to_ray.
"""

from tokenmill.store.backends import FileStore, ObjectInfo, S3Store, Store
from tokenmill.store.checkpoint import (
    EXPORT_PRODUCER_NAME,
    STATE_NAME,
    CheckpointFile,
    CheckpointInfo,
    CheckpointStore,
    retention_plan,
)
from tokenmill.store.credentials import CREDENTIALS_DIR_ENV, S3Settings, resolve_s3_settings
from tokenmill.store.dataset_reader import Dataset, open_dataset, read_manifest
from tokenmill.store.dataset_writer import DatasetWriter, StagedShard
from tokenmill.store.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CheckpointError,
    ChecksumMismatchError,
    DatasetConflictError,
    IncompleteDatasetError,
    IntegrityError,
    InvalidCredentialsError,
    InvalidURIError,
    ManifestError,
    ManifestNotFoundError,
    MissingShardError,
    ObjectNotFoundError,
    PermanentStoreError,
    SchemaValidationError,
    StaleAttemptError,
    StoreError,
    TransientStoreError,
)
from tokenmill.store.manifest import Manifest, Producer, ShardInfo, Summary, shard_name
from tokenmill.store.opener import open_parent, open_store
from tokenmill.store.retry import RetryPolicy
from tokenmill.store.runrecord import (
    AttemptFence,
    DriverLogUploader,
    Progress,
    read_progress,
    read_run_spec,
    read_run_spec_at,
    write_progress,
    write_run_spec,
)
from tokenmill.store.schemas import (
    CHAT_SAMPLES,
    DOCUMENTS,
    PREFERENCE_PAIRS,
    SCHEMAS,
    TOKEN_SEQUENCES,
    DatasetSchema,
    get_schema,
    validate_table,
)
from tokenmill.store.shards import ParquetOptions
from tokenmill.store.transfer import copy_object, copy_tree, download_dir, upload_dir
from tokenmill.store.uri import StoreURI, join_uri, normalize_uri, parse_uri

__all__ = [
    "CHAT_SAMPLES",
    "CREDENTIALS_DIR_ENV",
    "DOCUMENTS",
    "PREFERENCE_PAIRS",
    "SCHEMAS",
    "STATE_NAME",
    "TOKEN_SEQUENCES",
    "AccessDeniedError",
    "BucketNotFoundError",
    "AttemptFence",
    "EXPORT_PRODUCER_NAME",
    "CheckpointError",
    "CheckpointFile",
    "CheckpointInfo",
    "CheckpointStore",
    "ChecksumMismatchError",
    "Dataset",
    "DatasetConflictError",
    "DatasetSchema",
    "DatasetWriter",
    "DriverLogUploader",
    "FileStore",
    "IncompleteDatasetError",
    "IntegrityError",
    "InvalidCredentialsError",
    "InvalidURIError",
    "Manifest",
    "ManifestError",
    "ManifestNotFoundError",
    "MissingShardError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ParquetOptions",
    "PermanentStoreError",
    "Producer",
    "Progress",
    "StaleAttemptError",
    "RetryPolicy",
    "S3Settings",
    "S3Store",
    "SchemaValidationError",
    "ShardInfo",
    "StagedShard",
    "Store",
    "StoreError",
    "StoreURI",
    "Summary",
    "TransientStoreError",
    "copy_object",
    "copy_tree",
    "download_dir",
    "get_schema",
    "join_uri",
    "normalize_uri",
    "open_dataset",
    "open_parent",
    "open_store",
    "parse_uri",
    "read_manifest",
    "read_progress",
    "read_run_spec",
    "read_run_spec_at",
    "resolve_s3_settings",
    "retention_plan",
    "shard_name",
    "upload_dir",
    "validate_table",
    "write_progress",
    "write_run_spec",
]
