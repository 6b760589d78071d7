"""`python tests/trainer/cuda_only_loop.py <run-spec-uri> <rendezvous-file>`: the training loop of
a run spec (its token caches already built) on one rank, in a process of its own, under a default
process group whose only backend serves CUDA tensors, as NCCL does."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tokenmill.store import read_run_spec_at
from tokenmill.trainer.train.loop import run
from tokenmill.trainer.train.prepare import prepare


def main(spec_uri: str, rendezvous: str) -> None:
    dist.init_process_group("cuda:gloo", init_method=Path(rendezvous).as_uri(), rank=0, world_size=1)
    try:
        run(prepare(read_run_spec_at(spec_uri)), 0, 1, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
