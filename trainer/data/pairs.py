"""DPO data: `preference_pairs` datasets as token ids, checked, and batched for one forward per model.

Every pair becomes ``(prompt, chosen, rejected)`` token ids (`PairSet`):

- token form (`prompt_tokens`, `chosen_tokens`, `rejected_tokens`) is taken as it is, never
  decoded or re-tokenised;
- text form (`prompt` messages, `chosen`, `rejected`) is rendered in the Phi-4 chat format: a
  final assistant message is an open prefix the continuations extend, otherwise the prompt ends
  with a new assistant header; each continuation is followed by `<|im_end|>`. The prompt may be
  a whole conversation (a multi-turn pair): every message is rendered, earlier assistant turns
  closed like the others, and they are context only; the log-probs are those of the
  continuations alone.

Checks, all before training: a pair with neither form, a prompt message whose role the chat
format lacks (not system, user or assistant), an empty prompt or continuation, prompt roles out
of order, chosen equal to rejected, or a prompt and continuation longer than the sequence (never
truncated) is dropped and counted under the first reason that applies; an id outside the
vocabulary is an error naming the dataset, the pair and the field. Empty: in token form, a list
of no ids; in text form, a prompt with no message or only blank (whitespace) contents, or a
chosen or rejected that is blank. Role order (text form, `prompt_problem`): SFT's rule for a
conversation applied to the prompt with the continuation as its final assistant turn, i.e. an
optional system message first, then user and assistant alternating, starting with user; the
prompt ends with user (the continuations are the next assistant turn) or with assistant (a
prefix they continue). A dataset left with no pair is refused by the stage.

Batching (`pair_batch`). A pair whose continuations are one token each (a one-token pair, as
Pivotal Token Search writes them) is one sequence, its prompt: both log-probs are read from the
next-token distribution after its last token. Any other pair is two sequences, prompt +
chosen and prompt + rejected. The batch lists, for every log-prob to sum, the sequence and
position whose logits predict it, the target id and the pair and side it belongs to, so the
model computes the LM head only at those positions.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokenmill.store import PREFERENCE_PAIRS, Dataset, open_dataset
from tokenmill.trainer.data.chat import conversation_problem
from tokenmill.trainer.tokenizer import Tokenizer
from tokenmill.trainer.tokenizer.base import CHAT_ROLES
from tokenmill.trainer.tokenizer.special import IM_END, IM_SEP, IM_START

DROP_NO_FORM = "neither token ids nor chat text"
DROP_EMPTY = "empty prompt or continuation"
DROP_SAME = "chosen equals rejected"
DROP_TOO_LONG = "prompt and continuation longer than the sequence"
DROP_BAD_ROLE = "prompt role outside system, user, assistant"
DROP_ROLE_ORDER = "prompt roles out of order"
KEPT = "kept"
ONE_TOKEN = "one-token pairs"

_COLUMNS = ["id", "prompt_tokens", "chosen_tokens", "rejected_tokens", "prompt", "chosen", "rejected"]


class PairInputError(ValueError):
    """Pairs that cannot be trained on; raised before any compute."""


@dataclass
class PairSet:
    """The usable pairs of one dataset, in dataset order."""

    name: str
    ids: list[str] = field(default_factory=list)
    prompts: list[np.ndarray] = field(default_factory=list)
    chosen: list[np.ndarray] = field(default_factory=list)
    rejected: list[np.ndarray] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    fingerprint: str = ""
    """The dataset's shard checksums: a reference log-prob file is only valid for these pairs."""

    @property
    def num_sequences(self) -> int:
        """Pairs, under the name the mixture sampler reads."""
        return len(self.ids)

    def is_one_token(self, index: int) -> bool:
        return self.chosen[index].size == 1 and self.rejected[index].size == 1


def render_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The prompt's ids: a final assistant message stays open, else a new assistant header follows."""
    if messages and messages[-1].get("role") == "assistant":
        head = tokenizer.encode_chat(messages[:-1])
        opening = [tokenizer.token_id(IM_START), *tokenizer.encode("assistant"), tokenizer.token_id(IM_SEP)]
        return head + opening + tokenizer.encode(messages[-1]["content"])
    return tokenizer.encode_chat(messages, add_generation_prompt=True)


