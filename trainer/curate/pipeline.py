"""The CorpusFilter pipeline on Ray Data: analyse every shard, decide globally, write every shard.

1. **Analyse** (one Ray Data task per input shard): malformed rows, normalisation, outliers,
   language; for the survivors the quality score and topic, the content hash, the MinHash
   signature and the benchmark n-grams they share. Written to `<work>/analysis/` (no text).
2. **Decide** (the driver, over the analyses): quality cut (keepFraction is a global rank)
   and the non-STEM pass, exact then near duplicates across all shards, decontamination
   with the allow-list (which needs every document's benchmark 13-grams). Per shard
   decisions go to `<work>/decisions/`; the funnel to `<output>/_run/funnel.json`.
3. **Write** (one task per input shard): kept documents to `<output>/data/` and, with
   `keepDropped`, dropped ones to `<output>/dropped/` with step, reason and evidence; each
   shard committed on its own, manifests last.

`<work>` is `<output>/_work/<fingerprint>/`: the fingerprint covers the spec and the
resource's uid and generation, so a resumed attempt reuses analyses and committed shards
of the same spec and never those of another.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokenmill.api.corpus import CorpusFilterSpec
from tokenmill.layout import dataset_uri, join
from tokenmill.store import DOCUMENTS, AttemptFence, DatasetWriter, Producer, open_store
from tokenmill.trainer.curate import decontaminate as decon
from tokenmill.trainer.curate import dedup, quality, steps
from tokenmill.trainer.curate.inputs import Unit, read_unit
from tokenmill.trainer.curate.langid import load_identifier
from tokenmill.trainer.curate.text import split_words

STEPS = ("input", "outliers", "language", "quality", "exact-dedup", "near-dedup", "decontamination")
KEPT = "kept"
DROPPED = "dropped"
QUALITY_BINS = 10


def dropped_uri(output: str) -> str:
    return join(output, "dropped")


def work_uri(output: str, fingerprint: str) -> str:
    return join(output, "_work", fingerprint)


def fingerprint(doc: dict[str, Any]) -> str:
    metadata = doc.get("metadata") or {}
    basis = {"spec": doc.get("spec"), "uid": metadata.get("uid"), "generation": metadata.get("generation")}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Job:
    """Everything a task needs; pickled into each Ray Data task."""

    spec: CorpusFilterSpec
    output: str
    work: str
    producer: Producer
    index: decon.BenchmarkIndex | None = None
    allow: np.ndarray | None = None
    """Hashes of the allow-list dataset's n-grams."""
    quality_uri: str | None = None
    fence: AttemptFence | None = None
    """The attempt this run spec starts: a stale attempt commits and deletes nothing."""

    @property
    def spec_wire(self) -> dict[str, Any]:
        return self.spec.to_wire()


# -- 1. analyse ---------------------------------------------------------------------------

ANALYSIS_SCHEMA = pa.schema([
    ("row", pa.int64()), ("id", pa.string()), ("step", pa.string()), ("reason", pa.string()), ("evidence", pa.string()),
    ("bytes", pa.int64()), ("lang", pa.string()), ("lang_score", pa.float64()),
    ("quality", pa.float64()), ("topic", pa.string()), ("content_hash", pa.uint64()),
    ("signature", pa.list_(pa.uint32())), ("long_hits", pa.list_(pa.uint64())),
    ("ratio", pa.float64()), ("item", pa.int64()),
])


@lru_cache(maxsize=2)
def _quality_model(uri: str) -> quality.QualityModel:
    return quality.load(uri)


