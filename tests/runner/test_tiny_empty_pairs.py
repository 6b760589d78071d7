"""When Pivotal Token Search finds no pair, the tiny recipe's DPO stage refuses before training
with a message that says so, and `tokenmill run` shows that message in its result: no crash,
no checkpoint, nothing trained."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.tiny_run import TINY
from tests.trainer.posttrain_data import write_parent
from tokenmill.runner.local import LocalRunner
from tokenmill.runner.plan import plan_recipe
from tokenmill.store import PREFERENCE_PAIRS, CheckpointStore, DatasetWriter


@pytest.fixture
def dpo_on_no_pairs(tmp_path: Path) -> Path:
    """The tiny recipe's DPO stage on its own, its SFT parent a committed checkpoint and its PTS
    dataset committed with no pair (one empty shard, as the PTSJob writes it)."""
    parent = write_parent(tmp_path / "sft")
    pairs = tmp_path / "pts" / "data"
    writer = DatasetWriter(pairs.as_uri(), PREFERENCE_PAIRS)
    writer.write_shard(0, PREFERENCE_PAIRS.arrow.empty_table())
    writer.finalize(expected=[0])
    dpo = next(resource for resource in plan_recipe(TINY) if resource.name == "dpo")
    document = dpo.model_dump(by_alias=True, exclude_none=True, mode="json")
    spec = document["spec"]
    spec["model"] = {"parent": {"uri": parent}}
    spec["dpo"]["referenceModel"] = {"uri": parent}
    spec["datasets"] = [{**{k: v for k, v in spec["datasets"][0].items() if k != "ref"}, "uri": pairs.as_uri(),
                         "name": "pts"}]
    folder = tmp_path / "recipe"
    folder.mkdir()
    (folder / "recipe.yaml").write_text(yaml.safe_dump(document))
    return folder


def test_dpo_on_an_empty_pairs_dataset_fails_with_a_clear_reason(dpo_on_no_pairs: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    lines: list[str] = []
    runner = LocalRunner(store.as_uri(), entrypoint=(sys.executable, "-m", "tokenmill.trainer"))
    runner.events.line = lambda resource, text: lines.append(text)
    [result] = runner.run(plan_recipe(dpo_on_no_pairs))
    assert result.result == "Failed"
    assert result.detail.startswith("workload exited with status 2: datasets[0] (pts): dataset ")
    assert "has no pair to train on (pts: 0 pairs kept); nothing was trained" in result.detail
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert CheckpointStore.for_output(f"{store.as_uri()}/trainingstages/dpo").latest() is None
