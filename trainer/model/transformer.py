"""The decoder: embeddings, pre-norm blocks, final norm and an untied LM head.

Initialisation (`init_weights`): embeddings and every projection are drawn from
N(0, 0.02²), except the two projections that write into the residual stream (attention
`o_proj`, MLP `down_proj`), which use std 0.02 / sqrt(2 · layers) so the residual stream's
variance does not grow with depth (GPT-2's scaling); RMSNorm weights start at 1. There are
no biases.

For large models build on the meta device, shard (FSDP2), move with `to_empty` and call
`init_weights()`; rotary tables are computed per forward pass, so there are no buffers to
restore.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenmill.model_configs import ModelConfig
from tokenmill.trainer.model.attention import AttentionPlan, plan_attention
from tokenmill.trainer.model.layers import Attention, GatedMLP, RMSNorm, rope_cos_sin

INIT_STD = 0.02


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the blocks compute in: autocast's when it is on for x's device, else x's own.

    Under autocast the embedding output stays fp32 while every matmul and attention runs in
    the autocast dtype, so attention is planned for that dtype (bf16 enables the
    variable-length FlashAttention path on GPUs).
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config.hidden_size, config.num_heads, config.num_kv_heads)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, plan)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A Phi-4-family decoder. `forward` returns logits [batch, seq, vocab]."""

    def __init__(
        self,
        config: ModelConfig,
        rope_theta: float | None = None,
        max_positions: int | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.rope_theta = float(rope_theta if rope_theta is not None else config.rope_theta)
        self.max_positions = max_positions or config.max_position_embeddings
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids [batch, seq]; position_ids ([batch or 1, seq] or [seq]) default to 0..seq-1.

        `document_ids` [batch, seq] confine attention to runs of equal ids (packed
        documents); `attention_mask` (boolean, True = may attend, broadcastable to
        [batch, heads, seq, seq]) is intersected with the causal mask. `logits_at` (rows,
        positions), two [n] index tensors, returns only those positions' logits [n, vocab]:
        the LM head, the largest matrix product for a large vocabulary, runs on them alone.
        """
        seq_len = input_ids.shape[1]
        if seq_len > self.max_positions:
            raise ValueError(
                f"sequence length {seq_len} exceeds the model's {self.max_positions} positions"
            )
        x = self.embed(input_ids)
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.rope_theta, x.dtype)
        cos, sin = cos[:, None], sin[:, None]
        plan = plan_attention(document_ids, attention_mask, seq_len, x.device, compute_dtype(x))
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, plan, use_reentrant=False)
            else:
                x = layer(x, cos, sin, plan)
        if logits_at is not None:
            x = x[logits_at[0], logits_at[1]]
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        residual_std = INIT_STD / math.sqrt(2 * self.config.num_layers)
        nn.init.normal_(self.embed.weight, std=INIT_STD, generator=generator)
        nn.init.normal_(self.lm_head.weight, std=INIT_STD, generator=generator)
        self.norm.reset_parameters()
        for layer in self.layers:
            layer.attention_norm.reset_parameters()
            layer.mlp_norm.reset_parameters()
            attention, mlp = layer.attention, layer.mlp
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj,
                           mlp.gate_proj, mlp.up_proj):
                nn.init.normal_(linear.weight, std=INIT_STD, generator=generator)
            for linear in (attention.o_proj, mlp.down_proj):
                nn.init.normal_(linear.weight, std=residual_std, generator=generator)

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())


def build_model(
    config: ModelConfig,
    rope_theta: float | None = None,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    max_positions: int | None = None,
    activation_checkpointing: bool = False,
    seed: int | None = None,
) -> Transformer:
    """Builds and initialises the model on `device`; on "meta" it is left uninitialised.

    `rope_theta` overrides the config's RoPE base (midtraining: 250,000) and `max_positions`
    its context (midtraining: 16,384). `seed` makes the initialisation reproducible.
    """
    device = torch.device(device)
    with torch.device(device):
        model = Transformer(config, rope_theta, max_positions, activation_checkpointing)
    model.to(dtype)
    if device.type != "meta":
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator)
    return model
