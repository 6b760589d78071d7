"""Training throughput on CPU: our decoder against transformers' Phi3ForCausalLM.

Both models get the same config, the same initial weights (ours, mapped through the Hugging
Face mapping), the same batches, the same loss (cross-entropy on next tokens), AdamW, and
the same torch thread count, in one process. Steps alternate between the two models so
that changes in machine load affect both alike. Each model's rate is reported from its
median step time and from its fastest step (the better estimate on a shared, noisy machine,
as `timeit` advises); the ratio is given for both.

    python benchmarks/train_model.py [--hidden 256 --layers 4 --seq-len 256 --batch-size 8]
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
from tokenmill.trainer.model.hf import hf_config, to_hf_state_dict


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


def train_step_fn(model: torch.nn.Module, logits_of: Callable) -> Callable:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(batch: torch.Tensor) -> float:
        logits = logits_of(model, batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=320)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = bench_config(args)
    ours = build_model(config, seed=0)
    theirs = hf_model(config, ours.state_dict())
    ours.train()
    theirs.train()
    steps = {
        "tokenmill": train_step_fn(ours, lambda m, x: m(x)),
        "transformers": train_step_fn(theirs, lambda m, x: m(input_ids=x, use_cache=False).logits),
    }
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.seq_len + 1)
    batches = [
        torch.randint(0, config.vocab_size, shape, generator=generator) for _ in range(args.steps)
    ]
    first_loss = {name: step(batches[0]) for name, step in steps.items()}
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step(batches[0])

    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for batch in batches:
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            seconds[name].append(time.perf_counter() - start)

    tokens = args.batch_size * args.seq_len
    result = {}
    for name, values in seconds.items():
        result[name] = tokens / statistics.median(values)
        result[f"{name}_best"] = tokens / min(values)
    result["ratio"] = result["tokenmill"] / result["transformers"]
    result["ratio_best"] = result["tokenmill_best"] / result["transformers_best"]
    print(
        f"config: hidden {config.hidden_size}, layers {config.num_layers}, heads "
        f"{config.num_heads}/{config.num_kv_heads}, mlp {config.intermediate_size}, vocab "
        f"{config.vocab_size}; batch {args.batch_size} x {args.seq_len} tokens; fp32; "
        f"{args.threads} threads; AdamW; {args.steps} alternating steps each"
    )
    print(f"first-step loss: tokenmill {first_loss['tokenmill']:.6f}, "
          f"transformers {first_loss['transformers']:.6f}")
    print(f"{'':>13}  training tokens/s: median step | fastest step")
    for name in seconds:
        print(f"{name:>13}: {result[name]:27.0f} | {result[name + '_best']:.0f}")
    print(f"{'ratio':>13}: {result['ratio']:27.2f} | {result['ratio_best']:.2f}"
          "   (tokenmill / transformers)")
    return result


if __name__ == "__main__":
    main()
