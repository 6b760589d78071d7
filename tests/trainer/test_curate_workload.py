"""The CorpusFilter workload end to end: on Ray against the S3 server, bad input, and a resume after a kill."""

from __future__ import annotations

import json
import signal
from pathlib import PurePosixPath

import pytest

from tests.fixtures.processes import kill_when, run_to_end, start_in_session, workload_command
from tests.trainer import curate_corpus
from tokenmill.outputs import check_outputs
from tokenmill.store import (
    AttemptFence,
    ManifestNotFoundError,
    StaleAttemptError,
    open_dataset,
    open_store,
    read_manifest,
    read_progress,
    read_run_spec_at,
    write_run_spec,
)
from tokenmill.trainer.curate import workload
from tokenmill.trainer.curate.pipeline import dropped_uri
from tokenmill.workloads import PHASE_SUCCEEDED


def write_spec(output: str, spec: dict, attempt: int = 1) -> str:
    return write_run_spec(output, {"kind": "CorpusFilter", "attempt": attempt, "output": output, "spec": spec,
                                   "metadata": {"name": "web", "namespace": "default", "uid": "uid-1", "generation": 1}})


def kept_ids(output: str) -> list[str]:
    return open_dataset(f"{output}/data").read_all(columns=["id"]).column("id").to_pylist()


def check_output(output: str, corpus: curate_corpus.Corpus) -> None:
    ids = kept_ids(output)
    assert len(ids) == len(set(ids)), "a document was written twice"
    assert set(ids) == corpus.kept
    dropped = {row["id"]: json.loads(row["meta"])["dropped"] for row in open_dataset(dropped_uri(output)).read_all().to_pylist()}
    for identifier, (step, reason) in corpus.dropped.items():
        assert (dropped[identifier]["step"], dropped[identifier]["reason"]) == (step, reason), identifier
    malformed = [d for d in dropped.values() if d["step"] == "input"]
    assert [d["reason"] for d in malformed] == ["invalid-json"] * corpus.malformed_lines


@pytest.fixture
def ray_with_s3_environment(s3_bucket):
    """A Ray started after the bucket's endpoint and credentials are in the environment, so workers inherit them."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    yield s3_bucket
    ray.shutdown()


@pytest.mark.slow
def test_the_whole_pipeline_on_ray_against_s3(ray_with_s3_environment):
    bucket = ray_with_s3_environment
    corpus = curate_corpus.build()
    uris = curate_corpus.write(corpus, f"{bucket.uri}/inputs")
    output = f"{bucket.uri}/runs/web"
    assert workload.run(write_spec(output, curate_corpus.spec(uris))) == 0

    check_output(output, corpus)
    kept = {row["id"]: row for row in open_dataset(f"{output}/data").read_all().to_pylist()}
    meta = json.loads(kept["partial"]["meta"])
    assert meta["decontamination"]["verdict"] == "partial"
    assert meta["decontamination"]["item"] == "farmer-sheep" and 0.2 < meta["decontamination"]["ratio"] < 0.5
    assert all(row["lang"] == "en" and "langScore" in json.loads(row["meta"]) for row in kept.values())
    assert json.loads(kept["jsonl-0"]["meta"])["n"] == 0  # the input's own meta is kept
    dropped = {row["id"]: json.loads(row["meta"])["dropped"] for row in open_dataset(dropped_uri(output)).read_all().to_pylist()}
    ngram = dropped["contaminated-13"]["evidence"]["ngram"]
    assert ngram in curate_corpus.BENCHMARK_ITEM and len(ngram.split()) == 13
    assert dropped["contaminated-13"]["evidence"]["item"] == "farmer-sheep"
    assert dropped["near-3"]["evidence"]["duplicateOf"] == "doc-003"
    assert dropped["exact-1"]["evidence"] == {"duplicateOf": "doc-001"}

    funnel = open_store(output).read_json("_run/funnel.json")
    counts = {(row["step"], row["verdict"], row["reason"]): row["documents"] for row in funnel["documents"]}
    assert counts[("decontamination", "kept", "partial")] == 1
    assert counts[("near-dedup", "dropped", "near-duplicate")] == 2
    assert funnel["kept"] == len(corpus.kept) == read_manifest(f"{output}/data").summary.rows
    assert funnel["classifier"]["heldOutAccuracy"] > 0.9 and "heldOutF1" in funnel["classifier"]
    assert funnel["languages"] == {"en": len(corpus.kept)}
    assert 0 < funnel["bytesOut"] < funnel["bytesIn"]
    assert read_manifest(f"{output}/data").stats == funnel  # the funnel travels with the dataset
    outputs = check_outputs("CorpusFilter", output).summary
    assert outputs is not None
    assert outputs.stats == {"kept": funnel["kept"], "bytesIn": funnel["bytesIn"], "bytesOut": funnel["bytesOut"]}
    progress = read_progress(output)
    assert progress.phase == PHASE_SUCCEEDED
    assert progress.metrics["documents|outliers|dropped|non-text"] == 1
    assert open_store(f"{output}/quality").exists("classifier.npz")


@pytest.mark.slow
def test_bad_input_fails_before_any_work(ray_cluster, tmp_path, capfd):
    corpus = curate_corpus.build(documents=5)
    uris = curate_corpus.write(corpus, (tmp_path / "inputs").as_uri())
    short = (tmp_path / "short-bench").as_uri()
    from tokenmill.store import DOCUMENTS, DatasetWriter

    writer = DatasetWriter(short, DOCUMENTS)
    writer.write_shard(0, [{"id": "tiny-item", "text": "three words only"}])
    writer.finalize()
    cases = {
        "benchmark 'riddles': ": {"decontamination": {"benchmarks": [{"name": "riddles", "uri": (tmp_path / "nope").as_uri()}]}},
        "'short' item 'tiny-item' has 3 words": {"decontamination": {"benchmarks": [{"name": "short", "uri": short}]}},
        "no numeric label": {"quality": {"annotations": {"uri": uris["web"]}, "threshold": 0.5}},
        "input 'gone'": {"inputs": [{"name": "gone", "uri": (tmp_path / "missing").as_uri()}]},
    }
    for expected, override in cases.items():
        output = (tmp_path / "out").as_uri()
        assert workload.run(write_spec(output, curate_corpus.spec(uris, **override))) == workload.EXIT_BAD_INPUT
        err = capfd.readouterr().err
        assert expected in err and "nothing was processed" in err and "Traceback" not in err
        with pytest.raises(ManifestNotFoundError):
            read_manifest(f"{output}/data")


@pytest.mark.slow
def test_a_run_killed_mid_write_resumes_without_losing_or_duplicating_documents(tmp_path):
    corpus = curate_corpus.build()
    uris = curate_corpus.write(corpus, (tmp_path / "inputs").as_uri(), shards=6)
    output = (tmp_path / "out").as_uri()
    spec_uri = write_spec(output, curate_corpus.spec(uris))
    killed = start_in_session(workload_command("corpus-filter", spec_uri), tmp_path / "killed.log")
    # polled often: the shards are written one after another within a fraction of a second
    code = kill_when(killed, lambda: len(finished_shards(output)) >= 2, "two shards written", interval=0.005)
    log = (tmp_path / "killed.log").read_text(errors="replace")
    assert code == -signal.SIGKILL, log
    with pytest.raises(ManifestNotFoundError):
        read_manifest(f"{output}/data")
    finished = finished_shards(output)
    assert 2 <= len(finished) < 7, log

    spec_uri = write_spec(output, curate_corpus.spec(uris), attempt=2)
    resumed = start_in_session(workload_command("corpus-filter", spec_uri), tmp_path / "resumed.log")
    code = run_to_end(resumed)
    log = (tmp_path / "resumed.log").read_text(errors="replace")
    assert code == 0, log
    assert f"resuming; {len(finished)} of 7 shards already written" in log
    check_output(output, corpus)
    # the shards written before the kill were not redone; the rest were written by the second attempt
    attempts = {shard.shard: shard.attempt for shard in read_manifest(f"{output}/data").shards}
    assert len(attempts) == 7 and {name for name, attempt in attempts.items() if attempt == 1} == finished
    assert all(attempts[name] == 2 for name in set(attempts) - finished)


def finished_shards(output: str) -> set[str]:
    """The shards whose last act is in the store: the record that follows the shard's commits."""
    return {PurePosixPath(info.key).stem for info in open_store(f"{output}/_work").list("")
            if PurePosixPath(info.key).parent.name == "written"}


