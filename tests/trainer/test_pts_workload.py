"""The PTSJob workload end to end on a tiny random model: problems in, pairs and statistics
committed (manifest last), a rerun resumes without searching again, bad input stops first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer.generate_fixtures import TINY_GEN, tiny_model
from tokenmill.layout import dataset_uri
from tokenmill.store import (
    CHAT_SAMPLES,
    DatasetWriter,
    open_dataset,
    open_store,
    read_manifest,
    read_progress,
    write_run_spec,
)
from tokenmill.trainer.model.hf import export_hf
from tokenmill.trainer.pts import workload
from tokenmill.trainer.tokenizer import get_tokenizer

pytestmark = pytest.mark.slow  # generates with a model


def write_problems(uri: str, rows: list[dict]) -> str:
    writer = DatasetWriter(uri, CHAT_SAMPLES)
    writer.write_shard(0, rows)
    writer.finalize(expected=[0])
    return uri


def problem(index: int, **meta) -> dict:
    return {"id": f"p{index}", "source": "test", "meta": json.dumps(meta),
            "messages": [{"role": "user", "content": f"Add {index} and 3."},
                         {"role": "assistant", "content": f"The answer is {index + 3}."}]}


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("model") / "hf"
    export_hf(tiny_model(0, sharpness=1.0), TINY_GEN, directory, dtype="float32")
    return directory.as_uri()


def run_spec(tmp_path: Path, model: str, problems: str, **overrides) -> tuple[str, str]:
    spec = {
        "model": {"uri": model},
        "problems": {"uri": problems},
        "oracle": {"kind": "math"},
        "engine": "torch",
        "solutionsPerProblem": 3,
        "samplesPerEstimate": 8,
        "pGap": 0.3,
        "queryFilter": {"minSuccess": 0.0, "maxSuccess": 1.0},
        "maxPivotalTokens": 4,
        "rollout": {"temperature": 1.0, "maxTokens": 16, "seed": 3},
    }
    spec.update(overrides)
    output = (tmp_path / "out").as_uri()
    doc = {"runSpecVersion": 1, "apiVersion": "tokenmill.dev/v1alpha1", "kind": "PTSJob",
           "metadata": {"name": "pts", "namespace": "default", "uid": "uid-1", "generation": 1},
           "attempt": 0, "output": output, "spec": spec}
    return write_run_spec(output, doc), output


def answers_the_policy_reaches(model: str, count: int) -> list[str]:
    """For each problem, the final answer of the first of the policy's own solutions that has one
    (the workload samples the same solutions: same seeds). A random model rarely reaches it
    again, so p(success) jumps along that solution: pivotal tokens exist."""
    from tokenmill.trainer.generate import SamplingParams, load_torch_engine
    from tokenmill.trainer.oracles.math import extract_answer
    from tokenmill.trainer.pts.engine_policy import EnginePolicy, solution_decoder

    engine = load_torch_engine(model)
    tokenizer = engine.tokenizer
    policy = EnginePolicy(engine, SamplingParams(temperature=1.0, max_tokens=16, seed=3),
                          stop_token_ids=engine.default_stop_ids, vocab_size=tokenizer.vocab_size)
    decode = solution_decoder(tokenizer.decode, engine.default_stop_ids)
    answers = []
    for index in range(count):
        row = problem(index)
        question = tokenizer.encode_chat(row["messages"][:1], add_generation_prompt=True)
        found = [extract_answer(decode(s.token_ids)) for s in policy.sample_solutions(tuple(question), 3)]
        answers.append(next((answer for answer, _ in filter(None, found)), "none"))
    return answers


def test_pts_workload_commits_pairs_and_statistics(tmp_path, model_uri, monkeypatch, capsys):
    answers = answers_the_policy_reaches(model_uri, 3)
    rows = [problem(index, answer=answer) for index, answer in enumerate(answers)]
    problems = write_problems((tmp_path / "problems").as_uri(), rows)
    spec_uri, output = run_spec(tmp_path, model_uri, problems)

    assert workload.run(spec_uri) == 0

    progress = read_progress(output)
    assert progress.phase == "succeeded"
    report = open_store(output).read_json(workload.STATS_KEY)
    stats = report["stats"]
    assert stats["problems"] == stats["problemsSearched"] == 3
    assert stats["solutionsSearched"] == 9 and stats["estimates"] > 0
    assert stats["rollouts"] + stats["rolloutsReused"] == 8 * stats["estimates"]
    assert report["warnings"] and "samplesPerEstimate=8" in report["warnings"][0]
    assert progress.metrics["rollouts"] == stats["rollouts"]
    assert progress.metrics["pivotal_tokens"] == stats["pivotalTokens"]
    assert read_manifest(dataset_uri(output)).stats == {**stats, "warnings": report["warnings"]}

    pairs = open_dataset(dataset_uri(output))
    assert pairs.schema.name == "preference_pairs"
    rows = pairs.read_all().to_pylist()
    assert stats["pivotalTokens"] > 0 and len(rows) == stats["pairs"]["pivotal"] > 0
    for row in rows:
        meta = json.loads(row["meta"])
        assert meta["kind"] == "pivotal" and meta["p_chosen"] > meta["p_rejected"]
        assert len(row["chosen_tokens"]) == len(row["rejected_tokens"]) == 1
        assert row["chosen_tokens"] != row["rejected_tokens"]
        question = get_tokenizer("byte").encode_chat(problem(int(meta["problem_id"][1:]))["messages"][:1],
                                                     add_generation_prompt=True)
        assert row["prompt_tokens"][: len(question)] == question  # the question, then the solution prefix
        assert len(row["prompt_tokens"]) == len(question) + meta["position"]
    full = open_dataset(workload.full_solution_pairs_uri(output)).read_all().to_pylist()
    assert len(full) == stats["pairs"].get("full-solution", 0)
    assert all(json.loads(row["meta"])["kind"] == "full-solution" for row in full)

    # A rerun of the same run finds every shard committed: no search, same pairs.
    def no_search(*args, **kwargs):
        raise AssertionError("a committed shard was searched again")

    monkeypatch.setattr(workload, "search", no_search)
    # ...and deletes the request record an attempt stopped between a shard's commit and its deletion left
    store = open_store(output)
    store.write_json(f"{workload.REQUESTS_PREFIX}/part-000000/_commits/left-over.json", {})
    assert workload.run(spec_uri) == 0
    assert not store.list(f"{workload.REQUESTS_PREFIX}/")
    assert open_dataset(dataset_uri(output)).read_all().to_pylist() == rows
    assert open_store(output).read_json(workload.STATS_KEY)["stats"] == stats
    assert read_manifest(dataset_uri(output)).stats == {**stats, "warnings": report["warnings"]}


@pytest.mark.parametrize(("rows", "overrides", "message"), [
    ([problem(0, answer="5"), problem(1)], {}, r"problems\[p1\]\.answer: a math problem needs"),
    ([problem(0, answer="5")], {"oracle": {"kind": "code"}}, r"problems\[p0\]\.tests"),
    ([problem(0, answer="5")], {"pGap": 1.0}, "pGap"),
    ([problem(0, answer="5")], {"engine": "vllm"}, "vllm is not installed here"),
    ([problem(0, answer="5")], {"oracle": {"kind": "regex"}}, "oracle.kind"),
])
def test_bad_input_stops_before_sampling(tmp_path, model_uri, capsys, rows, overrides, message):
    import re

    problems = write_problems((tmp_path / "problems").as_uri(), rows)
    spec_uri, output = run_spec(tmp_path, model_uri, problems, **overrides)
    assert workload.run(spec_uri) == workload.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "nothing was sampled" in err and "Traceback" not in err
    assert not open_store(output).exists("data/_manifest.json")
    assert read_progress(output) is None


def test_problems_that_are_not_a_dataset(tmp_path, model_uri, capsys):
    spec_uri, output = run_spec(tmp_path, model_uri, (tmp_path / "missing").as_uri())
    assert workload.run(spec_uri) == workload.EXIT_BAD_INPUT
    assert "problems: no committed dataset at" in capsys.readouterr().err


def test_a_stale_attempt_commits_nothing(tmp_path, model_uri, capsys, monkeypatch):
    """The operator starts attempt 1 while attempt 0 is still searching: attempt 0's shards,
    statistics and manifest are refused, and it fails saying why."""
    problems = write_problems((tmp_path / "problems").as_uri(), [problem(0, answer="3")])
    spec_uri, output = run_spec(tmp_path, model_uri, problems)
    real_search = workload.search

    def search_then_superseded(*args, **kwargs):
        result = real_search(*args, **kwargs)
        newer = open_store(output).read_json("_run/spec.json")
        write_run_spec(output, {**newer, "attempt": 1})
        return result

    monkeypatch.setattr(workload, "search", search_then_superseded)
    assert workload.run(spec_uri) == workload.EXIT_FAILED
    err = capsys.readouterr().err
    assert "attempt 0 may not commit shard" in err and "names attempt 1" in err, err
    store = open_store(output)
    assert not store.exists("data/_manifest.json")
    assert not store.exists(workload.STATS_KEY)
    assert not [info.key for info in store.list("data/")] and not [info.key for info in store.list("_run/pts-shards")]


def test_the_job_says_what_the_code_sandbox_cannot_enforce(tmp_path, model_uri, capsys, monkeypatch):
    from tokenmill.trainer.oracles import code

    monkeypatch.setattr(code.shutil, "which", lambda name: None)  # a platform without unshare
    code.network_namespace_prefix.cache_clear()
    code.candidate_namespace_prefix.cache_clear()
    try:
        row = {**problem(0), "meta": json.dumps({"tests": ["assert add(2, 3) == 5"]})}
        problems = write_problems((tmp_path / "problems").as_uri(), [row])
        spec_uri, output = run_spec(tmp_path, model_uri, problems, oracle={"kind": "code"}, solutionsPerProblem=1,
                                    samplesPerEstimate=2, rollout={"temperature": 1.0, "maxTokens": 3, "seed": 3})
        assert workload.run(spec_uri) == 0
    finally:
        code.network_namespace_prefix.cache_clear()
        code.candidate_namespace_prefix.cache_clear()
    said = "code oracle: this platform gives the sandbox no network namespace"
    assert f"tokenmill pts: warning: {said}" in capsys.readouterr().out
    warnings = read_manifest(dataset_uri(output)).stats["warnings"]
    assert any(warning.startswith(said) for warning in warnings), warnings
    assert any(warning.startswith(said) for warning in open_store(output).read_json(workload.STATS_KEY)["warnings"])
