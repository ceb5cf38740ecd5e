"""The five tensors that hold one KIVI-quantized K or V cache, and how to read them back.

``QuantizedKV`` fields (token axis is dim -2 everywhere; see ``quantize.py`` for the packed layouts):

- ``codes``    uint8, packed codes of the quantized tokens, capacity rows beyond ``n_quant`` unused.
- ``scales``   per-group scales (scale dtype = model dtype).
- ``mins``     per-group minima (the asymmetric zero point).
- ``residual`` ``[B, H, capacity, D]`` full-precision ring buffer of the most recent tokens.
- ``lengths``  int64 ``[4]`` on the cache's device: ``(n_quant, n_residual, residual_start, ticket)``;
  ``ticket`` is scratch for the Triton append (its programs count themselves out so the last one
  can update the lengths) and is 0 between ops.

Logical token order is ``quantized[0:n_quant] ++ residual ring[start : start + n_residual]``.
Lengths live on the device so kernels read them without a host synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .quantize import dequantize_packed_ref, tokens_per_code_row, tokens_per_scale_row

N_QUANT, N_RESIDUAL, RESIDUAL_START, TICKET = 0, 1, 2, 3


class QuantizedKV(NamedTuple):
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    residual: torch.Tensor
    lengths: torch.Tensor


def read_lengths(kv: QuantizedKV) -> tuple[int, int, int]:
    n_quant, n_residual, start = kv.lengths[:TICKET].tolist()
    return n_quant, n_residual, start


def lengths_tensor(n_quant: int, n_residual: int, start: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([n_quant, n_residual, start, 0], dtype=torch.int64, device=device)


def triton_layout_unsupported(head_dim: int, group_size: int, *caches: QuantizedKV) -> str | None:
    """Why the Triton kernels cannot address caches of this shape (None when they can)."""
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        return f"head_dim={head_dim} is not a power of two in [16, 256]"
    if group_size & (group_size - 1):
        return f"group_size={group_size} is not a power of two"
    if any(kv.scales.stride() != kv.mins.stride() for kv in caches):
        return "scales and mins have different strides"
    return None


def ring_positions(start: int, count: int, capacity: int, device: torch.device) -> torch.Tensor:
    """Physical rows of ``count`` logical residual tokens starting at ring offset ``start``."""
    return (start + torch.arange(count, device=device)) % capacity


def residual_tokens_ref(kv: QuantizedKV) -> torch.Tensor:
    """The residual tokens in logical order, ``[B, H, n_residual, D]``."""
    _, n_residual, start = read_lengths(kv)
    rows = ring_positions(start, n_residual, kv.residual.shape[-2], kv.residual.device)
    return kv.residual.index_select(-2, rows)


def dequantize_cache_ref(kv: QuantizedKV, bits: int, group_size: int, per_channel: bool) -> torch.Tensor:
    """The whole cache in float32, ``[B, H, n_quant + n_residual, D]``."""
    n_quant, _, _ = read_lengths(kv)
    code_rows = n_quant // tokens_per_code_row(per_channel, bits)
    scale_rows = n_quant // tokens_per_scale_row(per_channel, group_size)
    quantized = dequantize_packed_ref(
        kv.codes[..., :code_rows, :],
        kv.scales[..., :scale_rows, :],
        kv.mins[..., :scale_rows, :],
        bits,
        group_size,
        per_channel,
    )
    return torch.cat([quantized, residual_tokens_ref(kv).float()], dim=-2)
