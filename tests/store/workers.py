"""Functions run in separate processes by the concurrency tests (kept light to import)."""

from __future__ import annotations

from tests.store.samples import sample_table
from tokenmill.store import DOCUMENTS, DatasetWriter, Producer


def write_document_shards(uri: str, producer: Producer, shards: list[int], rows: int) -> list[str]:
    """Write shards n (rows n*rows … n*rows+rows-1) of a documents dataset; returns their paths."""
    writer = DatasetWriter(uri, DOCUMENTS, producer=producer)
    return [writer.write_shard(n, sample_table(DOCUMENTS, rows, n * rows)).path for n in shards]
