"""Test-only: render charts/tokenmill with the Helm SDK (helm-python-sdk embeds Helm) into objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "tokenmill"
RELEASE, NAMESPACE = "tokenmill", "tokenmill-system"


def render(values: dict[str, Any] | None = None, *, release: str = RELEASE,
           namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every object the chart's templates render (NOTES.txt excluded), as an install would."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=release, namespace=namespace, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: dict[str, Any] | None = None) -> str:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return manifests[f"{CHART.name}/templates/NOTES.txt"]


def crds() -> dict[str, str]:
    """The chart's CRDs (installed by Helm before the templates), by file name."""
    with helm.Chart.load(CHART) as chart:
        return {Path(item["filename"]).name: item["data"] for item in chart.crds}


def only(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [item for item in objects if item["kind"] == kind]
