"""`tokenmill run RECIPE --store STORE --no-ray` with the scripted workload in place of the real ones:
the runner's console front end, as the CLI calls it, in a process of its own."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from tokenmill.runner.console import run_with_progress
from tokenmill.runner.plan import plan_recipe

SCRIPT = Path(__file__).with_name("scripted_workload.py")


def main(recipe: str, store: str) -> int:
    console = Console(highlight=False, markup=False)
    return run_with_progress(plan_recipe(recipe, store=store), Path(recipe), store=store, ray_address=None,
                             start_ray=False, console=console, entrypoint=(sys.executable, str(SCRIPT)))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
