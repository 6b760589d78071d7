"""The operator's only contact with the object store, through tokenmill.store.

Blocking calls (boto3 or the file system); the controller runs them in its thread pool.
Messages come from tokenmill.store's errors, which name URIs and never credentials.
"""

from __future__ import annotations

from typing import Any

from tokenmill.layout import COMMIT_MARKER_NAME, HF_CONFIG_NAME as HF_CONFIG
from tokenmill.operator.status import OutputCheck, UriCheck


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
    """What a finished attempt committed under `output` (tokenmill.outputs.check_outputs).

    Transient store errors propagate, so the controller retries the read instead of
    counting a failed attempt.
    """
    from tokenmill.outputs import check_outputs as check

    report = check(kind, output, uid)
    return OutputCheck(report.committed, report.summary, report.message)


def delete_outputs(output: str) -> int:
    """Remove everything under the output prefix; returns how many objects went."""
    from tokenmill.store import open_store

    return open_store(output).delete_prefix("")
