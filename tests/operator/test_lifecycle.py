"""The operator end to end: kopf, the emulated API server over HTTP, the KubeRay stand-in
running the test workload as a subprocess, and a real object store (moto's S3 or file://)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tests.operator.conftest import (
    EVENTS,
    KINDS,
    SECRETS,
    apply,
    commit_dataset,
    condition,
    corpus,
    eventually,
    phase_is,
    pts,
    rayjobs,
    ref,
    stage,
    status,
)
from tests.operator.standin import Behaviour
from tokenmill.layout import run_spec_uri
from tokenmill.operator import naming
from tokenmill.store import open_store, read_manifest


def read_json(uri: str) -> dict:
    parent, _, name = uri.rpartition("/")
    return open_store(parent).read_json(name)


def reports(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_chain_runs_in_order_on_s3(kube, start_operator, standin, s3_bucket, tmp_path):
    """CorpusFilter -> TrainingStage -> PTSJob, applied downstream first: each waits for its input,
    reads the input's committed output through the resolved spec, and the workloads get the store
    credentials only from the Secret the RayJob names."""
    store = f"{s3_bucket.uri}/runs"
    commit_dataset(f"{s3_bucket.uri}/raw")
    commit_dataset(f"{s3_bucket.uri}/problems")
    await kube.create(SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                "metadata": {"name": "store-credentials", "namespace": "default"},
                                "data": {key: base64.b64encode(value.encode()).decode() for key, value in {
                                    "AWS_ACCESS_KEY_ID": "AKIATOKENMILLTEST0001",
                                    "AWS_SECRET_ACCESS_KEY": "tokenmill-test-secret-0123456789abcdefSECRET",
                                }.items()}})
    report = tmp_path / "report.jsonl"
    await start_operator(store=store, credentials_secret="store-credentials", ray_env={
        "AWS_ENDPOINT_URL": s3_bucket.endpoint_url, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    runner = await standin(policy=lambda job: Behaviour(env={"FAKE_REPORT": str(report)}))

    await apply(kube, pts("search", model=ref("TrainingStage", "pretrain"),
                          problems={"uri": f"{s3_bucket.uri}/problems"}))
    await apply(kube, stage("pretrain", datasets=[{**ref("CorpusFilter", "web"), "weight": 1.0,
                                                   "uniqueTokens": 100000}]))
    waiting = await phase_is(kube, "TrainingStage", "pretrain", "Waiting")
    assert "CorpusFilter/web, which does not exist yet" in condition(kube, "TrainingStage", "pretrain",
                                                                      "InputsReady")["message"]
    assert waiting["reason"] == "WaitingForInput"
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{s3_bucket.uri}/raw"}]))

    done = await phase_is(kube, "PTSJob", "search", "Succeeded", timeout=90)
    web, pretrain = status(kube, "CorpusFilter", "web"), status(kube, "TrainingStage", "pretrain")
    assert web["phase"] == pretrain["phase"] == "Succeeded"
    assert [job["metadata"]["name"] for job in rayjobs(kube)] == ["cf-web-1", "pts-search-1", "ts-pretrain-1"]
    runs = runner.runs
    assert runs["cf-web-1"].ended_at < runs["ts-pretrain-1"].seen_at
    assert runs["ts-pretrain-1"].ended_at < runs["pts-search-1"].seen_at

    # The resolved specs carry the inputs' committed URIs instead of the refs.
    assert web["outputs"]["dataset"] == f"{store}/default/corpusfilters/web/data"
    stage_spec = read_json(run_spec_uri(pretrain["outputs"]["uri"]))
    assert stage_spec["spec"]["datasets"][0]["uri"] == web["outputs"]["dataset"]
    assert stage_spec["spec"]["datasets"][0]["name"] == "web" and "ref" not in stage_spec["spec"]["datasets"][0]
    assert stage_spec["attempt"] == 1 and stage_spec["metadata"]["uid"]
    search_spec = read_json(run_spec_uri(done["outputs"]["uri"]))
    assert search_spec["spec"]["model"] == {"uri": pretrain["outputs"]["checkpoint"]}
    assert pretrain["outputs"]["checkpoint"].endswith("/checkpoints/step-00000030")
    assert read_manifest(done["outputs"]["dataset"]).summary.rows == done["outputs"]["rows"] == 12
    seen = {line["name"]: line["inputs"] for line in reports(report)}
    assert seen["pretrain"] == {web["outputs"]["dataset"]: 12}


async def test_retry_resumes_from_committed_shards(kube, start_operator, standin, store_root, tmp_path):
    commit_dataset(f"{store_root}/raw")
    report = tmp_path / "report.jsonl"

    def policy(job):
        first = job["metadata"]["labels"][naming.LABEL_ATTEMPT] == "1"
        return Behaviour(env={"FAKE_REPORT": str(report), **({"FAKE_FAIL_AFTER_SHARDS": "1"} if first else {})})

    await start_operator()
    runner = await standin(policy=policy)
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}], backoffLimit=2))
    done = await phase_is(kube, "CorpusFilter", "web", "Succeeded")
    assert done["attempts"] == 2 and done["rayJobName"] == "cf-web-2"
    first, second = reports(report)
    assert (first["attempt"], first["failed"], first["written"]) == (1, True, [0])
    assert (second["attempt"], second["skipped"], second["written"]) == (2, [0], [1, 2])
    assert done["outputs"]["shards"] == 3
    # Attempt 1's RayJob was deleted (its cluster stopped) before attempt 2 started; the history keeps it.
    jobs = {job["metadata"]["name"]: job["status"]["jobDeploymentStatus"] for job in rayjobs(kube)}
    assert jobs == {"cf-web-2": "Complete"}
    assert runner.runs["cf-web-1"].ended_at < runner.runs["cf-web-2"].seen_at
    assert [(item["attempt"], item["result"], item["reason"]) for item in done["attemptHistory"]] == [
        (1, "Failed", "AppFailed"), (2, "Succeeded", "Succeeded")]
    def reasons() -> set[str]:  # events are posted in the background: they may trail the status
        return {event["reason"] for event in kube.list(EVENTS) if event["involvedObject"]["name"] == "web"}

    await eventually(lambda: {"AttemptFailed", "AttemptStarted", "Succeeded"} <= reasons(),
                     message=lambda: f"events so far: {reasons()}")


async def test_retries_are_bounded_by_backoff_limit(kube, start_operator, standin, store_root):
    commit_dataset(f"{store_root}/raw")
    await start_operator()
    await standin(policy=lambda job: Behaviour(env={"FAKE_FAIL_AFTER_SHARDS": "1"}))
    await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}], backoffLimit=1))
    failed = await phase_is(kube, "CorpusFilter", "web", "Failed")
    assert failed["reason"] == "AppFailed" and failed["attempts"] == 2
    message = condition(kube, "CorpusFilter", "web", "Failed")["message"]
    assert "2 failed attempt(s), backoffLimit 1" in message
    assert "completionTime" in failed
    assert [job["metadata"]["name"] for job in rayjobs(kube)] == ["cf-web-2"]  # the last attempt's is kept


async def test_deadlines_fail_the_attempt_with_kuberays_reason(kube, start_operator, standin, store_root):
    commit_dataset(f"{store_root}/raw")
    await start_operator()

    def policy(job):
        if job["metadata"]["labels"][naming.LABEL_NAME] == "stuck":
            return Behaviour(stuck_initializing=True)
        return Behaviour(env={"FAKE_SHARD_SECONDS": "30"})

    await standin(policy=policy, deadline_scale=0.01)
    slow = corpus("slow", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}], backoffLimit=0)
    slow["spec"]["ray"]["activeDeadlineSeconds"] = 120
    stuck = corpus("stuck", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}], backoffLimit=0)
    stuck["spec"]["ray"]["preRunningDeadlineSeconds"] = 120
    await apply(kube, slow)
    await apply(kube, stuck)
    assert (await phase_is(kube, "CorpusFilter", "slow", "Failed"))["reason"] == "DeadlineExceeded"
    assert (await phase_is(kube, "CorpusFilter", "stuck", "Failed"))["reason"] == "PreRunningDeadlineExceeded"
    (job,) = rayjobs(kube, "cf-stuck")
    assert job["spec"]["preRunningDeadlineSeconds"] == 120


async def test_invalid_semantics_block_the_run_until_fixed(kube, start_operator, standin, store_root):
    commit_dataset(f"{store_root}/raw")
    await start_operator()
    await standin()
    bad = corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}],
                 languages={"languages": ["en", "English"]},
                 decontamination={"benchmarks": [{"name": "gsm8k", "uri": f"{store_root}/raw"}], "ngram": 8,
                                  "infoNgram": 9})
    await apply(kube, bad)
    invalid = await phase_is(kube, "CorpusFilter", "web", "Invalid")
    valid = condition(kube, "CorpusFilter", "web", "Valid")
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "spec.languages.languages[1]" in valid["message"] and "spec.decontamination.infoNgram" in valid["message"]
    assert valid["observedGeneration"] == 1 and invalid["observedGeneration"] == 1
    assert rayjobs(kube) == []

    await kube.patch(KINDS["CorpusFilter"], "default", "web", {"spec": {"languages": {"languages": ["en"]},
                                                             "decontamination": None}})
    done = await phase_is(kube, "CorpusFilter", "web", "Succeeded")
    assert condition(kube, "CorpusFilter", "web", "Valid")["status"] == "True"
    assert done["observedGeneration"] == 2


async def test_long_names_fit_kuberays_47_characters(kube, start_operator, standin, store_root):
    commit_dataset(f"{store_root}/raw")
    name = "a-really-long-corpus-filter-name.for-the-web.crawl-of-2025-with-dots"
    await start_operator()
    await standin()
    document = corpus(name, inputs=[{"name": "raw", "uri": f"{store_root}/raw"}])
    await apply(kube, document)
    done = await phase_is(kube, "CorpusFilter", name, "Succeeded")
    (job,) = rayjobs(kube)
    job_name = job["metadata"]["name"]
    assert len(job_name) <= 47 and job_name == done["rayJobName"] == naming.rayjob_name("CorpusFilter", name, 1)
    assert job_name.startswith("cf-a-really-long") and job_name.endswith("-1") and "." not in job_name
    assert job["metadata"]["labels"][naming.LABEL_NAME] == naming.label_value(name)

