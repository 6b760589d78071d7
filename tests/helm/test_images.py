"""The Dockerfiles in images/ install what pyproject.toml declares, at versions it allows."""

from __future__ import annotations

import re
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.conftest import REPO
from tests.helm.chart import CHART, only, render
from tokenmill.operator.config import DEFAULT_RAY_VERSION

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def dockerfile(name: str) -> tuple[dict[str, str], list[str]]:
    """The ARG defaults and the RUN commands (continuation lines joined) of images/<name>/Dockerfile."""
    text = (REPO / "images" / name / "Dockerfile").read_text().replace("\\\n", " ")
    args, runs = {}, []
    for line in text.splitlines():
        if match := re.match(r"^ARG\s+(\w+)=(\S+)", line):
            args[match.group(1)] = match.group(2)
        elif line.startswith("RUN "):
            runs.append(line[4:])
    return args, runs


def requirement(extra: str, name: str) -> Requirement:
    found = [Requirement(text) for text in PYPROJECT["optional-dependencies"][extra]]
    matches = [req for req in found if req.name == name]
    assert matches, f"{name} is not in the {extra!r} extra of pyproject.toml"
    return matches[0]


def installs(runs: list[str]) -> list[str]:
    """Every quoted requirement of the `pip install` commands."""
    return [item for run in runs if "pip install" in run for item in re.findall(r'"([^"]+)"', run)
            if not item.startswith("http")]


def python_version(tag: str) -> Version:
    return Version(re.sub(r"^py(\d)(\d+)$", r"\1.\2", tag))


def test_the_operator_image_installs_only_the_operator_extra() -> None:
    args, runs = dockerfile("operator")
    assert Version(args["PYTHON_VERSION"]) in SpecifierSet(PYPROJECT["requires-python"])
    assert installs(runs) == [".[operator]"]
    text = (REPO / "images" / "operator" / "Dockerfile").read_text()
    assert not re.search(r"\b(torch|vllm|ray)\b", "\n".join(runs)), "the operator image installs no ML stack"
    assert "python:${PYTHON_VERSION}-slim" in text
    # The chart runs the image as its non-root user, with `operator ...` as the arguments.
    deployment, = only(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    user = re.search(r"^USER (\d+):(\d+)", text, re.M)
    assert user and int(user.group(1)) == pod["securityContext"]["runAsUser"] != 0
    assert int(user.group(2)) == pod["securityContext"]["runAsGroup"]
    assert re.search(r'^ENTRYPOINT \["tokenmill"\]', text, re.M) and pod["containers"][0]["args"][0] == "operator"
    operator_extra = {Requirement(item).name for item in PYPROJECT["optional-dependencies"]["operator"]}
    assert not operator_extra & {"torch", "vllm", "ray"}


def test_the_worker_image_pins_versions_pyproject_allows() -> None:
    args, runs = dockerfile("worker")
    torch, ray, vllm = Version(args["TORCH_VERSION"]), Version(args["RAY_VERSION"]), Version(args["VLLM_VERSION"])
    assert torch in requirement("trainer", "torch").specifier
    assert ray in requirement("trainer", "ray").specifier
    assert vllm in requirement("vllm", "vllm").specifier
    assert python_version(args["PYTHON_TAG"]) in SpecifierSet(PYPROJECT["requires-python"])
    # The same torch the project is developed and tested with (the Makefile's pin).
    makefile_torch = re.search(r'"torch==([^"]+)"', (REPO / "Makefile").read_text()).group(1)
    assert torch == Version(makefile_torch)
    # The Ray the operator writes into every RayCluster, by default and in the chart.
    assert ray == Version(DEFAULT_RAY_VERSION)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert ray == Version(values["defaults"]["rayVersion"])
    # Every install is pinned exactly, and the trainer extra comes with it.
    requirements = installs(runs)
    assert ".[trainer]" in requirements
    for item in requirements:
        if not item.startswith("."):
            assert "==" in item and "${" in item, f"unpinned install in images/worker/Dockerfile: {item}"
    assert any(item.startswith("vllm==") for item in requirements)
    assert any(run.count("--index-url") == 1 and "${CUDA_TAG}" in run for run in runs), \
        "torch comes from PyTorch's index for the image's CUDA"
