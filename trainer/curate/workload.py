"""The CorpusFilter workload: `python -m tokenmill.trainer corpus-filter --spec <uri>`.

The driver reads the run spec and checks every input before any work (`prepare`): the
inputs' shards, the benchmarks (an item too short for the n-gram test is an error), the
allow-list, the annotations (trained into the quality classifier, saved under
`<output>/quality/`) or a saved classifier, and the language model. Then the three phases of
`pipeline` run on Ray Data. A resumed attempt redoes neither analysed nor committed shards.
The last act, after both manifests and the funnel (also in the kept dataset's manifest) are
written, is the `succeeded` progress.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenmill.api.corpus import CorpusFilterSpec
from tokenmill.layout import dataset_uri, join
from tokenmill.store import (
    DOCUMENTS,
    AttemptFence,
    DatasetWriter,
    Producer,
    Progress,
    StoreError,
    open_store,
    read_run_spec_at,
    write_progress,
)
from tokenmill.trainer.curate import decontaminate as decon
from tokenmill.trainer.curate import pipeline, quality
from tokenmill.trainer.curate.inputs import InputError, Unit, plan_inputs, read_rows, read_unit
from tokenmill.trainer.curate.langid import LanguageModelError, load_identifier
from tokenmill.workloads import PHASE_SUCCEEDED

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class CurationInputError(ValueError):
    """Input the CorpusFilter cannot run on; raised before any document is processed."""


def _error(message: str) -> None:
    print(f"tokenmill corpus-filter: {message}", file=sys.stderr, flush=True)


def funnel_uri(output: str) -> str:
    return join(output, "_run", "funnel.json")


def quality_uri(output: str) -> str:
    return join(output, "quality")


@dataclass
class Prepared:
    job: pipeline.Job
    units: list[Unit]


def prepare(doc: dict[str, Any]) -> Prepared:
    """Check and load everything the run needs; CurationInputError names the bad input."""
    try:
        spec = CorpusFilterSpec.model_validate(doc["spec"])
    except Exception as error:  # pydantic's message lists every field
        raise CurationInputError(f"the run spec is not a valid CorpusFilter spec: {error}") from None
    output = str(doc["output"])
    metadata = doc.get("metadata") or {}
    producer = Producer(kind="CorpusFilter", name=str(metadata.get("name") or ""), uid=str(metadata.get("uid") or ""),
                        generation=int(metadata.get("generation") or 0), attempt=int(doc.get("attempt") or 0))
    try:
        units = plan_inputs([(source.name, str(source.uri)) for source in spec.inputs])
        index, allow = _benchmarks(spec)
    except (InputError, decon.BenchmarkError) as error:
        raise CurationInputError(str(error)) from None
    try:
        load_identifier(spec.languages.model.uri if spec.languages.model else None)
    except LanguageModelError as error:
        raise CurationInputError(f"spec.languages.model: {error}") from None
    job = pipeline.Job(spec=spec, output=output, work=pipeline.work_uri(output, pipeline.fingerprint(doc)),
                       producer=producer, index=index, allow=allow, fence=AttemptFence.from_run_spec(doc))
    if spec.quality is not None:
        job.quality_uri = _quality_classifier(spec, output, units)
    return Prepared(job, units)


def _benchmarks(spec: CorpusFilterSpec) -> tuple[decon.BenchmarkIndex | None, np.ndarray | None]:
    settings = spec.decontamination
    if settings is None:
        return None, None
    items = []
    for benchmark in settings.benchmarks:
        for number, row in enumerate(read_rows(benchmark.name, str(benchmark.uri), "benchmark")):
            items.append(decon.BenchmarkItem(benchmark.name, str(row.get("id") or number), row["text"]))
    index = decon.build_index(items, settings.ngram, settings.info_ngram)
    allow = np.zeros(0, np.uint64)
    if settings.allow_list is not None:
        uri = str(settings.allow_list.uri)
        rows = read_rows("allowList", uri, "spec.decontamination")
        allow = decon.allow_list_hashes([row["text"] for row in rows], settings.ngram, uri)
    return index, allow


def _quality_classifier(spec: CorpusFilterSpec, output: str, units: list[Unit]) -> str:
    settings = spec.quality
    assert settings is not None
    if settings.classifier:
        try:
            quality.load(str(settings.classifier))
        except (StoreError, quality.AnnotationError, ValueError, KeyError) as error:
            raise CurationInputError(f"spec.quality.classifier: cannot load {settings.classifier}: {error}") from None
        return str(settings.classifier)
    if settings.annotate is not None:
        if settings.non_stem.enabled:
            raise CurationInputError("spec.quality.nonStem: the annotator's labels carry no topics, so the non-STEM "
                                     "pass cannot be trained; set nonStem.enabled: false or give labelled annotations")
        where = f"spec.quality.annotate (prompt {settings.annotate.prompt})"
        texts, labels = _annotate(settings.annotate, units, output)
        topics = None
    else:
        assert settings.annotations is not None
        where = f"spec.quality.annotations ({settings.annotations.uri})"
        try:
            rows = read_rows("annotations", str(settings.annotations.uri), "spec.quality")
            texts, labels, topics = quality.labelled_rows(rows, where)
        except (InputError, quality.AnnotationError) as error:
            raise CurationInputError(str(error)) from None
    try:
        model = quality.train(texts, labels, topics, where=where)
    except quality.AnnotationError as error:
        raise CurationInputError(str(error)) from None
    if settings.non_stem.enabled and not set(settings.non_stem.topics) & set(model.topics):
        raise CurationInputError(
            f"{where}: no annotation has a topic among nonStem.topics "
            f"{list(settings.non_stem.topics)}, so the non-STEM pass cannot be trained (found {model.topics or 'none'})")
    return quality.save(model, quality_uri(output))


def _annotate(settings: Any, units: list[Unit], output: str) -> tuple[list[str], list[float]]:
    """Score an even sample of the inputs with the generator; (texts, labels)."""
    from tokenmill.trainer.curate import annotate, steps
    from tokenmill.trainer.generate import GenerationError, engine_from_generator, sampling_from_spec

    per_unit = -(-settings.sample_documents // len(units))
    sample: list[str] = []
    for unit in units:
        table, malformed = read_unit(unit)
        texts = steps.normalise_documents(table.column("text").combine_chunks().cast("string")).to_pylist()
        sample += [text for text, why in zip(texts, malformed) if not why and text][:per_unit]
    sample = sample[:settings.sample_documents]
    try:
        engine = engine_from_generator(settings.generator, output=output, field="spec.quality.annotate.generator")
        try:
            found = annotate.annotate(sample, engine, sampling_from_spec(settings.generator.sampling),
                                      settings.prompt)
        finally:
            engine.close()
    except (GenerationError, annotate.AnnotatorError) as error:
        raise CurationInputError(f"spec.quality.annotate: {error}") from None
    print(f"tokenmill corpus-filter: annotated {found.asked} documents with prompt {settings.prompt}; "
          f"{found.unusable} replies without both scores", flush=True)
    return found.texts, found.labels


def run(spec_uri: str) -> int:
    try:
        doc = read_run_spec_at(spec_uri)
    except StoreError as error:
        _error(f"cannot read the run spec {spec_uri}: {error}")
        return EXIT_BAD_INPUT
    started = time.monotonic()
    try:
        prepared = prepare(doc)
    except CurationInputError as error:
        _error(f"{error}; nothing was processed")
        return EXIT_BAD_INPUT
    job, units = prepared.job, prepared.units
    print(f"tokenmill corpus-filter: {len(units)} input shards, writing {dataset_uri(job.output)}", flush=True)
    try:
        funnel = execute(job, units)
    except InputError as error:
        _error(str(error))
        write_progress(job.output, Progress(phase="failed", message=str(error)[:500]))
        return EXIT_BAD_INPUT
    except Exception as error:  # a lost worker or store: the next attempt resumes
        _error(f"curation failed: {error}")
        write_progress(job.output, Progress(phase="failed", message=str(error)[:500]))
        return EXIT_FAILED
    seconds = time.monotonic() - started
    kept = funnel["kept"]
    total = sum(row["documents"] for row in funnel["documents"] if row["step"] == "input")
    write_progress(job.output, Progress(
        phase=PHASE_SUCCEEDED, done=len(units), total=len(units), unit="shards",
        message=f"kept {kept:,} of {total:,} documents in {seconds:.0f} s; dataset at {dataset_uri(job.output)}",
        metrics=progress_metrics(funnel)))
    return 0


def progress_metrics(funnel: dict[str, Any]) -> dict[str, float]:
    """The funnel as flat figures for the progress record (and so for the metrics endpoint)."""
    out: dict[str, float] = {"bytes_in": float(funnel["bytesIn"]), "bytes_out": float(funnel["bytesOut"]),
                             "documents_kept": float(funnel["kept"])}
    for row in funnel["documents"]:
        out[f"documents|{row['step']}|{row['verdict']}|{row['reason']}"] = float(row["documents"])
    for language, count in funnel["languages"].items():
        out[f"language|{language}"] = float(count)
    histogram = funnel["qualityHistogram"]
    for upper, count in zip(histogram["bins"][1:], histogram["documents"]):
        out[f"quality_bin|{upper}"] = float(count)
    for name, value in funnel["classifier"].items():
        out[f"classifier|{name}"] = float(value)
    return out


def execute(job: pipeline.Job, units: list[Unit]) -> dict[str, Any]:
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    total = len(units)
    write_progress(job.output, Progress(phase="analysing", done=0, total=total, unit="shards"))
    for done, _ in enumerate(pipeline.ray_map(units, _analyse_task, job), start=1):
        write_progress(job.output, Progress(phase="analysing", done=done, total=total, unit="shards"))

    analyses = [pipeline.read_analysis(job, unit) for unit in units]
    decisions, funnel = pipeline.decide(job, analyses)
    offsets = np.cumsum([0] + [table.num_rows for table in analyses])
    pipeline.write_decisions(job, units, offsets, decisions)
    if job.quality_uri:
        card = open_store(job.quality_uri).read_json(quality.CARD_NAME)
        funnel.classifier.update({k: float(v) for k, v in (card.get("metrics") or {}).items()})

    kept_writer = DatasetWriter(dataset_uri(job.output), DOCUMENTS, producer=job.producer, fence=job.fence)
    dropped_writer = DatasetWriter(pipeline.dropped_uri(job.output), DOCUMENTS, producer=job.producer,
                                   fence=job.fence)
    committed = set(kept_writer.resume())
    committed_dropped = set(dropped_writer.resume()) if job.spec.keep_dropped else None
    work = open_store(job.work)
    written: dict[int, dict[str, int]] = {}
    for unit in units:
        name = f"part-{unit.number:06d}"
        if name in committed and (committed_dropped is None or name in committed_dropped) \
                and work.exists(pipeline.written_key(unit)):
            written[unit.number] = work.read_json(pipeline.written_key(unit))
    pending = [unit for unit in units if unit.number not in written]
    if written:
        print(f"tokenmill corpus-filter: resuming; {len(written)} of {total} shards already written", flush=True)
    write_progress(job.output, Progress(phase="writing", done=len(written), total=total, unit="shards"))
    for result in pipeline.ray_map(pending, _write_task, job):
        written[result["unit"]] = result
        write_progress(job.output, Progress(phase="writing", done=len(written), total=total, unit="shards"))

    expected = [unit.number for unit in units]
    if job.spec.keep_dropped:
        dropped_writer.finalize(expected=expected)
    funnel.bytes_out = sum(result["bytes"] for result in written.values())
    report = funnel.to_dict()
    open_store(job.output).write_json("_run/funnel.json", report)
    kept_writer.finalize(expected=expected, stats=report)  # last: the dataset becomes visible
    return report


def _analyse_task(unit: Unit, job: pipeline.Job) -> dict[str, Any]:
    pipeline.analyse_unit(unit, job)
    return {"unit": unit.number}


def _write_task(unit: Unit, job: pipeline.Job) -> dict[str, Any]:
    return {"unit": unit.number, **pipeline.write_unit(unit, job)}