def analyse(texts: pa.Array, malformed: Sequence[str], job: Job, ids: Sequence[str] | None = None) -> pa.Table:
    """The per-document analysis of one batch (pure apart from loading the models)."""
    spec = job.spec
    count = len(texts)
    step = np.array([None] * count, dtype=object)
    reason = np.array([None] * count, dtype=object)
    evidence = np.array([None] * count, dtype=object)
    raw_bytes = np.asarray(pc.binary_length(texts.cast(pa.string())).fill_null(0), dtype=np.int64)

    def apply(verdicts: steps.Verdicts, positions: np.ndarray) -> np.ndarray:
        for local in np.flatnonzero(verdicts.dropped):
            where = positions[local]
            step[where], reason[where] = verdicts.step, verdicts.reasons[local]
            found = verdicts.evidence[local]
            evidence[where] = json.dumps(found) if found else None
        return positions[~verdicts.dropped]

    for index, why in enumerate(malformed):
        if why:
            step[index], reason[index] = "input", why
    alive = np.flatnonzero(step == None)  # noqa: E711 (object array)
    normalised = steps.normalise_documents(texts.cast(pa.string()), spec.extraction)
    alive = apply(steps.outliers(normalised.take(pa.array(alive, pa.int64())), spec.outliers), alive)

    lang = np.array([None] * count, dtype=object)
    lang_score = np.full(count, np.nan)
    if len(alive):
        identifier = load_identifier(_language_model_uri(spec))
        subset = normalised.take(pa.array(alive, pa.int64())).to_pylist()
        verdicts = steps.language(subset, identifier, spec.languages.languages, spec.languages.threshold)
        lang[alive] = verdicts.recorded["lang"]
        lang_score[alive] = verdicts.recorded["lang_score"]
        alive = apply(verdicts, alive)

    scores = np.full(count, np.nan)
    topics = np.array([None] * count, dtype=object)
    survivors = normalised.take(pa.array(alive, pa.int64()))
    survivor_texts = survivors.to_pylist()
    if job.quality_uri and len(alive):
        model = _quality_model(job.quality_uri)
        scores[alive] = model.score(survivor_texts)
        topics[alive] = model.topic(survivor_texts)

    hashes = np.zeros(count, np.uint64)
    hashes[alive] = [dedup.content_hash(t) for t in survivor_texts]
    signature = [None] * count
    long_hits: list[list[int]] = [[] for _ in range(count)]
    ratio = np.zeros(count)
    item = np.full(count, -1, np.int64)
    if len(alive):
        words = split_words(survivors)
        if spec.dedup.enabled:
            signatures, has = dedup.signatures(words, spec.dedup.ngram, spec.dedup.num_permutations)
            for local, where in enumerate(alive):
                if has[local]:
                    signature[where] = signatures[local]
        if job.index is not None:
            found = decon.match(words, job.index)
            for local, where in enumerate(alive):
                long_hits[where] = found.long_hits[local]
            ratio[alive], item[alive] = found.ratio, found.item
    return pa.table({
        "row": pa.array(np.arange(count), pa.int64()),
        "id": pa.array(list(ids) if ids is not None else [str(i) for i in range(count)], pa.string()),
        "step": pa.array(step.tolist(), pa.string()), "reason": pa.array(reason.tolist(), pa.string()),
        "evidence": pa.array(evidence.tolist(), pa.string()), "bytes": pa.array(raw_bytes),
        "lang": pa.array(lang.tolist(), pa.string()), "lang_score": pa.array(lang_score, pa.float64()),
        "quality": pa.array(scores, pa.float64()), "topic": pa.array(topics.tolist(), pa.string()),
        "content_hash": pa.array(hashes, pa.uint64()),
        "signature": pa.array([None if s is None else s.tolist() for s in signature], pa.list_(pa.uint32())),
        "long_hits": pa.array([np.asarray(h, np.uint64).tolist() for h in long_hits], pa.list_(pa.uint64())),
        "ratio": pa.array(ratio), "item": pa.array(item),
    }, schema=ANALYSIS_SCHEMA)


def _language_model_uri(spec: CorpusFilterSpec) -> str | None:
    return spec.languages.model.uri if spec.languages.model is not None else None


def analysis_key(unit: Unit) -> str:
    return f"analysis/part-{unit.number:06d}.parquet"


def analyse_unit(unit: Unit, job: Job) -> None:
    """Analyse one input shard into `<work>/analysis/`, unless an earlier attempt already did."""
    work = open_store(job.work)
    if work.exists(analysis_key(unit)):
        return
    table, malformed = read_unit(unit)
    result = analyse(table.column("text").combine_chunks(), malformed, job, table.column("id").to_pylist())
    sink = pa.BufferOutputStream()
    pq.write_table(result, sink, compression="zstd")
    work.write_bytes(analysis_key(unit), sink.getvalue().to_pybytes())


