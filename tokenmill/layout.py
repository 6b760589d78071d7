"""Where every resource keeps its files under its output URI (the object-store contract).

    <output>/_run/spec.json        the resolved spec the workload runs from
    <output>/_run/progress.json    progress the operator and the local runner read
    <output>/_run/driver.log       the driver's log, uploaded while the job runs
    <output>/data/                 the resource's dataset (Parquet shards + _manifest.json)
    <output>/tokens/<dataset>/<tokenizer>-L<length>/<bucket>/
                                   a training stage's token cache: each input dataset packed
                                   into sequences (token_sequences datasets, one per bucket)
    <output>/checkpoints/step-NNNNNNNN/   distributed checkpoints, commit marker last
    <output>/hf/                   the Hugging Face export of the final checkpoint
"""

from __future__ import annotations

MANIFEST_NAME = "_manifest.json"
COMMIT_MARKER_NAME = "_COMMITTED"
HF_CONFIG_NAME = "config.json"


def join(base: str, *parts: str) -> str:
    """Join URI path segments with exactly one slash between them."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def run_spec_uri(output: str) -> str:
    return join(output, "_run", "spec.json")


def progress_uri(output: str) -> str:
    return join(output, "_run", "progress.json")


def driver_log_uri(output: str) -> str:
    return join(output, "_run", "driver.log")


def dataset_uri(output: str) -> str:
    return join(output, "data")


def checkpoints_uri(output: str) -> str:
    return join(output, "checkpoints")


def checkpoint_uri(output: str, step: int) -> str:
    return join(checkpoints_uri(output), f"step-{step:08d}")


def hf_export_uri(output: str) -> str:
    return join(output, "hf")


def token_cache_uri(output: str, dataset: str, tokenizer: str, seq_len: int) -> str:
    return join(output, "tokens", dataset, f"{tokenizer}-L{seq_len}")