@pytest.mark.slow
def test_the_annotator_labels_a_sample_with_the_scripted_teacher_and_the_classifier_learns_it(ray_cluster, tmp_path):
    import random

    corpus = curate_corpus.build(documents=40)
    rng = random.Random(2)
    lessons = []
    for number in range(24):
        identifier = f"lesson-{number}"
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        text = (curate_corpus.english(rng, 60) + f" Tom buys {a} apples and then gets {b} more apples. "
                f"Count them: {a} + {b} apples in all, and {a} * {b} if every apple came in a bag of {b}.")
        corpus.dataset_rows.append({"id": identifier, "text": text, "source": "web"})
        lessons.append(identifier)
    uris = curate_corpus.write(corpus, (tmp_path / "inputs").as_uri())
    output = (tmp_path / "out").as_uri()
    spec = curate_corpus.spec(uris, keepDropped=True, quality={
        "annotate": {"generator": {"engine": "scripted"}, "sampleDocuments": 500}, "threshold": 0.5,
        "nonStem": {"enabled": False}})
    assert workload.run(write_spec(output, spec)) == 0

    kept = set(kept_ids(output))
    assert len(kept & set(lessons)) >= 0.8 * len(lessons)
    plain = {i for i in corpus.kept if i.startswith("doc-")}
    assert len(plain - kept) >= 0.8 * len(plain)
    dropped = {row["id"]: json.loads(row["meta"])["dropped"] for row in open_dataset(dropped_uri(output)).read_all().to_pylist()}
    assert all(dropped[i]["reason"] == "low-quality" for i in plain - kept)
    card = open_store(f"{output}/quality").read_json("classifier.json")
    assert card["metrics"]["heldOutAccuracy"] >= 0.8
    assert open_store(output).list("generations")  # the requests went through the request cache


def test_annotator_replies_are_parsed_into_labels():
    from tokenmill.trainer.curate.annotate import parse_score, prompt_for

    assert parse_score("educational value: 4/5\nreasoning: 3/5\ncomplexity: high") == 0.7
    assert parse_score("Educational value: 5 / 5") is None
    assert prompt_for("a passage", "educational-value-v1").startswith("Task: score\n")
    assert "### Passage\na passage" in prompt_for("a passage", "educational-value-v1")



def test_the_writers_are_fenced_by_the_run_specs_attempt(tmp_path):
    """The operator started attempt 2 while attempt 1 was running: attempt 1's job refuses to commit."""
    corpus = curate_corpus.build(documents=5)
    uris = curate_corpus.write(corpus, (tmp_path / "inputs").as_uri())
    output = (tmp_path / "out").as_uri()
    job = workload.prepare(read_run_spec_at(write_spec(output, curate_corpus.spec(uris)))).job
    assert job.fence == AttemptFence(output, 1)
    write_spec(output, curate_corpus.spec(uris), attempt=2)
    with pytest.raises(StaleAttemptError, match="attempt 1 may not .* names attempt 2"):
        job.fence.check("commit shard part-000000")
