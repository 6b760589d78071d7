"""Stage dpo: the loss against a hand computation and TRL, one forward per one-token pair, the stage end to end."""

from __future__ import annotations

import contextlib
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.processes import kill_training_after_checkpoint
from tests.trainer.posttrain_data import one_token_pair, write_pairs, write_parent, write_spec
from tokenmill.layout import hf_export_uri, join
from tokenmill.model_configs import get_model_config
from tokenmill.store import CheckpointStore, open_store, read_progress
from tokenmill.trainer.data.pairs import (
    DROP_SAME,
    DROP_TOO_LONG,
    dpo_loss,
    load_pairs,
    pair_batch,
    sequence_logps,
)
from tokenmill.trainer.model import build_model
from tokenmill.trainer.tokenizer import get_tokenizer
from tokenmill.trainer.train import workload
from tokenmill.trainer.train.dpo import REFERENCE_DIR, REFERENCE_MARKER
from tokenmill.trainer.train.loop import read_history
from tokenmill.workloads import PHASE_SUCCEEDED

BYTE = get_tokenizer("byte")
CONFIG = get_model_config("tiny")
PLAIN = contextlib.nullcontext()


def ids(text: str) -> np.ndarray:
    return np.asarray(BYTE.encode(text), dtype=np.int64)


MIXED_PAIRS = [
    (ids("2+2="), ids("4"), ids("5")),  # one-token
    (ids("the sky is "), ids("blue"), ids("green!")),
    (ids("x"), ids("yz"), ids("y")),
    (ids("count: 1 2 3 "), ids("4"), ids("9")),  # one-token
]


def hand_logp(model, prompt: np.ndarray, completion: np.ndarray) -> float:
    """log p(completion | prompt) from one full forward, log-softmax written out in float64."""
    sequence = np.concatenate([prompt, completion])
    with torch.no_grad():
        logits = model(torch.from_numpy(sequence[None]))[0].double()
    total = 0.0
    for offset, token in enumerate(completion):
        row = logits[prompt.size - 1 + offset]
        top = float(row.max())
        log_sum = top + math.log(float(torch.exp(row - top).sum()))
        total += float(row[int(token)]) - log_sum
    return total


def test_batch_loss_equals_a_hand_computation() -> None:
    policy, reference = build_model(CONFIG, seed=1), build_model(CONFIG, seed=2)
    beta = 0.7
    batch = pair_batch(MIXED_PAIRS, BYTE.pad_id)
    with torch.no_grad():
        loss, figures = dpo_loss(sequence_logps(policy, batch, PLAIN), sequence_logps(reference, batch, PLAIN), beta)
    for index, (prompt, chosen, rejected) in enumerate(MIXED_PAIRS):
        margin = beta * ((hand_logp(policy, prompt, chosen) - hand_logp(reference, prompt, chosen))
                         - (hand_logp(policy, prompt, rejected) - hand_logp(reference, prompt, rejected)))
        expected = math.log1p(math.exp(-margin))  # -log sigmoid(margin)
        assert float(loss[index]) == pytest.approx(expected, abs=1e-5)
        assert float(figures["margin"][index]) == pytest.approx(margin, abs=1e-5)
    assert float(loss.mean()) > 0.1  # the models differ: not the trivial log 2 of identical models


