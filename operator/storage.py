"""The operator's only contact with the object store, through tokenmill.store.

Blocking calls (boto3 or the file system); the controller runs them in its thread pool.
Messages come from tokenmill.store's errors, which name URIs and never credentials.
"""

from __future__ import annotations

from typing import Any

from tokenmill.api.resources import KINDS
from tokenmill.api.status import OutputSummary
from tokenmill.layout import COMMIT_MARKER_NAME, MANIFEST_NAME, dataset_uri, hf_export_uri
from tokenmill.operator.status import OutputCheck, UriCheck

HF_CONFIG = "config.json"


def write_run_spec(output: str, document: dict[str, Any]) -> str:
    from tokenmill.store import write_run_spec as write

    return write(output, document)


def read_run_spec(output: str) -> dict[str, Any] | None:
    """The run spec the last attempt was started with, or None."""
    from tokenmill.store import StoreError, read_run_spec as read

    try:
        document = read(output)
    except StoreError:
        return None
    return document if isinstance(document, dict) else None


def read_progress(output: str) -> Any:
    """The workload's last progress record (tokenmill.store.Progress), or None."""
    from tokenmill.store import StoreError, read_progress as read

    try:
        return read(output)
    except StoreError:
        return None  # progress is for display only; a malformed record must not stop anything


def check_input(path: str, uri: str, what: str) -> UriCheck:
    """Whether the input at `uri` is committed: a dataset manifest, or a model checkpoint/export.

    Transient store errors propagate (the controller retries); permanent ones are reported.
    """
    from tokenmill.store import ManifestError, PermanentStoreError, open_store, read_manifest

    try:
        if what == "dataset":
            read_manifest(uri)
            return UriCheck(path, uri, True)
        store = open_store(uri)
        if store.exists(COMMIT_MARKER_NAME) or store.exists(HF_CONFIG):
            return UriCheck(path, uri, True)
        return UriCheck(path, uri, False, f"{uri} holds neither a committed checkpoint ({COMMIT_MARKER_NAME}) "
                                          f"nor a Hugging Face export ({HF_CONFIG})")
    except ManifestError as error:  # missing or malformed: not committed (yet)
        return UriCheck(path, uri, False, str(error))
    except PermanentStoreError as error:  # no such bucket, access denied: the user must act
        return UriCheck(path, uri, False, str(error))


def check_outputs(kind: str, output: str, uid: str | None) -> OutputCheck:
    """What a finished attempt committed under `output`.

    Dataset kinds need a manifest written by this resource (its uid, when the manifest records
    a producer); checkpoint kinds a committed checkpoint or a Hugging Face export.

    Transient store errors propagate, so the controller retries the read instead of
    counting a failed attempt.
    """
    from tokenmill.store import CheckpointStore, ManifestError, open_store, read_manifest

    try:
        if KINDS[kind].output == "checkpoint":
            latest = CheckpointStore.for_output(output).latest()
            hf = hf_export_uri(output)
            has_hf = open_store(hf).exists(HF_CONFIG)
            if latest is None and not has_hf:
                return OutputCheck(False, message=f"{output} holds no committed checkpoint and no Hugging Face export")
            outputs = OutputSummary(
                uri=output,
                checkpoint=latest.uri if latest is not None else None,
                hf_export=hf if has_hf else None,
                bytes=latest.bytes if latest is not None else None,
            )
            step = f"checkpoint step {latest.step}" if latest is not None else "a Hugging Face export"
            return OutputCheck(True, outputs, f"committed {step}")
        data = dataset_uri(output)
        manifest = read_manifest(data)
        if uid and manifest.producer is not None and manifest.producer.uid and manifest.producer.uid != uid:
            return OutputCheck(False, message=f"{data}/{MANIFEST_NAME} was written by another resource "
                                              f"({manifest.producer.kind}/{manifest.producer.name})")
        summary = manifest.summary
        outputs = OutputSummary(
            uri=output, dataset=data, shards=summary.shards, rows=summary.rows, bytes=summary.bytes,
            tokens=summary.tokens,
        )
        return OutputCheck(True, outputs, f"committed {summary.shards} shard(s), {summary.rows:,} rows")
    except ManifestError as error:  # missing or malformed
        return OutputCheck(False, message=str(error))


def delete_outputs(output: str) -> int:
    """Remove everything under the output prefix; returns how many objects went."""
    from tokenmill.store import open_store

    return open_store(output).delete_prefix("")
