"""Tiny inputs for the post-training tests: a parent checkpoint, chat samples, preference pairs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from tokenmill.model_configs import get_model_config
from tokenmill.store import CHAT_SAMPLES, PREFERENCE_PAIRS, CheckpointStore, DatasetWriter, write_run_spec
from tokenmill.trainer.model import build_model
from tokenmill.trainer.train import checkpoint as ckpt
from tokenmill.trainer.train.prepare import ModelSetup

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


class _Policy:
    keep_last, keep_every = 1, None


def write_parent(output: Path, seed: int = 0, tokenizer: str = "byte") -> str:
    """A committed checkpoint of a freshly initialised tiny model; returns its URI."""
    config = get_model_config("tiny")
    model = build_model(config, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters())
    setup = ModelSetup(config, config.rope_theta, config.max_position_embeddings, tokenizer)
    store = CheckpointStore.for_output(output.as_uri())
    ckpt.save(store, 1, model, optimizer, {"model": setup.to_state(), "tokens_seen": 0}, 0, 1, _Policy())
    return store.uri_for(1)


def chat(n: int, rng: random.Random) -> list[dict[str, str]]:
    a, b = rng.sample(WORDS, 2)
    messages = [{"role": "user", "content": f"echo {a} {b}"}, {"role": "assistant", "content": f"{a} {b}"}]
    if n % 3 == 0:
        messages = [{"role": "system", "content": "be brief"}, *messages]
    return messages


def write_chats(target: Path, rows: int, *, shards: int = 2, seed: int = 0, extra: list | None = None) -> str:
    rng = random.Random(seed)
    writer = DatasetWriter(target.as_uri(), CHAT_SAMPLES)
    per = rows // shards
    for shard in range(shards):
        data = [{"id": f"{shard}-{i}", "messages": chat(i, rng), "source": "test"} for i in range(per)]
        if shard == 0 and extra:
            data += [{"id": f"extra-{i}", "messages": m, "source": "test"} for i, m in enumerate(extra)]
        writer.write_shard(shard, data)
    writer.finalize(expected=range(shards))
    return target.as_uri()


def one_token_pair(index: int, rng: random.Random) -> dict[str, Any]:
    """A prompt of bytes; chosen is always 'y' (121), rejected 'n' (110)."""
    prompt = list(f"{rng.choice(WORDS)} {rng.choice(WORDS)}? ".encode())
    return {"id": f"p{index}", "prompt_tokens": prompt, "chosen_tokens": [121], "rejected_tokens": [110]}


def write_pairs(target: Path, rows: list[dict[str, Any]], *, shards: int = 2) -> str:
    writer = DatasetWriter(target.as_uri(), PREFERENCE_PAIRS)
    per = -(-len(rows) // shards)
    for shard in range(shards):
        writer.write_shard(shard, rows[shard * per : (shard + 1) * per])
    writer.finalize(expected=range(shards))
    return target.as_uri()


def write_spec(output: str, spec: dict[str, Any], name: str, attempt: int = 1) -> str:
    document = {"runSpecVersion": 1, "kind": "TrainingStage", "metadata": {"name": name},
                "attempt": attempt, "output": output, "spec": spec}
    return write_run_spec(output, document)
