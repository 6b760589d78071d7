"""Model FLOPs per trained token, for model FLOPs utilisation (MFU).

flops_per_token = 6 · N + 12 · L · H · d · T
- N: weights of every matrix multiply (attention and MLP projections, the LM head); the
  embedding is a lookup and the norms are elementwise, so neither is counted. A weight costs
  2 FLOPs per token forward and 4 backward.
- 12 · L · H · d · T: attention scores (Q·Kᵀ) and the weighted sum of values, 2 · T · H · d
  FLOPs each per token and layer forward, tripled for the backward pass, with T the sequence
  length. As in PaLM (appendix B) and torchtitan the causal half is not discounted, so
  numbers are comparable with those reports.
Phi-4 at 4,096 tokens: about 9.49e10 FLOPs per token.
"""

from __future__ import annotations

from tokenmill.model_configs import ModelConfig


def matmul_parameters(config: ModelConfig) -> int:
    h, kv = config.hidden_size, config.num_kv_heads * config.head_dim
    q = config.num_heads * config.head_dim
    attention = h * q * 2 + h * kv * 2
    mlp = 3 * h * config.intermediate_size
    return config.num_layers * (attention + mlp) + h * config.vocab_size


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6 * matmul_parameters(config) + attention


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float,
        num_devices: int = 1) -> float:
    """Fraction of the devices' peak (FLOP/s each; 989e12 for an H100 in bf16) achieved."""
    return tokens_per_second * flops_per_token / (peak_flops * num_devices)
