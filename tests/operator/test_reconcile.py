"""The pure decision: from an observation to actions and status, without any I/O."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from typing import Any

from tests.operator.conftest import corpus, ref, stage
from tokenmill.api.loader import parse_resource
from tokenmill.api.semantic import validate
from tokenmill.api.status import OutputSummary, ResourceStatus
from tokenmill.operator import naming
from tokenmill.operator.config import OperatorConfig
from tokenmill.operator.reconcile import (
    NEED_OUTPUTS,
    NEED_PREVIOUS_RUN,
    NEED_PROGRESS,
    NEED_RAYJOBS,
    NEED_URI_CHECKS,
    CreateRayJob,
    DeleteOutputs,
    DeleteRayJob,
    Observation,
    SetFinalizer,
    WriteRunSpec,
    decide,
    same_run,
)
from tokenmill.operator.status import InputState, OutputCheck, RayJobView, UriCheck
from tokenmill.store import Progress

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
CONFIG = OperatorConfig(store="s3://store", retry_backoff_seconds=0)
OUTPUT = "s3://store/default/corpusfilters/web"
UID = "uid-web"


def body(document: dict[str, Any], *, generation: int = 1, status: dict | None = None, **meta: Any) -> dict[str, Any]:
    out = copy.deepcopy(document)
    out["metadata"].update({"uid": UID, "generation": generation, "resourceVersion": "7", **meta})
    if status is not None:
        out["status"] = status
    return out


def job(attempt: int, state: str = "", *, reason: str = "", end: datetime | None = None, deleting: bool = False,
        name: str = "web", job_status: str | None = None, message: str | None = None) -> RayJobView:
    if job_status is None:
        job_status = {"Complete": "SUCCEEDED", "Failed": "FAILED", "Running": "RUNNING"}.get(state, "")
    return RayJobView(
        name=naming.rayjob_name("CorpusFilter", name, attempt), attempt=attempt, owner_uid=UID,
        deployment_status=state, reason=reason,
        message=message if message is not None else (f"{reason} happened" if reason else ""), deleting=deleting,
        start_time=T0.isoformat(), end_time=end.isoformat() if end else None, created=T0.isoformat(),
        job_status=job_status,
    )


def observe(stored: dict[str, Any], *, jobs=(), now=T0, inputs=None, **extra: Any) -> Observation:
    document = {k: v for k, v in stored.items() if k != "status"}
    resource, problems = parse_resource(document)
    if resource is not None:
        problems = validate(resource)
    defaults = dict(uri_checks=[UriCheck("spec.inputs[0].uri", "s3://bucket/raw", True)], progress_read=True,
                    previous_run_read=True)
    defaults.update(extra)
    return Observation(body=stored, resource=resource, problems=problems, output=OUTPUT if resource else None,
                       rayjobs=list(jobs), inputs=inputs or {}, now=now, **defaults)


WEB = corpus("web", inputs=[{"name": "raw", "uri": "s3://bucket/raw"}])


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["type"]: item for item in status["conditions"]}


def test_first_reconcile_writes_the_run_spec_then_creates_attempt_one():
    decision = decide(observe(body(WEB)), CONFIG)
    write, create = decision.actions
    assert isinstance(write, WriteRunSpec) and write.output == OUTPUT
    assert write.document["attempt"] == 1 and write.document["metadata"]["uid"] == UID
    assert isinstance(create, CreateRayJob) and create.name == "cf-web-1" and create.attempt == 1
    assert create.manifest["metadata"]["annotations"][naming.ANNOTATION_SPEC_URI] == f"{OUTPUT}/_run/spec.json"
    status = decision.status
    ResourceStatus.model_validate(status)  # the API's own model accepts what the operator writes
    assert status["attempts"] == 1 and status["rayJobName"] == "cf-web-1" and status["phase"] == "Pending"
    assert status["observedGeneration"] == 1 and status["startTime"] == "2026-01-01T12:00:00Z"
    found = conditions(status)
    assert found["Valid"]["status"] == "True" and found["InputsReady"]["status"] == "True"
    assert found["Running"] == {"type": "Running", "status": "False", "reason": "Initializing",
                                "message": "RayJob cf-web-1 created (attempt 1)",
                                "lastTransitionTime": "2026-01-01T12:00:00Z", "observedGeneration": 1}
    assert [event.reason for event in decision.events] == ["AttemptStarted"]


def test_decisions_reach_a_fixed_point_and_keep_transition_times():
    stored = body(WEB)
    first = decide(observe(stored), CONFIG)
    stored = body(WEB, status=first.status)
    later = T0 + timedelta(minutes=5)
    again = decide(observe(stored, jobs=[job(1, "Initializing")], now=later), CONFIG)
    assert again.actions == [] and again.events == []
    assert conditions(again.status)["Running"]["message"] == "RayJob cf-web-1 is starting (Initializing)"
    assert conditions(again.status)["Running"]["lastTransitionTime"] == "2026-01-01T12:00:00Z"  # still False
    stored = body(WEB, status=again.status)
    settled = decide(observe(stored, jobs=[job(1, "Initializing")], now=later + timedelta(minutes=1)), CONFIG)
    assert settled.actions == [] and settled.events == [] and settled.status == again.status
    running = decide(observe(stored, jobs=[job(1, "Running")], now=later, progress=Progress(done=2, total=8, unit="shards")),
                     CONFIG)
    found = conditions(running.status)
    assert found["Running"]["status"] == "True" and found["Running"]["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert found["Valid"]["lastTransitionTime"] == "2026-01-01T12:00:00Z"  # unchanged status, unchanged time
    assert running.status["progress"] == "25% (2/8 shards)" and running.status["phase"] == "Running"


def test_needs_are_named_before_store_reads():
    assert decide(observe(body(WEB), uri_checks=None), CONFIG).needs == {NEED_URI_CHECKS}
    stored = body(WEB, status={"attempts": 1})
    assert decide(observe(stored, jobs=[job(1, "Running")], progress_read=False), CONFIG).needs == {NEED_PROGRESS}
    assert decide(observe(stored, jobs=[job(1, "Complete")]), CONFIG).needs == {NEED_OUTPUTS}
    failed = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 3}), status={"attempts": 1, "attemptHistory": [
        {"attempt": 1, "result": "Failed", "reason": "AppFailed", "endTime": "2026-01-01T11:00:00Z"}]})
    assert decide(observe(failed, previous_run_read=False), CONFIG).needs == {NEED_PREVIOUS_RUN}
    assert decide(observe(stored), CONFIG).needs == {NEED_RAYJOBS}  # a missing RayJob is confirmed by a listing


def test_a_rayjob_the_status_does_not_know_is_adopted():
    """The operator died after creating attempt 1's RayJob, before writing the status."""
    decision = decide(observe(body(WEB), jobs=[job(1, "Initializing")]), CONFIG)
    assert decision.actions == []
    assert decision.status["attempts"] == 1 and decision.status["rayJobName"] == "cf-web-1"


