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
