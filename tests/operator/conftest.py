"""Fixtures for the operator tests: the emulated API server, the operator, KubeRay's stand-in.

- `kube`: kmock's Kubernetes emulator (with the gaps filled in tests/operator/emulator.py)
  served over HTTP on 127.0.0.1, our four CRDs (from tokenmill.api.crd), RayJobs, Secrets,
  Events and kopf's peering resources registered; KUBECONFIG points at it.
- `start_operator(**config)`: the real operator, through kopf.operator() with our handlers,
  in this event loop; returns a handle to stop it gracefully or kill it.
- `standin(**options)`: the KubeRay stand-in (tests/operator/standin.py).
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import yaml

from tests.operator.emulator import Call, Emulator, ResourceSpec
from tests.operator.standin import KubeRayStandIn
from tokenmill.api.crd import all_crds
from tokenmill.operator.config import OperatorConfig
from tokenmill.operator.controller import Controller
from tokenmill.operator.handlers import MEMO_CONFIG, MEMO_CONTROLLER, register

RAYJOBS = ResourceSpec("ray.io", "v1", "rayjobs", "RayJob", short_names=("rayjob",))
SECRETS = ResourceSpec("", "v1", "secrets", "Secret", status_subresource=False)
EVENTS = ResourceSpec("", "v1", "events", "Event", status_subresource=False)
PEERINGS = ResourceSpec("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", namespaced=False,
                        status_subresource=False)
NS_PEERINGS = ResourceSpec("kopf.dev", "v1", "kopfpeerings", "KopfPeering", status_subresource=False)


def crd_specs() -> dict[str, ResourceSpec]:
    """Our kinds as the CRDs generated from the API define them."""
    specs = {}
    for crd in all_crds().values():
        names = crd["spec"]["names"]
        version = crd["spec"]["versions"][0]
        specs[names["kind"]] = ResourceSpec(
            crd["spec"]["group"], version["name"], names["plural"], names["kind"],
            namespaced=crd["spec"]["scope"] == "Namespaced",
            status_subresource="status" in (version.get("subresources") or {}),
            short_names=tuple(names.get("shortNames") or ()),
            categories=tuple(names.get("categories") or ()),
        )
    return specs


KINDS = crd_specs()


@pytest.fixture(scope="session")
def recorded_calls() -> list[Call]:
    """Every HTTP call any emulator of this session received (for the RBAC test)."""
    return []


@pytest.fixture
async def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded_calls: list[Call]) -> AsyncIterator[Emulator]:
    emulator = Emulator()
    for spec in (*KINDS.values(), RAYJOBS, SECRETS, EVENTS, PEERINGS, NS_PEERINGS):
        emulator.register(spec)
    async with emulator, kmock.Server(emulator) as server:
        url = str(server.url).rstrip("/")
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": url}}],
            "users": [{"name": "kmock", "user": {"token": "test-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
            "current-context": "kmock",
        }))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        emulator.api_url = url  # type: ignore[attr-defined]
        emulator.kubeconfig = kubeconfig  # type: ignore[attr-defined]
        try:
            yield emulator
        finally:
            recorded_calls.extend(emulator.calls)


@pytest.fixture
def store_root(tmp_path: Path) -> str:
    root = tmp_path / "store"
    root.mkdir()
    return root.as_uri()


def operator_config(store: str, **changes: Any) -> OperatorConfig:
    base = OperatorConfig(
        store=store,
        resync_seconds=1.0,
        retry_backoff_seconds=0.0,
        error_backoff_seconds=0.2,
        error_backoff_max_seconds=2.0,
        workers=4,
        api_threads=8,
        metrics_port=0,
        standalone=True,
        peering_check_seconds=0.3,
    )
    return base.with_overrides(**changes)


class OperatorHandle:
    """The real operator (kopf.operator with our handlers) on its own thread and event loop.

    Its own loop, because kopf treats every task of its loop as its own and cancels them when
    it stops: an operator sharing the test's loop would take the emulator, the stand-in and a
    second operator down with it.
    """

    def __init__(self, config: OperatorConfig, *, standalone: bool, priority: int, peering: str,
                 settings: kopf.OperatorSettings, liveness: str | None = None):
        self.config = config
        self.memo = kopf.Memo({MEMO_CONFIG: config})
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._arguments = dict(
            registry=register(kopf.OperatorRegistry()),
            settings=settings,
            clusterwide=config.clusterwide,
            namespaces=list(config.namespaces),
            standalone=standalone,
            peering_name=None if standalone else peering,
            priority=priority,
            memo=self.memo,
            stop_flag=self.stop_flag,
            liveness_endpoint=liveness,
        )
        self.thread = threading.Thread(target=self._main, name="operator", daemon=True)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._task = loop.create_task(kopf.operator(**self._arguments))
        try:
            loop.run_until_complete(self._task)
        except BaseException as error:  # cancellation (kill) or a crash, kept for the test
            self.error = error
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def start(self) -> OperatorHandle:
        self.thread.start()
        deadline = time.monotonic() + 30
        while MEMO_CONTROLLER not in self.memo:
            if not self.thread.is_alive():
                raise RuntimeError(f"the operator exited: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("the operator did not start")
            await asyncio.sleep(0.02)
        return self

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    @property
    def controller(self) -> Controller:
        return self.memo[MEMO_CONTROLLER]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.controller.health_server.port}"

    async def stop(self) -> None:
        """Graceful shutdown, as on SIGTERM."""
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 30)

    async def kill(self) -> None:
        """Abrupt stop: every task of the operator is cancelled wherever it is."""
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        await asyncio.to_thread(self.thread.join, 30)
        # kopf waits for a threading stop-flag in an executor thread; release it, or that
        # thread blocks the interpreter's exit.
        self.stop_flag.set()


@pytest.fixture
async def start_operator(kube: Emulator, store_root: str) -> AsyncIterator[Callable[..., Awaitable[OperatorHandle]]]:
    handles: list[OperatorHandle] = []

    async def start(*, standalone: bool = True, priority: int = 0, peering: str = "tokenmill",
                    liveness: str | None = None, **changes: Any) -> OperatorHandle:
        config = operator_config(changes.pop("store", store_root), standalone=standalone, **changes)
        settings = kopf.OperatorSettings()
        settings.queueing.idle_timeout = 0.3  # per-object workers linger 5 s by default: slow exits
        settings.queueing.exit_timeout = 0.5
        handle = OperatorHandle(config, standalone=standalone, priority=priority, peering=peering, settings=settings,
                                liveness=liveness)
        handles.append(handle)
        return await handle.start()

    yield start
    for handle in handles:
        if handle.running:
            await handle.stop()
        # kopf waits for a threading stop-flag in an executor thread even after a failed start;
        # release it, or that thread blocks the interpreter's exit.
        handle.stop_flag.set()


@pytest.fixture
async def standin(kube: Emulator, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    created: list[KubeRayStandIn] = []
    log_dir = tmp_path / "workload-logs"
    log_dir.mkdir()

    async def make(**options: Any) -> KubeRayStandIn:
        options.setdefault("log_dir", log_dir)
        runner = KubeRayStandIn(kube, RAYJOBS, SECRETS, **options)
        await runner.__aenter__()
        created.append(runner)
        return runner

    yield make
    for runner in created:
        await runner.__aexit__(None, None, None)


# ---- resources ----------------------------------------------------------------------------


def corpus(name: str, *, inputs: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tokenmill.dev/v1alpha1", "kind": "CorpusFilter",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"inputs": inputs, "ray": {"workers": {"replicas": 1, "gpusPerWorker": 0}}, **spec},
    }


def stage(name: str, *, datasets: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tokenmill.dev/v1alpha1", "kind": "TrainingStage",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "stage": "pretrain", "model": {"config": "tiny"}, "datasets": datasets, "sequenceLength": 128,
            "optimization": {"globalBatchSequences": 8, "microBatchSequences": 2, "peakLearningRate": 1e-3,
                             "totalTokens": 2048},
            "ray": {"workers": {"replicas": 2, "gpusPerWorker": 0}},
            **spec,
        },
    }


def pts(name: str, *, model: dict[str, Any], problems: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tokenmill.dev/v1alpha1", "kind": "PTSJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"model": model, "problems": problems, "oracle": {"kind": "math"}, "engine": "torch",
                 "ray": {"workers": {"replicas": 1, "gpusPerWorker": 0}}, **spec},
    }


def ref(kind: str, name: str) -> dict[str, Any]:
    return {"ref": {"kind": kind, "name": name}}


async def apply(kube: Emulator, document: dict[str, Any]) -> dict[str, Any]:
    return await kube.create(KINDS[document["kind"]], copy.deepcopy(document))


def get(kube: Emulator, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
    return kube.get(KINDS[kind], namespace, name)


def status(kube: Emulator, kind: str, name: str) -> dict[str, Any]:
    body = get(kube, kind, name)
    return (body or {}).get("status") or {}


def condition(kube: Emulator, kind: str, name: str, kind_of_condition: str) -> dict[str, Any]:
    for item in status(kube, kind, name).get("conditions") or ():
        if item["type"] == kind_of_condition:
            return item
    return {}


def rayjobs(kube: Emulator, name_prefix: str = "") -> list[dict[str, Any]]:
    return sorted((job for job in kube.list(RAYJOBS) if job["metadata"]["name"].startswith(name_prefix)),
                  key=lambda job: job["metadata"]["name"])


async def eventually(check: Callable[[], Any], *, timeout: float = 60.0, interval: float = 0.05,
                     message: str | Callable[[], str] = "") -> Any:
    """Wait until `check()` returns something truthy (or stops raising AssertionError)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except AssertionError as error:
            last = error
        await asyncio.sleep(interval)
    text = message() if callable(message) else message
    raise AssertionError(f"timed out after {timeout}s: {text or check}") from last


async def phase_is(kube: Emulator, kind: str, name: str, phase: str, timeout: float = 60.0) -> dict[str, Any]:
    return await eventually(lambda: status(kube, kind, name).get("phase") == phase and status(kube, kind, name),
                            timeout=timeout, message=lambda: f"{kind}/{name} phase {phase}; status now "
                                                             f"{status(kube, kind, name)}")


def commit_dataset(uri: str, rows: int = 5) -> None:
    """A committed documents dataset at `uri` (an input given by URI)."""
    from tokenmill.store import DOCUMENTS, DatasetWriter

    writer = DatasetWriter(uri, DOCUMENTS)
    writer.write_shard(0, [{"id": str(i), "text": f"raw {i}", "source": "test", "lang": "en", "meta": "{}"}
                           for i in range(rows)])
    writer.finalize(expected=[0])