class ForwardCounter:
    """Counts forward calls and the sequences they run."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = self.sequences = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1
        self.sequences += int(args[0].shape[0])


def test_one_forward_per_model_per_one_token_pair() -> None:
    rng = random.Random(0)
    rows = [one_token_pair(i, rng) for i in range(16)]
    pairs = [(np.array(r["prompt_tokens"]), np.array(r["chosen_tokens"]), np.array(r["rejected_tokens"])) for r in rows]
    policy, reference = build_model(CONFIG, seed=1), build_model(CONFIG, seed=2)
    counters = ForwardCounter(policy), ForwardCounter(reference)
    batch = pair_batch(pairs, BYTE.pad_id)
    assert batch.forwards == 16 and batch.input_ids.shape[0] == 16
    with torch.no_grad():
        reference_logps = sequence_logps(reference, batch, PLAIN)
    policy_logps = sequence_logps(policy, batch, PLAIN).detach()
    assert [(c.calls, c.sequences) for c in counters] == [(1, 16), (1, 16)]
    # Both log-probs of a pair come from its prompt's one next-token distribution.
    for index, (prompt, chosen, rejected) in enumerate(pairs[:3]):
        assert float(policy_logps[index, 0]) == pytest.approx(hand_logp(policy, prompt, chosen), abs=1e-5)
        assert float(reference_logps[index, 1]) == pytest.approx(hand_logp(reference, prompt, rejected), abs=1e-5)
    # Any other pair is two sequences: MIXED_PAIRS holds two one-token pairs and two others.
    assert pair_batch(MIXED_PAIRS, BYTE.pad_id).forwards == 1 + 2 + 2 + 1


def trl_step_zero(tmp_path: Path, seeds: tuple[int, int], rows: list[dict], beta: float, **dpo_args):
    """Our policy and reference (built from `seeds`), TRL's policy after its loss's backward, TRL's loss,
    and the pairs as TRL tokenized them (its completions end with the tokenizer's EOS)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Phi3ForCausalLM
    from trl import DPOConfig, DPOTrainer

    from tokenmill.trainer.model.hf import export_hf

    policy, reference = build_model(CONFIG, seed=seeds[0]), build_model(CONFIG, seed=seeds[1])
    export_hf(policy, CONFIG, tmp_path / "policy", tokenizer_name="byte", dtype="float32")
    export_hf(reference, CONFIG, tmp_path / "reference", tokenizer_name="byte", dtype="float32")
    hf_policy = Phi3ForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    hf_reference = Phi3ForCausalLM.from_pretrained(tmp_path / "reference", dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, per_device_train_batch_size=len(rows), report_to=[],
                     use_cpu=True, max_length=None, bf16=False, **dpo_args)
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(tmp_path / "policy"))
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    hf_policy.train()
    trl_loss = trainer.compute_loss(hf_policy, trainer.data_collator(examples))
    trl_loss.backward()
    pairs = [(np.array(e["prompt_ids"]), np.array(e["chosen_ids"]), np.array(e["rejected_ids"])) for e in examples]
    return policy, reference, hf_policy, trl_loss, pairs


def test_step_zero_loss_and_gradients_match_trl(tmp_path: Path) -> None:
    rows = [{"prompt": "echo red: ", "chosen": "red", "rejected": "blue moon"},
            {"prompt": "sum 2+2=", "chosen": "4", "rejected": "5"},
            {"prompt": "hi", "chosen": " there", "rejected": "!"},
            {"prompt": "a b c ", "chosen": "d", "rejected": "e f"}]
    beta = 0.3
    policy, reference, hf_policy, trl_loss, pairs = trl_step_zero(tmp_path, (1, 2), rows, beta)
    batch = pair_batch(pairs, BYTE.pad_id)
    with torch.no_grad():
        reference_logps = sequence_logps(reference, batch, PLAIN)
    loss, _ = dpo_loss(sequence_logps(policy, batch, PLAIN), reference_logps, beta)
    loss.mean().backward()
    assert float(loss.mean()) == pytest.approx(float(trl_loss), abs=1e-5)
    ours = dict(policy.named_parameters())
    theirs = dict(hf_policy.named_parameters())
    for our_name, trl_name in [("lm_head.weight", "lm_head.weight"), ("embed.weight", "model.embed_tokens.weight"),
                               ("norm.weight", "model.norm.weight"),
                               ("layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight")]:
        assert torch.allclose(ours[our_name].grad, theirs[trl_name].grad, atol=1e-6, rtol=1e-4), our_name