def prompt_problem(messages: Sequence[Mapping[str, str]]) -> str | None:
    """Why a text prompt's roles are out of order, or None.

    SFT's rule (`chat.conversation_problem`) applied to the conversation the pair trains on: the
    prompt with the continuation as its final assistant turn, appended after the prompt, or
    completing the prompt's final assistant message (a prefix). Accepted: an optional system
    message first, then user and assistant alternating, starting with user and ending with either.
    """
    if messages and messages[-1].get("role") == "assistant":
        return conversation_problem(messages)
    return conversation_problem([*messages, {"role": "assistant", "content": ""}])


def _pair_ids(row: Mapping[str, Any], tokenizer: Tokenizer) -> tuple[list[int], list[int], list[int]] | str:
    """The pair's (prompt, chosen, rejected) ids, or why it is dropped."""
    if row["prompt_tokens"] is not None and row["chosen_tokens"] is not None and row["rejected_tokens"] is not None:
        return list(row["prompt_tokens"]), list(row["chosen_tokens"]), list(row["rejected_tokens"])
    if row["prompt"] is not None and row["chosen"] is not None and row["rejected"] is not None:
        if any(message["role"] not in CHAT_ROLES for message in row["prompt"]):
            return DROP_BAD_ROLE
        blank_prompt = not any(message["content"].strip() for message in row["prompt"])
        if blank_prompt or not row["chosen"].strip() or not row["rejected"].strip():
            return DROP_EMPTY
        if prompt_problem(row["prompt"]):
            return DROP_ROLE_ORDER
        end = tokenizer.token_id(IM_END)
        return (render_prompt(tokenizer, row["prompt"]), [*tokenizer.encode(row["chosen"]), end],
                [*tokenizer.encode(row["rejected"]), end])
    return DROP_NO_FORM


def load_pairs(uri: str, name: str, tokenizer: Tokenizer, vocab_size: int, seq_len: int) -> PairSet:
    """Every pair of a committed `preference_pairs` dataset, checked (see the module docstring)."""
    dataset: Dataset = open_dataset(uri).expect_schema(PREFERENCE_PAIRS)
    pairs = PairSet(name, fingerprint=dataset_fingerprint(dataset))
    for info in dataset.shards:
        table = dataset.read_shard(info, columns=_COLUMNS)
        for row in table.to_pylist():
            ids = _pair_ids(row, tokenizer)
            if isinstance(ids, str):
                pairs.counts[ids] += 1
                continue
            prompt, chosen, rejected = ids
            for column, values in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
                bad = [v for v in values if not 0 <= v < vocab_size]
                if bad:
                    raise PairInputError(
                        f"dataset {name} ({uri}), pair {row['id']!r}: {column} holds id {bad[0]}, outside the "
                        f"model's vocabulary of {vocab_size} (were the pairs made with another tokenizer?)"
                    )
            if not prompt or not chosen or not rejected:
                pairs.counts[DROP_EMPTY] += 1
                continue
            if chosen == rejected:
                pairs.counts[DROP_SAME] += 1
                continue
            if len(prompt) + max(len(chosen), len(rejected)) - 1 > seq_len:
                pairs.counts[DROP_TOO_LONG] += 1
                continue
            pairs.counts[KEPT] += 1
            if len(chosen) == 1 and len(rejected) == 1:
                pairs.counts[ONE_TOKEN] += 1
            pairs.ids.append(str(row["id"]))
            pairs.prompts.append(np.asarray(prompt, dtype=np.int64))
            pairs.chosen.append(np.asarray(chosen, dtype=np.int64))
            pairs.rejected.append(np.asarray(rejected, dtype=np.int64))
    return pairs


def dataset_fingerprint(dataset: Dataset) -> str:
    shards = [[s.shard, s.sha256] for s in dataset.manifest.shards]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:32]