def history(status: dict[str, Any]) -> list[tuple[int, str, str]]:
    return [(item["attempt"], item["result"], item["reason"]) for item in status.get("attemptHistory", [])]


def test_a_vanished_rayjob_counts_as_a_failed_attempt():
    """The current attempt's RayJob was deleted by a person or a TTL: confirmed by a listing, it is
    a lost attempt that counts against backoffLimit, never recreated under the same attempt."""
    stored = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 1}), status={"attempts": 1, "rayJobName": "cf-web-1"})
    assert decide(observe(stored), CONFIG).needs == {NEED_RAYJOBS}
    lost = decide(observe(stored, rayjobs_listed=True), CONFIG)
    (create,) = [action for action in lost.actions if isinstance(action, CreateRayJob)]
    assert create.attempt == 2
    assert history(lost.status) == [(1, "Lost", "RayJobLost")]
    assert "AttemptLost" in [event.reason for event in lost.events]
    lost_again = decide(observe(body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 1}), status=lost.status),
                                rayjobs_listed=True), CONFIG)
    assert not [action for action in lost_again.actions if isinstance(action, CreateRayJob)]
    assert lost_again.status["phase"] == "Failed" and lost_again.status["reason"] == "RayJobLost"


def test_deleted_old_rayjobs_still_count_against_the_backoff_limit():
    """backoffLimit 1, attempt 1 failed and its RayJob was deleted: attempt 2 failing ends the
    resource instead of creating attempt 3."""
    limited = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 1}), status={"attempts": 2, "attemptHistory": [
        {"attempt": 1, "rayJobName": "cf-web-1", "result": "Failed", "reason": "AppFailed",
         "endTime": "2026-01-01T11:00:00Z"}]})
    final = decide(observe(limited, jobs=[job(2, "Failed", reason="AppFailed")]), CONFIG)
    assert not [action for action in final.actions if isinstance(action, CreateRayJob)]
    assert final.status["phase"] == "Failed" and final.status["attempts"] == 2
    assert "2 failed attempt(s), backoffLimit 1" in conditions(final.status)["Failed"]["message"]
    assert history(final.status) == [(1, "Failed", "AppFailed"), (2, "Failed", "AppFailed")]


