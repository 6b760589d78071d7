"""A PTSJob killed from outside in the middle of a shard and run again: the rerun asks the
engine for no sample answered before the kill, and writes the same pairs and statistics as
an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.trainer.generate_fixtures import TINY_GEN, tiny_model
from tests.trainer.test_pts_workload import answers_the_policy_reaches, problem, run_spec, write_problems
from tokenmill.layout import dataset_uri
from tokenmill.store import (
    DatasetWriter,
    ManifestNotFoundError,
    open_dataset,
    open_store,
    read_manifest,
    read_run_spec_at,
    shard_name,
    write_run_spec,
)
from tokenmill.store.dataset_reader import read_verified_shard
from tokenmill.store.schemas import GENERATIONS
from tokenmill.trainer.model.hf import export_hf
from tokenmill.trainer.pts import workload

pytestmark = pytest.mark.slow  # three runs of the workload, generating with a model

PROBLEMS = 4
PER_SHARD = 2
COMMAND = [sys.executable, "-m", "tests.trainer.pts_counting"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("model") / "hf"
    export_hf(tiny_model(0, sharpness=1.0), TINY_GEN, directory, dtype="float32")
    return directory.as_uri()


def start(spec_uri: str, log: Path, *hold: int) -> subprocess.Popen:
    with open(log.with_suffix(".out"), "wb") as out:
        return subprocess.Popen([*COMMAND, spec_uri, str(log), str(PER_SHARD), *map(str, hold)], cwd=ROOT,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def answered(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]


def keys(log: Path) -> list[str]:
    return [entry["key"] for entry in answered(log) if "key" in entry]


def committed_requests(output: str, number: int) -> set[str]:
    """The keys of the samples committed to shard `number`'s request record."""
    writer = DatasetWriter(workload.requests_uri(output, number), GENERATIONS)
    return {row["key"] for info in writer.committed().values()
            for row in read_verified_shard(writer.store, info).to_pylist()}


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the workload exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def outputs_of(output: str) -> tuple[list[dict], list[dict], dict]:
    return (open_dataset(dataset_uri(output)).read_all().to_pylist(),
            open_dataset(workload.full_solution_pairs_uri(output)).read_all().to_pylist(),
            open_store(output).read_json(workload.STATS_KEY))


@pytest.mark.timeout(1800)
def test_a_search_killed_mid_shard_resumes_without_asking_for_a_sample_again(tmp_path, model_uri):
    answers = answers_the_policy_reaches(model_uri, PROBLEMS)
    problems = write_problems((tmp_path / "problems").as_uri(),
                              [problem(index, answer=answer) for index, answer in enumerate(answers)])

    # the uninterrupted run
    spec_uri, whole = run_spec(tmp_path / "whole", model_uri, problems)
    process = start(spec_uri, tmp_path / "whole.log")
    assert process.wait(timeout=900) == 0, (tmp_path / "whole.out").read_text()
    expected = outputs_of(whole)
    paid_whole = keys(tmp_path / "whole.log")
    assert expected[0] and len(paid_whole) == len(set(paid_whole))
    assert len({entry["search"] for entry in answered(tmp_path / "whole.log")}) == PROBLEMS // PER_SHARD

    # killed from outside in the second shard, its second engine call (the rollouts at its
    # questions, after the solutions of both) never answered, once every sample answered before
    # is committed to the request cache
    spec_uri, output = run_spec(tmp_path / "killed", model_uri, problems)
    killed_log = tmp_path / "killed.log"
    process = start(spec_uri, killed_log, 1, 1)
    try:
        wait_for(lambda: {"held": True} in answered(killed_log), "the held engine call", process)
        second_shard = {entry["key"] for entry in answered(killed_log) if entry.get("search") == 1}
        assert len(second_shard) > 0
        wait_for(lambda: second_shard <= committed_requests(output, 1), "the answered samples' cache commits",
                 process, timeout=120.0)
    finally:
        kill_group(process)
    assert process.returncode == -signal.SIGKILL
    with pytest.raises(ManifestNotFoundError):
        read_manifest(dataset_uri(output))
    store = open_store(output)  # the first shard committed, the second not
    assert [store.exists(f"{workload.SHARD_STATS_PREFIX}/{shard_name(n)}.json") for n in (0, 1)] == [True, False]
    paid_before = keys(killed_log)

    # the rerun (the next attempt)
    doc = read_run_spec_at(spec_uri)
    spec_uri = write_run_spec(output, {**doc, "attempt": 1})
    rerun_log = tmp_path / "rerun.log"
    process = start(spec_uri, rerun_log)
    try:
        assert process.wait(timeout=900) == 0, (tmp_path / "rerun.out").read_text()
    finally:
        kill_group(process)
    paid_after = keys(rerun_log)
    said = (tmp_path / "rerun.out").read_text()
    assert f"shard {shard_name(1)}: {len(second_shard)} samples answered by an earlier attempt" in said, said

    again = set(paid_before) & set(paid_after)
    assert not again, f"{len(again)} of the {len(paid_before)} samples answered before the kill were asked for again"
    assert sorted(paid_before + paid_after) == sorted(paid_whole)  # every sample paid for once
    pairs, full_pairs, stats = outputs_of(output)
    assert (pairs, full_pairs, stats) == expected  # the same pairs and statistics
    assert read_manifest(dataset_uri(output)).stats == read_manifest(dataset_uri(whole)).stats
    # the request cache served its purpose: nothing of it is left under the output
    assert not list(open_store(output).list(f"{workload.REQUESTS_PREFIX}/"))


def test_a_shard_record_serves_an_earlier_attempts_answers_and_holds_no_others(tmp_path, model_uri):
    from tokenmill.trainer.generate import GenerationRequest, SamplingParams, load_torch_engine

    output = (tmp_path / "out").as_uri()
    engine = load_torch_engine(model_uri)
    request = GenerationRequest(prompt_token_ids=(10, 11, 12), n=4,
                                sampling=SamplingParams(temperature=1.0, max_tokens=6, seed=5))
    first = workload.RecordedEngine(engine, workload.ShardRequests(workload.requests_uri(output, 0)).load())
    (answer,) = first.generate([request])
    first.cache.flush()
    assert first.attempted == 4 and first.cache.completions == {}  # committed, not held in memory

    later = workload.RecordedEngine(engine, workload.ShardRequests(workload.requests_uri(output, 0)).load())
    assert len(later.cache.completions) == 4
    (again,) = later.generate([request])
    assert later.attempted == 0 and later.hits == 4  # the engine was asked for nothing
    assert [c.token_ids for c in again.completions] == [c.token_ids for c in answer.completions]
    # the record of another shard is another record
    other = workload.ShardRequests(workload.requests_uri(output, 1)).load()
    assert other.completions == {}