@dataclass
class PairBatch:
    """Sequences of a micro-batch of pairs and where to read each log-prob (see the module docstring)."""

    input_ids: torch.Tensor
    """[sequences, length], right-padded."""
    rows: torch.Tensor
    """[targets]: the sequence of each target."""
    positions: torch.Tensor
    """[targets]: the position whose logits predict the target."""
    targets: torch.Tensor
    """[targets]: the target id."""
    slots: torch.Tensor
    """[targets]: ``2 * pair + side`` (side 0 chosen, 1 rejected)."""
    num_pairs: int
    forwards: int
    """Sequences in the batch: one per one-token pair, two per other pair."""

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.input_ids.to(device), self.rows.to(device), self.positions.to(device),
                         self.targets.to(device), self.slots.to(device), self.num_pairs, self.forwards)

    def lengths(self) -> torch.Tensor:
        """[pairs, 2]: the tokens of each pair's chosen and rejected completion."""
        return torch.bincount(self.slots, minlength=2 * self.num_pairs).view(self.num_pairs, 2)


def pair_batch(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], pad_id: int) -> PairBatch:
    """The sequences and targets of ``(prompt, chosen, rejected)`` pairs."""
    sequences: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    slots: list[np.ndarray] = []
    for index, (prompt, chosen, rejected) in enumerate(pairs):
        if chosen.size == 1 and rejected.size == 1:
            row = len(sequences)
            sequences.append(prompt)
            rows.append(np.full(2, row))
            positions.append(np.full(2, prompt.size - 1))
            targets.append(np.array([chosen[0], rejected[0]]))
            slots.append(np.array([2 * index, 2 * index + 1]))
            continue
        for side, completion in enumerate((chosen, rejected)):
            row = len(sequences)
            sequence = np.concatenate([prompt, completion])
            sequences.append(sequence[:-1])  # the last token is only a target
            rows.append(np.full(completion.size, row))
            positions.append(np.arange(prompt.size - 1, sequence.size - 1))
            targets.append(completion)
            slots.append(np.full(completion.size, 2 * index + side))
    width = max(sequence.size for sequence in sequences)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        input_ids[row, : sequence.size] = sequence

    def cat(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    return PairBatch(torch.from_numpy(input_ids), cat(rows), cat(positions), cat(targets), cat(slots),
                     len(pairs), len(sequences))


def sequence_logps(model: Any, batch: PairBatch, autocast: Any) -> torch.Tensor:
    """log pi(chosen | prompt) and log pi(rejected | prompt) per pair, [pairs, 2], in fp32.

    One forward over the batch's sequences; the LM head runs only at the target positions.
    """
    with autocast:
        logits = model(batch.input_ids, logits_at=(batch.rows, batch.positions))
    logps = torch.log_softmax(logits.float(), dim=-1).gather(1, batch.targets[:, None]).squeeze(1)
    sums = torch.zeros(2 * batch.num_pairs, dtype=logps.dtype, device=logps.device)
    return sums.index_add(0, batch.slots, logps).view(batch.num_pairs, 2)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float,
    chosen_nll_weight: float = 0.0, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair sigmoid DPO loss from [pairs, 2] log-probs (chosen, rejected), and per-pair figures.

    rewards are beta x (policy - reference) log-prob; the loss is -log sigmoid(chosen reward -
    rejected reward), plus `chosen_nll_weight` x the chosen completion's negative log-likelihood
    per token (`lengths`: [pairs, 2] completion tokens, as `PairBatch.lengths`), which keeps the
    chosen completion likely while the margin grows (RPO, arXiv 2404.19733).
    """
    rewards = beta * (policy - reference.to(policy.dtype))
    margin = rewards[:, 0] - rewards[:, 1]
    loss = -torch.nn.functional.logsigmoid(margin)
    chosen_tokens = torch.ones_like(policy[:, 0]) if lengths is None else lengths[:, 0].to(policy.dtype)
    chosen_nll = -policy[:, 0] / chosen_tokens
    if chosen_nll_weight:
        loss = loss + chosen_nll_weight * chosen_nll
    return loss, {"chosen_reward": rewards[:, 0].detach(), "rejected_reward": rewards[:, 1].detach(),
                  "margin": margin.detach(), "accuracy": (margin.detach() > 0).to(policy.dtype),
                  "chosen_nll": chosen_nll.detach()}


def describe_pairs(pairs: PairSet) -> str:
    others = ", ".join(f"{reason}: {n}" for reason, n in sorted(pairs.counts.items()) if reason != KEPT)
    return f"  {pairs.name}: {pairs.counts.get(KEPT, 0)} pairs kept" + (f" ({others})" if others else "")