def test_failures_are_counted_from_the_rayjobs_of_an_older_status():
    """A status written before the history existed: finished RayJobs of earlier attempts failed."""
    limited = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 1}), status={"attempts": 2})
    jobs = [job(1, "Failed", reason="AppFailed"), job(2, "Failed", reason="DeadlineExceeded")]
    final = decide(observe(limited, jobs=jobs), CONFIG)
    assert final.actions == [DeleteRayJob("cf-web-1")]  # an older attempt's RayJob never lingers
    assert final.status["phase"] == "Failed" and final.status["reason"] == "DeadlineExceeded"
    assert "2 failed attempt(s), backoffLimit 1" in conditions(final.status)["Failed"]["message"]
    assert [(r.result, r.kind) for r in final.finished] == [("failed", "CorpusFilter")]


def test_the_next_attempt_starts_only_after_the_failed_one_is_stopped():
    generous = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 2}), status={"attempts": 1})
    failed = job(1, "Failed", reason="AppFailed")
    stopping = decide(observe(generous, jobs=[failed]), CONFIG)
    assert stopping.actions == [DeleteRayJob("cf-web-1")]
    assert stopping.status["reason"] == "StoppingAttempt" and stopping.requeue_after
    assert "AttemptFailed" in [event.reason for event in stopping.events]
    stored = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 2}), status=stopping.status)
    still = decide(observe(stored, jobs=[job(1, "Failed", reason="AppFailed", deleting=True)]), CONFIG)
    assert still.actions == [] and still.status["reason"] == "StoppingAttempt" and still.events == []
    retry = decide(observe(stored, jobs=[]), CONFIG)
    (write, create) = retry.actions
    assert isinstance(create, CreateRayJob) and create.attempt == 2 and retry.status["attempts"] == 2
    assert write.document["attemptHistory"] == stopping.status["attemptHistory"]  # the store's run record too
    assert [event.reason for event in retry.events] == ["AttemptStarted"]


def test_retry_waits_for_the_backoff_delay():
    config = OperatorConfig(store="s3://store", retry_backoff_seconds=10)
    ended = T0 - timedelta(seconds=4)
    stored = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 3}), status={"attempts": 1})
    stopped = decide(observe(stored, jobs=[job(1, "Failed", reason="AppFailed", end=ended)]), config)
    stored = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 3}), status=stopped.status)
    waiting = decide(observe(stored), config)
    assert waiting.actions == [] and waiting.status["reason"] == "BackoffDelay"
    assert waiting.requeue_after == 6.0
    later = decide(observe(stored, now=T0 + timedelta(seconds=7)), config)
    assert any(isinstance(action, CreateRayJob) for action in later.actions)


def test_a_stopped_ray_job_is_not_success():
    """KubeRay reports a STOPPED Ray job as jobDeploymentStatus Complete."""
    stored = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 0}), status={"attempts": 1})
    decision = decide(observe(stored, jobs=[job(1, "Complete", job_status="STOPPED")]), CONFIG)
    assert decision.needs == set()
    assert decision.status["phase"] == "Failed" and decision.status["reason"] == "JobStopped"


