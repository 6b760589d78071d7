"""Run records: resolved spec, progress, and the driver-log uploader; on file:// and S3."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tokenmill.layout import driver_log_uri, progress_uri, run_spec_uri
from tokenmill.store import (
    DriverLogUploader,
    ObjectNotFoundError,
    Progress,
    StoreError,
    open_store,
    read_progress,
    read_run_spec,
    write_progress,
    write_run_spec,
)


def read_object(uri: str) -> bytes:
    parent, _, name = uri.rpartition("/")
    return open_store(parent).read_bytes(name)


def test_run_spec_round_trip(base_uri: str) -> None:
    spec = {
        "kind": "TrainingStage",
        "spec": {"stage": "sft", "datasets": [{"uri": "s3://x/y", "weight": 0.4}]},
    }
    assert write_run_spec(base_uri, spec) == run_spec_uri(base_uri)
    assert read_run_spec(base_uri) == spec
    with pytest.raises(ObjectNotFoundError):
        read_run_spec(f"{base_uri}/elsewhere")


def test_progress_round_trip(base_uri: str) -> None:
    assert read_progress(base_uri) is None
    written = write_progress(
        base_uri,
        Progress(
            phase="train",
            done=250,
            total=1000,
            unit="steps",
            metrics={"loss": 2.5, "bad": float("nan")},
        ),
    )
    read = read_progress(base_uri)
    assert read == Progress(
        phase="train",
        done=250,
        total=1000,
        unit="steps",
        metrics={"loss": 2.5},
        updated_at=written.updated_at,
    )
    assert read is not None and read.fraction == 0.25 and read.updated_at.endswith("Z")
    raw = open_store(progress_uri(base_uri).rsplit("/", 1)[0]).read_json("progress.json")
    assert raw["fraction"] == 0.25 and "bad" not in raw["metrics"]
    assert len(read_object(progress_uri(base_uri))) < 512  # small: the operator polls it


def test_progress_fraction_edge_cases() -> None:
    assert Progress(done=5).fraction is None
    assert Progress(done=5, total=0).fraction is None
    assert Progress(done=15, total=10).fraction == 1.0
    assert Progress.from_dict({"done": 1, "extra": "ignored"}).done == 1


def test_driver_log_uploaded_while_running_and_at_the_end(base_uri: str, tmp_path: Path) -> None:
    log = tmp_path / "driver.log"
    log.write_text("starting\n")
    uploader = DriverLogUploader(log, base_uri, interval_s=0.05)
    with uploader:
        deadline = time.monotonic() + 10
        while uploader.uploads == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert read_object(driver_log_uri(base_uri)) == b"starting\n"  # uploaded while running
        with log.open("a") as handle:
            handle.write("step 1\n")
    assert read_object(driver_log_uri(base_uri)) == b"starting\nstep 1\n"  # final upload on exit
    count = uploader.uploads
    assert not uploader.upload_now() and uploader.uploads == count  # unchanged file: no upload


def test_driver_log_without_a_file_uploads_nothing(base_uri: str, tmp_path: Path) -> None:
    with DriverLogUploader(tmp_path / "absent.log", base_uri, interval_s=0.05) as uploader:
        assert not uploader.upload_now()  # what every tick does: nothing to upload
    assert uploader.uploads == 0
    with pytest.raises(ObjectNotFoundError):
        read_object(driver_log_uri(base_uri))


def test_final_upload_failure_is_raised_unless_already_failing(tmp_path: Path) -> None:
    log = tmp_path / "driver.log"
    log.write_text("x")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output directory should be")
    with pytest.raises(StoreError), DriverLogUploader(log, blocked.as_uri(), interval_s=60):
        log.write_text("a line the uploader cannot store\n")
    # the workload's own error is not masked by the upload's
    with pytest.raises(KeyError), DriverLogUploader(log, blocked.as_uri(), interval_s=60):
        raise KeyError("workload failed")
