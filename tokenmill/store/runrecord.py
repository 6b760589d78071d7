"""Run records under `<output>/_run/`: the resolved spec, progress, and the driver's log."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

from tokenmill.layout import driver_log_uri, progress_uri, run_spec_uri
from tokenmill.store.errors import ObjectNotFoundError, StaleAttemptError, StoreError
from tokenmill.store.manifest import utc_now
from tokenmill.store.opener import open_parent

log = logging.getLogger("tokenmill.store")


def write_run_spec(output: str, spec: Mapping[str, Any]) -> str:
    """Write the resolved spec the workload runs from; returns its URI."""
    uri = run_spec_uri(output)
    store, name = open_parent(uri)
    store.write_json(name, dict(spec))
    return uri


def read_run_spec_at(uri: str) -> dict[str, Any]:
    """The run spec at its own URI: what a workload is given (`--spec <uri>`)."""
    store, name = open_parent(uri)
    return store.read_json(name)


def read_run_spec(output: str) -> dict[str, Any]:
    return read_run_spec_at(run_spec_uri(output))


@dataclass(frozen=True)
class AttemptFence:
    """Keeps a stale attempt from committing or deleting: before each commit or garbage
    collection a writer checks that the run record (`<output>/_run/spec.json`, rewritten by the
    operator when it starts the next attempt) still names its attempt.

    The operator stops an attempt's RayJob before starting the next, so this is the second
    line: a Ray worker that outlived its cluster's deletion, or a driver that hung and woke up,
    fails with StaleAttemptError instead of overwriting or removing the new attempt's files.
    """

    output: str
    attempt: int

    @classmethod
    def from_run_spec(cls, run: Mapping[str, Any]) -> AttemptFence:
        """The fence of the attempt a run spec (as the operator or the local runner wrote it) starts."""
        return cls(str(run["output"]), int(run["attempt"]))

    def check(self, doing: str) -> None:
        uri = run_spec_uri(self.output)
        try:
            current = read_run_spec(self.output).get("attempt")
        except ObjectNotFoundError:
            raise StaleAttemptError(f"attempt {self.attempt} may not {doing}: its run record {uri} is gone",
                                    uri) from None
        if current != self.attempt:
            raise StaleAttemptError(
                f"attempt {self.attempt} may not {doing}: the run record {uri} names attempt {current}", uri
            )


@dataclass(frozen=True)
class Progress:
    """How far a workload is; small, because the operator polls it.

    `done` and `total` count `unit`s (documents, steps, tokens…); `total` is None while
    unknown. `metrics` holds a few current figures (loss, tokens/s) for the status line.
    """

    phase: str = ""
    done: float = 0
    total: float | None = None
    unit: str = ""
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    updated_at: str = ""

    @property
    def fraction(self) -> float | None:
        if not self.total or self.total <= 0:
            return None
        return max(0.0, min(1.0, self.done / self.total))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fraction"] = self.fraction
        data["metrics"] = {k: v for k, v in self.metrics.items() if math.isfinite(v)}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Progress:
        total = data.get("total")
        metrics = data.get("metrics") or {}
        return cls(
            phase=str(data.get("phase", "")),
            done=float(data.get("done", 0)),
            total=None if total is None else float(total),
            unit=str(data.get("unit", "")),
            message=str(data.get("message", "")),
            metrics={str(k): float(v) for k, v in metrics.items()},
            updated_at=str(data.get("updated_at", "")),
        )


def write_progress(output: str, progress: Progress) -> Progress:
    """Replace the progress record (stamping updated_at); returns what was written."""
    stamped = Progress(**{**asdict(progress), "updated_at": utc_now()})
    store, name = open_parent(progress_uri(output))
    store.write_json(name, stamped.to_dict())
    return stamped


def read_progress(output: str) -> Progress | None:
    """The last progress written, or None if the workload has not written any yet."""
    store, name = open_parent(progress_uri(output))
    try:
        return Progress.from_dict(store.read_json(name))
    except ObjectNotFoundError:
        return None


class DriverLogUploader:
    """Uploads a local log file to `<output>/_run/driver.log` every `interval_s` while the
    job runs (a daemon thread) and once more on stop(), so the log outlives the cluster.

    S3 has no append: each upload replaces the object with the whole file, and only when
    the file changed since the last upload. Failed periodic uploads are logged and tried
    again at the next tick; the final one raises.

        with DriverLogUploader("/tmp/ray/driver.log", output):
            run_the_workload()
    """

    def __init__(
        self, local_path: str | os.PathLike[str], output: str, *, interval_s: float = 30.0
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.local_path = os.fspath(local_path)
        self.uri = driver_log_uri(output)
        self.interval_s = interval_s
        self._store, self._name = open_parent(self.uri)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._uploaded: tuple[int, int] | None = None
        self.uploads = 0

    def start(self) -> DriverLogUploader:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="tokenmill-log-upload", daemon=True
            )
            self._thread.start()
        return self

    def upload_now(self) -> bool:
        """Upload if the file changed since the last upload; returns whether it uploaded."""
        with self._lock:
            try:
                stat = os.stat(self.local_path)
            except FileNotFoundError:
                return False
            version = (stat.st_size, stat.st_mtime_ns)
            if version == self._uploaded:
                return False
            self._store.upload_file(self.local_path, self._name)
            self._uploaded = version
            self.uploads += 1
            return True

    def stop(self) -> None:
        """Stop the thread and upload the final state of the log."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.upload_now()

    def __enter__(self) -> DriverLogUploader:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        except StoreError:
            if exc is None:
                raise
            log.exception("final upload of %s failed", self.uri)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.upload_now()
            except StoreError as error:
                log.warning("uploading %s failed, will retry: %s", self.uri, error)
