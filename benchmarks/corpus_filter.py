"""Benchmark: MB/s per core of our deduplication and decontamination against datatrove's blocks.

One generated corpus (default 110 MB of JSONL, English-like text from a Zipf vocabulary) with
planted exact duplicates, near duplicates (two words changed in about 300) and documents that
quote a benchmark item (20 consecutive words). Both sides read the same JSONL file, with the
same n-gram sizes (5-word shingles, 128 = 16 x 8 MinHash values; 13-grams for contamination),
on one core each, timed in CPU seconds (this process and its children):

- ours: what the CorpusFilter's tasks and driver run (`trainer/curate`): JSONL parsed by
  pyarrow, words hashed in batches, MinHash signatures, exact hashes, LSH clusters over the
  whole corpus; the hybrid 13/7-gram decontamination against the benchmark index;
- datatrove: its MinHash pipeline (signature, buckets, cluster, filter) and its n-gram
  decontamination filter (the index written from the same items with its own indexer's
  hashing), run in its own virtualenv (`--peer-python`, e.g. /tmp/dt-venv/bin/python with
  `pip install datatrove spacy nltk regex xxhash tokenizers`).

Also language-ID and quality-classifier documents/s, and the cores needed for 10T tokens.
The target is at least 10x datatrove per core on dedup and on decontamination.

    python benchmarks/corpus_filter.py [--megabytes 110] [--peer-python /tmp/dt-venv/bin/python]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TARGET = 10.0
SHINGLE, PERMUTATIONS, BANDS = 5, 128, 16
LONG, SHORT = 13, 7
BYTES_PER_TOKEN = 4.0
BENCHMARK_ITEMS = 2000


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# -- the corpus -------------------------------------------------------------------------------

def generate(folder: Path, megabytes: float, seed: int = 7) -> dict:
    """The corpus (corpus/corpus.jsonl), benchmark items (bench.jsonl) and what was planted."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    plan_path = folder / "planted.json"
    target = int(megabytes * 1e6)
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        if plan.get("bytes_target") == target:
            return plan
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ber", "dan", "el", "fin", "gor", "hal", "is",
                 "jun", "ker", "lin", "mor", "nal", "or", "pel", "quin", "ros", "sul", "ter", "um", "ven", "wil", "yar"]
    vocabulary = np.array(["".join(rng.choice(syllables, size=rng.integers(1, 4))) + str(i % 7 or "")
                           for i in range(30000)])
    weights = 1.0 / np.arange(1, len(vocabulary) + 1) ** 1.05
    weights /= weights.sum()

    def words(count: int) -> list[str]:
        return list(vocabulary[rng.choice(len(vocabulary), size=count, p=weights)])

    items = [" ".join(words(30)) for _ in range(BENCHMARK_ITEMS)]
    with open(folder / "bench.jsonl", "w") as bench:
        for number, item in enumerate(items):
            bench.write(json.dumps({"id": f"item-{number}", "text": item}) + "\n")
    corpus_dir = folder / "corpus"
    corpus_dir.mkdir(exist_ok=True)
    plan = {"bytes_target": target, "exact": [], "near": [], "contaminated": [], "originals": {}}
    written, number, recent = 0, 0, []
    with open(corpus_dir / "corpus.jsonl", "w") as out:
        while written < target:
            kind = rng.random()
            if recent and kind < 0.01:
                source_id, text = recent[int(rng.integers(len(recent)))]
                identifier = f"exact-{number}"
                plan["exact"].append(identifier)
            elif recent and kind < 0.02:
                source_id, text = recent[int(rng.integers(len(recent)))]
                tokens = text.split()
                for position in rng.choice(len(tokens), size=2, replace=False):
                    tokens[position] = "zzchanged"
                text, identifier = " ".join(tokens), f"near-{number}"
                plan["near"].append(identifier)
            elif kind < 0.025:
                item = items[int(rng.integers(len(items)))].split()
                start = int(rng.integers(0, len(item) - 20))
                text = " ".join(words(150) + item[start:start + 20] + words(150))
                identifier, source_id = f"contaminated-{number}", None
                plan["contaminated"].append(identifier)
            else:
                text, identifier, source_id = " ".join(words(int(rng.integers(150, 450)))), f"doc-{number}", None
                recent.append((identifier, text))
                recent = recent[-2000:]
            if source_id:
                plan["originals"][identifier] = source_id
            line = json.dumps({"id": identifier, "text": text}) + "\n"
            out.write(line)
            written += len(line)
            number += 1
    plan["documents"], plan["bytes"] = number, (corpus_dir / "corpus.jsonl").stat().st_size
    plan_path.write_text(json.dumps(plan))
    return plan


# -- ours -------------------------------------------------------------------------------------

def read_corpus(folder: Path):
    import pyarrow.json as pajson

    return pajson.read_json(folder / "corpus" / "corpus.jsonl")


