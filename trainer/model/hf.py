"""Our weights to and from Hugging Face `Phi3ForCausalLM` (model_type phi3).

The mapping is one to one except for two fusions in Phi-3: `qkv_proj` stacks our q, k, v
projections along the output dimension in that order, and `gate_up_proj` stacks gate then up.
RoPE uses the same "rotate half" layout, so no permutation is needed.

`export_hf` writes a directory that `transformers` and vLLM load as is: config.json,
model.safetensors (or shards of at most `max_shard_bytes` with model.safetensors.index.json),
generation_config.json and the tokenizer files. Fused tensors are built one shard at a time,
so exporting needs memory for one shard beyond the state dict itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tokenmill.model_configs import ModelConfig
from tokenmill.trainer.model.transformer import Transformer
from tokenmill.trainer.tokenizer import get_tokenizer, save_hf_tokenizer

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_SHARD_BYTES = 5 * 2**30
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def hf_parts(config: ModelConfig) -> dict[str, list[str]]:
    """Each Hugging Face tensor name and the names of our tensors it concatenates (dim 0)."""
    parts = {"model.embed_tokens.weight": ["embed.weight"]}
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        parts |= {
            theirs + "input_layernorm.weight": [ours + "attention_norm.weight"],
            theirs + "self_attn.qkv_proj.weight": [
                ours + f"attention.{name}.weight" for name in ("q_proj", "k_proj", "v_proj")
            ],
            theirs + "self_attn.o_proj.weight": [ours + "attention.o_proj.weight"],
            theirs + "post_attention_layernorm.weight": [ours + "mlp_norm.weight"],
            theirs + "mlp.gate_up_proj.weight": [ours + "mlp.gate_proj.weight",
                                                 ours + "mlp.up_proj.weight"],
            theirs + "mlp.down_proj.weight": [ours + "mlp.down_proj.weight"],
        }
    parts |= {"model.norm.weight": ["norm.weight"], "lm_head.weight": ["lm_head.weight"]}
    return parts


def our_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _plain_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    plain = {}
    for name, tensor in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        if hasattr(tensor, "full_tensor"):
            raise TypeError(
                f"{name} is a sharded DTensor; gather a full state dict first "
                "(torch.distributed.checkpoint.state_dict.get_model_state_dict with "
                "StateDictOptions(full_state_dict=True, cpu_offload=True))"
            )
        plain[name] = tensor
    return plain


def _check_keys(found: Mapping[str, object], expected: Mapping[str, object], what: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def to_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    ours = _plain_state_dict(state_dict)
    _check_keys(ours, our_shapes(config), "state dict")
    return {name: _fused(ours, names) for name, names in hf_parts(config).items()}


def from_hf_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    parts = hf_parts(config)
    _check_keys(hf_state_dict, parts, "Hugging Face state dict")
    shapes = our_shapes(config)
    ours: dict[str, torch.Tensor] = {}
    for hf_name, names in parts.items():
        sizes = [shapes[name][0] for name in names]
        tensor = hf_state_dict[hf_name]
        if tensor.shape[0] != sum(sizes):
            raise ValueError(f"{hf_name} has {tensor.shape[0]} rows, expected {sum(sizes)}")
        for name, piece in zip(names, torch.split(tensor, sizes), strict=True):
            ours[name] = piece.contiguous()
    return ours


def _fused(ours: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    tensors = [ours[name].detach() for name in names]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)


def hf_config(
    config: ModelConfig,
    *,
    rope_theta: float | None = None,
    max_positions: int | None = None,
    dtype: str = "bfloat16",
    tokenizer_name: str | None = None,
) -> dict:
    """config.json for `Phi3ForCausalLM` (written with both the v4 and v5 RoPE keys)."""
    theta = float(rope_theta if rope_theta is not None else config.rope_theta)
    positions = max_positions or config.max_position_embeddings
    tokenizer = get_tokenizer(tokenizer_name or config.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids, more than the "
            f"model's vocabulary of {config.vocab_size}"
        )
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": positions,
        "original_max_position_embeddings": positions,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta,
                            "partial_rotary_factor": 1.0},
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "initializer_range": 0.02,
        "sliding_window": None,
        "use_cache": True,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "tokenmill": {"config_name": config.name, "tokenizer": tokenizer.name},
    }


def config_from_hf(hf: Mapping, tokenizer_name: str | None = None) -> ModelConfig:
    """Our config for a Phi-3 config.json; rejects features our model does not implement."""
    if hf.get("model_type") != "phi3":
        raise ValueError(f"expected model_type 'phi3', got {hf.get('model_type')!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    heads = hf["num_attention_heads"]
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "tie_word_embeddings": hf.get("tie_word_embeddings", False),
        "rope type": rope.get("rope_type", rope.get("type", "default")) != "default",
        "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0) != 1.0,
        "head_dim": hf.get("head_dim", hf["hidden_size"] // heads) * heads != hf["hidden_size"],
    }
    if any(unsupported.values()):
        names = ", ".join(name for name, bad in unsupported.items() if bad)
        raise ValueError(f"unsupported Phi-3 features: {names}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    marker = hf.get("tokenmill") or {}
    vocab = hf["vocab_size"]
    tokenizer = tokenizer_name or marker.get("tokenizer") or _tokenizer_for_vocab(vocab)
    return ModelConfig(
        name=marker.get("config_name", "hf"),
        vocab_size=vocab,
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=float(theta),
        tokenizer=tokenizer,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
    )


def _tokenizer_for_vocab(vocab_size: int) -> str:
    for name in ("phi-4", "byte"):
        if vocab_size == get_tokenizer(name).vocab_size:
            return name
    raise ValueError(f"no tokenizer has a vocabulary of {vocab_size}; pass tokenizer_name")


def _shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def export_hf(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    config: ModelConfig,
    out_dir: str | Path,
    rope_theta: float | None = None,
    max_positions: int | None = None,
    tokenizer_name: str | None = None,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Writes a `Phi3ForCausalLM` directory; RoPE base and positions default to the model's."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        rope_theta = rope_theta if rope_theta is not None else getattr(model, "rope_theta", None)
        max_positions = max_positions or getattr(model, "max_positions", None)
        state_dict = model.state_dict()
    else:
        state_dict = model_or_state_dict
    ours = _plain_state_dict(state_dict)
    _check_keys(ours, our_shapes(config), "state dict")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), *out.glob(INDEX_FILE)]:
        stale.unlink()

    parts = hf_parts(config)
    target = DTYPES[dtype]
    item = torch.tensor([], dtype=target).element_size()
    sizes = {name: sum(ours[n].numel() for n in names) * item for name, names in parts.items()}
    shards = _shards(sizes, max_shard_bytes)
    weight_map = {}
    for index, names in enumerate(shards, start=1):
        filename = SINGLE_FILE if len(shards) == 1 else (
            f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {name: _fused(ours, parts[name]).to("cpu", target).contiguous()
                   for name in names}
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, filename)
        del tensors
    if len(shards) > 1:
        index_json = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index_json, indent=2))

    config_json = hf_config(config, rope_theta=rope_theta, max_positions=max_positions,
                            dtype=dtype, tokenizer_name=tokenizer_name)
    (out / CONFIG_FILE).write_text(json.dumps(config_json, indent=2))
    generation = {
        "bos_token_id": config_json["bos_token_id"],
        "eos_token_id": _stop_ids(config_json["tokenmill"]["tokenizer"]),
        "pad_token_id": config_json["pad_token_id"],
    }
    (out / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2))
    tokenizer = get_tokenizer(config_json["tokenmill"]["tokenizer"])
    save_hf_tokenizer(tokenizer, out, model_max_length=config_json["max_position_embeddings"])
    return out


def _stop_ids(tokenizer_name: str) -> list[int]:
    """Generation stops at the end of an assistant turn or at the end of a document."""
    tokenizer = get_tokenizer(tokenizer_name)
    return [tokenizer.eos_id, tokenizer.eot_id]


def _read_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = directory / INDEX_FILE
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    for filename in files:
        with safe_open(str(directory / filename), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def load_hf(
    directory: str | Path, tokenizer_name: str | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Our state dict (in the stored dtype) and config from a `Phi3ForCausalLM` directory.

    The returned config carries the checkpoint's RoPE base and positions.
    """
    path = Path(directory)
    config = config_from_hf(json.loads((path / CONFIG_FILE).read_text()), tokenizer_name)
    hf_state_dict = dict(_read_safetensors(path))
    return from_hf_state_dict(hf_state_dict, config), config
