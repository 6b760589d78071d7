"""How the model is spread over the data-parallel workers: FSDP2 or DDP.

- FSDP2 (`fully_shard` on every block, then on the root): parameters, gradients and optimizer
  state are sharded across ranks. With bf16 precision the parameters are gathered in bf16 for
  compute and gradients are reduced in fp32 into fp32 master weights. The last block stays
  gathered after its forward because its backward comes right after.
- DDP: a full replica per rank and an all-reduce of gradients; with bf16 precision on GPUs the
  forward runs under bf16 autocast.

`execution.parallelism: auto` picks FSDP2 on GPUs and DDP on CPUs. FSDP2 also runs on CPUs
over gloo, which is how its sharded checkpoints are tested without a GPU.

The training loop's own collectives (label-token counts, the loss, RNG states, barriers and
the checkpoint's planning) move small host tensors and objects. On GPUs the default process
group is NCCL, which serves CUDA tensors only, so they run on `host_group()`: the default
group when it has a CPU backend, else a gloo group over the same ranks.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn


def host_group() -> Any:
    """A process group that serves CPU tensors, or None when not distributed.

    Every rank must call it (a new group is a collective).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if "cpu:" in str(dist.get_backend_config()):  # e.g. "cpu:gloo,cuda:gloo"; NCCL is "cuda:nccl"
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def uses_fsdp(parallelism: str, device: torch.device) -> bool:
    if parallelism == "auto":
        return device.type == "cuda"
    return parallelism == "fsdp"


def fully_shard_model(model: nn.Module, precision: str, device_type: str) -> nn.Module:
    """Wrap each transformer block and then the root with FSDP2 over every rank, in place."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    param_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for index, block in enumerate(model.layers):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index != last)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def parallelize(model: nn.Module, device: torch.device, *, fsdp: bool, precision: str, world: int) -> nn.Module:
    if fsdp:
        return fully_shard_model(model, precision, device.type)
    if world > 1:
        return nn.parallel.DistributedDataParallel(model)
    return model


def core(model: nn.Module) -> nn.Module:
    """The model itself, without a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, last: bool) -> AbstractContextManager[object]:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return nullcontext()


def forward_precision(device: torch.device, *, fsdp: bool, precision: str) -> AbstractContextManager[object]:
    """bf16 autocast for DDP on GPUs; FSDP2 casts through its mixed-precision policy."""
    if precision == "bf16" and not fsdp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
