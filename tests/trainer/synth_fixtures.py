"""Seeds and run specs of the SyntheticDataJob tests."""

from __future__ import annotations

from typing import Any

from tokenmill.store import CHAT_SAMPLES, DOCUMENTS, DatasetWriter, write_run_spec

PROBLEMS = [
    "What is 17 + 25?",
    "Compute 3 * (4 + 5) - 2.",
    "Tom has 5 apples and buys 7 more. How many apples does he have?",
    "A shop has 4 boxes of 6 pencils each. How many pencils are there?",
    "Compute 12 * 7 + 5 * 3 - 9.",
    "What is 81 - 19?",
    "Compute (14 + 6) * (9 - 4).",
    "Lena has 40 stickers and gives away 13. How many are left?",
    "Write a poem about the sea.",
]


def write_seeds(uri: str, questions: list[str] = PROBLEMS, *, chat: bool = False, shards: int = 1) -> str:
    schema = CHAT_SAMPLES if chat else DOCUMENTS
    writer = DatasetWriter(uri, schema)
    per = -(-len(questions) // shards)
    for shard in range(shards):
        rows = []
        for number, question in enumerate(questions[shard * per:(shard + 1) * per], start=shard * per):
            if chat:
                rows.append({"id": f"q{number}", "messages": [{"role": "user", "content": question}],
                             "source": "test", "meta": "{}"})
            else:
                rows.append({"id": f"q{number}", "text": question, "source": "test", "lang": "en", "meta": "{}"})
        writer.write_shard(shard, rows or schema.arrow.empty_table())
    writer.finalize(expected=range(shards))
    return uri


def spec(seeds: str, *, workflow: list[dict[str, Any]] | None = None, dataset_type: str = "math",
         generator: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "seeds": [{"uri": seeds}],
        "datasetType": dataset_type,
        "workflow": workflow if workflow is not None else [
            {"type": "agreementFilter", "agreementFilter": {"samples": 8, "minAgreement": 0.2, "maxAgreement": 1.0}},
            {"type": "selfRevision", "selfRevision": {"rounds": 2, "rubric": ["reasoning", "factual accuracy"]}},
        ],
        "generator": generator or {"engine": "scripted", "mistakeRate": 0.3,
                                   "sampling": {"temperature": 1.0, "maxTokens": 256}},
        **extra,
    }


def write_spec(output: str, spec_body: dict[str, Any], attempt: int = 1) -> str:
    doc = {"runSpecVersion": 1, "apiVersion": "tokenmill.dev/v1alpha1", "kind": "SyntheticDataJob",
           "metadata": {"name": "synth", "namespace": "default", "uid": "uid-synth", "generation": 1},
           "attempt": attempt, "output": output, "spec": spec_body}
    return write_run_spec(output, doc)