def test_a_workload_that_is_not_built_fails_at_once():
    stored = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 5}), status={"attempts": 1})
    message = "Job entrypoint command failed with exit code 78, last available logs: not built"
    decision = decide(observe(stored, jobs=[job(1, "Failed", reason="AppFailed", message=message)]), CONFIG)
    assert not [action for action in decision.actions if isinstance(action, CreateRayJob)]
    assert decision.status["phase"] == "Failed" and decision.status["reason"] == "WorkloadNotBuilt"
    assert "retrying cannot help" in conditions(decision.status)["Failed"]["message"]


def test_driver_log_tails_are_redacted_and_capped():
    tail = ("Traceback ...\nbotocore error: AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY key AKIAIOSFODNN7EXAMPLE "
            "OPENAI_API_KEY: sk-proj-0123456789abcdefghijklmn https://user:hunter2@proxy.internal/ " + "x" * 5000)
    view = RayJobView.from_body({
        "metadata": {"name": "cf-web-1", "labels": {naming.LABEL_ATTEMPT: "1"}},
        "status": {"jobDeploymentStatus": "Failed", "reason": "AppFailed",
                   "message": f"Job entrypoint command failed with exit code 1, last available logs:\n{tail}"}})
    assert view is not None and len(view.message) <= 2048
    view = RayJobView.from_body({
        "metadata": {"name": "cf-web-1", "labels": {naming.LABEL_ATTEMPT: "1"}},
        "status": {"jobDeploymentStatus": "Failed", "message": tail[:400]}})
    for secret in ("wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY", "AKIAIOSFODNN7EXAMPLE", "sk-proj-0123456789abcdefghijklmn",
                   "hunter2"):
        assert secret not in view.message
    assert "botocore error" in view.message and "<redacted>" in view.message


def test_complete_without_committed_outputs_is_a_failed_attempt():
    stored = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 0}), status={"attempts": 1})
    missing = OutputCheck(False, message=f"{OUTPUT}/data has no committed _manifest.json")
    decision = decide(observe(stored, jobs=[job(1, "Complete")], output_check=missing), CONFIG)
    assert decision.status["phase"] == "Failed" and decision.status["reason"] == "OutputMissing"
    ok = OutputCheck(True, OutputSummary(uri=OUTPUT, dataset=f"{OUTPUT}/data", shards=3, rows=12, bytes=100))
    done = decide(observe(stored, jobs=[job(1, "Complete")], output_check=ok, now=T0 + timedelta(hours=1)), CONFIG)
    assert done.status["phase"] == "Succeeded" and done.status["outputs"]["rows"] == 12
    assert done.status["completionTime"] == "2026-01-01T13:00:00Z" and done.status["progress"] == "100%"
    assert [(r.result, r.duration_seconds) for r in done.finished] == [("succeeded", 3600.0)]
    assert done.finished[0].kind == "CorpusFilter"


def test_terminal_states_are_sticky():
    stored = body(WEB, generation=4, status={"attempts": 1, "phase": "Succeeded", "conditions": [
        {"type": "Succeeded", "status": "True", "reason": "Succeeded", "message": "", "lastTransitionTime": "x"}]})
    decision = decide(observe(stored, jobs=[]), CONFIG)
    assert decision.actions == [] and decision.status["phase"] == "Succeeded"
    assert decision.status["observedGeneration"] == 4


def test_suspend_and_resume():
    stored = body(dict(WEB, spec={**WEB["spec"], "suspend": True, "backoffLimit": 0}), status={"attempts": 1})
    suspend = decide(observe(stored, jobs=[job(1, "Running")]), CONFIG)
    assert suspend.actions == [DeleteRayJob("cf-web-1")]
    assert suspend.status["phase"] == "Suspended" and conditions(suspend.status)["Suspended"]["status"] == "True"
    resumed = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 0}), status=suspend.status, generation=3)
    decision = decide(observe(resumed, jobs=[]), CONFIG)
    (create,) = [action for action in decision.actions if isinstance(action, CreateRayJob)]
    assert create.attempt == 2  # a new attempt, and no failure counted (backoffLimit 0)
    assert conditions(decision.status)["Suspended"]["status"] == "False"


