"""Which data parallelism and forward precision a device and spec get."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from tokenmill.trainer.train.parallel import forward_precision, uses_fsdp

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("parallelism", "device", "fsdp"),
    [("auto", CPU, False), ("auto", CUDA, True), ("fsdp", CPU, True), ("ddp", CUDA, False), ("ddp", CPU, False)],
)
def test_auto_picks_fsdp_on_gpus_and_ddp_on_cpus(parallelism: str, device: torch.device, fsdp: bool) -> None:
    assert uses_fsdp(parallelism, device) is fsdp


def test_only_ddp_on_gpus_in_bf16_runs_under_autocast() -> None:
    assert isinstance(forward_precision(CPU, fsdp=False, precision="bf16"), nullcontext)
    assert isinstance(forward_precision(CUDA, fsdp=True, precision="bf16"), nullcontext)
    assert isinstance(forward_precision(CUDA, fsdp=False, precision="fp32"), nullcontext)
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext():
        context = forward_precision(CUDA, fsdp=False, precision="bf16")
    assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_fsdp2_blocks_compute_in_the_chosen_precision(one_rank_group, precision: str, dtype: torch.dtype) -> None:
    from tokenmill.model_configs import get_model_config
    from tokenmill.trainer.model import build_model
    from tokenmill.trainer.train.parallel import fully_shard_model

    model = fully_shard_model(build_model(get_model_config("tiny"), seed=0), precision, "cpu")
    seen: dict[str, torch.dtype] = {}
    for name in ("attention", "mlp"):
        getattr(model.layers[0], name).register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, out.dtype)
        )
    logits = model(torch.randint(0, 256, (2, 16)), document_ids=torch.zeros(2, 16, dtype=torch.long))
    logits.float().sum().backward()
    assert seen == {"attention": dtype, "mlp": dtype}
    # The master weights and their gradients stay fp32.
    weight = model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.float32 and weight.grad.dtype == torch.float32
