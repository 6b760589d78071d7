"""Distributed checkpoints in the store, the parent model's weights, and the Hugging Face export.

Save (every rank): rank 0 clears what a crashed attempt left at the step; every rank writes
its share with `torch.distributed.checkpoint` (DCP), straight into the final directory on a
file:// store or into a local directory that it then uploads; after a barrier rank 0 writes
`state.json` and the commit marker (`CheckpointStore.commit`), then applies retention.
The DCP state is `{"model", "optim"}` from `get_state_dict`, so the same files load under
DDP, FSDP2 (resharded) or a single process. `state.json` holds the step, tokens seen, the
sampler position, the scheduler, every rank's RNG states (CPU, and CUDA on a GPU) and the
model's shape.
"""

from __future__ import annotations

import base64
import json
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
from tokenmill.store import EXPORT_PRODUCER_NAME, CheckpointStore, open_store, upload_dir
from tokenmill.trainer.model.hf import export_hf as write_hf


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier(group: Any = None) -> None:
    if _distributed():
        dist.barrier(group=group)


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state(device: torch.device, cuda: Any = torch.cuda) -> dict[str, str]:
    """This process's generators: the CPU one, and the training GPU's when it trains on one."""
    state = {"cpu": _encode(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = _encode(cuda.get_rng_state(device))
    return state


def gather_rng(world: int, device: torch.device, group: Any = None) -> list[dict[str, str]]:
    mine = rng_state(device)
    if not _distributed():
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine, group=group)
    return states


def restore_rng(states: list[Any], rank: int, device: torch.device, cuda: Any = torch.cuda) -> None:
    """Set this rank's generators from a checkpoint (a rank it did not have keeps its own).

    A state saved on a GPU restores its CUDA generator only on a GPU; checkpoints written
    before CUDA states were kept hold the CPU state alone, as a string.
    """
    if rank >= len(states):
        return
    saved = states[rank]
    if isinstance(saved, str):
        saved = {"cpu": saved}
    torch.set_rng_state(_decode(saved["cpu"]))
    if device.type == "cuda" and "cuda" in saved:
        cuda.set_rng_state(_decode(saved["cuda"]), device)


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
    state: dict[str, Any], rank: int, world: int, policy: Any, *,
    device: torch.device = torch.device("cpu"), group: Any = None,
) -> str | None:
    """Write and commit checkpoint `step`; returns its URI on rank 0.

    `group` serves the host-side collectives (see `parallel.host_group`).
    """
    state = {**state, "rng": gather_rng(world, device, group)}
    if rank == 0:
        store.prepare(step, overwrite=True)
    _barrier(group)
    final = store.local_dir(step)
    tmp = None if final is not None else Path(tempfile.mkdtemp(prefix="tokenmill-save-"))
    target = final if final is not None else tmp
    assert target is not None
    target.mkdir(parents=True, exist_ok=True)
    expected: dict[str, int] | None = None
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(target), process_group=group)
        if rank == 0:
            expected = dcp_files(target)
        if tmp is not None:
            store.upload_dir(step, tmp)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier(group)
    uri = None
    if rank == 0:
        uri = store.commit(step, state, expected_files=expected).uri
        store.apply_retention(policy.keep_last, policy.keep_every)
    _barrier(group)
    return uri


def dcp_files(directory: Path) -> dict[str, int]:
    """The files DCP's `.metadata` in `directory` refers to, each with the bytes it addresses
    (plus `.metadata` itself): what the commit checks is in the store."""
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    needed: dict[str, int] = {".metadata": 0}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    return needed


def load(
    store: CheckpointStore, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *, group: Any = None
) -> dict[str, Any]:
    """Load model and optimizer from committed checkpoint `step`; returns its state.json."""
    with _local_copy(store, step) as directory:
        model_state, optim_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=str(directory), process_group=group)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    return store.read_state(step)


def load_model_weights(parent_uri: str, model: nn.Module, *, group: Any = None) -> None:
    """Only the model weights of a committed checkpoint (a parent stage's final one)."""
    from tokenmill.trainer.train.prepare import split_checkpoint_uri

    store, step = split_checkpoint_uri(parent_uri)
    with _local_copy(store, step) as directory:
        loaded = {"model": get_model_state_dict(model)}
        dcp.load(loaded, checkpoint_id=str(directory), process_group=group)
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
        producer = CheckpointStore.for_run(job.doc).producer
        assert producer is not None
        (Path(tmp) / EXPORT_PRODUCER_NAME).write_text(json.dumps(producer.to_dict()))
        target.delete_prefix("")
        upload_dir(tmp, target, last=["config.json"])
    return target.uri
