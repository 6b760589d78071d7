"""status.outputs from a committed dataset: the manifest's counts and the workload's headline statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.store.samples import sample_table
from tokenmill.api.status import OUTPUT_STATS_MAX, OutputSummary, ResourceStatus
from tokenmill.layout import dataset_uri
from tokenmill.outputs import check_outputs
from tokenmill.store import DOCUMENTS, DatasetWriter, Producer

RUN = Producer(kind="CorpusFilter", name="web", uid="uid-1", generation=1, attempt=1)


def commit(output: str, stats: dict | None) -> None:
    writer = DatasetWriter(dataset_uri(output), DOCUMENTS, producer=RUN)
    writer.write_shard(0, sample_table(DOCUMENTS, 6))
    writer.finalize(expected=[0], stats=stats)


def test_the_summary_shows_the_manifests_headline_counts(tmp_path: Path) -> None:
    output = (tmp_path / "out").as_uri()
    commit(output, {
        "kept": 5, "bytesIn": 1200, "bytesOut": 900,
        "languages": {"en": 5}, "documents": [{"step": "quality", "reason": "low", "documents": 1}],
        "stoppedBy": "<b>[red]maxSamples[/red]</b>", "workflowVersion": "abc123",
        "passed": True, "ratio": 0.5, "negative": -1, "huge": 2**64,
        "Not camel": 3, "evil\nname": 4, "kept\n": 6,
    })
    report = check_outputs("CorpusFilter", output, "uid-1")
    assert report.committed and report.summary is not None
    assert report.summary.stats == {"kept": 5, "bytesIn": 1200, "bytesOut": 900}
    wire = report.summary.to_wire()
    assert wire["stats"] == {"kept": 5, "bytesIn": 1200, "bytesOut": 900}
    assert wire["shards"] == 1 and wire["rows"] == 6
    # what the operator patches into status validates against the status model (and so the CRD)
    assert ResourceStatus.model_validate({"phase": "Succeeded", "outputs": wire}).outputs == report.summary


def test_the_summary_holds_at_most_the_cap(tmp_path: Path) -> None:
    output = (tmp_path / "out").as_uri()
    commit(output, {f"count{n}": n for n in range(OUTPUT_STATS_MAX + 10)})
    summary = check_outputs("CorpusFilter", output).summary
    assert summary is not None and summary.stats is not None
    assert len(summary.stats) == OUTPUT_STATS_MAX
    assert all(summary.stats[name] == int(name.removeprefix("count")) for name in summary.stats)


def test_a_manifest_without_stats_gives_the_summary_as_before(tmp_path: Path) -> None:
    output = (tmp_path / "out").as_uri()
    commit(output, None)
    summary = check_outputs("CorpusFilter", output).summary
    assert summary is not None and summary.stats is None
    assert "stats" not in summary.to_wire()
    commit(output, {"stoppedBy": "maxSamples"})  # statistics without a count: no empty object in status
    summary = check_outputs("CorpusFilter", output).summary
    assert summary is not None and summary.stats is None


@pytest.mark.parametrize("stats", [{"kept": "5 <b>"}, {"bad name": 1}, {"kept": -1}, {"kept": 1.5},
                                   {f"c{n}": n for n in range(OUTPUT_STATS_MAX + 1)}],
                         ids=["text", "name", "negative", "fraction", "too-many"])
def test_the_status_model_refuses_text_and_odd_names_in_stats(stats: dict) -> None:
    with pytest.raises(ValidationError, match="stats"):
        OutputSummary.model_validate({"uri": "s3://bucket/out", "stats": stats})
