"""Shard write and read throughput through tokenmill.store against raw pyarrow.

    python benchmarks/store.py [--shards 4] [--rows 32000] [--repeat 5]
                               [--backends file,file-nofsync,s3]

Both sides encode the same documents tables as Parquet with zstd and move them through the
same pyarrow filesystem: raw pyarrow is `pq.write_table` / `pq.read_table` on a path; the
store adds schema validation, the sha256, the atomic write (temp file + rename on file://,
fsynced unless TOKENMILL_STORE_FSYNC=0), a commit record per shard and the manifest on
write; the manifest read and the checksum check on read. s3 runs against moto's S3 server
started here on 127.0.0.1.

Throughput is Arrow (uncompressed) bytes per second, from the best of `--repeat` rounds
(on a shared machine other work only ever adds time). Each round runs every operation
twice, raw, store, store, raw, and averages the two; "overhead" is the median over rounds
of store time / raw time (both sides of each ratio saw the same load), "CPU" the same for
the CPU time of this process (moto's own CPU time is not in it). Two lines split the
store's extra cost: the commit protocol proper (commit records and manifest) and the
sha256 of the shard bytes (hashed while they are written, verified while they decode).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tokenmill.store import DOCUMENTS, DatasetWriter, open_dataset, open_store

COMPRESSION = "zstd"


def make_tables(shards: int, rows: int, seed: int = 0) -> list[pa.Table]:
    """Documents whose text has a word-frequency profile roughly like prose."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    vocabulary = [
        bytes(rng.choice(letters, size=int(n))).decode() for n in rng.integers(2, 11, size=30_000)
    ]
    ranks = np.minimum(rng.zipf(1.2, size=3_000_000), len(vocabulary)) - 1
    corpus = " ".join(vocabulary[i] for i in ranks)  # ~18 MB to cut documents from
    tables = []
    for shard in range(shards):
        starts = rng.integers(0, len(corpus) - 8_000, size=rows)
        lengths = rng.integers(200, 4_000, size=rows)
        texts = [corpus[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
        ids = [f"doc-{shard}-{i}" for i in range(rows)]
        tables.append(
            pa.Table.from_pydict(
                {
                    "id": ids,
                    "text": texts,
                    "source": ["web"] * rows,
                    "lang": ["en"] * rows,
                    "meta": [f'{{"n": {i}}}' for i in range(rows)],
                },
                schema=DOCUMENTS.arrow,
            )
        )
    return tables


@contextmanager
def moto_server() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) that `fn` took."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def raw_write(tables: list[pa.Table], fs: pafs.FileSystem, paths: list[str]) -> None:
    for table, path in zip(tables, paths, strict=True):
        pq.write_table(table, path, filesystem=fs, compression=COMPRESSION)


def raw_read(fs: pafs.FileSystem, paths: list[str]) -> None:
    for path in paths:
        pq.read_table(path, filesystem=fs)


def store_write(tables: list[pa.Table], uri: str, protocol: list[float]) -> None:
    """Write through the store; appends to `protocol` the wall time of the commit protocol
    proper (commit records and the manifest, not the shard bytes)."""
    writer = DatasetWriter(uri, DOCUMENTS)
    spent = 0.0
    for index, table in enumerate(tables):
        staged = writer.stage(index, table)
        spent += timed(partial(writer.commit, staged))[0]
    spent += timed(partial(writer.finalize, expected=range(len(tables))))[0]
    protocol.append(spent)


def store_read(uri: str) -> None:
    rows = sum(table.num_rows for table in open_dataset(uri).iter_tables(prefetch=0))
    assert rows > 0, f"nothing read from {uri}"


def run_backend(
    name: str, root: str, tables: list[pa.Table], repeat: int, protocol: list[float]
) -> dict[str, list[tuple[float, float]]]:
    """Per round, the wall and CPU seconds of each operation, each run twice in the order
    raw, store, store, raw (the first run after a phase change pays for warming up)."""
    store = open_store(root)
    fs = store.arrow_filesystem()
    times: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("raw_write", "store_write", "raw_read", "store_read")
    }
    for round_ in range(repeat):
        runs = {}
        for copy in "ab":
            raw_dir = f"raw-{round_}{copy}"
            paths = [store.arrow_path(f"{raw_dir}/shard-{i}.parquet") for i in range(len(tables))]
            uri = store.uri_of(f"dataset-{round_}{copy}")
            if name == "file":
                os.makedirs(store.arrow_path(raw_dir), exist_ok=True)
            runs[copy] = {
                "raw_write": partial(raw_write, tables, fs, paths),
                "store_write": partial(store_write, tables, uri, protocol),
                "raw_read": partial(raw_read, fs, paths),
                "store_read": partial(store_read, uri),
            }
        for op in ("write", "read"):
            order = [("raw", "a"), ("store", "a"), ("store", "b"), ("raw", "b")]
            measured = {(side, copy): timed(runs[copy][f"{side}_{op}"]) for side, copy in order}
            for side in ("raw", "store"):
                first, second = measured[(side, "a")], measured[(side, "b")]
                times[f"{side}_{op}"].append(
                    ((first[0] + second[0]) / 2, (first[1] + second[1]) / 2)
                )
        store.delete_prefix("")
    return times


