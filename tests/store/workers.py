"""Functions run in separate processes by the concurrency tests (kept light to import)."""

from __future__ import annotations

from tests.store.samples import sample_table
from tokenmill.store import DOCUMENTS, DatasetWriter, Producer


def write_document_shards(uri: str, producer: Producer, shards: list[int], rows: int) -> list[str]:
    """Write shards n (rows n*rows … n*rows+rows-1) of a documents dataset; returns their paths."""
    writer = DatasetWriter(uri, DOCUMENTS, producer=producer)
    return [writer.write_shard(n, sample_table(DOCUMENTS, rows, n * rows)).path for n in shards]


def die_while_uploading(uri: str, producer: Producer, ready_path: str) -> None:
    """Commit shard 0, then start shard 1 and hang halfway through its upload (to be killed)."""
    import os
    import time

    import tokenmill.store.dataset_writer as dataset_writer

    writer = DatasetWriter(uri, DOCUMENTS, producer=producer)
    writer.write_shard(0, sample_table(DOCUMENTS, 5))

    def hang_halfway(table, stream, options):  # type: ignore[no-untyped-def]
        stream.write(os.urandom(6 << 20))  # past the first multipart part on S3
        stream.flush()
        with open(ready_path, "w") as ready:
            ready.write("uploading")
        time.sleep(600)

    dataset_writer.write_parquet = hang_halfway  # type: ignore[assignment]
    writer.write_shard(1, sample_table(DOCUMENTS, 5, 5))