def ours_dedup(folder: Path) -> tuple[float, set[str]]:
    import numpy as np

    from tokenmill.trainer.curate import dedup
    from tokenmill.trainer.curate.text import split_words

    start = cpu_seconds()
    table = read_corpus(folder)
    texts, ids = table.column("text"), table.column("id").to_pylist()
    signatures, hashes = [], []
    for batch in texts.chunks:
        for offset in range(0, len(batch), 4096):
            chunk = batch.slice(offset, 4096)
            signature, _ = dedup.signatures(split_words(chunk), SHINGLE, PERMUTATIONS)
            signatures.append(signature)
            hashes.append(np.array([dedup.content_hash(t) for t in chunk.to_pylist()], dtype=np.uint64))
    hashes_all = np.concatenate(hashes)
    removed = {d.index for d in dedup.exact_duplicates(hashes_all)}
    matrix = np.concatenate(signatures)
    alive = np.array(sorted(set(range(len(ids))) - removed))
    removed |= {int(alive[d.index]) for d in dedup.near_duplicates(matrix[alive], BANDS, 0.8)}
    return cpu_seconds() - start, {ids[i] for i in removed}


def ours_decontamination(folder: Path) -> tuple[float, set[str]]:
    import numpy as np

    from tokenmill.trainer.curate import decontaminate as decon
    from tokenmill.trainer.curate.text import split_words

    start = cpu_seconds()
    items = [json.loads(line) for line in open(folder / "bench.jsonl")]
    index = decon.build_index([decon.BenchmarkItem("bench", i["id"], i["text"]) for i in items], LONG, SHORT)
    table = read_corpus(folder)
    ids = table.column("id").to_pylist()
    flagged, position = set(), 0
    thresholds = decon.Thresholds(0.2, 0.5)
    empty = np.zeros(0, np.uint64)
    for batch in table.column("text").chunks:
        for offset in range(0, len(batch), 4096):
            chunk = batch.slice(offset, 4096)
            found = decon.match(split_words(chunk), index)
            for local in np.flatnonzero([len(h) > 0 for h in found.long_hits] | (found.ratio > thresholds.info)):
                verdict, _ = decon.decide(found.long_hits[local], float(found.ratio[local]), int(found.item[local]),
                                          index, empty, thresholds)
                if verdict.startswith("contaminated"):
                    flagged.add(ids[position + int(local)])
            position += len(chunk)
    return cpu_seconds() - start, flagged


def ours_language_and_quality(folder: Path, documents: int = 5000) -> tuple[float, float, float]:
    import itertools

    from tokenmill.trainer.curate import quality, steps
    from tokenmill.trainer.curate.langid import load_identifier

    texts = [json.loads(line)["text"] for line in itertools.islice(open(folder / "corpus" / "corpus.jsonl"), documents)]
    identifier = load_identifier()
    start = cpu_seconds()
    steps.language(texts, identifier, ["en"], 0.5)
    language_rate = len(texts) / (cpu_seconds() - start)
    labels = [float(i % 2) for i in range(len(texts))]
    model = quality.train(texts[:2000], labels[:2000])
    start = cpu_seconds()
    model.score(texts)
    quality_rate = len(texts) / (cpu_seconds() - start)
    return language_rate, quality_rate, sum(len(t.encode()) for t in texts) / len(texts)


# -- datatrove (runs in its own virtualenv) ---------------------------------------------------

def peer_dedup(folder: Path) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    work = folder / "datatrove-minhash"
    config = MinhashConfig(n_grams=SHINGLE, num_buckets=BANDS, hashes_per_bucket=PERMUTATIONS // BANDS,
                           hash_config=HashConfig(precision=64))
    corpus = str(folder / "corpus")
    logs = str(work / "logs")
    start = cpu_seconds()
    LocalPipelineExecutor(pipeline=[JsonlReader(corpus), MinhashDedupSignature(str(work / "sigs"), config=config)],
                          tasks=1, workers=1, logging_dir=f"{logs}/1").run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)],
                          tasks=config.num_buckets, workers=1, logging_dir=f"{logs}/2").run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config)],
                          tasks=1, workers=1, logging_dir=f"{logs}/3").run()
    LocalPipelineExecutor(pipeline=[JsonlReader(corpus),
                                    MinhashDedupFilter(str(work / "remove"),
                                                       exclusion_writer=JsonlWriter(str(work / "removed")))],
                          tasks=1, workers=1, logging_dir=f"{logs}/4").run()
    seconds = cpu_seconds() - start
    return {"seconds": seconds, "removed": sorted(_ids(work / "removed"))}


def peer_decontamination(folder: Path) -> dict:
    import numpy as np
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig, NGramsDecontFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.text import ngrams, simplify_text

    work = folder / "datatrove-decont"
    index = work / "index"
    index.mkdir(parents=True, exist_ok=True)
    config = NGramsDecontConfig(n_grams=LONG)
    start = cpu_seconds()
    # the index as NGramsDecontIndexer.compute_hashes builds it from a label (the indexer itself
    # insists on lighteval, which only fetches tasks from the hub)
    probe = NGramsDecontFilter(str(index), config=config)
    hashes = set()
    for line in open(folder / "bench.jsonl"):
        tokens = probe.tokenizer.word_tokenize(simplify_text(json.loads(line)["text"], config.norm_config))
        hashes.update(probe.hash_func(" ".join(gram)) for gram in ngrams(tokens, config.n_grams))
    np.array(sorted(hashes), dtype=config.hash_config.np_descr).tofile(index / "bench.index.hashes")
    LocalPipelineExecutor(pipeline=[JsonlReader(str(folder / "corpus")),
                                    NGramsDecontFilter(str(index), config=config,
                                                       exclusion_writer=JsonlWriter(str(work / "removed")))],
                          tasks=1, workers=1, logging_dir=str(work / "logs")).run()
    seconds = cpu_seconds() - start
    return {"seconds": seconds, "removed": sorted(_ids(work / "removed"))}


