"""What a resource has committed under its output URI: one check for the operator and the local runner.

A kind's descriptor says what it commits: a dataset (`<output>/data/` with its manifest,
written by this resource when the manifest names a producer) or checkpoints (a committed
checkpoint under `<output>/checkpoints/`, or a Hugging Face export under `<output>/hf/`).

Transient store errors propagate, so a caller retries the read instead of counting a failure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenmill.api.resources import KINDS
from tokenmill.api.status import OUTPUT_STAT_NAME, OUTPUT_STATS_MAX, OutputSummary
from tokenmill.layout import HF_CONFIG_NAME, MANIFEST_NAME, dataset_uri, hf_export_uri
from tokenmill.store import (
    EXPORT_PRODUCER_NAME,
    CheckpointStore,
    ManifestError,
    ObjectNotFoundError,
    Producer,
    open_store,
    read_manifest,
)


@dataclass(frozen=True)
class OutputReport:
    committed: bool
    """Whether the output the kind must commit is there."""
    summary: OutputSummary | None = None
    """The status.outputs summary, when committed."""
    message: str = ""
    """What was found (committed) or what is missing (not committed)."""


def check_outputs(kind: str, output: str, uid: str | None = None) -> OutputReport:
    """What a resource of `kind` has committed under `output`; `uid` rejects another resource's dataset."""
    if KINDS[kind].output == "checkpoint":
        return _checkpoints(output, uid)
    return _dataset(output, uid)


def _checkpoints(output: str, uid: str | None) -> OutputReport:
    """With `uid`, only checkpoints and an export stamped by that resource count: a resource
    recreated under the same name never "succeeds" with the old one's weights."""
    committed = CheckpointStore.for_output(output).list()
    if uid:
        committed = [info for info in committed if info.producer is not None and info.producer.uid == uid]
    latest = committed[-1] if committed else None
    hf = hf_export_uri(output)
    export = open_store(hf)
    has_hf = export.exists(HF_CONFIG_NAME)
    if has_hf and uid:
        try:
            has_hf = Producer.from_dict(export.read_json(EXPORT_PRODUCER_NAME)).uid == uid
        except ObjectNotFoundError:
            has_hf = False
    if latest is None and not has_hf:
        return OutputReport(False, message=f"{output} holds no committed checkpoint and no Hugging Face export")
    summary = OutputSummary(
        uri=output,
        checkpoint=latest.uri if latest is not None else None,
        hf_export=hf if has_hf else None,
        bytes=latest.bytes if latest is not None else None,
    )
    step = f"checkpoint step {latest.step}" if latest is not None else "a Hugging Face export"
    return OutputReport(True, summary, f"committed {step}")


def _dataset(output: str, uid: str | None) -> OutputReport:
    data = dataset_uri(output)
    try:
        manifest = read_manifest(data)
    except ManifestError as error:  # missing or malformed: not committed
        return OutputReport(False, message=str(error))
    producer = manifest.producer
    if uid and producer is not None and producer.uid and producer.uid != uid:
        return OutputReport(False, message=f"{data}/{MANIFEST_NAME} was written by another resource "
                                           f"({producer.kind}/{producer.name})")
    counts = manifest.summary
    summary = OutputSummary(uri=output, dataset=data, shards=counts.shards, rows=counts.rows, bytes=counts.bytes,
                            tokens=counts.tokens, stats=headline_counts(manifest.stats))
    return OutputReport(True, summary, f"committed {counts.shards} shard(s), {counts.rows:,} rows")


_STAT_NAME = re.compile(OUTPUT_STAT_NAME)
_INT64_MAX = 2**63 - 1


def headline_counts(stats: Mapping[str, Any] | None) -> dict[str, int] | None:
    """The compact form of a manifest's statistics for status.outputs.stats: its top-level
    non-negative integers under camelCase names, the first OUTPUT_STATS_MAX in the manifest's order. Nested
    figures, text and anything else stay in the manifest, so no free text reaches status."""
    if not stats:
        return None
    counts: dict[str, int] = {}
    for name, value in stats.items():
        if len(counts) == OUTPUT_STATS_MAX:
            break
        if isinstance(name, str) and _STAT_NAME.fullmatch(name) and type(value) is int and 0 <= value <= _INT64_MAX:
            counts[name] = value
    return counts or None
