"""Stage dpo on multi-turn pairs (a whole conversation as the prompt, as SyntheticDataJob's
`multiTurn` + `judge` writes them): the rendered ids, the loss mask, TRL, the stage's own log-probs."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.posttrain_data import write_pairs, write_spec
from tests.trainer.test_dpo import BYTE, CONFIG, PLAIN, dpo_inputs, dpo_spec, hand_logp, trl_step_zero  # noqa: F401
from tokenmill.store import CheckpointStore
from tokenmill.trainer.data.chat import conversation_problem
from tokenmill.trainer.data.pairs import (
    DROP_BAD_ROLE,
    DROP_EMPTY,
    DROP_ROLE_ORDER,
    DROP_SAME,
    dpo_loss,
    load_pairs,
    pair_batch,
    sequence_logps,
)
from tokenmill.trainer.model import build_model
from tokenmill.trainer.tokenizer import get_tokenizer
from tokenmill.trainer.tokenizer.special import IM_END
from tokenmill.trainer.train import workload

# Rows as `_preference_row` writes them after multiTurn: the conversation up to its final user turn,
# and the judged final assistant replies. m0's rejected reply repeats an earlier assistant turn: a
# log-prob that also counted the earlier turns would differ from one over the final reply only.
MULTI_TURN = [
    {"id": "m0", "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                            {"role": "assistant", "content": "4"}, {"role": "user", "content": "times 3?"}],
     "chosen": "12", "rejected": "4"},
    {"id": "m1", "prompt": [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "red"},
                            {"role": "user", "content": "another"}, {"role": "assistant", "content": "blue"},
                            {"role": "user", "content": "one more"}],
     "chosen": "green", "rejected": "red, again"},
    {"id": "s0", "prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "no"},  # single-turn
]


def phi4_text(messages: list[dict[str, str]]) -> str:
    """The Phi-4 chat format, written out: every turn closed, then the assistant header."""
    turns = "".join(f"<|im_start|>{m['role']}<|im_sep|>{m['content']}<|im_end|>" for m in messages)
    return turns + "<|im_start|>assistant<|im_sep|>"


def expected_ids(tokenizer, row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, chosen, rejected) ids from the whole rendered text, tokenized in one piece."""
    def encode(text: str) -> np.ndarray:
        return np.asarray(tokenizer.encode(text, allow_special=True), dtype=np.int64)

    return (encode(phi4_text(row["prompt"])), encode(row["chosen"] + IM_END), encode(row["rejected"] + IM_END))


@pytest.mark.parametrize("name", ["byte", "phi-4"])
def test_the_prompt_is_the_whole_conversation_and_only_the_final_reply_is_a_target(tmp_path: Path, name) -> None:
    tokenizer = get_tokenizer(name)
    pairs = load_pairs(write_pairs(tmp_path / "pairs", MULTI_TURN), "mt", tokenizer, tokenizer.vocab_size, 256)
    assert pairs.ids == ["m0", "m1", "s0"]
    for index, row in enumerate(MULTI_TURN):
        prompt, chosen, rejected = expected_ids(tokenizer, row)
        # System, user and earlier assistant turns all in order, ending with the generation prompt.
        assert pairs.prompts[index].tolist() == prompt.tolist(), row["id"]
        assert pairs.chosen[index].tolist() == chosen.tolist(), row["id"]
        assert pairs.rejected[index].tolist() == rejected.tolist(), row["id"]

        batch = pair_batch([(pairs.prompts[index], pairs.chosen[index], pairs.rejected[index])], tokenizer.pad_id)
        for side, reply in enumerate((row["chosen"], row["rejected"])):
            # The chat format's own mask over the conversation with this reply: every assistant turn.
            full, mask = tokenizer.encode_chat_with_mask([*row["prompt"], {"role": "assistant", "content": reply}])
            final = [i for i in range(prompt.size, len(full)) if mask[i]]
            earlier = [i for i in range(prompt.size) if mask[i]]
            assert final == list(range(prompt.size, len(full)))  # the reply and its <|im_end|>
            assert bool(earlier) == (row["id"] != "s0")  # the multi-turn prompts hold assistant turns
            take = batch.slots == side
            # Position p predicts token p + 1 of prompt + reply: exactly the final reply's tokens, never
            # an earlier assistant turn's.
            predicted = (batch.positions[take] + 1).tolist()
            assert predicted == final
            sequence = batch.input_ids[int(batch.rows[take][0])].tolist()
            assert sequence[: len(full) - 1] == full[:-1]  # the model reads the whole conversation
            assert batch.targets[take].tolist() == full[prompt.size :]
        assert batch.lengths().tolist() == [[chosen.size, rejected.size]]


