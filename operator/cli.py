"""The `tokenmill operator` and `tokenmill render` commands (added to the main CLI by add_commands)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_INVALID = 2


def add_commands(commands: Any) -> None:
    """Add `operator` and `render` to the `tokenmill` CLI's sub-parsers."""
    run = commands.add_parser("operator", help="run the Kubernetes operator (kopf) in this process")
    add_operator_arguments(run)
    run.set_defaults(func=cmd_operator)

    render = commands.add_parser("render", help="print the RayJobs the operator would create for a recipe")
    render.add_argument("path", metavar="FILE", help="a recipe file or a folder of them")
    render.add_argument("--namespace", default="default", help="namespace of resources that name none (default: default)")
    render.add_argument("--store", help="default store URI, as the operator's TOKENMILL_STORE")
    render.set_defaults(func=cmd_render)


def add_operator_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NAMESPACE",
                        help="serve only this namespace (repeatable; default: all namespaces, or TOKENMILL_NAMESPACES)")
    parser.add_argument("--metrics-port", type=int, help="port of /metrics and /readyz (default 8080; 0 picks one)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8081/healthz",
                        help="kopf's liveness endpoint (default http://0.0.0.0:8081/healthz; '' disables it)")
    parser.add_argument("--peering", help="kopf peering name (default tokenmill, or TOKENMILL_PEERING)")
    parser.add_argument("--priority", type=int, help="peering priority of this replica (default: random)")
    parser.add_argument("--standalone", action="store_true", default=None,
                        help="no peering: this is the only replica")
    parser.add_argument("--verbose", action="store_true", help="log kopf's and the operator's details")


def cmd_operator(args: argparse.Namespace) -> int:
    import asyncio

    import kopf

    from tokenmill.operator.config import from_env
    from tokenmill.operator.handlers import MEMO_CONFIG, register

    config = from_env().with_overrides(
        namespaces=tuple(args.namespaces) if args.namespaces else None,
        metrics_port=args.metrics_port,
        peering=args.peering,
        standalone=args.standalone,
        peering_priority=args.priority,
    )
    kopf.configure(verbose=args.verbose)
    if not args.verbose:  # kopf logs every handler call at INFO; the operator logs what matters
        import logging

        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    registry = register(kopf.OperatorRegistry())
    asyncio.run(kopf.operator(
        registry=registry,
        clusterwide=config.clusterwide,
        namespaces=list(config.namespaces),
        standalone=config.standalone,
        peering_name=None if config.standalone else config.peering,
        priority=config.priority(),
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo({MEMO_CONFIG: config}),
    ))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from tokenmill.api.problems import RecipeError
    from tokenmill.operator.config import from_env
    from tokenmill.operator.render import render_recipe, to_yaml

    config = from_env().with_overrides(store=args.store)
    try:
        manifests = render_recipe(args.path, config, namespace=args.namespace)
    except RecipeError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(error.problems)} problem(s); nothing rendered", file=sys.stderr)
        return EXIT_INVALID
    _warn_unbuilt(manifests)
    sys.stdout.write(to_yaml(manifests))
    return 0


def _warn_unbuilt(manifests: list[dict[str, Any]]) -> None:
    """On stderr (the YAML stays clean): each rendered resource whose workload is not built here."""
    from tokenmill.api.resources import KINDS
    from tokenmill.workloads import workload_built

    for manifest in manifests:
        owner = manifest["metadata"]["ownerReferences"][0]
        descriptor = KINDS[owner["kind"]]
        if not workload_built(descriptor.workload_module):
            print(f"warning: {owner['kind']}/{owner['name']}: the {descriptor.cli_name} workload is not built in "
                  f"this installation ({descriptor.workload_module}); the image must contain it", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m tokenmill.operator`: the operator command on its own."""
    parser = argparse.ArgumentParser(prog="python -m tokenmill.operator", description="the tokenmill operator")
    add_operator_arguments(parser)
    return cmd_operator(parser.parse_args(argv))