def test_a_resumed_attempt_continues_the_same_run():
    previous = {"kind": "CorpusFilter", "metadata": {"uid": UID, "generation": 1}, "output": OUTPUT,
                "spec": {**copy.deepcopy(parse_resource(WEB)[0].spec.to_wire()), "suspend": True}}
    stored = body(WEB, status={"attempts": 1, "conditions": [
        {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "", "lastTransitionTime": "x"}]},
        generation=3)
    decision = decide(observe(stored, previous_run=previous), CONFIG)
    write = next(action for action in decision.actions if isinstance(action, WriteRunSpec))
    assert write.document["attempt"] == 2 and write.document["metadata"]["generation"] == 1
    changed = copy.deepcopy(previous)
    changed["spec"]["extraction"] = "plain"
    assert not same_run(changed, write.document)
    queued = copy.deepcopy(previous)
    queued["spec"]["ray"]["queueName"] = "urgent"
    queued["spec"]["ray"]["activeDeadlineSeconds"] = 7200
    assert same_run(queued, write.document)  # a new queue or deadline continues the run
    resized = copy.deepcopy(previous)
    resized["spec"]["ray"]["workers"]["replicas"] = 5
    assert not same_run(resized, write.document)
    assert not same_run({**previous, "metadata": {"uid": "other", "generation": 1}}, write.document)


def test_inputs_wait_fail_and_recover():
    reader = stage("pretrain", datasets=[{**ref("CorpusFilter", "web"), "weight": 1.0, "uniqueTokens": 100000}])
    stored = body(reader)
    missing = decide(observe(stored, uri_checks=[]), CONFIG)
    assert missing.actions == [] and missing.status["phase"] == "Waiting"
    assert "CorpusFilter/web, which does not exist yet" in conditions(missing.status)["InputsReady"]["message"]
    running = {("CorpusFilter", "web"): InputState("CorpusFilter", "web", True, phase="Running")}
    assert "(phase Running)" in conditions(decide(observe(stored, inputs=running, uri_checks=[]), CONFIG).status)[
        "InputsReady"]["message"]
    failed = {("CorpusFilter", "web"): InputState("CorpusFilter", "web", True, phase="Failed", failed=True,
                                                  reason="AppFailed")}
    failure = decide(observe(stored, inputs=failed, uri_checks=[]), CONFIG)
    assert failure.status["phase"] == "Failed" and failure.status["reason"] == "InputFailed"
    summary = OutputSummary(uri="s3://store/web", dataset="s3://store/web/data", rows=5)
    recovered = {("CorpusFilter", "web"): InputState("CorpusFilter", "web", True, phase="Succeeded", succeeded=True,
                                                     outputs=summary)}
    again = decide(observe(body(reader, status=failure.status), inputs=recovered, uri_checks=[]), CONFIG)
    write = next(action for action in again.actions if isinstance(action, WriteRunSpec))
    assert write.document["spec"]["datasets"][0]["uri"] == "s3://store/web/data"
    assert "completionTime" not in again.status


def test_uncommitted_uri_input_waits():
    decision = decide(observe(body(WEB), uri_checks=[UriCheck("spec.inputs[0].uri", "s3://bucket/raw", False,
                                                              "s3://bucket/raw has no committed dataset")]), CONFIG)
    assert decision.actions == [] and decision.status["phase"] == "Waiting"
    assert conditions(decision.status)["InputsReady"]["message"] == (
        "waiting for spec.inputs[0].uri: s3://bucket/raw has no committed dataset")


def test_invalid_specs_start_nothing():
    document = corpus("web", inputs=[{"name": "raw", "uri": "file:relative"}], languages={"languages": ["EN"]})
    decision = decide(observe(body(document)), CONFIG)
    assert decision.actions == [] and decision.status["phase"] == "Invalid"
    message = conditions(decision.status)["Valid"]["message"]
    assert "spec.inputs[0].uri" in message and "spec.languages.languages[0]" in message
    broken = body(WEB)
    broken["spec"]["backoffLimit"] = -1  # a stored object the schema would have refused
    unparsable = decide(observe(broken), CONFIG)
    assert unparsable.status["phase"] == "Invalid" and unparsable.actions == []


def test_no_store_means_output_uri_is_required():
    observation = observe(body(WEB))
    decision = decide(Observation(**{**observation.__dict__, "output": None}), CONFIG)
    assert decision.status["phase"] == "Invalid"
    assert "spec.output.uri: required" in conditions(decision.status)["Valid"]["message"]