def test_chosen_nll_term_matches_trl_sft_loss(tmp_path: Path) -> None:
    """dpo.chosenNllWeight against TRL's sigmoid + weighted sft loss, on chosen completions of one length
    (TRL averages the NLL over the batch's chosen tokens, ours per pair: the same when lengths agree)."""
    rows = [{"prompt": "6 + 9 = ", "chosen": "15", "rejected": "17"},
            {"prompt": "8 - 3 = ", "chosen": "5.", "rejected": "6"},
            {"prompt": "hi", "chosen": " x", "rejected": " there!"}]
    beta, weight = 0.2, 0.7
    policy, reference, hf_policy, trl_loss, pairs = trl_step_zero(
        tmp_path, (3, 4), rows, beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, weight])
    assert len({chosen.size for _, chosen, _ in pairs}) == 1
    batch = pair_batch(pairs, BYTE.pad_id)
    with torch.no_grad():
        reference_logps = sequence_logps(reference, batch, PLAIN)
    policy_logps = sequence_logps(policy, batch, PLAIN)
    plain, _ = dpo_loss(policy_logps.detach(), reference_logps, beta)
    loss, figures = dpo_loss(policy_logps, reference_logps, beta, weight, batch.lengths())
    loss.mean().backward()
    assert float(loss.mean()) == pytest.approx(float(trl_loss), abs=1e-5)
    assert float(loss.mean() - plain.mean()) == pytest.approx(weight * float(figures["chosen_nll"].mean()), abs=1e-5)
    assert float(figures["chosen_nll"].mean()) > 1.0  # an untrained model: the term is far from zero
    ours, theirs = dict(policy.named_parameters()), dict(hf_policy.named_parameters())
    for our_name, trl_name in [("lm_head.weight", "lm_head.weight"), ("embed.weight", "model.embed_tokens.weight"),
                               ("layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight")]:
        assert torch.allclose(ours[our_name].grad, theirs[trl_name].grad, atol=1e-6, rtol=1e-4), our_name


def test_batch_lengths_count_each_completion() -> None:
    batch = pair_batch(MIXED_PAIRS, BYTE.pad_id)
    assert batch.lengths().tolist() == [[1, 1], [4, 6], [2, 1], [1, 1]]


def test_dpo_raises_the_margin_on_held_out_pairs() -> None:
    rng = random.Random(3)
    rows = [one_token_pair(i, rng) for i in range(48)]
    pairs = [(np.array(r["prompt_tokens"]), np.array(r["chosen_tokens"]), np.array(r["rejected_tokens"])) for r in rows]
    train, held_out = pairs[:32], pairs[32:]
    policy, reference = build_model(CONFIG, seed=5), build_model(CONFIG, seed=5)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)

    def margins(subset):
        batch = pair_batch(subset, BYTE.pad_id)
        with torch.no_grad():
            _, figures = dpo_loss(sequence_logps(policy, batch, PLAIN), sequence_logps(reference, batch, PLAIN), 1.0)
        return figures["margin"]

    assert margins(held_out).abs().max() == 0  # the policy starts as the reference
    for start in range(0, 64, 8):
        batch = pair_batch([train[(start + k) % len(train)] for k in range(8)], BYTE.pad_id)
        with torch.no_grad():
            reference_logps = sequence_logps(reference, batch, PLAIN)
        loss, _ = dpo_loss(sequence_logps(policy, batch, PLAIN), reference_logps, 0.5)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = margins(held_out)
    assert float(after.mean()) > 0.5 and bool((after > 0).all()), after


def test_pairs_are_checked_before_training(tmp_path: Path) -> None:
    rows = [
        {"id": "ok", "prompt_tokens": [1, 2, 3], "chosen_tokens": [4], "rejected_tokens": [5]},
        {"id": "same", "prompt_tokens": [1, 2, 3], "chosen_tokens": [4], "rejected_tokens": [4]},
        {"id": "long", "prompt_tokens": list(range(40)), "chosen_tokens": [4], "rejected_tokens": [5]},
        {"id": "none", "source": "x"},
        {"id": "chat", "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Let"}],
         "chosen": " us", "rejected": " me"},
    ]
    pairs = load_pairs(write_pairs(tmp_path / "pairs", rows), "pairs", BYTE, CONFIG.vocab_size, 32)
    assert pairs.ids == ["ok", "chat"]
    assert pairs.counts[DROP_SAME] == 1 and pairs.counts[DROP_TOO_LONG] == 1 and pairs.counts["kept"] == 2
    # The chat pair: the open assistant prefix is continued, each continuation closes the turn.
    expected_prompt = BYTE.encode("<|im_start|>user<|im_sep|>hi<|im_end|><|im_start|>assistant<|im_sep|>Let",
                                  allow_special=True)
    assert pairs.prompts[1].tolist() == expected_prompt
    assert pairs.chosen[1].tolist() == BYTE.encode(" us<|im_end|>", allow_special=True)


