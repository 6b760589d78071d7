"""The exceptions of tokenmill.store.

Every error names the URI it concerns. Messages are built from the URI, the operation
and the store's error code only, so no credential can leak into a log or a status.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error raised by tokenmill.store."""

    def __init__(self, message: str, uri: str = "") -> None:
        super().__init__(message)
        self.uri = uri


class InvalidURIError(StoreError, ValueError):
    """A URI that is neither s3://bucket/prefix, file:///absolute/path nor a local path."""


class ObjectNotFoundError(StoreError):
    """The object (or prefix) does not exist."""


class PermanentStoreError(StoreError):
    """An error that retrying cannot fix; raised at once."""


class BucketNotFoundError(PermanentStoreError):
    """The bucket does not exist."""


class AccessDeniedError(PermanentStoreError):
    """The credentials are valid but not allowed to do this."""


class InvalidCredentialsError(PermanentStoreError):
    """The access key is unknown or the signature does not match."""


class TransientStoreError(StoreError):
    """A transient error (5xx, throttling, reset, timeout) that outlived every retry."""


class IntegrityError(StoreError):
    """Stored data does not match what its manifest or commit marker promised."""


class ChecksumMismatchError(IntegrityError):
    """A shard's bytes do not match the checksum its manifest records."""


class MissingShardError(IntegrityError):
    """A shard the manifest lists is not in the store."""


class ManifestError(StoreError):
    """A manifest or commit record that is absent, malformed or of an unknown format."""


class ManifestNotFoundError(ManifestError):
    """The prefix holds no committed dataset."""


class SchemaValidationError(StoreError):
    """A table that does not match the dataset's schema."""


class DatasetConflictError(StoreError):
    """Committed shards that belong to another schema or another producer."""


class IncompleteDatasetError(StoreError):
    """Shards the committer expected have no commit record."""


class CheckpointError(StoreError):
    """A checkpoint that is missing, uncommitted, incomplete or already committed."""


class StaleAttemptError(StoreError):
    """A writer of an attempt that is no longer the resource's current one: it may not commit
    or delete anything (the run record names a later attempt)."""
