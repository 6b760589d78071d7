"""The `tokenmill` command: validate recipes, generate CRDs, run recipes locally, run the operator."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from tokenmill.api.problems import RecipeError

EXIT_INVALID = 2

# Recipes' text (names, values, messages) is never parsed as rich markup.
console = Console(highlight=False, markup=False)
errors = Console(stderr=True, highlight=False, markup=False)


def _print_problems(error: RecipeError, consequence: str = "nothing was run") -> int:
    for problem in error.problems:
        errors.print(Text.assemble(("error", "red"), " ", str(problem)), soft_wrap=True)
    errors.print(f"{len(error.problems)} problem(s); {consequence}")
    return EXIT_INVALID


def warn_unbuilt(resources: list, stream: Console) -> None:
    """Warn about each resource whose kind's workload is not built in this installation."""
    from tokenmill.api.resources import KINDS
    from tokenmill.workloads import workload_built

    for resource in resources:
        descriptor = KINDS[resource.kind]
        if not workload_built(descriptor.workload_module):
            stream.print(Text.assemble(
                ("warning", "yellow"),
                f" {resource.kind}/{resource.name}: the {descriptor.cli_name} workload is not built in this "
                f"installation ({descriptor.workload_module}); it would fail as not built",
            ), soft_wrap=True)


def cmd_validate(args: argparse.Namespace) -> int:
    from tokenmill.api.recipe import checked_recipe
    from tokenmill.resolve import output_uri
    from tokenmill.runner.plan import plan_recipe

    mode = "local" if args.local else "cluster"
    resources: list = []
    failures: list[RecipeError] = []
    for path in args.paths:
        try:
            if args.local:
                from tokenmill.runner.local import default_store

                resources += plan_recipe(path, store=args.store or default_store(Path(path)))
            else:
                resources += checked_recipe(
                    path, local=False,
                    default_output=lambda r: output_uri(r, args.store, namespace=args.namespace) if args.store else None,
                )
        except RecipeError as error:
            failures.append(error)
    if failures:
        errors.print(f"checked in {mode} mode")
        return _print_problems(RecipeError([p for error in failures for p in error.problems]),
                               "nothing was run" if args.local else "nothing is valid to apply")
    warn_unbuilt(resources, errors)
    console.print(f"{len(resources)} resource(s) valid in {mode} mode in {', '.join(args.paths)}")
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from tokenmill.api.crd import all_crds, render_yaml

    out = Path(args.out)
    stale = []
    for file_name, crd in all_crds().items():
        text = render_yaml(crd)
        target = out / file_name
        if args.check:
            if not target.exists() or target.read_text() != text:
                stale.append(str(target))
            continue
        out.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        console.print(f"wrote {target}")
    if stale:
        errors.print(f"stale CRDs (run `tokenmill crds --out {out}`): {', '.join(stale)}")
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tokenmill.runner.console import run_with_progress
    from tokenmill.runner.plan import plan_recipe

    from tokenmill.runner.local import default_store

    from tokenmill.runner.evaluation import load_config, resolve_config

    store = args.store or default_store(Path(args.recipe))
    try:
        resources = plan_recipe(args.recipe, store=store)
        evaluation = load_config(Path(args.recipe))
        if evaluation is not None:
            evaluation = resolve_config(evaluation, Path(args.recipe), resources, store)
    except RecipeError as error:
        return _print_problems(error)
    return run_with_progress(resources, Path(args.recipe), store=store, ray_address=args.ray_address,
                             start_ray=not args.no_ray, console=console, evaluation=evaluation)


def cmd_report(args: argparse.Namespace) -> int:
    from tokenmill.report import ReportError
    from tokenmill.runner.console import print_report
    from tokenmill.store import StoreError

    try:
        print_report(args.run if "://" in args.run else Path(args.run).resolve().as_uri(), console)
    except (ReportError, StoreError) as error:
        errors.print(Text.assemble(("error", "red"), f" {error}"), soft_wrap=True)
        return EXIT_INVALID
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenmill.trainer.generate.serve import main as serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate", help="check recipes: schema, CEL rules, semantics, refs, cycles, outputs",
        description="Checks recipes as the operator would (cluster mode), or as `tokenmill run` would with --local.",
    )
    validate.add_argument("paths", nargs="+", metavar="PATH", help="a recipe file or a folder of them")
    validate.add_argument("--local", action="store_true",
                          help="check for the local runner: relative file: URIs are allowed (default: cluster mode)")
    validate.add_argument("--store", help="the store outputs default to (the operator's TOKENMILL_STORE, or the "
                                          "local runner's --store), to check outputs for overlaps")
    validate.add_argument("--namespace", default="default",
                          help="namespace of resources that name none, for default outputs (default: default)")
    validate.set_defaults(func=cmd_validate)

    crds = commands.add_parser("crds", help="write the CustomResourceDefinitions generated from the API")
    crds.add_argument("--out", default="crds", help="folder to write to (default: crds)")
    crds.add_argument("--check", action="store_true", help="only check that the folder is up to date")
    crds.set_defaults(func=cmd_crds)

    run = commands.add_parser("run", help="run a recipe on this machine with a local Ray")
    run.add_argument("recipe", help="a recipe folder (or file)")
    run.add_argument("--store", help="store URI for outputs (default: file://./tokenmill-runs/<recipe>)")
    run.add_argument("--ray-address", help="an existing Ray cluster to run on (default: start a local one)")
    run.add_argument("--no-ray", action="store_true", help="do not start Ray; each workload starts its own")
    run.set_defaults(func=cmd_run)

    report = commands.add_parser("report", help="(re)build report.html for a finished run, local or in S3")
    report.add_argument("run", metavar="DIR", help="the run's store root (a folder, file:// or s3:// URI)")
    report.set_defaults(func=cmd_report)

    serve = commands.add_parser("serve", help="serve a model over the OpenAI API with the torch engine")
    serve.add_argument("model", metavar="MODEL_URI", help="a checkpoint or Hugging Face export (s3://, file://, path)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--served-model-name", help="the model's name in the API (default: the URI's last segment)")
    serve.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    serve.add_argument("--delay-ms", type=float, default=0.0,
                       help="answer each batch this long after it started (the engine goes on meanwhile): "
                            "an artificial latency for benchmarks")
    serve.set_defaults(func=cmd_serve)

    if importlib.util.find_spec("tokenmill.operator.cli") is not None:
        from tokenmill.operator.cli import add_commands

        add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
