"""Model architectures by name: the data the API validates against and the trainer builds from.

This module stays free of torch so that the operator and the validator can use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer in the Phi-4 family (RMSNorm, RoPE, GQA, SiLU-gated MLP)."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float
    tokenizer: str
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def parameter_count(self) -> int:
        """Exact count for this architecture: untied embeddings and head, no biases."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * h * 2 + h * kv * 2
        mlp = h * self.intermediate_size * 3
        per_layer = attention + mlp + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def to_dict(self) -> dict:
        return asdict(self)


# `phi-4` is the pretraining shape: 4,096 positions. The pretraining RoPE base is not
# published; we use 10,000 and midtraining raises it to 250,000 for 16,384 positions.
PHI_4 = ModelConfig(
    name="phi-4",
    vocab_size=100_352,
    hidden_size=5120,
    num_layers=40,
    num_heads=40,
    num_kv_heads=10,
    intermediate_size=17_920,
    max_position_embeddings=4096,
    rope_theta=10_000.0,
    tokenizer="phi-4",
)
TINY = ModelConfig(
    name="tiny",
    vocab_size=320,
    hidden_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=384,
    max_position_embeddings=256,
    rope_theta=10_000.0,
    tokenizer="byte",
)

MODEL_CONFIGS: dict[str, ModelConfig] = {
    config.name: config
    for config in (
        PHI_4,
        TINY,
        replace(TINY, name="tiny-phi4-vocab", vocab_size=100_352, max_position_embeddings=512, tokenizer="phi-4"),
        # Phi-4's width and vocabulary with 4 of its 40 layers: the GPU throughput benchmark.
        replace(PHI_4, name="phi-4-width-4l", num_layers=4),
    )
}


def get_model_config(name: str) -> ModelConfig:
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        allowed = ", ".join(sorted(MODEL_CONFIGS))
        raise KeyError(f"unknown model config {name!r}; known configs: {allowed}") from None
