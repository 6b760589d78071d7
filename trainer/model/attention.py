"""Causal grouped-query attention, optionally confined to documents packed in one sequence.

`plan_attention` runs once per forward pass and picks how every layer attends:
- no document ids and no mask: `scaled_dot_product_attention(is_causal=True)`, which is
  FlashAttention on a GPU and the fused CPU kernel on a CPU;
- document ids on a CUDA device in bf16/fp16: FlashAttention's variable-length kernel
  (`torch.nn.attention.varlen.varlen_attn`) over the documents as separate causal sequences,
  so no mask is materialised and no block across a document boundary is computed;
- document ids on a CPU: causal SDPA over each document separately ("segments"), so no mask
  is materialised and no product across a document boundary is computed;
- otherwise (a GPU in fp32, or an explicit mask): SDPA with a dense boolean mask, the causal
  mask intersected with "same document" (block-diagonal causal) and with the caller's mask.

A document is a maximal run of equal ids within a row, so ids may repeat across rows. RoPE
is relative, so positions need not restart at each document once attention is confined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch without the variable-length FlashAttention wrapper
    varlen_attn = None


@dataclass
class AttentionPlan:
    """How to attend in this forward pass: `kind` is "causal", "dense", "varlen" or "segments"."""

    kind: str
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    lengths: list[list[int]] | None = None
    """segments: the documents' lengths in each row."""


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, seq]: True where a document begins (each row's first token included)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [batch, 1, seq, seq]: True where a query may see a key."""
    segments = document_starts(document_ids).cumsum(dim=1)
    seq_len = document_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    same_document = segments[:, :, None] == segments[:, None, :]
    return (same_document & causal)[:, None]


def document_boundaries(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative lengths (int32, [documents + 1]) of the flattened batch, and the longest."""
    flat_starts = document_starts(document_ids).flatten().nonzero().squeeze(1)
    total = torch.tensor([document_ids.numel()], device=document_ids.device)
    cu_seqlens = torch.cat([flat_starts, total]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return cu_seqlens, max_seqlen


def plan_attention(
    document_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    allow_varlen: bool = True,
) -> AttentionPlan:
    """`attention_mask` is boolean, broadcastable to [batch, heads, seq, seq], True = may attend."""
    if document_ids is None and attention_mask is None:
        return AttentionPlan("causal")
    if attention_mask is None and allow_varlen and _varlen_usable(device, dtype):
        cu_seqlens, max_seqlen = document_boundaries(document_ids)
        return AttentionPlan("varlen", cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if attention_mask is None and device.type == "cpu":
        return AttentionPlan("segments", lengths=document_lengths(document_ids))
    if document_ids is not None:
        mask = document_mask(document_ids)
    else:
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise TypeError("attention_mask must be boolean (True = may attend)")
        mask = mask & attention_mask
    return AttentionPlan("dense", mask=mask)


def document_lengths(document_ids: torch.Tensor) -> list[list[int]]:
    """The lengths of the documents (runs of equal ids) in each row."""
    starts = document_starts(document_ids)
    seq_len = document_ids.shape[1]
    lengths = []
    for row in starts.cpu():
        positions = row.nonzero().squeeze(1).tolist() + [seq_len]
        lengths.append([end - start for start, end in zip(positions, positions[1:])])
    return lengths


def _attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[list[int]]) -> torch.Tensor:
    """Causal attention within each document of each row; [batch, heads, seq, dim] out.

    `split` makes views whose backward is one `cat`, so the gradient costs no per-document
    full-size buffers.
    """
    gqa = k.shape[1] != q.shape[1]
    rows = []
    for row_q, row_k, row_v, row_lengths in zip(q.split(1), k.split(1), v.split(1), lengths, strict=True):
        # 4-D pieces [1, heads, length, dim], which the fused CPU kernel takes.
        pieces = zip(row_q.split(row_lengths, 2), row_k.split(row_lengths, 2), row_v.split(row_lengths, 2))
        outs = [F.scaled_dot_product_attention(dq, dk, dv, is_causal=True, enable_gqa=gqa) for dq, dk, dv in pieces]
        rows.append(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
    return torch.cat(rows)


def _varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    return varlen_attn is not None and device.type == "cuda" and dtype in (
        torch.bfloat16,
        torch.float16,
    )


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """q [batch, heads, seq, dim], k/v [batch, kv_heads, seq, dim] -> [batch, seq, heads·dim]."""
    batch, heads, seq_len, head_dim = q.shape
    gqa = k.shape[1] != heads
    if plan.kind == "varlen":
        packed = [
            t.transpose(1, 2).reshape(batch * seq_len, t.shape[1], head_dim) for t in (q, k, v)
        ]
        out = varlen_attn(
            *packed,
            plan.cu_seqlens,
            plan.cu_seqlens,
            plan.max_seqlen,
            plan.max_seqlen,
            window_size=(-1, 0),
            enable_gqa=gqa,
        )
        return out.view(batch, seq_len, heads * head_dim)
    if plan.kind == "causal":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif plan.kind == "segments":
        assert plan.lengths is not None
        out = _attend_segments(q, k, v, plan.lengths)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(batch, seq_len, heads * head_dim)
