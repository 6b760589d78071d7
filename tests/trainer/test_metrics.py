"""The workload's Prometheus metrics: from its progress record to the exposition a PodMonitor scrapes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.trainer.test_train_stage import make_data, stage_spec, write_spec
from tokenmill.store import Progress, write_progress
from tokenmill.trainer.__main__ import start_metrics
from tokenmill.trainer.metrics import ProgressCollector, progress_metrics, serve_workload_metrics
from tokenmill.workloads import METRICS_PORT_ENV

LABELS = {"kind": "TrainingStage", "namespace": "team", "name": "pretrain"}
TRAINING = Progress(
    phase="training", done=30, total=120, unit="steps", message="step 30/120",
    metrics={"step": 30, "loss": 2.5, "lr": 3e-4, "grad_norm": 0.8, "tokens_per_s": 51200.0, "mfu": 0.41,
             "tokens_seen": 1_966_080},
)


def samples(families) -> dict[str, tuple[dict[str, str], float]]:
    return {s.name: (s.labels, s.value) for family in families for s in family.samples}


def test_training_progress_becomes_labelled_gauges_and_a_token_counter() -> None:
    found = samples(progress_metrics(TRAINING, LABELS))
    assert found["tokenmill_train_loss"] == (LABELS, 2.5)
    assert found["tokenmill_train_mfu_ratio"][1] == 0.41
    assert found["tokenmill_train_learning_rate"][1] == 3e-4
    assert found["tokenmill_train_tokens_per_second"][1] == 51200.0
    assert found["tokenmill_train_grad_norm"][1] == 0.8
    assert found["tokenmill_train_step"][1] == 30
    assert found["tokenmill_train_tokens_total"][1] == 1_966_080
    assert found["tokenmill_workload_progress_ratio"][1] == 0.25
    assert found["tokenmill_workload_phase"] == ({**LABELS, "phase": "training"}, 1.0)


def test_no_progress_yet_and_other_kinds() -> None:
    assert progress_metrics(None, LABELS) == []
    starting = Progress(phase="starting")
    assert set(samples(progress_metrics(starting, LABELS))) == {"tokenmill_workload_phase"}
    other = samples(progress_metrics(TRAINING, {**LABELS, "kind": "PTSJob"}))
    assert not any(name.startswith("tokenmill_train_") for name in other)


def test_the_record_is_read_at_most_once_per_refresh_interval() -> None:
    reads, now = [], [0.0]

    def read() -> Progress:
        reads.append(now[0])
        return TRAINING

    collector = ProgressCollector(read, LABELS, refresh_seconds=5.0, clock=lambda: now[0])
    for moment in (0.0, 1.0, 4.9, 5.0, 6.0, 11.0):
        now[0] = moment
        list(collector.collect())
    assert reads == [0.0, 5.0, 11.0]


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[str, str]]:
    output = (tmp_path / "out").as_uri()
    doc = {"kind": "TrainingStage", "metadata": {"namespace": "team", "name": "pretrain"}, "output": output}
    server = serve_workload_metrics(doc, 0, address="127.0.0.1", refresh_seconds=0.0)
    try:
        yield output, f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def scrape(url: str) -> dict[str, tuple[dict[str, str], float]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return samples(text_string_to_metric_families(response.read().decode()))


def test_metrics_follow_the_progress_over_http(served) -> None:
    output, url = served
    # Nothing written yet: no workload series (the process's live generation counters may be there).
    assert not any(name.startswith(("tokenmill_workload_", "tokenmill_train_")) for name in scrape(url))
    write_progress(output, TRAINING)
    assert scrape(url)["tokenmill_train_loss"] == (LABELS, 2.5)
    write_progress(output, Progress(phase="training", done=60, total=120, unit="steps",
                                    metrics={**TRAINING.metrics, "loss": 1.75, "step": 60}))
    after = scrape(url)
    assert after["tokenmill_train_loss"][1] == 1.75 and after["tokenmill_workload_progress_ratio"][1] == 0.5


def test_a_bad_port_is_reported_and_never_stops_the_workload(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv(METRICS_PORT_ENV, "not-a-port")
    start_metrics((tmp_path / "out" / "_run" / "spec.json").as_uri())
    assert "not serving metrics on port 'not-a-port': invalid literal for int()" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_training_entrypoint_serves_its_metrics_while_it_trains(tmp_path) -> None:
    docs = tmp_path / "docs"
    make_data.write(docs, 200)
    spec = stage_spec(docs.as_uri())
    spec["optimization"]["totalTokens"] *= 4  # 48 steps: several seconds of training to scrape
    spec_uri = write_spec((tmp_path / "out").as_uri(), spec, name="metered")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[METRICS_PORT_ENV] = str(port)
    command = [sys.executable, "-m", "tokenmill.trainer", "training-stage", "--spec", spec_uri]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[float] = []
    try:
        while driver.poll() is None:
            try:
                found = scrape(f"http://127.0.0.1:{port}/metrics")
            except OSError:  # not listening yet
                found = {}
            if "tokenmill_train_loss" in found:
                labels, loss = found["tokenmill_train_loss"]
                assert labels == {"kind": "TrainingStage", "namespace": "", "name": "metered"}
                seen.append(loss)
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            driver.kill()
        stderr = driver.communicate()[1]
    assert driver.returncode == 0, stderr[-2000:]
    assert seen, "no training metrics were scraped while the stage ran"
    assert len(set(seen)) >= 2, seen  # the served loss followed training
