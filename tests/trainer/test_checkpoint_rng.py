"""A checkpoint's RNG states: the CPU generator always, the GPU's when a rank trains on one."""

from __future__ import annotations

import torch

from tokenmill.trainer.train.checkpoint import gather_rng, restore_rng, rng_state

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


class GeneratorAsCuda:
    """torch.cuda's RNG-state calls over a CPU generator standing in for device 0's."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(11)
        self.devices: list[torch.device] = []

    def get_rng_state(self, device: torch.device) -> torch.Tensor:
        self.devices.append(device)
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor, device: torch.device) -> None:
        self.devices.append(device)
        self.generator.set_state(state)

    def draw(self) -> torch.Tensor:
        return torch.rand(4, generator=self.generator)


def test_a_gpu_rank_saves_and_restores_both_generators() -> None:
    cuda = GeneratorAsCuda()
    saved = rng_state(GPU, cuda)
    assert set(saved) == {"cpu", "cuda"} and cuda.devices == [GPU]
    expected_cpu, expected_gpu = torch.rand(4), cuda.draw()
    torch.rand(100), cuda.draw()  # both generators move on
    other_rank = rng_state(CPU)
    restore_rng([other_rank, saved], 1, GPU, cuda)  # rank 1 takes its own entry
    assert torch.equal(torch.rand(4), expected_cpu)
    assert torch.equal(cuda.draw(), expected_gpu)
    assert cuda.devices[-1] == GPU


def test_a_cpu_rank_keeps_the_cpu_generator_only_and_old_checkpoints_still_restore() -> None:
    saved = gather_rng(1, CPU)  # not distributed: this process's state alone
    assert [set(state) for state in saved] == [{"cpu"}]
    expected = torch.rand(3)
    torch.rand(10)
    cuda = GeneratorAsCuda()
    restore_rng(saved, 0, GPU, cuda)  # a CPU-saved state on a GPU rank leaves the GPU generator alone
    assert torch.equal(torch.rand(3), expected) and cuda.devices == []
    restore_rng([saved[0]["cpu"]], 0, CPU)  # the format of checkpoints written before: one string per rank
    assert torch.equal(torch.rand(3), expected)
    restore_rng(saved, 5, CPU)  # a rank the checkpoint did not have keeps its own state