def read_analysis(job: Job, unit: Unit) -> pa.Table:
    data = open_store(job.work).read_bytes(analysis_key(unit))
    return pq.read_table(pa.BufferReader(data))


# -- 2. decide ------------------------------------------------------------------------------

@dataclass
class Funnel:
    """Documents per (step, verdict, reason), bytes in and out, languages, quality scores."""

    counts: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    languages: Counter = field(default_factory=Counter)
    quality_histogram: list[int] = field(default_factory=lambda: [0] * QUALITY_BINS)
    classifier: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        rows = [{"step": s, "verdict": v, "reason": r, "documents": n}
                for (s, v, r), n in sorted(self.counts.items(), key=lambda kv: (STEPS.index(kv[0][0]), kv[0]))]
        return {"documents": rows, "bytesIn": self.bytes_in, "bytesOut": self.bytes_out,
                "languages": dict(sorted(self.languages.items())),
                "qualityHistogram": {"bins": [round(i / QUALITY_BINS, 2) for i in range(QUALITY_BINS + 1)],
                                     "documents": self.quality_histogram},
                "classifier": self.classifier,
                "kept": sum(n for (s, v, r), n in self.counts.items() if s == STEPS[-1] and v == KEPT)}


@dataclass
class Decisions:
    """Per document of all shards, in input order."""

    step: np.ndarray
    reason: np.ndarray
    evidence: np.ndarray
    partial: np.ndarray


