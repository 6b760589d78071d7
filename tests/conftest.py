"""Project-wide test settings and fixtures."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# The S3-compatible test server's fixtures (moto_s3_server, s3_bucket), for every test module.
from tests.fixtures.s3 import moto_s3_server, s3_bucket  # noqa: F401

# One uninterrupted run of examples/tiny per session, for the tests that compare with it.
from tests.fixtures.tiny_run import tiny_reference  # noqa: F401

# Ray Train waits this long in every report(); the default (2 s) makes CPU tests crawl.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write YAML documents (dedented) into files of a fresh recipe folder; returns the folder."""

    def write(**files: str) -> Path:
        folder = tmp_path / "recipe"
        folder.mkdir(exist_ok=True)
        for name, text in files.items():
            (folder / f"{name}.yaml").write_text(textwrap.dedent(text))
        return folder

    return write
