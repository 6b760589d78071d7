"""Training throughput on CPU: our decoder against transformers' Phi3ForCausalLM, in CPU seconds.

Both models get the same config, the same initial weights (ours, mapped through the Hugging
Face mapping), the same batches, the same loss (cross-entropy on next tokens), AdamW, and
the same torch thread count, in one process. Two paths are timed:

- ``causal``: plain causal attention over whole rows;
- ``documents``: rows of packed documents with attention kept inside each document, the path
  CPU training takes (ours from ``document_ids``; transformers from the same block-diagonal
  causal mask given as a 4-D boolean ``attention_mask``).

Each round runs one training step of every (model, path) pair, in an order that alternates
from round to round, and times it in process CPU seconds (all threads), which unlike wall
time does not count the time other processes on a shared machine take the cores away. The
figures are the median over rounds of tokens per CPU-second, and of the per-round ratio
(tokenmill / transformers) with its interquartile range.

    python benchmarks/train_model.py [--hidden 256 --layers 4 --seq-len 256 --batch-size 8 --rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tokenmill.model_configs import ModelConfig
from tokenmill.trainer.model import build_model
from tokenmill.trainer.model.attention import document_mask
from tokenmill.trainer.model.hf import hf_config, to_hf_state_dict

TARGET_RATIO = 1.2
PATHS = ("causal", "documents")


def bench_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        name="bench-cpu",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.hidden * 3,
        max_position_embeddings=args.seq_len,
        rope_theta=10_000.0,
        tokenizer="byte" if args.vocab == 320 else "phi-4",
    )


def hf_model(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    hf = Phi3Config(**{k: v for k, v in hf_config(config, dtype="float32").items()
                       if k not in ("architectures", "tokenmill", "torch_dtype")})
    hf._attn_implementation = "sdpa"
    model = Phi3ForCausalLM(hf)
    model.load_state_dict(to_hf_state_dict(state_dict, config))
    return model


def packed_document_ids(batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Ids of documents of random lengths (16 to seq_len / 2 tokens) packed into each row."""
    ids = torch.empty(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        position, document = 0, 0
        while position < seq_len:
            length = int(torch.randint(16, max(17, seq_len // 2), (1,), generator=generator))
            ids[row, position : position + length] = document
            position, document = position + length, document + 1
    return ids


Step = Callable[[torch.Tensor, torch.Tensor | None], float]


def train_step_fn(model: torch.nn.Module, logits_of: Callable) -> Step:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(batch: torch.Tensor, documents: torch.Tensor | None) -> float:
        logits = logits_of(model, batch[:, :-1], documents)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def ours_logits(model: torch.nn.Module, inputs: torch.Tensor, documents: torch.Tensor | None) -> torch.Tensor:
    return model(inputs, document_ids=documents)


def theirs_logits(model: torch.nn.Module, inputs: torch.Tensor, documents: torch.Tensor | None) -> torch.Tensor:
    mask = None if documents is None else document_mask(documents)
    return model(input_ids=inputs, attention_mask=mask, use_cache=False).logits


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=320)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (one step of each model and path)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is not inflated by idle spinning)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = bench_config(args)
    ours = build_model(config, seed=0)
    theirs = hf_model(config, ours.state_dict())
    ours.train()
    theirs.train()
    steps = {"tokenmill": train_step_fn(ours, ours_logits), "transformers": train_step_fn(theirs, theirs_logits)}
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.seq_len + 1)
    batches = [torch.randint(0, config.vocab_size, shape, generator=generator) for _ in range(args.rounds)]
    documents = [packed_document_ids(args.batch_size, args.seq_len, generator) for _ in range(args.rounds)]
    inputs = {"causal": lambda r: (batches[r], None), "documents": lambda r: (batches[r], documents[r])}

    first_loss = {(name, path): step(*inputs[path](0)) for name, step in steps.items() for path in PATHS}
    for _ in range(args.warmup - 1):
        for name, step in steps.items():
            for path in PATHS:
                step(*inputs[path](0))

    pairs = [(name, path) for path in PATHS for name in steps]
    seconds: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    for round_index in range(args.rounds):
        order = pairs if round_index % 2 == 0 else pairs[::-1]
        for name, path in order:
            batch, docs = inputs[path](round_index)
            start = time.process_time()
            steps[name](batch, docs)
            seconds[(name, path)].append(time.process_time() - start)

    tokens = args.batch_size * args.seq_len
    print(
        f"config: hidden {config.hidden_size}, layers {config.num_layers}, heads "
        f"{config.num_heads}/{config.num_kv_heads}, mlp {config.intermediate_size}, vocab "
        f"{config.vocab_size}; batch {args.batch_size} x {args.seq_len} tokens; fp32; "
        f"{args.threads} threads; AdamW; {args.rounds} interleaved rounds; CPU seconds per step"
    )
    result: dict[str, float] = {}
    for path in PATHS:
        ours_loss, their_loss = first_loss[("tokenmill", path)], first_loss[("transformers", path)]
        print(f"\n{path}: first-step loss tokenmill {ours_loss:.6f}, transformers {their_loss:.6f}")
        if abs(ours_loss - their_loss) > 1e-3:
            raise SystemExit(f"{path}: the two models compute different losses; the comparison is void")
        for name in steps:
            rate = tokens / statistics.median(seconds[(name, path)])
            result[f"{name}_{path}"] = rate
            print(f"  {name:>12}: {rate:10,.0f} training tokens per CPU-second (median step)")
        ratios = [t / o for o, t in zip(seconds[("tokenmill", path)], seconds[("transformers", path)], strict=True)]
        low, median, high = quartiles(ratios)
        result[f"ratio_{path}"] = median
        verdict = "meets" if median >= TARGET_RATIO else "below"
        print(f"  {'ratio':>12}: {median:.2f} (interquartile {low:.2f}-{high:.2f}; tokenmill / transformers; "
              f"{verdict} the {TARGET_RATIO}x goal)")
    return result


if __name__ == "__main__":
    main()
