"""Incremental forward passes of our decoder with a key/value cache.

The model's own `forward` computes a whole sequence; generation instead appends tokens to a
cache of every layer's keys and values. `KVCache` holds them preallocated as
[batch, kv_heads, capacity, head_dim] per layer (zeroed: masked-out garbage could be NaN, and
attention weight 0 times NaN is still NaN), so a decode step writes one column in place.
Rows may start at different columns (left padding): `valid` marks the columns a row may
attend to, and every row carries its own positions for RoPE. The maths is the model's own
(same modules, same RMSNorm, RoPE and grouped-query attention), so outputs match `forward`.

Decoding uses `DecodeBatch` and `decode_step` instead: the prompt's keys and values stay
where prefill left them, in `PrefixSegment`s, and only the generated tokens go into a
per-row suffix cache. A segment is either shared by all its rows (the n samples of one
prompt: its keys are read once per step for all of them, never copied per sample) or per
row (distinct prompts, left-padded, masked). Attention takes one softmax over a row's prefix
and suffix scores together, so the result is the same as over one concatenated cache.
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


@dataclass
class PrefixSegment:
    """The prompt keys and values of rows start..stop of a decode batch."""

    start: int
    stop: int
    keys: list[torch.Tensor]  # per layer: shared [kv_heads, len, head_dim], else [rows, kv_heads, len, head_dim]
    values: list[torch.Tensor]
    shared: bool
    mask: torch.Tensor | None = None  # per row: [rows, 1, 1, len], 0 or -inf (left padding)

    def select(self, rows: torch.Tensor, start: int) -> PrefixSegment:
        """The segment of the given rows (indices into this segment), starting at batch row `start`."""
        if self.shared:
            return PrefixSegment(start, start + len(rows), self.keys, self.values, True)
        return PrefixSegment(start, start + len(rows), [k[rows] for k in self.keys], [v[rows] for v in self.values],
                             False, None if self.mask is None else self.mask[rows])


@dataclass
class DecodeBatch:
    """Rows decoding together: their prompts' segments and the keys and values they generate."""

    segments: list[PrefixSegment]
    keys: list[torch.Tensor]  # per layer [rows, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    prompt_lengths: torch.Tensor  # [rows]: the position of each row's first generated token
    steps: int = 0  # suffix columns written so far

    @classmethod
    def create(cls, model: Transformer, segments: list[PrefixSegment], prompt_lengths: torch.Tensor,
               capacity: int) -> DecodeBatch:
        config = model.config
        parameter = model.embed.weight
        shape = (len(prompt_lengths), config.num_kv_heads, capacity, config.head_dim)
        return cls(segments,
                   [torch.empty(shape, dtype=parameter.dtype, device=parameter.device) for _ in range(config.num_layers)],
                   [torch.empty(shape, dtype=parameter.dtype, device=parameter.device) for _ in range(config.num_layers)],
                   prompt_lengths)

    def select(self, rows: list[int]) -> DecodeBatch:
        """The batch of the given rows only, in order (finished rows leave the batch)."""
        index = torch.tensor(rows, device=self.prompt_lengths.device)
        segments, start = [], 0
        for segment in self.segments:
            inside = [r - segment.start for r in rows if segment.start <= r < segment.stop]
            if inside:
                local = torch.tensor(inside, device=index.device)
                segments.append(segment.select(local, start))
                start += len(inside)
        return DecodeBatch(segments, [k[index] for k in self.keys], [v[index] for v in self.values],
                           self.prompt_lengths[index], self.steps)


class RopeTable:
    """cos and sin of every position, computed once (the same values `rope_cos_sin` gives)."""

    def __init__(self, model: Transformer) -> None:
        positions = torch.arange(model.max_positions, device=model.embed.weight.device)
        self.cos, self.sin = rope_cos_sin(positions, model.config.head_dim, model.rope_theta, model.embed.weight.dtype)


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


def _norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    if x.dtype == torch.float32:  # the module's maths in one call: no cast to undo
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm(x)


