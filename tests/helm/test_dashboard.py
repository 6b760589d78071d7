"""The Grafana dashboard's queries, run by a real Prometheus against the real metrics endpoints.

Prometheus (Debian's package) scrapes a running operator (kopf against the emulated API
server, driving CorpusFilters, a SyntheticDataJob, a TrainingStage and a PTSJob through the
KubeRay stand-in to success and failure), a running training workload's driver (the real
entrypoint training a tiny model) and the metrics servers of a CorpusFilter, a
SyntheticDataJob and a PTSJob workload that ran to completion (the real entrypoints on a small
corpus, a few seeds with the scripted engine and a tiny model; the server their drivers run,
serving the final progress record). Every panel's PromQL must
parse, and must return series once they have reported; every metric a panel names must be
one the code exports.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.prometheus import Prometheus, PrometheusError
from tests.fixtures.s3 import free_port
from tests.helm.chart import CHART
from tests.operator.conftest import apply, commit_dataset, corpus, phase_is, pts, stage
from tests.operator.emulator import _status_response
from tests.operator.standin import Behaviour
from tests.trainer import curate_corpus
from tests.trainer.generate_fixtures import TINY_GEN, tiny_model
from tests.trainer.synth_fixtures import spec as synth_spec
from tests.trainer.synth_fixtures import write_seeds
from tests.trainer.test_pts_workload import answers_the_policy_reaches, problem, write_problems
from tests.trainer.test_train_stage import make_data, stage_spec
from tokenmill.api.resources import KINDS
from tokenmill.operator import naming
from tokenmill.store import open_store, read_run_spec_at, write_run_spec
from tokenmill.trainer.metrics import serve_workload_metrics
from tokenmill.trainer.model.hf import export_hf
from tokenmill.workloads import METRICS_PORT_ENV

DASHBOARD = CHART / "dashboards" / "tokenmill.json"
# What Grafana puts in place of its variables; `$namespace` is "All".
VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "1h", "$namespace": ".*"}
WORKLOAD_NAMESPACE = "research"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_queries() -> list[tuple[str, str, str]]:
    """(row, panel title, PromQL with Grafana's variables filled in) of every panel target."""
    queries, row = [], ""
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{row} / {panel['title']}: a variable the test does not know: {expr}"
            queries.append((row, panel["title"], expr))
    return queries


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\btokenmill_[a-z0-9_]+", expr))


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), {
        "tokenmill-operator": {},
        # As the chart's PodMonitor: the workload's own namespace label wins over the target's.
        "tokenmill-workloads": {"honor_labels": True},
    }).start()
    try:
        yield server
    finally:
        server.stop()


