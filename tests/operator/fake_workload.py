"""Test-only workload: what the KubeRay stand-in runs instead of `python -m tokenmill.trainer`.

It speaks the workload contract the real trainer follows, without Ray or torch:

- reads the run spec the operator wrote (`--spec <uri>`), refuses unresolved refs and
  checks that every dataset input holds a committed manifest;
- writes progress records while it works;
- dataset kinds commit SHARDS shards through tokenmill.store's DatasetWriter (manifest
  last) and resume: shards an earlier attempt committed are skipped;
- TrainingStage commits a checkpoint (commit marker last, stamped with its producer) and a
  Hugging Face export with its producer record;
- every commit and deletion is fenced by the attempt (the run record names the current one).

Behaviour knobs (environment, set by the tests through the stand-in):
    FAKE_FAIL_AFTER_SHARDS=n   exit 3 after committing n shards in this attempt
    FAKE_HOLD_FILE=path        after the first shard, wait until `path` exists
    FAKE_SHARD_SECONDS=s       sleep s seconds per shard
    FAKE_REPORT=path           append a JSON line describing this run (for assertions)
    FAKE_PRINT=text            print `text` to stderr first (what a driver log may hold)

Usage: python tests/operator/fake_workload.py <cli-name> --spec <uri>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SHARDS = 3
ROWS = 4


def _inputs(node: object, path: str = "spec") -> list[tuple[str, str, str]]:
    """(path, field, uri) of every input URI; raises on a ref left unresolved."""
    found: list[tuple[str, str, str]] = []
    if isinstance(node, dict):
        if "ref" in node:
            raise SystemExit(f"fake workload: unresolved ref at {path}: {node['ref']}")
        for key, value in node.items():
            if key == "uri" and isinstance(value, str):
                found.append((path, path.rsplit(".", 1)[-1], value))
            else:
                found += _inputs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += _inputs(item, f"{path}[{index}]")
    return found


def main(argv: list[str]) -> int:
    from tokenmill.layout import dataset_uri, hf_export_uri
    from tokenmill.store import (
        DOCUMENTS,
        EXPORT_PRODUCER_NAME,
        PREFERENCE_PAIRS,
        AttemptFence,
        CheckpointStore,
        DatasetWriter,
        Producer,
        Progress,
        open_store,
        read_manifest,
        shard_name,
        write_progress,
    )

    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)

    if os.environ.get("FAKE_PRINT"):
        print(os.environ["FAKE_PRINT"], file=sys.stderr, flush=True)
    parent, _, name = args.spec.rpartition("/")
    run = open_store(parent).read_json(name)
    kind, meta, attempt, output = run["kind"], run["metadata"], int(run["attempt"]), run["output"]
    expected = {"CorpusFilter": "corpus-filter", "SyntheticDataJob": "synthetic-data",
                "TrainingStage": "training-stage", "PTSJob": "pts"}[kind]
    if args.command != expected:
        raise SystemExit(f"fake workload: command {args.command} does not match kind {kind}")

    inputs_seen = {}
    for path, field, uri in _inputs(run["spec"]):
        if field in ("datasets", "inputs", "problems") or ".datasets[" in path or ".inputs[" in path:
            inputs_seen[uri] = read_manifest(uri).summary.rows
        elif field in ("model", "parent"):
            store = open_store(uri)
            if not (store.exists("_COMMITTED") or store.exists("config.json")):
                raise SystemExit(f"fake workload: model input {uri} is not committed")
            inputs_seen[uri] = -1

    fail_after = int(os.environ.get("FAKE_FAIL_AFTER_SHARDS", "-1"))
    hold = os.environ.get("FAKE_HOLD_FILE")
    pause = float(os.environ.get("FAKE_SHARD_SECONDS", "0"))
    producer = Producer(kind=kind, name=meta["name"], uid=meta.get("uid") or "", generation=int(meta.get("generation") or 0),
                        attempt=attempt)
    written, skipped = [], []

    if kind == "TrainingStage":
        checkpoints = CheckpointStore.for_run(run)  # this run's checkpoints only, fenced by attempt
        steps = checkpoints.steps()
        for step in (10, 20, 30):
            if step in steps:
                skipped.append(step)
                continue
            with checkpoints.staging(step, {"tokens_seen": step * 100}, overwrite=True) as directory:
                (directory / "model.bin").write_bytes(b"\0" * 64)
            written.append(step)
            write_progress(output, Progress(phase="training", done=step, total=30, unit="steps"))
            if _scripted_failure_due(written, hold, fail_after):
                _report(kind, meta, attempt, written, skipped, inputs_seen, failed=True)
                return 3
            time.sleep(pause)
        hf = open_store(hf_export_uri(output))
        hf.write_json(EXPORT_PRODUCER_NAME, producer.to_dict())
        hf.write_json("config.json", {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"})
    else:
        schema = PREFERENCE_PAIRS if kind == "PTSJob" else DOCUMENTS
        writer = DatasetWriter(dataset_uri(output), schema, producer=producer, fence=AttemptFence.from_run_spec(run))
        done = writer.resume()
        for shard in range(SHARDS):
            if shard_name(shard) in done:
                skipped.append(shard)
                continue
            writer.write_shard(shard, _rows(schema.name, shard))
            written.append(shard)
            write_progress(output, Progress(phase="filtering", done=len(done) + len(written), total=SHARDS,
                                            unit="shards"))
            if _scripted_failure_due(written, hold, fail_after):
                _report(kind, meta, attempt, written, skipped, inputs_seen, failed=True)
                return 3
            time.sleep(pause)
        writer.finalize(expected=range(SHARDS))
    write_progress(output, Progress(phase="done", done=1, total=1, unit="run"))
    _report(kind, meta, attempt, written, skipped, inputs_seen, failed=False)
    return 0


def _rows(schema: str, shard: int) -> list[dict]:
    if schema == "preference_pairs":
        return [{"id": f"{shard}-{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
                 "chosen": "a", "rejected": "b", "source": "fake"} for i in range(ROWS)]
    return [{"id": f"{shard}-{i}", "text": f"document {shard}-{i}", "source": "fake", "lang": "en", "meta": "{}"}
            for i in range(ROWS)]



def _scripted_failure_due(written: list, hold: str | None, fail_after: int) -> bool:
    """After each unit of work: wait at the hold file after the first, and say whether to fail now."""
    if hold and len(written) == 1:
        while not os.path.exists(hold):
            time.sleep(0.05)
    return fail_after >= 0 and len(written) >= fail_after

def _report(kind: str, meta: dict, attempt: int, written: list, skipped: list, inputs: dict, *, failed: bool) -> None:
    target = os.environ.get("FAKE_REPORT")
    if not target:
        return
    line = {"kind": kind, "name": meta["name"], "attempt": attempt, "written": written, "skipped": skipped,
            "inputs": inputs, "failed": failed,
            "api_key_sha256": hashlib.sha256(os.environ["TOKENMILL_GENERATOR_API_KEY"].encode()).hexdigest()
            if "TOKENMILL_GENERATOR_API_KEY" in os.environ else None}
    with open(target, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
