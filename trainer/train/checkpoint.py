"""Distributed checkpoints in the store, the parent model's weights, and the Hugging Face export.

Save (every rank): rank 0 clears what a crashed attempt left at the step; every rank writes
its share with `torch.distributed.checkpoint` (DCP), straight into the final directory on a
file:// store or into a local directory that it then uploads; after a barrier rank 0 writes
`state.json` and the commit marker (`CheckpointStore.commit`), then applies retention.
The DCP state is `{"model", "optim"}` from `get_state_dict`, so the same files load under
DDP, FSDP2 (resharded) or a single process. `state.json` holds the step, tokens seen, the
sampler position, the scheduler, every rank's torch RNG state and the model's shape.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from tokenmill.layout import hf_export_uri
from tokenmill.store import CheckpointStore, open_store, upload_dir
from tokenmill.trainer.model.hf import export_hf as write_hf


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def gather_rng(world: int) -> list[str]:
    mine = rng_state()
    if not _distributed():
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine)
    return states


def restore_rng(states: list[str], rank: int) -> None:
    if rank < len(states):
        raw = base64.b64decode(states[rank])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


@contextmanager
def _local_copy(store: CheckpointStore, step: int) -> Iterator[Path]:
    """The checkpoint's files as a local directory (downloaded when the store is remote)."""
    local = store.local_dir(step)
    if local is not None:
        store.get(step)
        yield local
        return
    tmp = Path(tempfile.mkdtemp(prefix="tokenmill-load-"))
    try:
        store.download(step, tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(
    store: CheckpointStore, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
    state: dict[str, Any], rank: int, world: int, policy: Any,
) -> str | None:
    """Write and commit checkpoint `step`; returns its URI on rank 0."""
    state = {**state, "rng": gather_rng(world)}
    if rank == 0:
        store.prepare(step, overwrite=True)
    _barrier()
    final = store.local_dir(step)
    tmp = None if final is not None else Path(tempfile.mkdtemp(prefix="tokenmill-save-"))
    target = final if final is not None else tmp
    assert target is not None
    target.mkdir(parents=True, exist_ok=True)
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(target))
        if tmp is not None:
            store.upload_dir(step, tmp)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    uri = None
    if rank == 0:
        uri = store.commit(step, state).uri
        store.apply_retention(policy.keep_last, policy.keep_every)
    _barrier()
    return uri


def load(store: CheckpointStore, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model and optimizer from committed checkpoint `step`; returns its state.json."""
    with _local_copy(store, step) as directory:
        model_state, optim_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=str(directory))
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    return store.read_state(step)


def load_model_weights(parent_uri: str, model: nn.Module) -> None:
    """Only the model weights of a committed checkpoint (a parent stage's final one)."""
    from tokenmill.trainer.train.prepare import split_checkpoint_uri

    store, step = split_checkpoint_uri(parent_uri)
    with _local_copy(store, step) as directory:
        loaded = {"model": get_model_state_dict(model)}
        dcp.load(loaded, checkpoint_id=str(directory))
        set_model_state_dict(model, loaded["model"])


def export_hf(job: Any, model: nn.Module, rank: int, device: torch.device) -> str | None:
    """The final weights as a `Phi3ForCausalLM` directory with tokenizer files at `<output>/hf`.

    Every rank takes part in gathering the weights; rank 0 writes them and returns the URI.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    setup = job.model
    dtype = "bfloat16" if device.type == "cuda" and job.spec.execution.precision == "bf16" else "float32"
    target = open_store(hf_export_uri(job.output))
    with tempfile.TemporaryDirectory(prefix="tokenmill-hf-") as tmp:
        write_hf(full, setup.config, tmp, rope_theta=setup.rope_theta, max_positions=setup.max_positions,
                 tokenizer_name=setup.tokenizer_name, dtype=dtype)
        target.delete_prefix("")
        upload_dir(tmp, target, last=["config.json"])
    return target.uri
