"""The SyntheticDataJob workload end to end on Ray: seeds in, a committed dataset with provenance
and per-step statistics out (a math job, and multi-turn conversations whose final turns a judge
picks); budgets; bad input stopped before generation; the engine actors'
generation on the driver's metrics endpoint; the openai engine against `tokenmill serve`. (A
killed run's resume and the failure budget: `test_synth_resume.py`.)"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.trainer.synth_fixtures import PROBLEMS, spec, write_seeds, write_spec
from tokenmill.layout import dataset_uri
from tokenmill.store import (
    TOKEN_SEQUENCES,
    DatasetWriter,
    ManifestNotFoundError,
    open_dataset,
    open_store,
    read_manifest,
    read_progress,
)
from tokenmill.trainer.generate.cache import generations_uri
from tokenmill.trainer.metrics import progress_metrics, resource_labels
from tokenmill.trainer.oracles.math import extract_answer
from tokenmill.trainer.synth import workload

pytestmark = pytest.mark.slow  # starts Ray


def stats_of(output: str) -> dict:
    return open_store(output).read_json(workload.STATS_KEY)


def check_consistent(output: str) -> tuple[list[dict], dict]:
    """Every item counted once per step it reached; the dataset holds what the statistics say."""
    rows = open_dataset(dataset_uri(output)).read_all().to_pylist()
    stats = stats_of(output)
    for step in stats["steps"]:
        assert step["in"] == step["kept"] + sum(step["droppedByReason"].values()), step
    assert stats["written"] == len(rows)
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:
        meta = json.loads(row["meta"])
        assert extract_answer(row["messages"][-1]["content"])[0] == meta["answer"]
        assert meta["provenance"]["workflowVersion"] == stats["workflowVersion"]
    return rows, stats


def cache_keys(output: str) -> list[str]:
    return [row["key"] for row in open_dataset(generations_uri(output)).read_all().to_pylist()]


@pytest.fixture
def ray_with_s3_environment(s3_bucket):
    """A Ray started after the bucket's endpoint and credentials are in the environment, so workers inherit them."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    yield s3_bucket
    ray.shutdown()


def test_the_whole_job_on_ray_against_s3(ray_with_s3_environment, monkeypatch):
    bucket = ray_with_s3_environment
    monkeypatch.setattr(workload, "SEEDS_PER_SHARD", 4)
    seeds = write_seeds(f"{bucket.uri}/seeds", chat=True, shards=2)
    output = f"{bucket.uri}/runs/math"
    assert workload.run(write_spec(output, spec(seeds))) == 0

    rows, stats = check_consistent(output)
    assert len(read_manifest(dataset_uri(output)).shards) == 3  # 9 seeds, 4 a shard
    assert read_manifest(dataset_uri(output)).stats == stats  # the statistics travel with the dataset
    assert [s["step"] for s in stats["steps"]] == ["agreementFilter", "selfRevision", "output"]
    agreement = stats["steps"][0]
    assert agreement["in"] == len(PROBLEMS) and agreement["requests"] == 8 * len(PROBLEMS)
    assert agreement["droppedByReason"]["no-answer"] == 1  # the poem
    assert 0 < stats["written"] < len(PROBLEMS)
    assert stats["templates"] == {"critique": 1, "revise": 1, "solve": 1}
    provenance = json.loads(rows[0]["meta"])["provenance"]
    assert provenance["seedId"] == rows[0]["id"] and provenance["datasetType"] == "math"
    assert provenance["steps"][0]["step"] == "agreementFilter" and len(provenance["steps"][0]["answers"]) == 8
    # every sample paid for is in the request cache, committed with its manifest
    keys = cache_keys(output)
    assert len(keys) == len(set(keys)) == stats["requestsSent"] == sum(s["requests"] for s in stats["steps"])

    progress = read_progress(output)
    assert progress.phase == "succeeded" and progress.fraction == 1.0
    labels = resource_labels({"kind": "SyntheticDataJob", "metadata": {"name": "synth", "namespace": "default"}})
    families = {family.name: family for family in progress_metrics(progress, labels)}
    records = {(s.labels["step"], s.labels["verdict"]): s.value for s in families["tokenmill_synth_records"].samples}
    assert records[("agreementFilter", "dropped")] == sum(agreement["droppedByReason"].values())
    assert records[("output", "kept")] == len(rows)
    [tokens] = families["tokenmill_synth_tokens_generated"].samples
    assert tokens.name == "tokenmill_synth_tokens_generated_total" and tokens.value == stats["tokensGenerated"] > 0

    # On the same cluster and store, a chat job: two-turn conversations (each reply critiqued and
    # revised where it fails), whose final assistant turns a judge picks from the conversation's
    # own reply and two fresh ones; the teacher slips often enough that revisions slip too.
    chat_output = f"{bucket.uri}/runs/chat"
    assert workload.run(write_spec(chat_output, spec(seeds, dataset_type="chat", workflow=[
        {"type": "multiTurn", "multiTurn": {"turns": 2, "reviseEachTurn": True}},
        {"type": "judge", "judge": {"responses": 3, "rubric": ["correctness"], "scale": 10}}],
        generator={"engine": "scripted", "mistakeRate": 0.6, "sampling": {"temperature": 1.0, "maxTokens": 256}}))) == 0
    check_judged_conversations(chat_output)