def _stop(driver: subprocess.Popen[bytes]) -> None:
    """Stop a workload's driver and the local Ray it started (they share its process group)."""
    for sent in (signal.SIGTERM, signal.SIGKILL):
        if driver.poll() is not None:
            return
        os.killpg(driver.pid, sent)
        try:
            driver.wait(30)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def training_workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The training entrypoint, training a tiny model for longer than the test needs; its metrics address."""
    root = tmp_path_factory.mktemp("training")
    make_data.write(root / "docs", 200)
    spec = stage_spec((root / "docs").as_uri(), checkpoint={"intervalSteps": 100000, "keepLast": 1})
    spec["optimization"]["totalTokens"] *= 1000
    spec["datasets"][0]["epochs"] = 1000
    output = (root / "out").as_uri()
    spec_uri = write_run_spec(output, {
        "runSpecVersion": 1, "kind": "TrainingStage", "attempt": 1, "output": output, "spec": spec,
        "metadata": {"name": "pretrain", "namespace": WORKLOAD_NAMESPACE},
    })
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update({METRICS_PORT_ENV: str(port), "TOKENMILL_TRAIN_LOG_EVERY": "2"})
    log = open(root / "driver.log", "wb")
    driver = subprocess.Popen([sys.executable, "-m", "tokenmill.trainer", "training-stage", "--spec", spec_uri],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _stop(driver)
        log.close()


class FinishedWorkload:
    """A workload's real entrypoint run to completion, then its final progress record served by
    the metrics server its driver runs (the driver itself has exited by then)."""

    def __init__(self, root: Path, document: dict[str, Any]):
        self.root = root
        output = (root / "out").as_uri()
        self.spec_uri = write_run_spec(output, {"runSpecVersion": 1, "attempt": 1, "output": output, **document})
        cli_name = KINDS[document["kind"]].cli_name
        env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", METRICS_PORT_ENV)}
        with open(root / "driver.log", "wb") as log:
            self.driver = subprocess.Popen(
                [sys.executable, "-m", "tokenmill.trainer", cli_name, "--spec", self.spec_uri],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.servers: list[Any] = []

    def served(self) -> str:
        """Wait for success; the address of its metrics."""
        returncode = self.driver.wait(timeout=400)
        assert returncode == 0, (self.root / "driver.log").read_text(errors="replace")[-3000:]
        server = serve_workload_metrics(read_run_spec_at(self.spec_uri), 0, address="127.0.0.1")
        self.servers.append(server)
        return f"127.0.0.1:{server.server_port}"

    def stop(self) -> None:
        _stop(self.driver)
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def corpus_workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FinishedWorkload]:
    """The CorpusFilter entrypoint (on Ray) on a small corpus with planted duplicates and contamination."""
    root = tmp_path_factory.mktemp("corpus")
    uris = curate_corpus.write(curate_corpus.build(), (root / "inputs").as_uri())
    workload = FinishedWorkload(root, {"kind": "CorpusFilter", "spec": curate_corpus.spec(uris),
                                       "metadata": {"name": "web", "namespace": WORKLOAD_NAMESPACE}})
    yield workload
    workload.stop()


@pytest.fixture(scope="module")
def synth_workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FinishedWorkload]:
    """The SyntheticDataJob entrypoint (on Ray) with the scripted engine: an agreement filter (which
    drops the seed without an answer) and self-revision over a few math questions."""
    root = tmp_path_factory.mktemp("synth")
    seeds = write_seeds((root / "seeds").as_uri())
    workload = FinishedWorkload(root, {"kind": "SyntheticDataJob", "spec": synth_spec(seeds),
                                       "metadata": {"name": "math", "namespace": WORKLOAD_NAMESPACE}})
    yield workload
    workload.stop()


@pytest.fixture(scope="module")
def pts_workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FinishedWorkload]:
    """The PTSJob entrypoint on a tiny random model and three problems whose answers it can reach."""
    root = tmp_path_factory.mktemp("pts")
    export_hf(tiny_model(0, sharpness=1.0), TINY_GEN, root / "model", dtype="float32")
    model = (root / "model").as_uri()
    answers = answers_the_policy_reaches(model, 3)
    problems = write_problems((root / "problems").as_uri(),
                              [problem(index, answer=answer) for index, answer in enumerate(answers)])
    spec = {"model": {"uri": model}, "problems": {"uri": problems}, "oracle": {"kind": "math"}, "engine": "torch",
            "solutionsPerProblem": 3, "samplesPerEstimate": 8, "pGap": 0.3,
            "queryFilter": {"minSuccess": 0.0, "maxSuccess": 1.0}, "maxPivotalTokens": 4,
            "rollout": {"temperature": 1.0, "maxTokens": 16, "seed": 3}}
    workload = FinishedWorkload(root, {"kind": "PTSJob", "spec": spec,
                                       "metadata": {"name": "search", "namespace": WORKLOAD_NAMESPACE}})
    yield workload
    workload.stop()


def test_the_dashboard_has_a_row_per_kind_and_one_for_the_operator() -> None:
    board = dashboard()
    rows = [panel["title"] for panel in board["panels"] if panel["type"] == "row"]
    assert rows == ["Operator", *KINDS]
    variables = {item["name"]: item for item in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["includeAll"] and variables["namespace"]["allValue"] == ".*"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"])
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    # Grafana's 24-column grid: every panel fits, none covers another.
    covered: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        place = panel["gridPos"]
        assert place["x"] + place["w"] <= 24, panel["title"]
        for cell in ((x, y) for x in range(place["x"], place["x"] + place["w"])
                     for y in range(place["y"], place["y"] + place["h"])):
            assert cell not in covered, f"{panel['title']} covers {covered[cell]}"
            covered[cell] = panel["title"]


def test_every_panel_query_parses(prometheus: Prometheus) -> None:
    with pytest.raises(PrometheusError, match="bad_data"):  # the check can fail
        prometheus.query("sum(rate(tokenmill_stage_runs_total[30s])")
    for row, title, expr in panel_queries():
        try:
            prometheus.query(expr)
        except PrometheusError as error:
            pytest.fail(f"{row} / {title}: {expr}: {error}")


async def run_every_kind_through_the_operator(kube, start_operator, standin, store_root: str, prometheus: Prometheus):
    """Attempts of every kind succeed, one fails, and one reconciliation meets an API error."""
    commit_dataset(f"{store_root}/raw")
    open_store(f"{store_root}/teacher").write_json("config.json", {"architectures": ["Phi3ForCausalLM"]})
    failed_once: list[str] = []

    async def fail_first_status_patch(request):
        if request.method == "PATCH" and request.path.endswith("/status") and not failed_once:
            failed_once.append(request.path)
            return _status_response(500, "InternalError", "etcd is having a bad day")
        return None

    kube.faults.append(fail_first_status_patch)
    operator = await start_operator()
    prometheus.add_targets("tokenmill-operator", operator.metrics_url.removeprefix("http://"))

    def policy(job):
        if job["metadata"]["labels"][naming.LABEL_NAME] == "bad":
            return Behaviour(env={"FAKE_FAIL_AFTER_SHARDS": "1"})
        return Behaviour()

    await standin(policy=policy)
    raw = f"{store_root}/raw"
    synthetic = {
        "apiVersion": "tokenmill.dev/v1alpha1", "kind": "SyntheticDataJob",
        "metadata": {"name": "rewrites", "namespace": "default"},
        "spec": {"seeds": [{"uri": raw}], "datasetType": "documents",
                 "workflow": [{"type": "rewrite", "rewrite": {"targets": ["exercise"]}}],
                 "generator": {"engine": "torch", "model": {"uri": f"{store_root}/teacher"}},
                 "ray": {"workers": {"replicas": 1, "gpusPerWorker": 0}}},
    }
    documents = [
        corpus("web", inputs=[{"name": "raw", "uri": raw}]),
        corpus("bad", inputs=[{"name": "raw", "uri": raw}], backoffLimit=0),
        synthetic,
        stage("pretrain", datasets=[{"uri": raw, "weight": 1.0, "uniqueTokens": 100000}]),
        pts("search", model={"uri": f"{store_root}/teacher"}, problems={"uri": raw}),
    ]
    for document in documents:
        await apply(kube, document)
    for document in documents:
        name = document["metadata"]["name"]
        await phase_is(kube, document["kind"], name, "Failed" if name == "bad" else "Succeeded")
    assert failed_once


@pytest.mark.slow
async def test_every_panel_returns_series_from_the_running_operator_and_workload(
        prometheus, training_workload, corpus_workload, synth_workload, pts_workload, kube, start_operator, standin,
        store_root) -> None:
    prometheus.add_targets("tokenmill-workloads", training_workload)
    await run_every_kind_through_the_operator(kube, start_operator, standin, store_root, prometheus)
    for finished in (corpus_workload, synth_workload, pts_workload):
        prometheus.add_targets("tokenmill-workloads", await asyncio.to_thread(finished.served))

    queries = panel_queries()

    def empty_panels() -> list[str]:
        return [f"{row} / {title}: {expr}" for row, title, expr in queries if not prometheus.query(expr)]

    deadline, empty = time.monotonic() + 420, ["not queried yet"]
    while time.monotonic() < deadline:
        empty = await asyncio.to_thread(empty_panels)
        if not empty:
            break
        await asyncio.sleep(1)
    targets = [(t["labels"]["job"], t["health"], t.get("lastError")) for t in prometheus.health_of_targets()]
    assert not empty, f"panels without series: {empty}; targets: {targets}"

    # Every metric a panel names is one the operator or the workload exports.
    exported = set(await asyncio.to_thread(prometheus.api, "label/__name__/values"))
    named = set().union(*(metric_names(expr) for _, _, expr in queries))
    assert named - exported == set(), "panels name metrics the code does not export"
    # The namespace variable's values: the workloads' namespaces.
    series = await asyncio.to_thread(prometheus.api, "series", **{"match[]": "tokenmill_workload_phase"})
    assert {item["namespace"] for item in series} == {WORKLOAD_NAMESPACE}
    # Every kind's row shows that kind: a panel filtered on a kind returns only that kind.
    for row, title, expr in queries:
        if row in KINDS and 'kind="' in expr:
            kinds = {item["metric"].get("kind") for item in prometheus.query(expr)} - {None}
            assert kinds <= {row}, f"{row} / {title} shows {kinds}"