def test_a_prompt_role_the_chat_format_lacks_is_dropped_and_counted(dpo_inputs, tmp_path: Path,
                                                                     capsys) -> None:
    """Such a prompt used to raise the chat format's ValueError out of the loader: the stage ended in a
    traceback instead of counting the pair or refusing the dataset."""
    tool = {"id": "tool", "prompt": [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "rain"},
                                     {"role": "user", "content": "so?"}],
            "chosen": "take an umbrella", "rejected": "sun"}
    same = {"id": "same", "prompt": MULTI_TURN[0]["prompt"], "chosen": "12", "rejected": "12"}
    pairs = load_pairs(write_pairs(tmp_path / "pairs", [*MULTI_TURN, tool, same]), "mt", BYTE, CONFIG.vocab_size, 256)
    assert pairs.ids == ["m0", "m1", "s0"]
    assert pairs.counts[DROP_BAD_ROLE] == 1 and pairs.counts[DROP_SAME] == 1 and pairs.counts["kept"] == 3

    # A dataset of such pairs only is bad input: the stage refuses it (exit 2) before training.
    parent, _, _ = dpo_inputs
    output = (tmp_path / "out").as_uri()
    only_tool = write_pairs(tmp_path / "tool-pairs", [tool, {**tool, "id": "tool2"}])
    assert workload.run(write_spec(output, dpo_spec(parent, only_tool), "dpo")) == 2
    err = capsys.readouterr().err
    assert "no pair to train on" in err and f"{DROP_BAD_ROLE}: 2" in err
    assert not CheckpointStore.for_output(output).steps()


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# Text-form pairs with nothing to condition on or nothing to score: each would render to a prompt of
# headers only, or a continuation of only <|im_end|>, and used to be kept.
EMPTY = [
    {"id": "no-messages", "prompt": [], "chosen": "12", "rejected": "4"},
    {"id": "blank-messages", "prompt": [msg("system", " "), msg("user", "\n\t")], "chosen": "12", "rejected": "4"},
    {"id": "empty-chosen", "prompt": MULTI_TURN[0]["prompt"], "chosen": "", "rejected": "4"},
    {"id": "empty-rejected", "prompt": MULTI_TURN[1]["prompt"], "chosen": "green", "rejected": ""},
    {"id": "blank-chosen", "prompt": [msg("user", "hi")], "chosen": " \n ", "rejected": "no"},
    {"id": "blank-after-prefix", "prompt": [msg("user", "hi"), msg("assistant", "hel")], "chosen": "lo",
     "rejected": "\t"},
    # token form: an empty list was already dropped under the same reason
    {"id": "no-prompt-tokens", "prompt_tokens": [], "chosen_tokens": [3], "rejected_tokens": [4]},
]


def test_an_empty_prompt_or_reply_is_dropped_and_counted(tmp_path: Path) -> None:
    pairs = load_pairs(write_pairs(tmp_path / "pairs", [*MULTI_TURN, *EMPTY]), "mt", BYTE, CONFIG.vocab_size, 256)
    assert pairs.ids == ["m0", "m1", "s0"]
    assert pairs.counts[DROP_EMPTY] == len(EMPTY) and pairs.counts["kept"] == 3
    # a reply that is not blank is kept, whatever it holds besides its text
    spaced = write_pairs(tmp_path / "spaced", [{"id": "spaced", "prompt": [msg("user", "hi")], "chosen": " hello ",
                                                "rejected": "no\n"}], shards=1)
    assert load_pairs(spaced, "s", BYTE, CONFIG.vocab_size, 256).ids == ["spaced"]


