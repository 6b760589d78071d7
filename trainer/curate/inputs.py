"""The CorpusFilter's inputs: document datasets, or JSONL / Parquet files under a prefix.

`plan_inputs` checks everything before any work: each input is a committed dataset of the
`documents` schema whose shards are all present at their committed size, or a prefix holding
`.jsonl` / `.parquet` files (Parquet footers are read, so a truncated file is caught), and
the inputs hold at least one document. `read_unit` returns one shard as a `documents` table
plus the reason each malformed row is dropped for (a JSON line that does not parse, a text
that is not a string or not valid UTF-8): such rows are counted, never fatal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tokenmill.store import (
    DOCUMENTS,
    ManifestNotFoundError,
    ShardInfo,
    StoreError,
    open_dataset,
    open_store,
)
from tokenmill.store.dataset_reader import read_verified_shard

FILE_SUFFIXES = (".jsonl", ".parquet")
COLUMNS = ("id", "text", "source", "lang", "meta")


class InputError(ValueError):
    """An input that cannot be read; raised before any document is processed."""


@dataclass(frozen=True)
class Unit:
    """One shard of one input: the unit of work, of resume and of output sharding."""

    number: int
    """Position among all inputs' shards: the output shard number."""
    input: str
    store: str
    kind: str
    """dataset, parquet or jsonl."""
    key: str
    rows: int | None
    shard: str = ""
    """The dataset's ShardInfo as JSON (kind dataset)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Unit:
        return cls(**data)

    @property
    def label(self) -> str:
        return f"input {self.input!r} {self.store}/{self.key}"


def plan_inputs(inputs: Sequence[tuple[str, str]]) -> list[Unit]:
    """Every shard of every (name, uri) input, checked; InputError names the first bad one."""
    units: list[Unit] = []
    for name, uri in inputs:
        units += _plan_one(name, uri, start=len(units))
    known_rows = sum(u.rows or 0 for u in units)
    if not units or (known_rows == 0 and all(u.rows is not None for u in units)):
        raise InputError("the inputs hold no documents: " + ", ".join(f"{n} ({u})" for n, u in inputs))
    return units


def _plan_one(name: str, uri: str, start: int) -> list[Unit]:
    try:
        dataset = open_dataset(uri)
    except ManifestNotFoundError:
        return _plan_files(name, uri, start)
    except StoreError as error:
        raise InputError(f"input {name!r}: cannot read {uri}: {error}") from None
    if dataset.manifest.schema_ref != DOCUMENTS.ref:
        raise InputError(f"input {name!r}: {uri} holds {dataset.manifest.schema_ref}, not {DOCUMENTS.ref}")
    sizes = {o.key: o.size for o in dataset.store.list("")}
    units = []
    for info in dataset.shards:
        if sizes.get(info.path) != info.bytes:
            found = "is missing" if info.path not in sizes else f"has {sizes[info.path]} bytes, not {info.bytes}"
            raise InputError(f"input {name!r}: shard {info.shard} of {uri} ({info.path}) {found}")
        units.append(Unit(start + len(units), name, dataset.uri, "dataset", info.path, info.rows,
                          json.dumps(info.to_dict())))
    return units


def _plan_files(name: str, uri: str, start: int) -> list[Unit]:
    try:
        store = open_store(uri)
        listing = [o for o in store.list("") if o.key.endswith(FILE_SUFFIXES) and "/_" not in f"/{o.key}"]
    except StoreError as error:
        raise InputError(f"input {name!r}: cannot list {uri}: {error}") from None
    if not listing:
        raise InputError(f"input {name!r}: {uri} has neither a committed dataset (_manifest.json) nor "
                         f"{' or '.join(FILE_SUFFIXES)} files")
    units = []
    for info in sorted(listing, key=lambda o: o.key):
        if info.key.endswith(".parquet"):
            try:
                with store.arrow_filesystem().open_input_file(store.arrow_path(info.key)) as handle:
                    metadata = pq.ParquetFile(handle).metadata
                    names = set(metadata.schema.names)
                    rows = metadata.num_rows
            except (OSError, pa.ArrowException) as error:
                raise InputError(f"input {name!r}: {store.uri_of(info.key)} is not a readable Parquet file: "
                                 f"{error}") from None
            if "text" not in names:
                raise InputError(f"input {name!r}: {store.uri_of(info.key)} has no text column")
            units.append(Unit(start + len(units), name, store.uri, "parquet", info.key, rows))
        else:
            units.append(Unit(start + len(units), name, store.uri, "jsonl", info.key,
                              0 if info.size == 0 else None))
    return units


def read_unit(unit: Unit) -> tuple[pa.Table, list[str]]:
    """The shard as a `documents` table, and per row '' or the reason it is malformed."""
    rows, malformed = read_unit_rows(unit)
    table, reasons = _rows_to_table(unit, rows)
    return table, [malformed.get(i) or reason for i, reason in enumerate(reasons)]


def read_unit_rows(unit: Unit) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """The shard's rows as dicts (every column), and the rows that did not parse."""
    store = open_store(unit.store)
    try:
        if unit.kind == "dataset":
            table = read_verified_shard(store, ShardInfo.from_dict(json.loads(unit.shard), unit.store))
            return table.to_pylist(), {}
        data = store.read_bulk(unit.key)
    except StoreError as error:
        raise InputError(f"{unit.label}: cannot read: {error}") from None
    if unit.kind == "parquet":
        try:
            return pq.read_table(pa.BufferReader(data)).to_pylist(), {}
        except (OSError, pa.ArrowException) as error:
            raise InputError(f"{unit.label}: not a readable Parquet file: {error}") from None
    rows: list[dict[str, Any]] = []
    malformed: dict[int, str] = {}
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            malformed[len(rows)], row = "invalid-utf8", {}
        except ValueError:
            malformed[len(rows)], row = "invalid-json", {}
        if not isinstance(row, dict):
            malformed[len(rows)], row = "invalid-json", {}
        rows.append(row)
    return rows, malformed