def check_judged_conversations(output: str) -> None:
    """Each row is its seed's conversation ending in the judge's winner, with the judgement in provenance."""
    from tokenmill.trainer.generate.scripted_engine import correct_answer
    from tokenmill.trainer.synth.steps import parse_judgement

    rows = open_dataset(dataset_uri(output)).read_all().to_pylist()
    stats = stats_of(output)
    assert read_manifest(dataset_uri(output)).stats == stats and len(read_manifest(dataset_uri(output)).shards) == 3
    assert [s["step"] for s in stats["steps"]] == ["multiTurn", "judge", "output"]
    for step in stats["steps"]:
        assert step["in"] == step["kept"] + sum(step["droppedByReason"].values()), step
    multi_turn, judged, _ = stats["steps"]
    assert multi_turn["in"] == len(PROBLEMS) and judged["in"] == multi_turn["kept"]
    assert judged["keptByReason"] == {"best-of-n": judged["kept"]} and judged["requests"] == judged["in"] * (2 + 3)
    assert stats["written"] == len(rows) == judged["kept"] > 0
    assert stats["templates"] == {"critique": 1, "follow_up": 1, "judge": 2, "revise": 1, "solve": 1}
    keys = cache_keys(output)
    assert len(keys) == len(set(keys)) == stats["requestsSent"] <= sum(s["requests"] for s in stats["steps"])
    replaced = revised_own = 0
    for row in rows:
        messages, provenance = row["messages"], json.loads(row["meta"])["provenance"]
        assert provenance["seedId"] == row["id"] and provenance["datasetType"] == "chat"
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2
        assert messages[0]["content"] == PROBLEMS[int(row["id"][1:])]
        [entry] = [e for e in provenance["steps"] if e["step"] == "judge" and "scores" in e]
        assert entry["turn"] == 2 and entry["ownResponse"] and len(entry["responses"]) == 3
        assert [parse_judgement(verdict, 10) for verdict in entry["verdicts"]] == entry["scores"]
        assert messages[-1] == {"role": "assistant", "content": entry["responses"][entry["chosen"]]}
        assert entry["scores"][entry["chosen"]] == max(s for s in entry["scores"] if s is not None)
        sound = [extract_answer(text) is not None and extract_answer(text)[0] == correct_answer(messages[-2]["content"])
                 for text in entry["responses"]]
        assert sound[entry["chosen"]] or not any(sound)  # the scripted judge finds a sound reply when there is one
        replaced += entry["chosen"] != 0
        revised = [e for e in provenance["steps"] if e["step"] == "multiTurn" and e.get("turn") == 2]
        if revised:  # the conversation's own reply, as the judge saw it, is the revision of the draft
            assert entry["responses"][0] != revised[0]["draft"]
            revised_own += 1
    assert replaced, "some conversation's own final reply lost to a fresh one, which replaced it"
    assert revised_own, "some conversation's final reply was revised before it was judged"