def _attend(q: torch.Tensor, segment: PrefixSegment, layer: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention of q [rows, kv_heads, group, head_dim] (already scaled) over the segment's
    prompt and the rows' own generated keys/values [rows, kv_heads, steps, head_dim]."""
    rows, kv_heads, group, head_dim = q.shape
    prefix_keys, prefix_values = segment.keys[layer], segment.values[layer]
    length = prefix_keys.shape[-2]
    if segment.shared:  # one matrix product for all rows: [kv, rows * group, d] x [kv, d, len]
        stacked = q.transpose(0, 1).reshape(kv_heads, rows * group, head_dim)
        prefix_scores = torch.matmul(stacked, prefix_keys.transpose(1, 2)).view(kv_heads, rows, group, length)
        prefix_scores = prefix_scores.transpose(0, 1)
    else:
        prefix_scores = torch.matmul(q, prefix_keys.transpose(2, 3))
        if segment.mask is not None:
            prefix_scores = prefix_scores + segment.mask
    scores = torch.cat([prefix_scores, torch.matmul(q, keys.transpose(2, 3))], dim=-1)
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # float32 sums for half-precision models
    prefix_weights, own_weights = weights[..., :length], weights[..., length:]
    if segment.shared:
        stacked = prefix_weights.transpose(0, 1).reshape(kv_heads, rows * group, length)
        out = torch.matmul(stacked, prefix_values).view(kv_heads, rows, group, head_dim).transpose(0, 1)
    else:
        out = torch.matmul(prefix_weights, prefix_values)
    return out + torch.matmul(own_weights, values)


@torch.inference_mode()
def decode_step(
    model: Transformer, input_ids: torch.Tensor, batch: DecodeBatch, rope: RopeTable,
    *, fused: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Appends one token per row (`input_ids` [rows]) at suffix column batch.steps and returns
    the next-token logits [rows, vocab]."""
    step = batch.steps
    if step >= batch.keys[0].shape[2]:
        raise ValueError(f"decode cache overflow: step {step}, capacity {batch.keys[0].shape[2]}")
    config = model.config
    rows = input_ids.shape[0]
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    group = heads // kv_heads
    positions = batch.prompt_lengths + step
    cos, sin = rope.cos[positions][:, None], rope.sin[positions][:, None]  # [rows, 1, head_dim]
    scale = head_dim ** -0.5
    x = model.embed(input_ids)
    for index, layer in enumerate(model.layers):
        attention = layer.attention
        h = _norm(x, layer.attention_norm)
        if fused is not None:
            qkv = F.linear(h, fused[index][0])
        else:
            qkv = torch.cat([attention.q_proj(h), attention.k_proj(h), attention.v_proj(h)], dim=-1)
        qkv = qkv.view(rows, heads + 2 * kv_heads, head_dim)
        qk = apply_rope(qkv[:, :heads + kv_heads], cos, sin)
        q = (qk[:, :heads] * scale).view(rows, kv_heads, group, head_dim)
        batch.keys[index][:, :, step] = qk[:, heads:]
        batch.values[index][:, :, step] = qkv[:, heads + kv_heads:]
        own_keys, own_values = batch.keys[index][:, :, :step + 1], batch.values[index][:, :, :step + 1]
        if len(batch.segments) == 1:
            out = _attend(q, batch.segments[0], index, own_keys, own_values)
        else:
            out = torch.cat([
                _attend(q[s.start:s.stop], s, index, own_keys[s.start:s.stop], own_values[s.start:s.stop])
                for s in batch.segments])
        x = x + F.linear(out.reshape(rows, heads * head_dim), attention.o_proj.weight)
        h = _norm(x, layer.mlp_norm)
        if fused is not None:
            gate, up = F.linear(h, fused[index][1]).chunk(2, dim=-1)
        else:
            gate, up = layer.mlp.gate_proj(h), layer.mlp.up_proj(h)
        x = x + F.linear(F.silu(gate) * up, layer.mlp.down_proj.weight)
    batch.steps = step + 1
    return model.lm_head(_norm(x, model.norm)).float()
