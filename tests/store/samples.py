"""Small sample tables for each dataset schema."""

from __future__ import annotations

import json

import pyarrow as pa

from tokenmill.store import (
    CHAT_SAMPLES,
    DOCUMENTS,
    PREFERENCE_PAIRS,
    TOKEN_SEQUENCES,
    DatasetSchema,
)
from tokenmill.store.schemas import GENERATIONS


def sample_table(schema: DatasetSchema, rows: int, start: int = 0) -> pa.Table:
    """`rows` distinct rows with ids `<schema>-<n>` for n in [start, start + rows)."""
    ids = [f"{schema.name}-{n:06d}" for n in range(start, start + rows)]
    if schema is DOCUMENTS:
        data = {
            "id": ids,
            "text": [
                f"document {n} " + "lorem ipsum " * (n % 7) for n in range(start, start + rows)
            ],
            "source": ["web" if n % 2 else "books" for n in range(start, start + rows)],
            "lang": ["en"] * rows,
            "meta": [json.dumps({"n": n}) for n in range(start, start + rows)],
        }
    elif schema is TOKEN_SEQUENCES:
        tokens = [
            [(n * 7 + i) % 100352 for i in range(1 + n % 13)] for n in range(start, start + rows)
        ]
        data = {
            "id": ids,
            "tokens": tokens,
            "loss_mask": [
                [i % 2 == 0 for i in range(len(t))] if n % 3 else None
                for n, t in zip(range(start, start + rows), tokens, strict=True)
            ],
            "source": ["math"] * rows,
        }
    elif schema is CHAT_SAMPLES:
        data = {
            "id": ids,
            "messages": [
                [
                    {"role": "user", "content": f"question {n}"},
                    {"role": "assistant", "content": f"answer {n}"},
                ]
                for n in range(start, start + rows)
            ],
            "source": ["synthetic"] * rows,
            "meta": [None] * rows,
        }
    elif schema is PREFERENCE_PAIRS:
        data = {
            "id": ids,
            "prompt": [
                [
                    {"role": "user", "content": f"solve {n}"},
                    {"role": "assistant", "content": "Let x ="},
                ]
                for n in range(start, start + rows)
            ],
            "chosen": [f" {n}" for n in range(start, start + rows)],
            "rejected": [f" {n + 1}" for n in range(start, start + rows)],
            "source": ["pts"] * rows,
            "meta": [json.dumps({"p_gain": 0.4})] * rows,
            "prompt_tokens": [[7, 8, n] for n in range(start, start + rows)],
            "chosen_tokens": [[n % 100] for n in range(start, start + rows)],
            "rejected_tokens": [[n % 100 + 1] for n in range(start, start + rows)],
        }
    elif schema is GENERATIONS:
        numbers = range(start, start + rows)
        data = {
            "key": [f"{n:064x}" for n in numbers],
            "request_id": ids,
            "sample_index": [n % 4 for n in numbers],
            "completion": [None if n % 5 == 4 else json.dumps({"text": f"answer {n}"}) for n in numbers],
            "error_kind": ["timeout" if n % 5 == 4 else None for n in numbers],
            "error": ["no answer within 60 s" if n % 5 == 4 else None for n in numbers],
        }
    else:
        raise ValueError(schema.ref)
    return pa.Table.from_pydict(data, schema=schema.arrow)
