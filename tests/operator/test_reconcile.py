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
        name: str = "web") -> RayJobView:
    return RayJobView(
        name=naming.rayjob_name("CorpusFilter", name, attempt), attempt=attempt, owner_uid=UID,
        deployment_status=state, reason=reason, message=f"{reason} happened" if reason else "", deleting=deleting,
        start_time=T0.isoformat(), end_time=end.isoformat() if end else None, created=T0.isoformat(),
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
    failed = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 3}), status={"attempts": 1})
    assert decide(observe(failed, jobs=[job(1, "Failed", reason="AppFailed")], previous_run_read=False),
                  CONFIG).needs == {NEED_PREVIOUS_RUN}


def test_a_rayjob_the_status_does_not_know_is_adopted():
    """The operator died after creating attempt 1's RayJob, before writing the status."""
    decision = decide(observe(body(WEB), jobs=[job(1, "Initializing")]), CONFIG)
    assert decision.actions == []
    assert decision.status["attempts"] == 1 and decision.status["rayJobName"] == "cf-web-1"


def test_a_rayjob_missing_from_the_cache_is_recreated_under_the_same_name():
    decision = decide(observe(body(WEB, status={"attempts": 1})), CONFIG)
    (create,) = [action for action in decision.actions if isinstance(action, CreateRayJob)]
    assert create.name == "cf-web-1" and create.attempt == 1  # the API server's 409 makes this idempotent


def test_failures_are_counted_from_the_rayjobs():
    limited = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 1}), status={"attempts": 2})
    jobs = [job(1, "Failed", reason="AppFailed"), job(2, "Failed", reason="DeadlineExceeded")]
    final = decide(observe(limited, jobs=jobs), CONFIG)
    assert final.actions == []
    assert final.status["phase"] == "Failed" and final.status["reason"] == "DeadlineExceeded"
    assert "2 failed attempt(s), backoffLimit 1" in conditions(final.status)["Failed"]["message"]
    assert [(r.result, r.kind) for r in final.finished] == [("failed", "CorpusFilter")]

    generous = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 2}), status={"attempts": 2})
    retry = decide(observe(generous, jobs=jobs), CONFIG)
    (create,) = [action for action in retry.actions if isinstance(action, CreateRayJob)]
    assert create.attempt == 3 and retry.status["attempts"] == 3
    assert "AttemptFailed" in [event.reason for event in retry.events]


def test_retry_waits_for_the_backoff_delay():
    config = OperatorConfig(store="s3://store", retry_backoff_seconds=10)
    stored = body(dict(WEB, spec={**WEB["spec"], "backoffLimit": 3}), status={"attempts": 1})
    ended = T0 - timedelta(seconds=4)
    waiting = decide(observe(stored, jobs=[job(1, "Failed", reason="AppFailed", end=ended)]), config)
    assert waiting.actions == [] and waiting.status["reason"] == "BackoffDelay"
    assert waiting.requeue_after == 6.0
    later = decide(observe(stored, jobs=[job(1, "Failed", reason="AppFailed", end=ended)],
                           now=T0 + timedelta(seconds=7)), config)
    assert any(isinstance(action, CreateRayJob) for action in later.actions)


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
    deleting = body(document, finalizers=[naming.FINALIZER], deletionTimestamp="2026-01-01T12:00:00Z")
    busy = decide(observe(deleting, jobs=[job(1, "Running")]), CONFIG)
    assert busy.actions == [DeleteRayJob("cf-web-1")] and busy.requeue_after and busy.status is None
    clean = decide(observe(deleting, jobs=[]), CONFIG)
    assert clean.actions == [DeleteOutputs(OUTPUT), SetFinalizer(False)]
    retained = body(WEB, finalizers=[naming.FINALIZER])
    assert decide(observe(retained), CONFIG).actions[0] == SetFinalizer(False)
