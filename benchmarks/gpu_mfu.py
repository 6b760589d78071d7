"""Training tokens/s and MFU of a Phi-4-width model under FSDP2 and bf16 on CUDA GPUs.

One GPU:  python benchmarks/gpu_mfu.py --layers 4 --seq-len 4096 --batch-size 2
Several:  torchrun --nproc-per-node 8 benchmarks/gpu_mfu.py --layers 8

Every block and then the whole model is wrapped with `fully_shard` (parameters in bf16 for
compute, gradients reduced in fp32, fp32 master weights and AdamW state). The model is built
on the meta device and initialised after sharding. MFU counts model FLOPs including
attention (`tokenmill.trainer.model.flops`) against `--peak-flops` per GPU (989e12: H100
SXM dense bf16). `--documents N` packs N documents per sequence, which takes the
variable-length FlashAttention path; `--check` first compares that path with the dense
masked one on random inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch
import torch.nn.functional as F

from tokenmill.model_configs import ModelConfig, get_model_config
from tokenmill.trainer.model import build_model, flops_per_token, mfu
from tokenmill.trainer.train.parallel import fully_shard_model

H100_BF16_PEAK = 989e12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="Phi-4 has 40")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per GPU per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK,
                        help="peak FLOP/s of one GPU")
    parser.add_argument("--documents", type=int, default=0,
                        help="documents packed per sequence (0: one causal sequence)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--check", action="store_true",
                        help="compare varlen and dense document attention first")
    return parser.parse_args(argv)


def benchmark_config(args: argparse.Namespace) -> ModelConfig:
    phi4 = get_model_config("phi-4")
    return dataclasses.replace(
        phi4,
        name=f"phi-4-width-{args.layers}l",
        num_layers=args.layers,
        max_position_embeddings=max(args.seq_len, phi4.max_position_embeddings),
    )


def report(config: ModelConfig, args: argparse.Namespace, tokens_per_second: float,
           world_size: int) -> dict[str, float]:
    per_token = flops_per_token(config, args.seq_len)
    return {
        "tokens_per_second": tokens_per_second,
        "tokens_per_second_per_gpu": tokens_per_second / world_size,
        "flops_per_token": per_token,
        "tflops_per_gpu": tokens_per_second * per_token / world_size / 1e12,
        "mfu": mfu(tokens_per_second, per_token, args.peak_flops, world_size),
    }


def _document_ids(batch: int, seq_len: int, documents: int, device: torch.device) -> torch.Tensor:
    cuts = torch.randperm(seq_len - 1, device=device)[: documents - 1].sort().values + 1
    starts = torch.zeros(seq_len, dtype=torch.long, device=device)
    starts[cuts] = 1
    return starts.cumsum(0).expand(batch, seq_len)


def check_varlen(device: torch.device) -> float:
    from tokenmill.trainer.model.attention import attend, plan_attention

    batch, seq_len, heads, kv_heads, dim = 2, 1024, 8, 2, 128
    q = torch.randn(batch, heads, seq_len, dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, seq_len, dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    documents = _document_ids(batch, seq_len, 5, device)
    varlen = plan_attention(documents, None, seq_len, device, torch.bfloat16)
    if varlen.kind != "varlen":
        raise SystemExit("varlen attention is not available in this torch build")
    dense = plan_attention(documents, None, seq_len, device, torch.bfloat16, allow_varlen=False)
    return (attend(q, k, v, varlen) - attend(q, k, v, dense)).abs().max().item()


def _setup_distributed() -> tuple[int, int, torch.device]:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    return rank, world_size, device


def _sharded_model(config: ModelConfig, args: argparse.Namespace,
                   device: torch.device) -> torch.nn.Module:
    model = build_model(config, device="meta", max_positions=args.seq_len,
                        activation_checkpointing=args.activation_checkpointing)
    if args.compile:
        for block in model.layers:
            block.compile()
    fully_shard_model(model, "bf16", "cuda")  # the training loop's own sharding
    model.to_empty(device=device)
    model.init_weights()
    return model


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu_mfu.py needs a CUDA GPU and found none; run it on a GPU machine "
            "(the CPU comparison is benchmarks/train_model.py)"
        )
    import torch.distributed as dist

    rank, world_size, device = _setup_distributed()
    try:
        if args.check and rank == 0:
            print(f"varlen vs dense document attention, max |diff|: {check_varlen(device):.3e}")
        config = benchmark_config(args)
        model = _sharded_model(config, args, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
        generator = torch.Generator(device=device).manual_seed(rank)
        shape = (args.batch_size, args.seq_len + 1)
        documents = None
        if args.documents > 1:
            documents = _document_ids(args.batch_size, args.seq_len, args.documents, device)

        def step() -> None:
            batch = torch.randint(0, config.vocab_size, shape, device=device, generator=generator)
            logits = model(batch[:, :-1], document_ids=documents)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = args.steps * args.batch_size * args.seq_len * world_size
        result = report(config, args, tokens / elapsed, world_size)
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if rank == 0:
            print(
                f"{config.name} ({config.parameter_count() / 1e9:.2f}B params), "
                f"{world_size} x {torch.cuda.get_device_name(device)}, batch "
                f"{args.batch_size} x {args.seq_len} per GPU, documents/seq "
                f"{max(args.documents, 1)}, AC {args.activation_checkpointing}, compile "
                f"{args.compile}"
            )
            print(
                f"tokens/s {result['tokens_per_second']:.0f} "
                f"({result['tokens_per_second_per_gpu']:.0f} per GPU), "
                f"{result['tflops_per_gpu']:.0f} TFLOP/s per GPU, MFU {result['mfu']:.1%} of "
                f"{args.peak_flops / 1e12:.0f} TFLOP/s, peak memory "
                f"{result['peak_memory_gib']:.1f} GiB"
            )
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
