"""The named, versioned Arrow schemas of tokenmill datasets, and validation against them.

A schema's version changes whenever a reader of the old version could misread new data.
`meta` columns hold a JSON object as a string, so per-source fields need no schema change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import pyarrow as pa

from tokenmill.store.errors import SchemaValidationError

#: Parquet key-value metadata naming a shard's schema, e.g. b"documents/1".
SCHEMA_METADATA_KEY = b"tokenmill.schema"

_MESSAGE = pa.struct(
    [
        pa.field("role", pa.string(), nullable=False),
        pa.field("content", pa.string(), nullable=False),
    ]
)
_MESSAGES = pa.list_(pa.field("item", _MESSAGE, nullable=False))


@dataclass(frozen=True)
class DatasetSchema:
    """A named, versioned Arrow schema; `token_column` holds token ids when the rows have them."""

    name: str
    version: int
    arrow: pa.Schema
    description: str = ""
    token_column: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def with_metadata(self) -> pa.Schema:
        return self.arrow.with_metadata({SCHEMA_METADATA_KEY: self.ref.encode()})


DOCUMENTS = DatasetSchema(
    "documents",
    1,
    pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("lang", pa.string()),
            pa.field("meta", pa.string()),
        ]
    ),
    "raw or filtered documents; meta is a JSON object",
)

TOKEN_SEQUENCES = DatasetSchema(
    "token_sequences",
    1,
    pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field(
                "tokens", pa.list_(pa.field("item", pa.int32(), nullable=False)), nullable=False
            ),
            # Per-token: True where the loss is taken; null means every token is trained on.
            pa.field("loss_mask", pa.list_(pa.field("item", pa.bool_(), nullable=False))),
            pa.field("source", pa.string()),
        ]
    ),
    "tokenized sequences for pretraining and SFT",
    token_column="tokens",
)

CHAT_SAMPLES = DatasetSchema(
    "chat_samples",
    1,
    pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("messages", _MESSAGES, nullable=False),
            pa.field("source", pa.string()),
            pa.field("meta", pa.string()),
        ]
    ),
    "conversations as role/content messages; meta is a JSON object",
)

_TOKEN_IDS = pa.list_(pa.field("item", pa.int32(), nullable=False))

PREFERENCE_PAIRS = DatasetSchema(
    "preference_pairs",
    2,
    pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            # A pair is given either as token ids (prompt_tokens, chosen_tokens, rejected_tokens)
            # or as chat text (prompt, chosen, rejected); the token form wins when both are set.
            # Token form: a pair whose chosen and rejected are one id each is a one-token pair
            # (Pivotal Token Search): both log-probs come from one next-token distribution.
            pa.field("prompt_tokens", _TOKEN_IDS),
            pa.field("chosen_tokens", _TOKEN_IDS),
            pa.field("rejected_tokens", _TOKEN_IDS),
            # Text form: the conversation so far; a final assistant message is a prefix that
            # chosen and rejected continue, otherwise they are the next assistant turn.
            pa.field("prompt", _MESSAGES),
            pa.field("chosen", pa.string()),
            pa.field("rejected", pa.string()),
            pa.field("source", pa.string()),
            pa.field("meta", pa.string()),
        ]
    ),
    "DPO pairs: a prompt with a chosen and a rejected continuation, as token ids or chat text; "
    "meta is a JSON object",
)

GENERATIONS = DatasetSchema(
    "generations",
    1,
    pa.schema(
        [
            # sha256 of engine, model identity, prompt, sampling parameters, seed, sample index
            pa.field("key", pa.string(), nullable=False),
            pa.field("request_id", pa.string()),
            pa.field("sample_index", pa.int32(), nullable=False),
            # the completion as a JSON object, null when the sample failed
            pa.field("completion", pa.string()),
            pa.field("error_kind", pa.string()),
            pa.field("error", pa.string()),
        ]
    ),
    "a generation engine's request cache: one row per sample, its completion or its error",
)

SCHEMAS: dict[str, DatasetSchema] = {
    s.ref: s for s in (DOCUMENTS, TOKEN_SEQUENCES, CHAT_SAMPLES, PREFERENCE_PAIRS, GENERATIONS)
}

TableLike: TypeAlias = (
    pa.Table
    | pa.RecordBatch
    | Sequence[pa.RecordBatch]
    | Mapping[str, Any]
    | Sequence[Mapping[str, Any]]
)


def get_schema(name: str, version: int | None = None) -> DatasetSchema:
    """A registered schema by name, the newest version unless one is given."""
    candidates = [s for s in SCHEMAS.values() if s.name == name]
    if version is not None:
        candidates = [s for s in candidates if s.version == version]
    if not candidates:
        known = ", ".join(sorted(SCHEMAS))
        wanted = f"{name}/{version}" if version is not None else name
        raise SchemaValidationError(f"unknown dataset schema {wanted!r}; known: {known}")
    return max(candidates, key=lambda s: s.version)


def to_table(data: TableLike, schema: DatasetSchema) -> pa.Table:
    """Build a table from a Table, RecordBatch(es), a column dict or a list of row dicts."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, Mapping):
        return _from_columns(dict(data), schema)
    rows = list(data)
    if rows and all(isinstance(r, pa.RecordBatch) for r in rows):
        return pa.Table.from_batches(rows)
    if all(isinstance(r, Mapping) for r in rows):
        names = list(dict.fromkeys(k for r in rows for k in r))
        return _from_columns({n: [r.get(n) for r in rows] for n in names}, schema)
    raise SchemaValidationError(
        f"cannot make a {schema.ref} table from {type(data).__name__}; pass a pyarrow Table, "
        "RecordBatches, a dict of columns or a list of row dicts"
    )