def decide(job: Job, analyses: Sequence[pa.Table]) -> tuple[Decisions, Funnel]:
    """The global steps over every shard's analysis, in input order."""
    spec = job.spec
    table = pa.concat_tables(analyses) if analyses else ANALYSIS_SCHEMA.empty_table()
    total = table.num_rows
    names = table.column("id").to_pylist()

    def ids(where: int) -> str:
        return names[where]

    step = np.array(table.column("step").to_pylist(), dtype=object)
    reason = np.array(table.column("reason").to_pylist(), dtype=object)
    evidence = np.array(table.column("evidence").to_pylist(), dtype=object)
    partial = np.array([None] * total, dtype=object)
    funnel = Funnel(bytes_in=int(pc.sum(table.column("bytes")).as_py() or 0))

    def alive() -> np.ndarray:
        return np.flatnonzero(step == None)  # noqa: E711 (object array)

    def drop(where: int, name: str, why: str, found: dict[str, Any] | None) -> None:
        step[where], reason[where] = name, why
        evidence[where] = json.dumps(found) if found else None

    # quality and the non-STEM pass
    if spec.quality is not None:
        survivors = alive()
        scores = np.asarray(table.column("quality").to_numpy(zero_copy_only=False), dtype=np.float64)
        topics = np.array(table.column("topic").to_pylist(), dtype=object)
        for value in scores[survivors]:
            funnel.quality_histogram[min(int(value * QUALITY_BINS), QUALITY_BINS - 1)] += 1
        keep = _quality_keep(scores[survivors], topics[survivors], spec)
        cutoff = float(np.min(scores[survivors][keep])) if keep.any() else 1.0
        for where, kept in zip(survivors, keep):
            if not kept:
                drop(int(where), "quality", "low-quality", {"score": round(float(scores[where]), 4),
                                                            "cutoff": round(cutoff, 4)})

    # exact, then near duplicates, across all shards
    if spec.dedup.enabled:
        survivors = alive()
        hashes = table.column("content_hash").to_numpy()[survivors]
        for duplicate in dedup.exact_duplicates(hashes):
            drop(int(survivors[duplicate.index]), "exact-dedup", "exact-duplicate",
                 {"duplicateOf": ids(int(survivors[duplicate.kept]))})
        survivors = alive()
        signature_column = table.column("signature").take(pa.array(survivors, pa.int64()))
        with_signature = np.flatnonzero(np.asarray(signature_column.is_valid()))
        if len(with_signature) > 1:
            flat = signature_column.take(pa.array(with_signature)).combine_chunks().flatten()
            matrix = np.asarray(flat.to_numpy(), dtype=np.uint32).reshape(len(with_signature), -1)
            members = survivors[with_signature]
            for duplicate in dedup.near_duplicates(matrix, spec.dedup.bands, spec.dedup.jaccard_threshold):
                drop(int(members[duplicate.index]), "near-dedup", "near-duplicate",
                     {"duplicateOf": ids(int(members[duplicate.kept])), "similarity": duplicate.similarity})

    # decontamination with the allow-list
    if job.index is not None and spec.decontamination is not None:
        settings = spec.decontamination
        survivors = alive()
        hits = table.column("long_hits")
        all_hits = [np.asarray(h, np.uint64) for h in hits.to_pylist()]
        allowed = job.allow if job.allow is not None else np.zeros(0, np.uint64)
        min_documents = settings.allow_list_min_documents
        if min_documents:
            considered = [all_hits[i] for i in np.flatnonzero(np.array(table.column("reason").is_null()))]
            allowed = np.union1d(allowed, decon.common_ngrams(considered, min_documents))
        funnel.classifier["allowListedNgrams"] = float(len(allowed))
        ratio = table.column("ratio").to_numpy()
        item = table.column("item").to_numpy()
        thresholds = decon.Thresholds(settings.info_threshold, settings.contaminated_threshold)
        for where in survivors:
            verdict, found = decon.decide(all_hits[where], float(ratio[where]), int(item[where]), job.index,
                                          allowed, thresholds)
            if verdict.startswith("contaminated"):
                drop(int(where), "decontamination", verdict, found)
            elif verdict == "partial":
                partial[where] = json.dumps(found)

    # the funnel: every document counted once, at the step that dropped it; kept ones pass every step
    order = {name: position for position, name in enumerate(STEPS)}
    dropped_at = np.array([len(STEPS) if s is None else order[s] for s in step], dtype=np.int64)
    kept = dropped_at == len(STEPS)
    kept_partial = kept & (partial != None)  # noqa: E711 (object array)
    for position, name in enumerate(STEPS):
        for why, n in Counter(reason[dropped_at == position].tolist()).items():
            funnel.counts[(name, DROPPED, str(why))] = int(n)
        if name == "decontamination":
            funnel.counts[(name, KEPT, "partial")] = int(kept_partial.sum())
            funnel.counts[(name, KEPT, "clean")] = int(kept.sum() - kept_partial.sum())
        else:
            funnel.counts[(name, KEPT, "passed")] = int((dropped_at > position).sum())
    lang = table.column("lang").to_pylist()
    for where in np.flatnonzero(kept):
        funnel.languages[lang[where] or "und"] += 1
    return Decisions(step, reason, evidence, partial), funnel


def _quality_keep(scores: np.ndarray, topics: np.ndarray, spec: CorpusFilterSpec) -> np.ndarray:
    """Which documents the quality step keeps, the non-STEM pass included."""
    settings = spec.quality
    assert settings is not None
    count = len(scores)
    if settings.threshold is not None:
        keep = scores >= settings.threshold
    else:
        wanted = math.ceil(settings.keep_fraction * count)
        order = np.argsort(-scores, kind="stable")
        keep = np.zeros(count, bool)
        keep[order[:wanted]] = True
    non_stem = settings.non_stem
    if non_stem.enabled:
        on_topic = np.flatnonzero(np.isin(topics.astype(str), list(non_stem.topics)))
        wanted = math.ceil(non_stem.keep_fraction * len(on_topic))
        already = int(keep[on_topic].sum())
        if already < wanted:
            candidates = on_topic[~keep[on_topic]]
            best = candidates[np.argsort(-scores[candidates], kind="stable")][:wanted - already]
            keep[best] = True
    return keep