def _ids(folder: Path) -> set[str]:
    found = set()
    for path in folder.rglob("*.jsonl*"):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as handle:
            found.update(json.loads(line)["id"] for line in handle if line.strip())
    return found


def run_peer(python: str, what: str, folder: Path) -> dict:
    import shutil

    shutil.rmtree(folder / f"datatrove-{'minhash' if what == 'dedup' else 'decont'}", ignore_errors=True)
    result = subprocess.run([python, "-P", os.path.abspath(__file__), "--peer", what, "--workdir", str(folder)],
                            capture_output=True, text=True, cwd="/", check=False)
    if result.returncode != 0:
        raise SystemExit(f"datatrove {what} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- report -----------------------------------------------------------------------------------

def detection(flagged: set[str], planted: list[str]) -> str:
    return f"{len(set(planted) & flagged)}/{len(planted)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=110.0)
    parser.add_argument("--workdir", default="/tmp/tokenmill-corpus-bench")
    parser.add_argument("--peer-python", default="/tmp/dt-venv/bin/python")
    parser.add_argument("--peer", choices=["dedup", "decont"], help=argparse.SUPPRESS)
    parser.add_argument("--skip-peer", action="store_true", help="only our figures")
    args = parser.parse_args()
    folder = Path(args.workdir)
    if args.peer:
        result = peer_dedup(folder) if args.peer == "dedup" else peer_decontamination(folder)
        print(json.dumps(result))
        return

    started = time.monotonic()
    plan = generate(folder, args.megabytes)
    megabytes = plan["bytes"] / 1e6
    print(f"corpus: {plan['documents']:,} documents, {megabytes:.1f} MB; planted {len(plan['exact'])} exact, "
          f"{len(plan['near'])} near duplicates, {len(plan['contaminated'])} contaminated "
          f"(generated in {time.monotonic() - started:.0f} s)", flush=True)
    originals = set(plan["originals"].values())

    seconds, removed = ours_dedup(folder)
    ours = {"dedup": (megabytes / seconds, removed)}
    print(f"ours  dedup: {megabytes / seconds:7.2f} MB/s per core; found exact {detection(removed, plan['exact'])}, "
          f"near {detection(removed, plan['near'])}; originals removed {len(removed & originals)}; "
          f"other removed {len(removed - set(plan['exact']) - set(plan['near']))}", flush=True)
    seconds, flagged = ours_decontamination(folder)
    ours["decont"] = (megabytes / seconds, flagged)
    print(f"ours  decontamination: {megabytes / seconds:7.2f} MB/s per core; found {detection(flagged, plan['contaminated'])}; "
          f"false positives {len(flagged - set(plan['contaminated']))}", flush=True)
    language_rate, quality_rate, document_bytes = ours_language_and_quality(folder)
    print(f"ours  language ID: {language_rate:,.0f} docs/s per core; quality classifier: {quality_rate:,.0f} docs/s "
          f"per core (documents of {document_bytes:,.0f} bytes)", flush=True)

    if not args.skip_peer:
        for what, label in (("dedup", "dedup"), ("decont", "decontamination")):
            peer = run_peer(args.peer_python, what, folder)
            rate, found = megabytes / peer["seconds"], set(peer["removed"])
            planted = plan["contaminated"] if what == "decont" else plan["exact"] + plan["near"]
            extra = len(found - set(planted))
            print(f"datatrove {label}: {rate:7.2f} MB/s per core; found {detection(found, planted)}; "
                  f"other removed {extra}", flush=True)
            ratio = ours[what][0] / rate
            verdict = "meets" if ratio >= TARGET else "misses"
            print(f"ratio {label}: {ratio:.1f}x datatrove per core ({verdict} the {TARGET:.0f}x target)", flush=True)

    # cores for 10T tokens (40 TB of text at 4 bytes per token) in 24 hours, every step on every byte
    total_bytes = 10e12 * BYTES_PER_TOKEN
    seconds_per_byte = (1 / (ours["dedup"][0] * 1e6) + 1 / (ours["decont"][0] * 1e6)
                        + 1 / (language_rate * document_bytes) + 1 / (quality_rate * document_bytes))
    core_hours = total_bytes * seconds_per_byte / 3600
    print(f"10T tokens ({total_bytes / 1e12:.0f} TB): {core_hours:,.0f} core-hours for dedup + decontamination + "
          f"language ID + quality, {core_hours / 24:,.0f} cores for a day")


if __name__ == "__main__":
    main()