def _rows_to_table(unit: Unit, rows: list[dict[str, Any]]) -> tuple[pa.Table, list[str]]:
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    reasons = []
    for number, row in enumerate(rows):
        text = row.get("text")
        reason = ""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                text, reason = None, "invalid-utf8"
        elif not isinstance(text, str):
            text, reason = None, "text-not-a-string"
        else:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a JSON escape
                text, reason = None, "invalid-utf8"
        reasons.append(reason)
        identifier = row.get("id")
        columns["id"].append(str(identifier) if identifier not in (None, "") else f"{unit.input}-{unit.number}-{number}")
        columns["text"].append(text)
        columns["source"].append(str(row.get("source") or unit.input))
        columns["lang"].append(row.get("lang") if isinstance(row.get("lang"), str) else None)
        meta = row.get("meta")
        columns["meta"].append(meta if isinstance(meta, str) else (json.dumps(meta) if meta is not None else None))
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    return table, reasons


def read_rows(name: str, uri: str, what: str) -> list[dict[str, Any]]:
    """All rows (every column) of a small dataset: a benchmark, the allow-list, annotations.

    InputError when it is missing, empty or has a malformed row."""
    try:
        units = plan_inputs([(name, uri)])
    except InputError as error:
        raise InputError(f"{what} {name!r}: {error}") from None
    rows: list[dict[str, Any]] = []
    for unit in units:
        unit_rows, malformed = read_unit_rows(unit)
        if malformed:
            number = min(malformed)
            raise InputError(f"{what} {name!r} ({unit.store}/{unit.key}): line {number + 1} is malformed "
                             f"({malformed[number]})")
        rows += unit_rows
    if not rows:
        raise InputError(f"{what} {name!r} ({uri}) holds no rows")
    return rows