def write_decisions(job: Job, units: Sequence[Unit], offsets: Sequence[int], decisions: Decisions) -> None:
    work = open_store(job.work)
    for unit, start, end in zip(units, offsets[:-1], offsets[1:]):
        table = pa.table({
            "step": pa.array(decisions.step[start:end].tolist(), pa.string()),
            "reason": pa.array(decisions.reason[start:end].tolist(), pa.string()),
            "evidence": pa.array(decisions.evidence[start:end].tolist(), pa.string()),
            "partial": pa.array(decisions.partial[start:end].tolist(), pa.string()),
        })
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        work.write_bytes(f"decisions/part-{unit.number:06d}.parquet", sink.getvalue().to_pybytes())


# -- 3. write -------------------------------------------------------------------------------

def write_unit(unit: Unit, job: Job) -> dict[str, int]:
    """Write one shard's kept (and dropped) documents; returns rows and bytes written."""
    kept_writer = DatasetWriter(dataset_uri(job.output), DOCUMENTS, producer=job.producer, fence=job.fence)
    dropped_writer = DatasetWriter(dropped_uri(job.output), DOCUMENTS, producer=job.producer, fence=job.fence) \
        if job.spec.keep_dropped else None
    work = open_store(job.work)
    decisions = pq.read_table(pa.BufferReader(work.read_bytes(f"decisions/part-{unit.number:06d}.parquet")))
    analysis = read_analysis(job, unit)
    table, _ = read_unit(unit)
    normalised = steps.normalise_documents(table.column("text").combine_chunks().cast(pa.string()),
                                           job.spec.extraction).to_pylist()
    rows = table.to_pylist()
    step = decisions.column("step").to_pylist()
    reason = decisions.column("reason").to_pylist()
    evidence = decisions.column("evidence").to_pylist()
    partial = decisions.column("partial").to_pylist()
    lang = analysis.column("lang").to_pylist()
    lang_score = analysis.column("lang_score").to_pylist()
    scores = analysis.column("quality").to_pylist()
    kept, dropped = [], []
    for number, row in enumerate(rows):
        meta = _meta(row.get("meta"))
        if step[number] is None:
            meta["langScore"] = round(lang_score[number], 4)
            if scores[number] is not None and not math.isnan(scores[number]):
                meta["quality"] = round(scores[number], 4)
            if partial[number]:
                meta["decontamination"] = {"verdict": "partial", **json.loads(partial[number])}
            kept.append({"id": row["id"], "text": normalised[number], "source": row["source"],
                         "lang": lang[number], "meta": json.dumps(meta, ensure_ascii=False)})
        elif dropped_writer is not None:
            meta["dropped"] = {"step": step[number], "reason": reason[number],
                               "evidence": json.loads(evidence[number]) if evidence[number] else None}
            dropped.append({"id": row["id"], "text": row["text"] or "", "source": row["source"],
                            "lang": lang[number] or row.get("lang"), "meta": json.dumps(meta, ensure_ascii=False)})
    if dropped_writer is not None:
        dropped_writer.write_shard(unit.number, pa.Table.from_pylist(dropped, schema=DOCUMENTS.arrow))
    info = kept_writer.write_shard(unit.number, pa.Table.from_pylist(kept, schema=DOCUMENTS.arrow))
    result = {"rows": info.rows, "bytes": sum(len(r["text"].encode("utf-8")) for r in kept)}
    work.write_json(written_key(unit), result)  # last: the shard is done
    return result


def written_key(unit: Unit) -> str:
    return f"written/part-{unit.number:06d}.json"


def _meta(value: Any) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError:
        return {"original": value}
    return parsed if isinstance(parsed, dict) else {"original": parsed}


def ray_map(units: Sequence[Unit], task: Callable[[Unit, Job], Any], job: Job) -> Iterator[Any]:
    """Run `task` once per unit on Ray Data (one block per unit); yields results as they finish."""
    import ray.data

    def apply(batch: dict[str, Any]) -> dict[str, Any]:
        results = [task(Unit.from_dict(json.loads(item)), job) for item in batch["unit"]]
        return {"unit": batch["unit"], "result": [json.dumps(r) for r in results]}

    dataset = ray.data.from_items([{"unit": json.dumps(u.to_dict())} for u in units],
                                  override_num_blocks=max(len(units), 1))
    mapped = dataset.map_batches(apply, batch_size=1, batch_format="numpy")
    for row in mapped.iter_rows():
        yield json.loads(row["result"])