def sha256_seconds(tables: list[pa.Table]) -> tuple[float, float]:
    """Parquet megabytes of the tables, and the best time to sha256 them in one thread."""
    buffers = []
    for table in tables:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=COMPRESSION)
        buffers.append(sink.getvalue())
    best = min(timed(lambda: [hashlib.sha256(b).digest() for b in buffers])[1] for _ in range(3))
    return sum(b.size for b in buffers) / 1e6, best


def report(
    name: str,
    tables: list[pa.Table],
    times: dict[str, list[tuple[float, float]]],
    protocol: list[float],
) -> None:
    megabytes = sum(t.nbytes for t in tables) / 1e6
    parquet_mb, hashing = sha256_seconds(tables)
    print(
        f"\n{name}: {len(tables)} shards, {megabytes:.0f} MB of Arrow data "
        f"({parquet_mb:.0f} MB of Parquet) per pass"
    )
    print(
        f"  {'':6} {'raw pyarrow':>14} {'tokenmill.store':>16} {'overhead':>9} {'CPU':>7}"
        "   wall overhead per round"
    )
    shares = []
    for op in ("write", "read"):
        raw, ours = times[f"raw_{op}"], times[f"store_{op}"]
        wall = [(o[0] / r[0] - 1) * 100 for o, r in zip(ours, raw, strict=True)]
        cpu = [(o[1] / r[1] - 1) * 100 for o, r in zip(ours, raw, strict=True)]
        best_raw, best_ours = min(r[0] for r in raw), min(o[0] for o in ours)
        print(
            f"  {op:6} {megabytes / best_raw:10.0f} MB/s {megabytes / best_ours:12.0f} MB/s "
            f"{statistics.median(wall):+8.1f}% {statistics.median(cpu):+6.1f}%   "
            + " ".join(f"{x:+.0f}" for x in wall)
        )
        shares.append(hashing / min(r[1] for r in raw) * 100)
    raw_write = statistics.median(r[0] for r in times["raw_write"])
    commit = statistics.median(protocol)
    print(
        f"  commit protocol alone (commit records + manifest): {commit * 1000:.0f} ms per pass, "
        f"{commit / raw_write * 100:.1f}% of raw write"
    )
    print(
        f"  sha256 of the shard bytes alone: {hashing * 1000:.0f} ms of CPU, "
        f"{shares[0]:.1f}% of raw write CPU, {shares[1]:.1f}% of raw read CPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=32_000, help="documents per shard")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--backends",
        default="file,file-nofsync,s3",
        help="file (fsync, the default), file-nofsync (TOKENMILL_STORE_FSYNC=0, no more "
        "durable than raw pyarrow), s3",
    )
    args = parser.parse_args()

    tables = make_tables(args.shards, args.rows)
    print(
        f"pyarrow {pa.__version__}, compression {COMPRESSION}, best of {args.repeat} rounds, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    for name in args.backends.split(","):
        if name in ("file", "file-nofsync"):
            os.environ["TOKENMILL_STORE_FSYNC"] = "0" if name == "file-nofsync" else "1"
            title = "file:// without fsync" if name == "file-nofsync" else "file:// (fsync)"
            with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
                protocol: list[float] = []
                times = run_backend("file", tmp, tables, args.repeat, protocol)
                report(title, tables, times, protocol)
        elif name == "s3":
            with moto_server() as endpoint:
                os.environ.update(
                    {
                        "AWS_ENDPOINT_URL": endpoint,
                        "AWS_ACCESS_KEY_ID": "bench",
                        "AWS_SECRET_ACCESS_KEY": "bench-secret",
                        "AWS_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true",
                    }
                )
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
                protocol = []
                times = run_backend("s3", "s3://bench/run", tables, args.repeat, protocol)
                report("s3:// (moto server on 127.0.0.1)", tables, times, protocol)
        else:
            parser.error(f"unknown backend {name!r}; use file, file-nofsync and/or s3")


if __name__ == "__main__":
    main()