def validate_table(data: TableLike, schema: DatasetSchema) -> pa.Table:
    """`data` as a table of exactly `schema` (column order, types, metadata).

    Missing nullable columns are filled with nulls; types that convert without loss are
    cast. Unknown columns, missing required ones, lossy casts and nulls where the schema
    forbids them raise SchemaValidationError naming the schema and the column.
    """
    table = to_table(data, schema)
    names = set(table.column_names)
    extra = [n for n in table.column_names if schema.arrow.get_field_index(n) < 0]
    if extra:
        raise SchemaValidationError(
            f"schema {schema.ref} has no column(s) {', '.join(extra)}; "
            f"its columns are {', '.join(schema.arrow.names)}"
        )
    if len(names) != table.num_columns:
        raise SchemaValidationError(f"table for schema {schema.ref} repeats a column name")
    columns = []
    for field in schema.arrow:
        if field.name not in names:
            if not field.nullable:
                raise SchemaValidationError(
                    f"schema {schema.ref} requires column {field.name!r} ({field.type})"
                )
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if column.type != field.type:
            column = _cast(column, field, schema)
        _check_nulls(column, field, field.name, schema)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema.with_metadata())


def _cast(column: pa.ChunkedArray, field: pa.Field, schema: DatasetSchema) -> pa.ChunkedArray:
    try:
        return column.cast(field.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise SchemaValidationError(
            f"column {field.name!r} of schema {schema.ref} must be {field.type}, "
            f"got {column.type}: {exc}"
        ) from exc


def _check_nulls(
    array: pa.ChunkedArray | pa.Array, field: pa.Field, path: str, schema: DatasetSchema
) -> None:
    nulls = array.null_count
    if nulls and not field.nullable:
        raise SchemaValidationError(
            f"column {path!r} of schema {schema.ref} must not be null ({nulls} null values)"
        )
    kind = field.type
    chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        if _needs_check(kind.value_field, [chunk.values for chunk in chunks]):
            items = pa.chunked_array([chunk.flatten() for chunk in chunks], kind.value_type)
            _check_nulls(items, kind.value_field, f"{path}[]", schema)
    elif pa.types.is_struct(kind):
        for index, child in enumerate(kind):
            if not _needs_check(child, [chunk.field(index) for chunk in chunks]):
                continue
            # A null struct has no children to check; only rows where the struct is set count.
            values = [c.filter(c.is_valid()).field(index) for c in chunks]
            _check_nulls(
                pa.chunked_array(values, child.type), child, f"{path}.{child.name}", schema
            )


def _needs_check(field: pa.Field, children: list[pa.Array]) -> bool:
    """Whether a nested field's values (all of them, before the parent's nulls or slicing hide
    some) could break a rule: a nested type has rules of its own; a plain one only when it
    must not be null and has a null somewhere."""
    if pa.types.is_nested(field.type):
        return True
    return not field.nullable and any(child.null_count for child in children)


def _from_columns(columns: dict[str, Any], schema: DatasetSchema) -> pa.Table:
    unknown = [str(n) for n in columns if schema.arrow.get_field_index(str(n)) < 0]
    if unknown:
        raise SchemaValidationError(
            f"schema {schema.ref} has no column(s) {', '.join(unknown)}; "
            f"its columns are {', '.join(schema.arrow.names)}"
        )
    arrays = {}
    for name, values in columns.items():
        field = schema.arrow.field(name)
        try:
            # Nullable here, so that validate_table reports a null with the column's name.
            arrays[name] = pa.array(values, type=field.type, from_pandas=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
            raise SchemaValidationError(
                f"column {name!r} does not fit schema {schema.ref} ({field.type}): {exc}"
            ) from exc
    return pa.table(arrays)
