"""Incremental forward passes of our decoder with a key/value cache.

The model's own `forward` computes a whole sequence; generation instead appends tokens to a
cache of every layer's keys and values. `KVCache` holds them preallocated as
[batch, kv_heads, capacity, head_dim] per layer (zeroed: masked-out garbage could be NaN, and
attention weight 0 times NaN is still NaN), so a decode step writes one column in place.
Rows may start at different columns (left padding): `valid` marks the columns a row may
attend to, and every row carries its own positions for RoPE. The maths is the model's own
(same modules, same RMSNorm, RoPE and grouped-query attention), so outputs match `forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.trainer.model.layers import apply_rope, rope_cos_sin
from tokenmill.trainer.model.transformer import Transformer


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer [batch, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    valid: torch.Tensor  # [batch, capacity] bool: the columns holding a real token
    length: int = 0  # columns written so far
    padded: bool = True  # whether any row has invalid columns before `length` (else no mask)

    @classmethod
    def empty(cls, model: Transformer, batch: int, capacity: int) -> KVCache:
        config = model.config
        parameter = model.embed.weight
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=parameter.dtype, device=parameter.device)
                  for _ in range(config.num_layers)],
            values=[torch.zeros(shape, dtype=parameter.dtype, device=parameter.device)
                    for _ in range(config.num_layers)],
            valid=torch.zeros(batch, capacity, dtype=torch.bool, device=parameter.device),
        )

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def select(self, rows: torch.Tensor) -> KVCache:
        """The cache of the given rows only (finished rows are dropped from the batch)."""
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values],
                       self.valid[rows], self.length, self.padded)


def fuse_weights(model: Transformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, q/k/v stacked into one matrix and gate/up into another (as Phi-3 stores
    them): two matrix products instead of five per layer, which pays for small models."""
    fused = []
    with torch.no_grad():
        for layer in model.layers:
            attention, mlp = layer.attention, layer.mlp
            qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            fused.append((qkv, gate_up))
    return fused


@torch.inference_mode()
def forward_cached(
    model: Transformer, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
    *, last_only: bool = True, fused: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Appends `input_ids` [batch, seq] at columns cache.length.. and returns their logits
    (only the last position's, [batch, vocab], when `last_only`).

    A new token attends to every valid earlier column and causally to the new ones; the
    caller marks the new columns valid (or not, for padding) in `cache.valid` beforehand.
    `fused` (from `fuse_weights`) must hold the model's current weights.
    """
    batch, seq = input_ids.shape
    start, end = cache.length, cache.length + seq
    if end > cache.capacity:
        raise ValueError(f"KV cache overflow: {end} columns needed, capacity {cache.capacity}")
    config = model.config
    x = model.embed(input_ids)
    cos, sin = rope_cos_sin(positions, config.head_dim, model.rope_theta, x.dtype)
    cos, sin = cos[:, None], sin[:, None]
    mask: torch.Tensor | None
    causal = False
    if seq == 1:  # a decode step: the new column is valid, so every row sees itself
        mask = cache.valid[:, None, None, :end] if cache.padded else None
    elif start == 0 and not cache.padded:
        mask, causal = None, True
    else:
        earlier = torch.ones(seq, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        # A padding token sees itself only: a query with nothing to attend to would give NaNs.
        itself = torch.zeros(seq, end, dtype=torch.bool, device=x.device)
        itself[:, start:end] = torch.eye(seq, dtype=torch.bool, device=x.device)
        mask = (cache.valid[:, None, None, :end] & earlier[None, None]) | itself[None, None]
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    gqa = heads != kv_heads
    for index, layer in enumerate(model.layers):
        attention = layer.attention
        h = layer.attention_norm(x)
        if fused is not None:
            q, k, v = F.linear(h, fused[index][0]).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = attention.q_proj(h), attention.k_proj(h), attention.v_proj(h)
        q = q.view(batch, seq, heads, head_dim).transpose(1, 2)
        k = k.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        v = v.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.keys[index][:, :, start:end] = k
        cache.values[index][:, :, start:end] = v
        out = F.scaled_dot_product_attention(
            q, cache.keys[index][:, :, :end], cache.values[index][:, :, :end],
            attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        x = x + attention.o_proj(out.transpose(1, 2).reshape(batch, seq, heads * head_dim))
        if fused is not None:
            gate, up = F.linear(layer.mlp_norm(x), fused[index][1]).chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(F.silu(gate) * up)
        else:
            x = x + layer.mlp(layer.mlp_norm(x))
    cache.length = end
    if last_only:
        x = x[:, -1]
    return model.lm_head(model.norm(x)).float()
