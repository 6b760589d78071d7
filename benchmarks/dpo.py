"""Benchmark: DPO training pairs/s on one-token pairs, our step against TRL's DPOTrainer.

The same tiny model (the `tiny` config with the byte tokenizer; ours as `Transformer`, TRL's
as the exported `Phi3ForCausalLM` with the same weights), the same pairs (prompts of 48 to 160
tokens from Pivotal-Token-Search-like data, a chosen and a rejected next token), the same
batch, fp32 and AdamW, one thread, in one process, timed in process CPU seconds over
alternating rounds (the median is reported with the spread).

- Ours, per epoch over the pairs: the reference pass once (one forward of the reference per
  pair, as the stage does before training, its cost included), then per batch one forward of
  the policy over the prompts (the LM head only at each prompt's last position), the sigmoid
  DPO loss, backward and the optimizer step.
- TRL, per batch: its collator over the pairs written as prompt + one-token completions
  (prompt_ids, chosen_ids, rejected_ids), `DPOTrainer.compute_loss` (policy and reference
  forwards over both sequences of every pair), backward and the optimizer step. The Trainer's
  own loop is left out, which can only favour TRL.

The target is at least 2x.

    python benchmarks/dpo.py [--pairs 64] [--batch 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tokenmill.model_configs import get_model_config
from tokenmill.trainer.data.pairs import dpo_loss, pair_batch, sequence_logps
from tokenmill.trainer.model import build_model
from tokenmill.trainer.model.hf import export_hf
from tokenmill.trainer.tokenizer import get_tokenizer

TARGET_RATIO = 2.0
BETA = 0.1


def make_pairs(count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        prompt = np.array([rng.randrange(32, 127) for _ in range(rng.randint(48, 160))], dtype=np.int64)
        chosen, rejected = rng.sample(range(32, 127), 2)
        pairs.append((prompt, np.array([chosen]), np.array([rejected])))
    return pairs


def cpu_seconds(run: Callable[[], None]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from datasets import Dataset
    from transformers import AutoTokenizer, Phi3ForCausalLM
    from trl import DPOConfig, DPOTrainer

    config, tokenizer = get_model_config("tiny"), get_tokenizer("byte")
    pairs = make_pairs(args.pairs, seed=0)
    batches = [pairs[i : i + args.batch] for i in range(0, len(pairs), args.batch)]
    policy, reference = build_model(config, seed=1), build_model(config, seed=2)
    plain = contextlib.nullcontext()

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(policy, config, Path(tmp) / "policy", tokenizer_name="byte", dtype="float32")
        export_hf(reference, config, Path(tmp) / "reference", tokenizer_name="byte", dtype="float32")
        hf_policy = Phi3ForCausalLM.from_pretrained(Path(tmp) / "policy", dtype=torch.float32)
        hf_reference = Phi3ForCausalLM.from_pretrained(Path(tmp) / "reference", dtype=torch.float32)
        trainer = DPOTrainer(
            model=hf_policy, ref_model=hf_reference,
            args=DPOConfig(output_dir=str(Path(tmp) / "trl"), beta=BETA, per_device_train_batch_size=args.batch,
                           report_to=[], use_cpu=True, max_length=None, bf16=False),
            train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
            processing_class=AutoTokenizer.from_pretrained(Path(tmp) / "policy"),
        )
    ours_optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    trl_optimizer = torch.optim.AdamW(hf_policy.parameters(), lr=1e-5)
    hf_policy.train()
    trl_batches = [[{"prompt_ids": p.tolist(), "chosen_ids": c.tolist(), "rejected_ids": r.tolist()} for p, c, r in b]
                   for b in batches]

    def ours_epoch() -> None:
        with torch.no_grad():
            reference_logps = [sequence_logps(reference, pair_batch(b, tokenizer.pad_id), plain) for b in batches]
        for batch, ref in zip(batches, reference_logps):
            loss, _ = dpo_loss(sequence_logps(policy, pair_batch(batch, tokenizer.pad_id), plain), ref, BETA)
            loss.mean().backward()
            ours_optimizer.step()
            ours_optimizer.zero_grad(set_to_none=True)

    def trl_epoch() -> None:
        for examples in trl_batches:
            loss = trainer.compute_loss(hf_policy, trainer.data_collator(examples))
            loss.backward()
            trl_optimizer.step()
            trl_optimizer.zero_grad(set_to_none=True)

    ours_epoch(), trl_epoch()  # warm-up
    ours_rates, trl_rates = [], []
    for _ in range(args.rounds):
        ours_rates.append(len(pairs) / cpu_seconds(ours_epoch))
        trl_rates.append(len(pairs) / cpu_seconds(trl_epoch))
    ours, theirs = statistics.median(ours_rates), statistics.median(trl_rates)
    ratio = ours / theirs
    print(f"pairs {len(pairs)} (one-token, prompts 48-160 tokens), batch {args.batch}, fp32, one thread, "
          f"{args.rounds} rounds, CPU time")
    spread = {name: f"(min {min(rates):.1f}, max {max(rates):.1f})" for name, rates in
              (("ours", ours_rates), ("trl", trl_rates))}
    print(f"ours (reference pass included): {ours:8.1f} pairs/s  {spread['ours']}")
    print(f"TRL DPOTrainer step:            {theirs:8.1f} pairs/s  {spread['trl']}")
    print(f"ratio {ratio:.2f}x (target >= {TARGET_RATIO:.0f}x): {'met' if ratio >= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