@pytest.fixture(scope="module")
def dpo_inputs(tmp_path_factory) -> tuple[str, str, Path]:
    root = tmp_path_factory.mktemp("dpo")
    rng = random.Random(0)
    rows = [one_token_pair(i, rng) for i in range(64)]
    rows.append({"id": "same", "prompt_tokens": [1, 2, 3], "chosen_tokens": [5], "rejected_tokens": [5]})
    return write_parent(root / "parent"), write_pairs(root / "pairs", rows), root


DPO_STEPS = 20
"""Steps of the DPO test runs: many after checkpoint 3, so the kill from outside lands mid-run."""


def dpo_spec(parent: str, pairs: str, reference: str | None = None, **overrides) -> dict:
    spec = {
        "stage": "dpo", "model": {"parent": {"uri": parent}},
        "dpo": {"beta": 0.5, "referenceModel": {"uri": reference or parent}},
        "datasets": [{"uri": pairs, "name": "pts", "weight": 1.0, "epochs": 10}],
        "sequenceLength": 64,
        "optimization": {"globalBatchSequences": 8, "microBatchSequences": 2, "peakLearningRate": 1e-3,
                         "totalTokens": DPO_STEPS * 8 * 64},
        "checkpoint": {"intervalSteps": 3, "keepLast": 2},
        "execution": {"precision": "fp32", "seed": 4},
        "ray": {"workers": {"replicas": 2, "gpusPerWorker": 0}},
    }
    spec.update(overrides)
    return spec


@pytest.mark.slow
def test_dpo_stage_trains_resumes_exactly_and_reuses_the_reference(ray_cluster, dpo_inputs, tmp_path,
                                                                     capfd) -> None:
    parent, pairs, _ = dpo_inputs
    full = (tmp_path / "full").as_uri()
    assert workload.run(write_spec(full, dpo_spec(parent, pairs), "dpo")) == 0
    out = capfd.readouterr().out
    assert "pts: 64 pairs kept" in out and f"{DROP_SAME}: 1" in out and "one-token pairs: 64" in out
    assert "reference log-probs of 64 pairs computed (64 sequences forwarded)" in out  # one per pair
    history = read_history(full)
    assert len(history) == DPO_STEPS and history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["loss"] < 0.4 and history[-1]["reward_accuracy"] == 1.0 and history[-1]["margin"] > 0.5
    assert all(row["sequences_per_pair"] == 1.0 for row in history)  # one forward per one-token pair
    assert history[-1]["chosen_reward"] > 0 > history[-1]["rejected_reward"]
    assert read_progress(full).phase == PHASE_SUCCEEDED
    assert open_store(hf_export_uri(full)).exists("config.json")
    assert open_store(join(full, REFERENCE_DIR)).exists(REFERENCE_MARKER)

    # killed from outside once checkpoint 3 is committed, then resumed
    broken = (tmp_path / "broken").as_uri()
    latest = kill_training_after_checkpoint(write_spec(broken, dpo_spec(parent, pairs), "dpo"), broken, 3,
                                            tmp_path / "killed.log")
    assert 3 <= latest < len(history)
    capfd.readouterr()
    assert workload.run(write_spec(broken, dpo_spec(parent, pairs), "dpo", attempt=2)) == 0
    out = capfd.readouterr().out
    assert "reference log-probs read back" in out and "computed" not in out
    assert re.search(rf"resumed from \S+ \(step {latest}, ", out)
    assert [row["loss"] for row in read_history(broken)] == pytest.approx([r["loss"] for r in history], abs=1e-6, rel=0)


