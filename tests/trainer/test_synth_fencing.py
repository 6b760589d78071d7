"""A superseded SyntheticDataJob attempt commits nothing: once the run record names the next
attempt, the old attempt's workers commit no shard, no shard statistics and no request-cache
shard, and the driver's request cache and dataset write no manifest (no Ray: the worker and the
driver's writers are driven directly)."""

from __future__ import annotations

import json

import pytest

from tests.trainer.synth_fixtures import PROBLEMS, spec, write_seeds, write_spec
from tokenmill.layout import dataset_uri
from tokenmill.store import (
    CHAT_SAMPLES,
    AttemptFence,
    DatasetWriter,
    ManifestNotFoundError,
    StaleAttemptError,
    open_store,
    read_manifest,
    read_run_spec,
)
from tokenmill.trainer.generate.cache import RequestCache, generations_uri
from tokenmill.trainer.synth import workload


def keys_under(uri: str) -> list[str]:
    return sorted(info.key for info in open_store(uri).list(""))


def shard_batch(seeds: list[dict], number: int = 0) -> dict:
    return {"shard": [json.dumps({"shard": number, "seeds": seeds})]}


@pytest.fixture
def prepared(tmp_path):
    seeds = write_seeds((tmp_path / "seeds").as_uri(), PROBLEMS[:4])
    output = (tmp_path / "out").as_uri()
    write_spec(output, spec(seeds), attempt=1)
    return workload.prepare(read_run_spec(output))


def test_the_current_attempt_commits_its_shard(prepared):
    job = prepared.job
    assert job.fence == AttemptFence(job.output, 1)
    workload.ShardWorker(job)(shard_batch(prepared.seeds))
    assert DatasetWriter(dataset_uri(job.output), CHAT_SAMPLES, producer=job.producer).committed()
    assert open_store(job.output).exists(workload.shard_stats_key(0))
    assert RequestCache(generations_uri(job.output)).writer.committed()  # what was paid for is on record


def test_a_stale_attempts_worker_commits_no_shard_and_no_cache_entry(prepared):
    job = prepared.job
    worker = workload.ShardWorker(job)  # attempt 1 started its worker...
    write_spec(job.output, spec(str(job.spec.seeds[0].uri)), attempt=2)  # ...then the operator started attempt 2
    before = keys_under(job.output)
    with pytest.raises(StaleAttemptError, match="attempt 1 may not commit shard .* names attempt 2"):
        worker(shard_batch(prepared.seeds))
    assert keys_under(job.output) == before  # no shard, no shard statistics, no request-cache shard


def test_a_stale_attempts_driver_writes_no_manifest(prepared):
    job = prepared.job
    workload.ShardWorker(job)(shard_batch(prepared.seeds))  # attempt 1 committed its only shard
    write_spec(job.output, spec(str(job.spec.seeds[0].uri)), attempt=2)
    before = keys_under(job.output)
    with pytest.raises(StaleAttemptError, match="names attempt 2"):
        RequestCache(generations_uri(job.output), fence=job.fence).finalize()
    with pytest.raises(StaleAttemptError, match="names attempt 2"):
        DatasetWriter(dataset_uri(job.output), CHAT_SAMPLES, producer=job.producer, fence=job.fence).finalize()
    assert keys_under(job.output) == before
    with pytest.raises(ManifestNotFoundError):
        read_manifest(dataset_uri(job.output))
