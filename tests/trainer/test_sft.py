"""Stage sft: the Phi-4 chat format, the assistant-only loss mask, packing, and the stage end to end."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.processes import kill_training_after_checkpoint
from tests.trainer.posttrain_data import chat, write_chats, write_parent, write_spec
from tokenmill.layout import hf_export_uri
from tokenmill.model_configs import get_model_config
from tokenmill.store import open_store, read_progress
from tokenmill.trainer.data.chat import (
    DROP_NO_ASSISTANT,
    DROP_NO_TARGET_LEFT,
    DROP_ROLE_ORDER,
    DROP_TOO_LONG,
    TARGET_FLAG,
    TRUNCATED,
    conversation_problem,
    pack_conversations,
    split_masked_rows,
)
from tokenmill.trainer.data.packing import IGNORE_INDEX, document_ids
from tokenmill.trainer.model import build_model
from tokenmill.trainer.tokenizer import get_tokenizer
from tokenmill.trainer.train import workload
from tokenmill.trainer.train.loop import read_history
from tokenmill.workloads import PHASE_SUCCEEDED

BYTE = get_tokenizer("byte")
CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "ok?"},
    {"role": "assistant", "content": "no"},
]


def masked(packed) -> np.ndarray:
    return np.where(packed.masks, packed.rows | TARGET_FLAG, packed.rows)


def test_the_loss_mask_covers_exactly_the_assistant_turns() -> None:
    packed = pack_conversations([CONVERSATION], BYTE, 80)
    row, mask = packed.rows[0], packed.masks[0]
    text = ("<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>hi<|im_end|>"
            "<|im_start|>assistant<|im_sep|>yo<|im_end|><|im_start|>user<|im_sep|>ok?<|im_end|>"
            "<|im_start|>assistant<|im_sep|>no<|im_end|><|endoftext|>")
    expected = BYTE.encode(text, allow_special=True)
    assert row[: len(expected)].tolist() == expected
    assert (row[len(expected):] == BYTE.pad_id).all()
    # By hand: system turn 10 ids, user turn 9, assistant header 11, so "yo<|im_end|>" is 30..32;
    # then the user turn 33..42, the assistant header 43..53 and "no<|im_end|>" 54..56.
    assert np.flatnonzero(mask).tolist() == [30, 31, 32, 54, 55, 56]
    assert [BYTE.decode([t]) for t in row[[30, 31, 32, 54, 55, 56]]] == ["y", "o", "<|im_end|>", "n", "o", "<|im_end|>"]
    inputs, labels = split_masked_rows(masked(packed), BYTE.pad_id)
    trained = np.flatnonzero(labels[0] != IGNORE_INDEX)
    assert trained.tolist() == [29, 30, 31, 53, 54, 55]  # the positions that predict them
    assert labels[0, trained].tolist() == row[[30, 31, 32, 54, 55, 56]].tolist()
    assert inputs[0].tolist() == row[:-1].tolist()


@pytest.mark.parametrize(("messages", "reason"), [
    ([{"role": "user", "content": "a"}], DROP_NO_ASSISTANT),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], DROP_ROLE_ORDER),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     DROP_ROLE_ORDER),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
     DROP_ROLE_ORDER),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     DROP_ROLE_ORDER),
])
def test_bad_conversations_are_dropped_and_counted(messages, reason) -> None:
    assert conversation_problem(messages) == reason
    packed = pack_conversations([messages, CONVERSATION], BYTE, 80)
    assert packed.counts[reason] == 1 and packed.counts["kept"] == 1 and packed.rows.shape[0] == 1


def test_packing_keeps_whole_samples_and_attention_inside_each() -> None:
    rng = random.Random(1)
    conversations = [chat(n, rng) for n in range(6)]
    packed = pack_conversations(conversations, BYTE, 128)
    single = pack_conversations(conversations, BYTE, 128, packing="single")
    assert single.rows.shape[0] == 6 and packed.rows.shape[0] < 6
    assert packed.masks.sum() == single.masks.sum()  # the same targets, fewer rows
    # Each sample ends with end-of-text, which opens the next sample's segment.
    starts = [np.flatnonzero(row == BYTE.eot_id) for row in packed.rows]
    assert sum(len(s) for s in starts) == 6

    # Attention stays inside each sample: changing the first sample changes nothing the second
    # one computes (its segment opens at the end-of-text before it); without the document ids it would.
    model = build_model(get_model_config("tiny"), seed=0).eval()
    inputs, _ = split_masked_rows(masked(packed), BYTE.pad_id)
    row = inputs[:1]
    first_eot = int(starts[0][0])
    other = row.copy()
    other[0, :first_eot] = np.where(other[0, :first_eot] < 256, ord("a"), other[0, :first_eot])
    second = slice(first_eot, int(starts[0][1]))

    def logits(ids: np.ndarray, confined: bool = True) -> torch.Tensor:
        doc_ids = torch.from_numpy(document_ids(ids, BYTE.eot_id, BYTE.pad_id).astype(np.int64))
        with torch.no_grad():
            return model(torch.from_numpy(ids), document_ids=doc_ids if confined else None)[0, second]

    assert torch.allclose(logits(row), logits(other), atol=1e-6)
    assert not torch.allclose(logits(row, confined=False), logits(other, confined=False), atol=1e-3)


def test_over_long_samples_are_truncated_or_dropped_and_counted() -> None:
    long_answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 100}]
    late_answer = [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "x"}]
    truncated = pack_conversations([long_answer, late_answer, CONVERSATION], BYTE, 64)
    assert truncated.counts[TRUNCATED] == 1 and truncated.counts[DROP_NO_TARGET_LEFT] == 1
    assert truncated.counts["kept"] == 2 and truncated.rows.shape == (2, 65)
    dropped = pack_conversations([long_answer, late_answer, CONVERSATION], BYTE, 64, over_long="drop")
    assert dropped.counts[DROP_TOO_LONG] == 2 and dropped.counts["kept"] == 1 and dropped.rows.shape == (1, 65)


def test_sft_lowers_the_assistant_loss_and_masked_tokens_get_no_gradient() -> None:
    rng = random.Random(0)
    packed = pack_conversations([chat(n, rng) for n in range(24)], BYTE, 96)
    inputs, labels = (torch.from_numpy(a) for a in split_masked_rows(masked(packed), BYTE.pad_id))
    doc_ids = torch.from_numpy(document_ids(inputs.numpy(), BYTE.eot_id, BYTE.pad_id).astype(np.int64))
    torch.manual_seed(0)
    model = build_model(get_model_config("tiny"), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def step() -> float:
        logits = model(inputs, document_ids=doc_ids)
        logits.retain_grad()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        loss.backward()
        trained = labels != IGNORE_INDEX
        assert logits.grad[~trained].abs().max() == 0  # context and padding positions: no gradient
        assert (logits.grad[trained].abs().sum(-1) > 0).all()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    losses = [step() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("sft")
    bad = [[{"role": "user", "content": "no answer"}],
           [{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}]]
    return write_parent(root / "parent"), write_chats(root / "chats", 200, extra=bad)


def sft_spec(parent: str, chats: str, **overrides) -> dict:
    spec = {
        "stage": "sft", "model": {"parent": {"uri": parent}},
        "datasets": [{"uri": chats, "name": "chats", "weight": 1.0, "epochs": 10}],
        "sequenceLength": 64,
        "optimization": {"globalBatchSequences": 8, "microBatchSequences": 2, "peakLearningRate": 3e-3,
                         "warmupSteps": 1, "totalTokens": 10 * 8 * 64},
        "checkpoint": {"intervalSteps": 4, "keepLast": 2},
        "execution": {"precision": "fp32", "seed": 3},
        "ray": {"workers": {"replicas": 2, "gpusPerWorker": 0}},
    }
    spec.update(overrides)
    return spec


@pytest.mark.slow
def test_sft_stage_trains_resumes_exactly_and_exports(ray_cluster, sft_inputs, tmp_path, capfd) -> None:
    parent, chats = sft_inputs
    full = (tmp_path / "full").as_uri()
    assert workload.run(write_spec(full, sft_spec(parent, chats), "sft")) == 0
    out = capfd.readouterr().out
    assert "chats: 200 samples kept" in out and f"{DROP_NO_ASSISTANT}: 1" in out and f"{DROP_ROLE_ORDER}: 1" in out
    history = read_history(full)
    losses = [row["loss"] for row in history]
    assert len(losses) == 10 and losses[-1] < losses[0] - 1.0, losses
    assert all(0.05 < row["trained_token_share"] < 0.5 for row in history)
    assert read_progress(full).phase == PHASE_SUCCEEDED
    assert open_store(hf_export_uri(full)).exists("config.json")

    # killed from outside once checkpoint 4 is committed, then resumed
    broken = (tmp_path / "broken").as_uri()
    latest = kill_training_after_checkpoint(write_spec(broken, sft_spec(parent, chats), "sft"), broken, 4,
                                            tmp_path / "killed.log")
    assert 4 <= latest < len(losses)
    assert workload.run(write_spec(broken, sft_spec(parent, chats), "sft", attempt=2)) == 0
    assert re.search(rf"resumed from \S+ \(step {latest}, ", capfd.readouterr().out)
    assert [row["loss"] for row in read_history(broken)] == pytest.approx(losses, abs=1e-6, rel=0)


@pytest.mark.slow
def test_sft_one_sample_per_sequence(ray_cluster, sft_inputs, tmp_path) -> None:
    parent, chats = sft_inputs
    output = (tmp_path / "single").as_uri()
    spec = sft_spec(parent, chats, sft={"packing": "single", "overLong": "drop"})
    spec["optimization"] = {**spec["optimization"], "totalTokens": 4 * 8 * 64}
    assert workload.run(write_spec(output, spec, "sft")) == 0
    # One short sample per 64-token row: a smaller share of the positions is trained on than packed.
    assert all(row["trained_token_share"] < 0.2 for row in read_history(output))


def test_sft_rejects_a_dataset_of_another_schema(tmp_path, sft_inputs, capsys) -> None:
    from tests.trainer.test_train_stage import make_data

    parent, _ = sft_inputs
    docs = tmp_path / "docs"
    make_data.write(docs, 10)
    code = workload.run(write_spec((tmp_path / "out").as_uri(), sft_spec(parent, docs.as_uri()), "sft"))
    assert code == 2
    err = capsys.readouterr().err
    assert "datasets[0] (chats)" in err and "stage sft reads 'chat_samples'" in err