def test_dpo_bad_input_is_refused_before_training(dpo_inputs, tmp_path, capsys) -> None:
    parent, pairs, root = dpo_inputs

    def refused(spec: dict, name: str) -> str:
        assert workload.run(write_spec((tmp_path / name).as_uri(), spec, "dpo")) == 2
        assert not CheckpointStore.for_output((tmp_path / name).as_uri()).steps()
        return capsys.readouterr().err

    other = write_parent(root / "phi4-reference", tokenizer="phi-4")
    err = refused(dpo_spec(parent, pairs, reference=other), "tokenizer")
    assert "dpo.referenceModel" in err and "'phi-4'" in err and "not be comparable" in err

    outside = write_pairs(tmp_path / "outside", [
        {"id": "fine", "prompt_tokens": [1, 2], "chosen_tokens": [3], "rejected_tokens": [4]},
        {"id": "big", "prompt_tokens": [1, 2, 100264], "chosen_tokens": [3], "rejected_tokens": [4]},
    ])
    err = refused(dpo_spec(parent, outside), "vocab")
    assert "datasets[0] (pts)" in err and "pair 'big'" in err and "prompt holds id 100264" in err

    useless = write_pairs(tmp_path / "useless", [
        {"id": "same", "prompt_tokens": [1, 2], "chosen_tokens": [3], "rejected_tokens": [3]},
        {"id": "long", "prompt_tokens": list(range(100)), "chosen_tokens": [3], "rejected_tokens": [4]},
    ])
    err = refused(dpo_spec(parent, useless), "useless")
    assert "no pair to train on" in err and f"{DROP_SAME}: 1" in err and f"{DROP_TOO_LONG}: 1" in err


def test_dpo_figures_are_exported_as_prometheus_metrics() -> None:
    from tokenmill.store import Progress
    from tokenmill.trainer.metrics import progress_metrics

    figures = {"step": 3, "loss": 0.4, "reward_accuracy": 0.75, "chosen_reward": 0.2, "rejected_reward": -0.1,
               "margin": 0.3, "pairs_per_s": 50.0, "pairs_seen": 24, "tokens_seen": 900}
    labels = {"kind": "TrainingStage", "namespace": "ns", "name": "dpo"}
    progress = Progress(phase="training", metrics=figures)
    families = {f.name: f.samples[0].value for f in progress_metrics(progress, labels)}
    assert families["tokenmill_train_dpo_reward_accuracy_ratio"] == 0.75
    assert families["tokenmill_train_dpo_margin"] == pytest.approx(0.3)
    assert families["tokenmill_train_dpo_rejected_reward"] == pytest.approx(-0.1)
    assert families["tokenmill_train_dpo_pairs"] == 24  # a counter: exposed as _total
    assert "tokenmill_train_mfu_ratio" not in families  # a figure the stage does not report is left out


@pytest.mark.slow
def test_dpo_stage_on_full_sequence_chat_pairs_in_one_process(dpo_inputs, tmp_path) -> None:
    """The stage's loop on one rank, without Ray, over pairs given as chat text (two sequences each)."""
    from tokenmill.store import read_run_spec_at
    from tokenmill.trainer.train import loop
    from tokenmill.trainer.train.prepare import prepare

    parent, _, _ = dpo_inputs
    rng = random.Random(1)
    rows = []
    for index in range(24):
        a, b = rng.sample(["red", "blue", "green", "cat", "dog"], 2)
        rows.append({"id": f"c{index}", "prompt": [{"role": "user", "content": f"say {a}"}],
                     "chosen": a, "rejected": b})
    pairs = write_pairs(tmp_path / "chat-pairs", rows)
    output = (tmp_path / "out").as_uri()
    spec = dpo_spec(parent, pairs, optimization={"globalBatchSequences": 8, "microBatchSequences": 4,
                                                 "peakLearningRate": 3e-3, "totalTokens": 8 * 8 * 64})
    job = prepare(read_run_spec_at(write_spec(output, spec, "dpo")), build_caches=True)
    loop.run(job, 0, 1, torch.device("cpu"))
    history = read_history(output)
    assert all(row["sequences_per_pair"] == 2.0 for row in history)  # prompt + chosen, prompt + rejected
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["loss"] < history[0]["loss"] - 0.05 and history[-1]["margin"] > 0, history
