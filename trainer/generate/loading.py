"""Our model from the store: a committed checkpoint or a Hugging Face export, and its identity.

A URI may name
- a checkpoint directory `<output>/checkpoints/step-NNNNNNNN` (commit marker present): the
  architecture comes from its `state.json`, the weights from the distributed checkpoint;
- a Hugging Face export (a directory with `config.json`, `Phi3ForCausalLM`);
- a resource's output prefix holding `hf/config.json`: its export.

The identity (part of every request-cache key) is a sha256 over what the outputs depend on:
for a checkpoint its commit marker (which lists every file with its size) and state; for an
export its config and the bytes of its weight files.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.layout import COMMIT_MARKER_NAME
from tokenmill.model_configs import ModelConfig, get_model_config
from tokenmill.store import CheckpointStore, FileStore, StoreError, download_dir, open_store
from tokenmill.trainer.generate.interface import GenerationInputError
from tokenmill.trainer.model.transformer import Transformer
from tokenmill.trainer.tokenizer import Tokenizer, get_tokenizer

if TYPE_CHECKING:
    from tokenmill.trainer.generate.torch_engine import TorchEngine

_STEP_DIR = re.compile(r"^(?P<base>.+)/step-(?P<step>\d{8,})/?$")


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    identity: str
    uri: str
    kind: str  # "checkpoint" or "hf"


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(len(part).to_bytes(8, "little"))
        hasher.update(part)
    return hasher.hexdigest()


def model_kind(uri: str, field: str = "model") -> tuple[str, str]:
    """("checkpoint" | "hf", the URI to load) for a model URI; GenerationInputError otherwise."""
    uri = uri.rstrip("/")
    try:
        store = open_store(uri)
        if _STEP_DIR.match(uri) and store.exists(COMMIT_MARKER_NAME):
            return "checkpoint", uri
        if store.exists("config.json"):
            return "hf", uri
        if store.exists("hf/config.json"):
            return "hf", f"{uri}/hf"
    except StoreError as error:
        raise GenerationInputError(f"{field}: cannot read {uri}: {error}") from None
    raise GenerationInputError(
        f"{field}: {uri} is neither a committed checkpoint (<output>/checkpoints/step-NNNNNNNN with "
        "_COMMITTED) nor a Hugging Face export (config.json)")


def load_model(
    uri: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    field: str = "model",
) -> LoadedModel:
    kind, uri = model_kind(uri, field)
    if kind == "checkpoint":
        return _load_checkpoint(uri, torch.device(device), dtype, field)
    with tempfile.TemporaryDirectory(prefix="tokenmill-model-") as tmp:
        directory = Path(tmp)
        store = open_store(uri)
        local = store.local_path("") if isinstance(store, FileStore) else None
        if local is None:
            download_dir(uri, directory)
            local = directory
        return load_hf_directory(Path(local), uri=uri, device=device, dtype=dtype, field=field)


def load_hf_directory(
    directory: Path, *, uri: str | None = None, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, field: str = "model",
) -> LoadedModel:
    from tokenmill.trainer.model.hf import load_hf

    where = uri or str(directory)
    try:
        state_dict, config = load_hf(directory)
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise GenerationInputError(f"{field}: {where} is not a usable Phi-3 export: {error}") from None
    tokenizer = _tokenizer(config.tokenizer, config, where, field)
    model = Transformer(config, config.rope_theta, config.max_position_embeddings)
    model.load_state_dict(state_dict)
    model.to(device=device, dtype=dtype).eval()
    parts = [(directory / "config.json").read_bytes()]
    for weights in sorted(directory.glob("model*.safetensors")):
        parts.append(weights.read_bytes())
    return LoadedModel(model, tokenizer, config, f"hf:{_digest(*parts)}", where, "hf")


def _load_checkpoint(uri: str, device: torch.device, dtype: torch.dtype, field: str) -> LoadedModel:
    from tokenmill.trainer.train.checkpoint import load_model_weights

    match = _STEP_DIR.match(uri)
    assert match is not None
    checkpoints, step = CheckpointStore(match.group("base")), int(match.group("step"))
    try:
        state = checkpoints.read_state(step)
        marker = open_store(uri).read_bytes(COMMIT_MARKER_NAME)
    except StoreError as error:
        raise GenerationInputError(f"{field}: cannot read checkpoint {uri}: {error}") from None
    saved = state.get("model") or {}
    try:
        config = get_model_config(saved["config"])
    except KeyError as error:
        raise GenerationInputError(f"{field}: checkpoint {uri} names no known model config ({error})") from None
    rope_theta = float(saved.get("rope_theta", config.rope_theta))
    max_positions = int(saved.get("max_positions", config.max_position_embeddings))
    tokenizer = _tokenizer(saved.get("tokenizer") or config.tokenizer, config, uri, field)
    model = Transformer(config, rope_theta, max_positions)
    load_model_weights(uri, model)
    model.to(device=device, dtype=dtype).eval()
    identity = _digest(marker, json.dumps(saved, sort_keys=True).encode())
    return LoadedModel(model, tokenizer, config, f"checkpoint:{identity}", uri, "checkpoint")


def _tokenizer(name: str, config: ModelConfig, where: str, field: str) -> Tokenizer:
    try:
        tokenizer = get_tokenizer(name)
    except KeyError as error:
        raise GenerationInputError(f"{field}: {where}: {error.args[0]}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise GenerationInputError(
            f"{field}: {where}: tokenizer {name!r} has {tokenizer.vocab_size} ids but the model "
            f"only {config.vocab_size} embeddings (vocabulary mismatch)")
    return tokenizer


def load_torch_engine(uri: str, *, device: str | torch.device | None = None, field: str = "model",
                      **options: Any) -> TorchEngine:
    """A TorchEngine over the model at `uri` (on CUDA when available unless `device` says)."""
    from tokenmill.trainer.generate.torch_engine import TorchEngine

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(uri, device=device, field=field)
    return TorchEngine(loaded.model, loaded.tokenizer, identity=loaded.identity, **options)
