"""What a resource has committed under its output URI, as the status.outputs summary."""

from __future__ import annotations

from tokenmill.api.status import OutputSummary
from tokenmill.layout import dataset_uri, hf_export_uri
from tokenmill.store import CheckpointStore, ManifestNotFoundError, open_store, read_manifest


def summarize_outputs(output: str) -> OutputSummary:
    """Read the committed dataset manifest, the latest committed checkpoint and the HF export, where present."""
    summary = OutputSummary(uri=output)
    try:
        counts = read_manifest(dataset_uri(output)).summary
        summary = summary.model_copy(
            update={"dataset": dataset_uri(output), "shards": counts.shards, "rows": counts.rows,
                    "bytes": counts.bytes, "tokens": counts.tokens}
        )
    except ManifestNotFoundError:  # the resource produces no dataset, or has not committed one yet
        summary = OutputSummary(uri=output)
    latest = CheckpointStore.for_output(output).latest()
    if latest is not None:
        summary = summary.model_copy(update={"checkpoint": latest.uri})
    if open_store(hf_export_uri(output)).exists("config.json"):
        summary = summary.model_copy(update={"hf_export": hf_export_uri(output)})
    return summary

