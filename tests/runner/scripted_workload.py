"""A test-only workload: commits the output a real workload of each kind would, and logs its calls.

Behaviour is scripted by environment variables so one test can make a kind fail or be missing,
or wait for Ctrl-C (`SCRIPTED_WAIT_FOR_SIGINT=<kind>`, touching `SCRIPTED_READY` once it waits) and
then stop the way Ray's processes may: a thread's traceback on stderr, then its own last line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from tokenmill.layout import dataset_uri
from tokenmill.store import DOCUMENTS, CheckpointStore, DatasetWriter, Progress, read_run_spec, write_progress
from tokenmill.workloads import NOT_BUILT_EXIT_CODE, PHASE_SUCCEEDED


def main() -> int:
    kind, spec_uri = sys.argv[1], sys.argv[3]
    output = spec_uri.rsplit("/_run/", 1)[0]
    run = read_run_spec(output)
    with open(os.environ["SCRIPTED_LOG"], "a") as log:
        log.write(json.dumps({"kind": kind, "name": run["metadata"]["name"], "spec": run["spec"]}) + "\n")
    if kind in os.environ.get("SCRIPTED_MISSING", "").split(","):
        return NOT_BUILT_EXIT_CODE
    if kind in os.environ.get("SCRIPTED_FAIL", "").split(","):
        print("scripted failure", file=sys.stderr)
        return 1
    print(f"{kind} {run['metadata']['name']} working")
    if kind in os.environ.get("SCRIPTED_WAIT_FOR_SIGINT", "").split(","):
        return wait_for_ctrl_c()
    if kind in os.environ.get("SCRIPTED_NO_OUTPUT", "").split(","):
        return 0
    if kind == "training-stage":
        with tempfile.TemporaryDirectory() as local:
            Path(local, "weights.bin").write_bytes(b"\0" * 64)
            CheckpointStore.for_output(output).save_dir(10, local, {"step": 10})
    else:
        writer = DatasetWriter(dataset_uri(output), DOCUMENTS)
        writer.write_shard(0, [{"id": "d0", "text": "hello", "source": kind, "lang": "en", "meta": "{}"}])
        writer.finalize(expected=[0])
    write_progress(output, Progress(phase=PHASE_SUCCEEDED, done=1, total=1, unit="step", message="done"))
    return 0


def wait_for_ctrl_c() -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it stops in its own time, as a workload shutting down in order
    Path(os.environ["SCRIPTED_READY"]).touch()
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()

    def monitor() -> None:
        raise ConnectionError("the cluster went away while stopping")

    stopping = threading.Thread(target=monitor, name="ClusterMonitor")
    stopping.start()
    stopping.join()
    print("scripted workload stopped", flush=True)
    return 130


if __name__ == "__main__":
    sys.exit(main())