@pytest.fixture
def ray_local():
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_max_samples_stops_with_exactly_that_many_committed_records(ray_local, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(workload, "SEEDS_PER_SHARD", 2)
    monkeypatch.setenv(workload.WORKERS_ENV, workers)
    seeds = write_seeds((tmp_path / "seeds").as_uri(), PROBLEMS * 3)
    output = (tmp_path / "out").as_uri()
    body = spec(seeds, budgets={"maxSamples": 3}, workflow=[
        {"type": "agreementFilter", "agreementFilter": {"samples": 4, "minAgreement": 0.0, "maxAgreement": 1.0}}])
    assert workload.run(write_spec(output, body)) == 0
    rows, stats = check_consistent(output)
    assert len(rows) == 3 and stats["stoppedBy"] == "maxSamples"
    assert stats["seeds"] < len(PROBLEMS) * 3  # not every seed was needed
    assert "stopped by budget maxSamples" in read_progress(output).message


def test_max_generated_tokens_stops_early(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(workload, "SEEDS_PER_SHARD", 2)
    monkeypatch.setenv(workload.WORKERS_ENV, "1")
    seeds = write_seeds((tmp_path / "seeds").as_uri(), PROBLEMS * 3)
    output = (tmp_path / "out").as_uri()
    assert workload.run(write_spec(output, spec(seeds, budgets={"maxGeneratedTokens": 500}))) == 0
    rows, stats = check_consistent(output)
    assert stats["stoppedBy"] == "maxGeneratedTokens" and stats["tokensGenerated"] >= 500
    assert stats["seeds"] < len(PROBLEMS) * 3


def _nothing_written(output: str) -> None:
    with pytest.raises(ManifestNotFoundError):
        read_manifest(dataset_uri(output))
    assert not open_store(output).list("generations/")


@pytest.mark.parametrize(("case", "message"), [
    ("schema", r"spec\.seeds\[0\]: dataset .* has schema token_sequences/1; seeds are documents/1 or chat_samples/1"),
    ("workflow", r"spec\.workflow\[0\]\.type: instructionReversal does not fit datasetType math"),
    ("probe", r"generator\.model"),
    ("missing", r"spec\.seeds\[0\]: no committed dataset"),
])
def test_bad_input_fails_before_any_generation(tmp_path, capfd, case, message):
    seeds = write_seeds((tmp_path / "seeds").as_uri())
    body = spec(seeds)
    if case == "schema":
        wrong = (tmp_path / "tokens").as_uri()
        writer = DatasetWriter(wrong, TOKEN_SEQUENCES)
        writer.write_shard(0, [{"id": "a", "tokens": [1, 2], "loss_mask": None, "source": "x"}])
        writer.finalize()
        body["seeds"] = [{"uri": wrong}]
    elif case == "workflow":
        body["workflow"] = [{"type": "instructionReversal", "instructionReversal": {"similarityThreshold": 0.8}}]
    elif case == "probe":
        body["generator"] = {"engine": "torch", "model": {"uri": (tmp_path / "no-model").as_uri()}}
    else:
        body["seeds"] = [{"uri": (tmp_path / "nothing").as_uri()}]
    output = (tmp_path / "out").as_uri()
    assert workload.run(write_spec(output, body)) == workload.EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert "nothing was generated" in err
    _nothing_written(output)


def test_the_metrics_endpoint_shows_the_engine_actors_generation(ray_local, tmp_path, monkeypatch):
    """The engines run in Ray actors; their requests, tokens and cache hits reach the driver's
    `/metrics` (a seed asked twice is paid for once: the second time from the request cache)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.fixtures.s3 import free_port
    from tokenmill.trainer.metrics import serve_workload_metrics

    monkeypatch.setattr(workload, "SEEDS_PER_SHARD", 4)
    monkeypatch.setenv(workload.WORKERS_ENV, "1")
    seeds = write_seeds((tmp_path / "seeds").as_uri(), PROBLEMS[:4] * 2)  # the second shard repeats the first
    output = (tmp_path / "out").as_uri()
    port = free_port()
    server = serve_workload_metrics({"kind": "SyntheticDataJob", "metadata": {"name": "synth", "namespace": "default"},
                                     "output": output}, port, address="127.0.0.1")

    def scrape() -> Counter:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            text = response.read().decode()
        return Counter({(s.name, tuple(sorted(s.labels.items()))): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples})

    try:
        before = scrape()
        assert workload.run(write_spec(output, spec(seeds))) == 0
        after = scrape()
    finally:
        server.shutdown()
    stats = stats_of(output)
    asked = sum(step["requests"] for step in stats["steps"])

    def added(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"engine": "scripted", **labels}.items())))
        return after[key] - before[key]

    assert stats["requestsSent"] * 2 == asked  # the repeated shard cost nothing
    assert added("tokenmill_generate_requests_total", outcome="ok") == stats["requestsSent"]
    assert added("tokenmill_generate_cache_hits_total") == asked - stats["requestsSent"]
    assert added("tokenmill_generate_generated_tokens_total") * 2 == stats["tokensGenerated"] > 0
    assert added("tokenmill_generate_requests_total", outcome="error") == 0


def test_the_openai_engine_against_tokenmill_serve(ray_local, tmp_path, monkeypatch):
    from tests.trainer.generate_fixtures import export_tiny
    from tests.trainer.generate_http import ServeProcess

    key = "sk-synth-0123456789"
    server = ServeProcess(export_tiny(tmp_path / "hf").as_uri(), name="tiny", api_key=key).wait_ready()
    try:
        import ray

        ray.shutdown()  # the workers must see the key the operator would mount
        monkeypatch.setenv("TOKENMILL_GENERATOR_API_KEY", key)
        ray.init(num_cpus=2, include_dashboard=False)
        seeds = write_seeds((tmp_path / "seeds").as_uri(), PROBLEMS[:4])
        output = (tmp_path / "out").as_uri()
        body = spec(seeds, generator={"engine": "openai", "endpoint": server.url, "modelName": "tiny",
                                      "apiKeySecret": {"name": "teacher", "key": "api-key"},
                                      "sampling": {"temperature": 1.0, "maxTokens": 8}},
                    workflow=[{"type": "agreementFilter",
                               "agreementFilter": {"samples": 3, "minAgreement": 0.0, "maxAgreement": 1.0}}])
        assert workload.run(write_spec(output, body)) == 0
        stats = stats_of(output)
        [agreement, written] = stats["steps"]
        assert agreement["in"] == 4 and agreement["requests"] == 12
        assert agreement["in"] == agreement["kept"] + sum(agreement["droppedByReason"].values())
        assert stats["requestsSent"] == 12 and server.metric("tokenmill_generate_request_duration_seconds_count") > 0
        assert len(cache_keys(output)) == 12
        assert key not in json.dumps(stats) and key not in json.dumps(read_progress(output).to_dict())
    finally:
        server.stop()
