"""Attention of new queries over a KIVI cache, in plain PyTorch (the ground truth).

``q [B, Hq, n, D]`` attends over the logical keys/values ``dequant(quantized) ++ residual``
(``[B, Hkv, T, D]``), with ``Hq = g * Hkv``: query head ``h`` reads KV head ``h // g`` (the
``repeat_kv`` / ``repeat_interleave`` convention), without materialising repeated K/V.
``attn_mask`` follows ``F.scaled_dot_product_attention``: boolean (True = attend) or additive,
broadcastable to ``[B, Hq, n, T]``; ``is_causal`` uses SDPA's top-left alignment. Scores, softmax
and the value product run in float32; the output has the query's dtype.
"""

from __future__ import annotations

import math

import torch

from .cache_layout import QuantizedKV, dequantize_cache_ref


def attention_over_dense_ref(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    is_causal: bool,
) -> torch.Tensor:
    """Float32 grouped-query attention of ``q`` over dense ``keys``/``values [B, Hkv, T, D]``."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, seq_len = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    grouped_q = q.float().reshape(batch, kv_heads, group * q_len, head_dim)
    scores = (grouped_q @ keys.float().transpose(-1, -2) * scale).view(batch, q_heads, q_len, seq_len)
    if is_causal:
        causal = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    probs = scores.softmax(dim=-1).view(batch, kv_heads, group * q_len, seq_len)
    out = probs @ values.float()
    return out.view(batch, q_heads, q_len, values.shape[-1]).to(q.dtype)


def decode_attention_ref(
    q: torch.Tensor,
    key: QuantizedKV,
    value: QuantizedKV,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    is_causal: bool,
    key_bits: int,
    value_bits: int,
    group_size: int,
) -> torch.Tensor:
    """``softmax(scale * q Kᵀ + mask) V`` over the dequantized cache ++ residual."""
    keys = dequantize_cache_ref(key, key_bits, group_size, per_channel=True)
    values = dequantize_cache_ref(value, value_bits, group_size, per_channel=False)
    return attention_over_dense_ref(q, keys, values, attn_mask, scale, is_causal)