# Prompts out of the order SFT accepts for a conversation (an optional system message, then user and
# assistant alternating from user), with the continuation as the final assistant turn.
OUT_OF_ORDER = [
    [msg("assistant", "hi"), msg("user", "hello")],  # starts with assistant
    [msg("assistant", "The answer is")],  # a prefix with no user turn before it
    [msg("system", "be brief")],  # no user turn: the reply would follow the system message
    [msg("system", "be brief"), msg("assistant", "ok")],
    [msg("user", "a"), msg("user", "b")],  # two user turns in a row
    [msg("user", "a"), msg("assistant", "b"), msg("assistant", "c")],  # two assistant turns in a row
    [msg("user", "a"), msg("system", "b"), msg("user", "c")],  # system not first
    [msg("system", "a"), msg("system", "b"), msg("user", "c")],
]
IN_ORDER = [
    [msg("user", "a")],
    [msg("system", "s"), msg("user", "a")],
    [msg("user", "a"), msg("assistant", "The answer is")],  # a prefix the continuations extend
    [msg("system", "s"), msg("user", "a"), msg("assistant", "b"), msg("user", "c")],
    [msg("user", "a"), msg("assistant", "b"), msg("user", "c"), msg("assistant", "prefix")],
]


def test_prompt_roles_follow_the_sft_order_and_may_end_with_an_assistant_prefix(tmp_path: Path) -> None:
    rows = [{"id": f"bad{i}", "prompt": prompt, "chosen": " 12", "rejected": " 4"}
            for i, prompt in enumerate(OUT_OF_ORDER)]
    rows += [{"id": f"ok{i}", "prompt": prompt, "chosen": " 12", "rejected": " 4"} for i, prompt in enumerate(IN_ORDER)]
    pairs = load_pairs(write_pairs(tmp_path / "pairs", rows), "mt", BYTE, CONFIG.vocab_size, 256)
    assert pairs.ids == [f"ok{i}" for i in range(len(IN_ORDER))]
    assert pairs.counts[DROP_ROLE_ORDER] == len(OUT_OF_ORDER) and pairs.counts["kept"] == len(IN_ORDER)
    # the same rule as SFT's: each accepted prompt completed by its reply is a conversation SFT keeps,
    # each refused one is not
    for prompt in IN_ORDER + OUT_OF_ORDER:
        if prompt[-1]["role"] == "assistant":
            completed = [*prompt[:-1], msg("assistant", prompt[-1]["content"] + " 12")]
        else:
            completed = [*prompt, msg("assistant", " 12")]
        assert (conversation_problem(completed) is None) == (prompt in IN_ORDER), prompt


def test_a_dataset_of_empty_and_disordered_pairs_is_refused(dpo_inputs, tmp_path: Path, capsys) -> None:
    parent, _, _ = dpo_inputs
    output = (tmp_path / "out").as_uri()
    rows = [*EMPTY[:3], {"id": "order", "prompt": OUT_OF_ORDER[0], "chosen": "12", "rejected": "4"}]
    assert workload.run(write_spec(output, dpo_spec(parent, write_pairs(tmp_path / "pairs", rows)), "dpo")) == 2
    err = capsys.readouterr().err
    assert "no pair to train on" in err and f"{DROP_EMPTY}: 3" in err and f"{DROP_ROLE_ORDER}: 1" in err
    assert not CheckpointStore.for_output(output).steps()


