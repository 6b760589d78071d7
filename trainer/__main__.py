"""The workload entrypoint every RayJob runs: `python -m tokenmill.trainer <kind> --spec <uri>`."""

from __future__ import annotations

import argparse
import importlib
import sys

from tokenmill.api.resources import KINDS
from tokenmill.workloads import NOT_BUILT_EXIT_CODE, WORKLOAD_MODULES, workload_built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.trainer", description=__doc__)
    parser.add_argument("kind", choices=sorted(info.cli_name for info in KINDS.values()))
    parser.add_argument("--spec", required=True, help="URI of the run spec (<output>/_run/spec.json)")
    args = parser.parse_args(argv)
    module_name = WORKLOAD_MODULES[args.kind]
    if not workload_built(args.kind):
        print(f"tokenmill: the {args.kind} workload is not built yet ({module_name} does not exist)", file=sys.stderr)
        return NOT_BUILT_EXIT_CODE
    workload = importlib.import_module(module_name)
    return int(workload.run(args.spec) or 0)


if __name__ == "__main__":
    sys.exit(main())
