"""report.html: built from a run's committed records only, text escaped, local or in S3, and
opened by a real browser (headless Chromium) with every image loading."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tokenmill.cli import main as cli
from tokenmill.report import build_report, read_run, text_summary
from tokenmill.store import open_store

HOSTILE = "<script>alert('x')</script> & [bold]"
ARTIFACTS = Path(os.environ.get("TOKENMILL_TEST_ARTIFACTS", "test-artifacts"))


def write_run(root: str, *, greedy: float = 0.625, label: str = "PTS-DPO", reason: str = "repetition") -> None:
    """A finished run's records as the workloads and the runner write them."""
    store = open_store(root)

    def resource(plural: str, kind: str, name: str, spec: dict, progress: dict) -> str:
        output = f"{store.uri}/{plural}/{name}"
        store.write_json(f"{plural}/{name}/_run/spec.json",
                         {"kind": kind, "metadata": {"name": name}, "output": output, "spec": spec})
        store.write_json(f"{plural}/{name}/_run/progress.json", progress)
        return f"{plural}/{name}"

    web = resource("corpusfilters", "CorpusFilter", "web", {}, {"phase": "succeeded", "updated_at": "2026-01-01T00:00:01Z"})
    store.write_json(f"{web}/_run/funnel.json", {"documents": [
        {"step": "input", "verdict": "kept", "reason": "passed", "documents": 679},
        {"step": "outliers", "verdict": "dropped", "reason": reason, "documents": 97},
        {"step": "outliers", "verdict": "kept", "reason": "passed", "documents": 582},
        {"step": "decontamination", "verdict": "dropped", "reason": "contaminated-13gram", "documents": 3},
        {"step": "decontamination", "verdict": "kept", "reason": "passed", "documents": 579},
    ]})
    synth = resource("syntheticdatajobs", "SyntheticDataJob", "math", {},
                     {"phase": "succeeded", "updated_at": "2026-01-01T00:00:02Z"})
    store.write_json(f"{synth}/_run/synth-stats.json", {"seeds": 240, "written": 131, "steps": [
        {"step": "agreementFilter", "in": 240, "kept": 150, "droppedByReason": {"all-agree": 90}},
        {"step": "selfRevision", "in": 150, "kept": 131, "droppedByReason": {"still-wrong": 19}},
    ]})
    sft = resource("trainingstages", "TrainingStage", "sft", {"stage": "sft"},
                   {"phase": "succeeded", "updated_at": "2026-01-01T00:00:03Z"})
    history = [{"step": step, "loss": 3.0 / step, "lr": 1e-3 * min(1, step / 5)} for step in range(1, 41)]
    store.write_bytes(f"{sft}/_run/train_metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    pts = resource("ptsjobs", "PTSJob", "pts", {}, {"phase": "succeeded", "updated_at": "2026-01-01T00:00:04Z"})
    store.write_json(f"{pts}/_run/pts-stats.json", {"stats": {
        "problems": 48, "problemsSearched": 17, "pivotalTokens": 23, "pairs": {"pivotal": 21},
        "deltaPHistogram": {"[-0.4,-0.3)": 5, "[0.3,0.4)": 18}, "pivotalPerSolution": {"0": 9, "1": 12, "2": 5}},
        "warnings": []})
    store.write_json("_evaluation/evaluation.json", {
        "problems": "file:///data/eval", "oracle": "math", "temperature": 1.0, "maxTokens": 64, "seed": 0,
        "models": {"SFT": {"problems": 20, "greedyAccuracy": 0.55, "successRate": 0.4125, "successRateStderr": 0.05,
                           "samplesPerProblem": 8},
                   label: {"problems": 20, "greedyAccuracy": greedy, "successRate": 0.4875,
                           "successRateStderr": 0.06, "samplesPerProblem": 8}}})


def test_the_report_shows_the_runs_own_figures(tmp_path: Path) -> None:
    root = (tmp_path / "run").as_uri()
    write_run(root)
    uri = build_report(root)
    html = (tmp_path / "run" / "report.html").read_text()
    assert uri.endswith("/report.html")
    for figure in ("0.625", "0.412 ± 0.050", "0.487 ± 0.060", "contaminated-13gram", "17 of 48", "23"):
        assert figure in html
    images = sorted(p.name for p in (tmp_path / "run" / "report").iterdir())
    assert images == ["corpusfilter-web-funnel.png", "ptsjob-pts-pts.png", "syntheticdatajob-math-acceptance.png",
                      "trainingstage-sft-training.png"]
    for name in images:
        assert (tmp_path / "run" / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="report/{name}"' in html

    write_run(root, greedy=0.875)  # a different run's figure: the report follows the records
    build_report(root)
    html = (tmp_path / "run" / "report.html").read_text()
    assert "0.875" in html and "0.625" not in html


def test_run_text_is_escaped_not_rendered(tmp_path: Path) -> None:
    root = (tmp_path / "run").as_uri()
    write_run(root, label=HOSTILE, reason=HOSTILE)
    build_report(root)
    html = (tmp_path / "run" / "report.html").read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; [bold]" in html


def test_the_terminal_summary_fits_80_columns(tmp_path: Path) -> None:
    root = (tmp_path / "run").as_uri()
    write_run(root)
    lines = text_summary(read_run(root))
    assert all(len(line) < 80 for line in lines)
    assert any("PTS-DPO" in line and "0.625" in line for line in lines)


def test_tokenmill_report_rebuilds_a_run_in_s3(s3_bucket, capsys) -> None:
    root = f"{s3_bucket.uri}/runs/tiny"
    write_run(root)
    assert cli(["report", root]) == 0
    store = open_store(root)
    html = store.read_bytes("report.html").decode()
    assert "0.625" in html
    assert store.read_bytes("report/trainingstage-sft-training.png")[:4] == b"\x89PNG"
    assert f"report: {root}/report.html" in capsys.readouterr().out


def test_tokenmill_report_names_a_folder_without_a_run(tmp_path: Path, capsys) -> None:
    assert cli(["report", str(tmp_path)]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("headless Chromium is required: apt-get install chromium (.ci/run installs it)")
    return found


@pytest.mark.slow
def test_the_report_opens_in_chromium_with_every_image(tmp_path: Path) -> None:
    write_run((tmp_path / "run").as_uri())
    build_report((tmp_path / "run").as_uri())
    report = tmp_path / "run" / "report.html"
    # A copy of the report that records, once loaded, each image's natural width in the DOM.
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("</body>", (
        "<script>window.addEventListener('load', () => { document.body.dataset.images = JSON.stringify("
        "Array.from(document.images, i => [i.getAttribute('src'), i.naturalWidth])); });</script></body>")))
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dumped = subprocess.run([*browser, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'data-images="([^"]*)"', dumped.stdout)
    assert found, dumped.stderr[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(images) == 4
    assert all(width > 100 for _, width in images), images

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = (ARTIFACTS / "report-screenshot.png").resolve()
    screenshot.unlink(missing_ok=True)
    subprocess.run([*browser, "--hide-scrollbars", "--window-size=1000,1800", f"--screenshot={screenshot}",
                    report.as_uri()], capture_output=True, timeout=120, check=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
