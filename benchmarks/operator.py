"""Operator throughput: 500 resources applied at once to the emulated API server.

The operator runs as its own process (`python -m tokenmill.operator`, standalone), exactly as in
a cluster, against kmock's Kubernetes emulator served over HTTP (tests/operator/emulator.py).
The KubeRay stand-in completes every RayJob at once: Initializing, Running, then Complete, after
writing what the workload would commit (a dataset manifest, or a committed checkpoint for a
TrainingStage) to a file:// store. Reported:

- seconds from the apply until every resource has its RayJob, and until every status is
  Succeeded (resources per second for both);
- the operator process's peak resident memory (VmHWM);
- the API requests the operator made, per resource.

    python benchmarks/operator.py [--resources 500] [--workers 8] [--api-threads 16]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import kmock  # noqa: E402
import yaml  # noqa: E402

from tests.operator.conftest import EVENTS, KINDS, PEERINGS, RAYJOBS, SECRETS, commit_dataset  # noqa: E402
from tests.operator.emulator import Emulator  # noqa: E402
from tests.operator.rbac import OPERATOR_AGENTS  # noqa: E402
from tests.operator.standin import KubeRayStandIn  # noqa: E402
from tokenmill.layout import dataset_uri  # noqa: E402

MIX = (("CorpusFilter", 0.4), ("SyntheticDataJob", 0.2), ("TrainingStage", 0.2), ("PTSJob", 0.2))


def documents(count: int, store: str) -> list[dict[str, Any]]:
    raw, teacher = f"{store}/raw", f"{store}/teacher"
    ray = {"workers": {"replicas": 1, "gpusPerWorker": 0}}
    make = {
        "CorpusFilter": lambda name: {"inputs": [{"name": "raw", "uri": raw}], "ray": ray},
        "SyntheticDataJob": lambda name: {
            "seeds": [{"uri": raw}], "datasetType": "documents",
            "workflow": [{"type": "rewrite", "rewrite": {"targets": ["exercise"]}}],
            "generator": {"engine": "torch", "model": {"uri": teacher}}, "ray": ray},
        "TrainingStage": lambda name: {
            "stage": "pretrain", "model": {"config": "tiny"}, "sequenceLength": 128,
            "datasets": [{"uri": raw, "weight": 1.0, "uniqueTokens": 100000}],
            "optimization": {"globalBatchSequences": 8, "microBatchSequences": 2, "peakLearningRate": 1e-3,
                             "totalTokens": 2048},
            "ray": {"workers": {"replicas": 2, "gpusPerWorker": 0}}},
        "PTSJob": lambda name: {"model": {"uri": teacher}, "problems": {"uri": raw}, "oracle": {"kind": "math"},
                                "engine": "torch", "ray": ray},
    }
    out = []
    counts = {kind: round(count * share) for kind, share in MIX}
    counts["CorpusFilter"] += count - sum(counts.values())
    for kind, number in counts.items():
        for index in range(number):
            name = f"{kind.lower()}-{index:04d}"
            out.append({"apiVersion": "tokenmill.dev/v1alpha1", "kind": kind,
                        "metadata": {"name": name, "namespace": "default"}, "spec": make[kind](name)})
    return out


def complete(rayjob: dict[str, Any], store: str) -> None:
    """What a finished workload leaves behind: a committed dataset manifest or checkpoint."""
    from tokenmill.store import CheckpointStore, Manifest, Producer, open_store

    labels = rayjob["metadata"]["labels"]
    kind, name = labels["tokenmill.dev/kind"], labels["tokenmill.dev/name"]
    output = f"{store}/default/{KINDS[kind].plural}/{name}"
    if kind == "TrainingStage":
        CheckpointStore.for_output(output).commit(1, {"tokens_seen": 0})
        return
    owner = rayjob["metadata"]["ownerReferences"][0]
    manifest = Manifest("documents", 1, (), producer=Producer(kind=kind, name=name, uid=owner["uid"]))
    open_store(dataset_uri(output)).write_json("_manifest.json", manifest.to_dict())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run(args: argparse.Namespace) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="tokenmill-bench-"))
    store = (workdir / "store").as_uri()
    commit_dataset(f"{store}/raw")
    from tokenmill.store import open_store

    open_store(f"{store}/teacher").write_json("config.json", {"architectures": ["Phi3ForCausalLM"]})

    emulator = Emulator()
    for spec in (*KINDS.values(), RAYJOBS, SECRETS, EVENTS, PEERINGS):
        emulator.register(spec)
    async with emulator, kmock.Server(emulator) as server:
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "kmock", "user": {"token": "bench"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
            "current-context": "kmock",
        }))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "TOKENMILL_STORE": store, "TOKENMILL_STANDALONE": "true",
               "TOKENMILL_METRICS_PORT": "0", "TOKENMILL_WORKERS": str(args.workers),
               "TOKENMILL_API_THREADS": str(args.api_threads), "TOKENMILL_RETRY_BACKOFF_SECONDS": "0"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        log = open(workdir / "operator.log", "wb")
        operator = subprocess.Popen([sys.executable, *os.environ.get("BENCH_PYTHON_ARGS", "").split(), "-m", "tokenmill.operator", "--liveness", ""], env=env,
                                    stdout=log, stderr=log)
        try:
            # Ready when it has discovered the API (its first request) and started watching.
            deadline = time.monotonic() + 60
            while not any(call.query.get("watch") == "true" for call in emulator.calls):
                if operator.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the operator did not start; see {workdir / 'operator.log'}")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            baseline_calls = len(emulator.calls)
            operator_cpu_before, harness_cpu_before = cpu_seconds(operator.pid), time.process_time()
            standin = KubeRayStandIn(emulator, RAYJOBS, SECRETS, instant=True, poll_seconds=0.05,
                                     complete=lambda rayjob: complete(rayjob, store))
            async with standin:
                resources = documents(args.resources, store)
                started = time.monotonic()
                for document in resources:
                    await emulator.create(KINDS[document["kind"]], copy.deepcopy(document))
                applied = time.monotonic() - started
                all_jobs = all_done = None
                while all_done is None:
                    now = time.monotonic() - started
                    if all_jobs is None and len(emulator.peek(RAYJOBS)) >= len(resources):
                        all_jobs = now
                    if all_jobs is not None and sum(
                            (body.get("status") or {}).get("phase") == "Succeeded"
                            for spec in KINDS.values() for body in emulator.peek(spec)) >= len(resources):
                        all_done = now
                    if now > args.timeout:
                        raise TimeoutError(f"not done after {args.timeout}s; see {workdir / 'operator.log'}")
                    await asyncio.sleep(0.1)
            peak = peak_rss_mib(operator.pid)
            operator_cpu = cpu_seconds(operator.pid) - operator_cpu_before
            harness_cpu = time.process_time() - harness_cpu_before
            calls = [c for c in emulator.calls[baseline_calls:] if c.user_agent.startswith(OPERATOR_AGENTS)]
            duplicates = len(emulator.peek(RAYJOBS)) - len(resources)
        finally:
            operator.terminate()
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                operator.kill()
            log.close()
    return {"resources": len(resources), "applied_s": applied, "rayjobs_s": all_jobs, "succeeded_s": all_done,
            "peak_rss_mib": peak, "api_calls": len(calls), "extra_rayjobs": duplicates,
            "operator_cpu_s": operator_cpu, "harness_cpu_s": harness_cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resources", type=int, default=500)
    parser.add_argument("--workers", type=int, default=8, help="reconcile workers (TOKENMILL_WORKERS)")
    parser.add_argument("--api-threads", type=int, default=16, help="I/O threads (TOKENMILL_API_THREADS)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    n = result["resources"]
    print(f"resources applied:              {n} (in {result['applied_s']:.2f} s)")
    print(f"every RayJob exists after:      {result['rayjobs_s']:.2f} s  ({n / result['rayjobs_s']:.1f} resources/s)")
    print(f"every status Succeeded after:   {result['succeeded_s']:.2f} s  ({n / result['succeeded_s']:.1f} resources/s)")
    print(f"operator peak memory (VmHWM):   {result['peak_rss_mib']:.0f} MiB")
    print(f"operator API requests:          {result['api_calls']} ({result['api_calls'] / n:.1f} per resource)")
    print(f"CPU seconds, operator process:  {result['operator_cpu_s']:.1f} "
          f"(emulator + stand-in process: {result['harness_cpu_s']:.1f}; {os.cpu_count()} cores)")
    print(f"RayJobs beyond one per resource: {result['extra_rayjobs']}")
    return 0 if result["extra_rayjobs"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