def test_delete_policy_manages_the_finalizer_and_cleans_up():
    document = dict(WEB, spec={**WEB["spec"], "output": {"deletePolicy": "Delete"}})
    adding = decide(observe(body(document)), CONFIG)
    assert adding.actions[0] == SetFinalizer(True)
    deleting = body(document, finalizers=[naming.FINALIZER], deletionTimestamp="2026-01-01T12:00:00Z",
                    status={"attempts": 1, "outputUri": OUTPUT})
    busy = decide(observe(deleting, jobs=[job(1, "Running")]), CONFIG)
    assert busy.actions == [DeleteRayJob("cf-web-1")] and busy.requeue_after and busy.status is None
    clean = decide(observe(deleting, jobs=[]), CONFIG)
    assert clean.actions == [DeleteOutputs(OUTPUT), SetFinalizer(False)]
    never_started = body(document, finalizers=[naming.FINALIZER], deletionTimestamp="2026-01-01T12:00:00Z")
    assert decide(observe(never_started), CONFIG).actions == [SetFinalizer(False)]  # nothing was written
    retained = body(WEB, finalizers=[naming.FINALIZER])
    assert decide(observe(retained), CONFIG).actions[0] == SetFinalizer(False)


def test_deletion_uses_the_output_recorded_at_the_first_attempt():
    """The operator's default store changed since the resource ran: its outputs are where the
    status says, and only that prefix is deleted."""
    document = dict(WEB, spec={**WEB["spec"], "output": {"deletePolicy": "Delete"}})
    first = decide(observe(body(document)), CONFIG)
    assert first.status["outputUri"] == OUTPUT
    deleting = body(document, finalizers=[naming.FINALIZER], deletionTimestamp="2026-01-01T12:00:00Z",
                    status=first.status)
    observation = observe(deleting)
    moved = Observation(**{**observation.__dict__, "output": "s3://elsewhere/default/corpusfilters/web"})
    assert decide(moved, CONFIG).actions == [DeleteOutputs(OUTPUT), SetFinalizer(False)]


def test_an_output_another_resource_reads_is_not_deleted():
    document = dict(WEB, spec={**WEB["spec"], "output": {"deletePolicy": "Delete"}})
    deleting = body(document, finalizers=[naming.FINALIZER], deletionTimestamp="2026-01-01T12:00:00Z",
                    status={"attempts": 1, "outputUri": OUTPUT})
    blocked = decide(observe(deleting, readers=["TrainingStage/pretrain"]), CONFIG)
    assert blocked.actions == [] and blocked.requeue_after
    found = conditions(blocked.status)["ActionFailed"]
    assert found["status"] == "True" and found["reason"] == "OutputInUse"
    assert "TrainingStage/pretrain" in found["message"]
    assert [event.reason for event in blocked.events] == ["OutputInUse"]


def test_the_history_is_recovered_from_the_stores_run_record():
    """A status without the history (restored from a backup): the run record still counts attempt 1."""
    limited = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 1}), status={"attempts": 2})
    assert decide(observe(limited, jobs=[job(2, "Failed", reason="AppFailed")], previous_run_read=False),
                  CONFIG).needs == {NEED_PREVIOUS_RUN}
    record = {"kind": "CorpusFilter", "metadata": {"uid": UID, "generation": 1}, "attempt": 2, "attemptHistory": [
        {"attempt": 1, "rayJobName": "cf-web-1", "result": "Failed", "reason": "AppFailed",
         "endTime": "2026-01-01T11:00:00Z"}]}
    final = decide(observe(limited, jobs=[job(2, "Failed", reason="AppFailed")], previous_run=record), CONFIG)
    assert final.status["phase"] == "Failed"
    assert history(final.status) == [(1, "Failed", "AppFailed"), (2, "Failed", "AppFailed")]
    stranger = {**record, "metadata": {"uid": "someone-else", "generation": 1}}
    retried = decide(observe(limited, jobs=[job(2, "Failed", reason="AppFailed")], previous_run=stranger), CONFIG)
    assert retried.status["phase"] == "Pending"  # another resource's record is not this one's history
