"""`tokenmill run examples/tiny` end to end, as `make tiny` runs it from a clean checkout:
every stage succeeds (its output relayed, and kept in its `_run/driver.log`, with no traceback), the
evaluation compares SFT with PTS-DPO, and report.html is written (the session's reference run, in an
80-column terminal)."""

from __future__ import annotations

import json
import re

import pytest

from tests.fixtures.tiny_run import TinyRun, tiny_stages


def plain(text: str) -> str:
    """`text` without the control characters a terminal (or rich) may drop or act on, and with one
    space for each run of blanks (rich expands tabs)."""
    return re.sub(r"[ \t]+", " ", re.sub(r"[\x07\x08\x0b\x0c\x0d\x1b]", "", text))


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_the_tiny_recipe_runs_end_to_end(tiny_reference: TinyRun) -> None:
    store, output = tiny_reference.store, tiny_reference.output
    for label, path in tiny_stages():
        assert json.loads((store / path / "_run" / "progress.json").read_text())["phase"] == "succeeded", label
        assert f"start {label}" in output and f"done {label} in " in output
        log = (store / path / "_run" / "driver.log").read_text().splitlines()
        shown = plain(output)
        assert log and all(plain(f"{label} {line}").rstrip() in shown for line in log if line.strip()), label
    # Ray Train's placement-group cleaner finds this run's cluster among the machine's others.
    assert "Traceback" not in output, output
    funnel = json.loads((store / "corpusfilters/web/_run/funnel.json").read_text())
    assert {"step": "decontamination", "verdict": "dropped", "reason": "contaminated-13gram",
            "documents": 4} in funnel["documents"]
    pairs = json.loads((store / "ptsjobs/pts/data/_manifest.json").read_text())["summary"]["rows"]
    assert pairs >= 20, f"PTS found {pairs} pairs: too few for DPO to learn from"
    evaluation = json.loads((store / "_evaluation/evaluation.json").read_text())
    assert set(evaluation["models"]) == {"SFT", "PTS-DPO"}
    assert all(figures["problems"] == 20 for figures in evaluation["models"].values())
    assert "start evaluation: SFT, PTS-DPO" in output and "done evaluation in " in output
    assert (store / "report.html").is_file()
    assert f"report: {store.as_uri()}/report.html" in output
    summary = output[output.index("\u250f"):]  # from the summary table's top-left corner
    assert max(len(line) for line in summary.splitlines() if not line.startswith("report: ")) <= 80
