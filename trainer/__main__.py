"""The workload entrypoint every RayJob runs: `python -m tokenmill.trainer <kind> --spec <uri>`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tokenmill.api.resources import KINDS, by_cli_name
from tokenmill.workloads import METRICS_PORT_ENV, NOT_BUILT_EXIT_CODE, workload_built


def start_metrics(spec_uri: str) -> None:
    """Serve the workload's Prometheus metrics when the operator asked for them; never fatal."""
    port = os.environ.get(METRICS_PORT_ENV)
    if not port:
        return
    from tokenmill.store import StoreError, read_run_spec_at
    from tokenmill.trainer.metrics import serve_workload_metrics

    try:
        number = int(port)
        serve_workload_metrics(read_run_spec_at(spec_uri), number)
    except (OSError, ValueError, StoreError) as error:
        print(f"tokenmill: not serving metrics on port {port!r}: {error}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.trainer", description=__doc__)
    parser.add_argument("kind", choices=sorted(info.cli_name for info in KINDS.values()))
    parser.add_argument("--spec", required=True, help="URI of the run spec (<output>/_run/spec.json)")
    args = parser.parse_args(argv)
    module_name = by_cli_name(args.kind).workload_module
    if not workload_built(module_name):
        print(f"tokenmill: the {args.kind} workload is not built yet ({module_name} does not exist)", file=sys.stderr)
        return NOT_BUILT_EXIT_CODE
    workload = importlib.import_module(module_name)
    start_metrics(args.spec)
    return int(workload.run(args.spec) or 0)


if __name__ == "__main__":
    sys.exit(main())