def test_multi_turn_step_matches_trl_and_a_hand_computation(tmp_path: Path) -> None:
    """TRL's DPOTrainer on the same rows as conversations: it renders them with the chat template of the
    exported tokenizer and masks the prompt; our pairs come from the stage's loader."""
    conversations = [{"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": row["chosen"]}],
                      "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in MULTI_TURN]
    beta = 0.3
    policy, reference, hf_policy, trl_loss, trl_pairs = trl_step_zero(tmp_path, (1, 2), conversations, beta)
    loaded = load_pairs(write_pairs(tmp_path / "pairs", MULTI_TURN), "mt", BYTE, CONFIG.vocab_size, 256)
    pairs = list(zip(loaded.prompts, loaded.chosen, loaded.rejected))
    for ours, theirs in zip(pairs, trl_pairs):
        assert [part.tolist() for part in ours] == [part.tolist() for part in theirs]

    batch = pair_batch(pairs, BYTE.pad_id)
    assert batch.forwards == 2 * len(pairs)
    with torch.no_grad():
        reference_logps = sequence_logps(reference, batch, PLAIN)
    policy_logps = sequence_logps(policy, batch, PLAIN)
    for index, (prompt, chosen, rejected) in enumerate(pairs):
        for side, reply in enumerate((chosen, rejected)):
            assert float(policy_logps[index, side]) == pytest.approx(hand_logp(policy, prompt, reply), abs=1e-5)
            assert float(reference_logps[index, side]) == pytest.approx(hand_logp(reference, prompt, reply), abs=1e-5)
    loss, _ = dpo_loss(policy_logps, reference_logps, beta)
    loss.mean().backward()
    assert float(loss.mean()) == pytest.approx(float(trl_loss), abs=1e-5)
    ours, theirs = dict(policy.named_parameters()), dict(hf_policy.named_parameters())
    for our_name, trl_name in [("lm_head.weight", "lm_head.weight"), ("embed.weight", "model.embed_tokens.weight"),
                               ("layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight")]:
        assert torch.allclose(ours[our_name].grad, theirs[trl_name].grad, atol=1e-6, rtol=1e-4), our_name


@pytest.mark.slow
def test_dpo_stage_on_multi_turn_pairs_in_one_process(dpo_inputs, tmp_path) -> None:
    """The stage's loop on one rank, without Ray: its committed reference log-probs and its first step's
    chosen NLL against a direct computation on the parent's weights, then training lowers the loss."""
    from tokenmill.store import read_run_spec_at
    from tokenmill.trainer.train import checkpoint as ckpt
    from tokenmill.trainer.train import loop
    from tokenmill.trainer.train.dpo import REFERENCE_DIR
    from tokenmill.trainer.train.loop import read_history
    from tokenmill.trainer.train.prepare import prepare

    parent, _, _ = dpo_inputs
    rng = random.Random(2)
    rows = []
    for index in range(8):  # one global batch: step 1 takes every pair once
        a, b, c = rng.sample(["red", "blue", "green", "cat", "dog", "sun"], 3)
        rows.append({"id": f"c{index}", "prompt": [
            {"role": "system", "content": "echo"}, {"role": "user", "content": a}, {"role": "assistant", "content": a},
            {"role": "user", "content": b}], "chosen": b, "rejected": c})
    uri = write_pairs(tmp_path / "multi-turn", rows)
    output = (tmp_path / "out").as_uri()
    steps = 6
    length = 128  # the conversations are 60-80 tokens
    spec = dpo_spec(parent, uri, sequenceLength=length,
                    optimization={"globalBatchSequences": 8, "microBatchSequences": 4, "peakLearningRate": 3e-3,
                                  "totalTokens": steps * 8 * length})
    job = prepare(read_run_spec_at(write_spec(output, spec, "dpo")), build_caches=True)
    loop.run(job, 0, 1, torch.device("cpu"))

    start = build_model(CONFIG)
    ckpt.load_model_weights(parent, start)
    start.eval()
    expected = [expected_ids(BYTE, row) for row in rows]
    hand = np.array([[hand_logp(start, p, c), hand_logp(start, p, r)] for p, c, r in expected])
    assert hand.min() < -10  # an untrained model: the sums are far from zero
    reference = np.load(Path(tmp_path / "out" / REFERENCE_DIR / "pts.npy"))
    np.testing.assert_allclose(reference, hand, atol=1e-4, rtol=0)

    history = read_history(output)
    assert len(history) == steps and all(row["sequences_per_pair"] == 2.0 for row in history)
    first = history[0]  # the policy is the parent: loss log 2, chosen NLL per token of the parent
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    chosen_nll = np.mean([-hand[i, 0] / expected[i][1].size for i in range(len(rows))])
    assert first["chosen_nll"] == pytest.approx(chosen_nll, abs=1e-4)
    assert history[-1]["loss"] < first["loss"] - 0.05 and history[-1]["margin"] > 0, history
