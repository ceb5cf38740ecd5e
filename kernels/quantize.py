"""KIVI's asymmetric group quantizer and bit packing, in plain PyTorch (the ground truth).

A group of G elements is quantized with its own minimum and scale, computed in float32:
``mn = min``, ``scale = (max - min) / (2**b - 1)``, ``code = clamp(round((x - mn) / scale), 0, 2**b - 1)``
(round half to even), ``dequant = code * scale + mn``. Scales and minima are stored in the cache's
scale dtype (the model dtype); codes are computed against the *stored* (rounded) scale and minimum
so that dequantization is consistent with them. A constant group has ``scale == 0`` and dequantizes
to ``mn`` exactly.

Codes are packed ``P = 8 // b`` to a uint8 byte along the grouped axis, first element in the
lowest bits. Layouts for a cache of T tokens, head dim D:

- keys, per-channel (``per_channel=True``): a group is G consecutive tokens of one channel.
  codes ``[B, H, T // P, D]``, scales/mins ``[B, H, T // G, D]``.
- values, per-token (``per_channel=False``): a group is G consecutive channels of one token.
  codes ``[B, H, T, D // P]``, scales/mins ``[B, H, T, D // G]``.

In both layouts the token axis is dim -2 of every tensor, which is what the cache appends along.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def codes_per_byte(bits: int) -> int:
    return 8 // bits


def tokens_per_code_row(per_channel: bool, bits: int) -> int:
    """How many tokens one row (dim -2) of the packed codes holds."""
    return codes_per_byte(bits) if per_channel else 1


def tokens_per_scale_row(per_channel: bool, group_size: int) -> int:
    """How many tokens one row (dim -2) of the scales/mins holds."""
    return group_size if per_channel else 1


def _group_axis(per_channel: bool) -> int:
    return -2 if per_channel else -1


def quantize_ref(
    x: torch.Tensor, bits: int, group_size: int, per_channel: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., T, D]`` in groups along tokens (keys) or channels (values).

    Returns unpacked uint8 codes shaped like ``x``, and scales/mins in ``scale_dtype``.
    """
    axis = _group_axis(per_channel)
    groups = x.float().unflatten(axis, (-1, group_size))
    reduce_dim = axis  # after unflatten, the within-group index sits at `axis`
    mn = groups.amin(reduce_dim, keepdim=True).to(scale_dtype)
    mx = groups.amax(reduce_dim, keepdim=True)
    # A tensor divisor: CUDA turns division by a Python scalar into a multiplication by its
    # reciprocal, which rounds differently from the division the contract (and the CPU) does.
    levels = torch.full((), 2**bits - 1, dtype=torch.float32, device=x.device)
    scale = ((mx - mn.float()) / levels).to(scale_dtype)
    mn_f, scale_f = mn.float(), scale.float()
    safe_scale = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
    codes = torch.round((groups - mn_f) / safe_scale).clamp_(0, 2**bits - 1)
    codes = torch.where(scale_f > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.uint8).flatten(axis - 1, axis), scale.squeeze(reduce_dim), mn.squeeze(reduce_dim)


def dequantize_unpacked_ref(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int, per_channel: bool
) -> torch.Tensor:
    """``codes * scale + mn`` in float32, broadcasting each group's scale over its G elements."""
    axis = _group_axis(per_channel)
    scale = scales.float().repeat_interleave(group_size, dim=axis)
    mn = mins.float().repeat_interleave(group_size, dim=axis)
    return codes.float() * scale + mn


def pack_ref(codes: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """Pack uint8 codes ``P = 8 // bits`` to a byte along the grouped axis, first in the lowest bits."""
    per_byte = codes_per_byte(bits)
    axis = _group_axis(per_channel)
    lanes = codes.unflatten(axis, (-1, per_byte))  # lane index at `axis`
    packed = torch.zeros_like(lanes.select(axis, 0))
    for lane in range(per_byte):
        packed |= lanes.select(axis, lane) << (lane * bits)
    return packed


def unpack_ref(packed: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """Inverse of :func:`pack_ref`."""
    per_byte = codes_per_byte(bits)
    axis = _group_axis(per_channel)
    mask = 2**bits - 1
    lanes = [(packed >> (lane * bits)) & mask for lane in range(per_byte)]
    return torch.stack(lanes, dim=axis).flatten(axis - 1, axis)  # lane index right after the packed axis


def quantize_pack_ref(
    x: torch.Tensor, bits: int, group_size: int, per_channel: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and pack ``x [..., T, D]``: returns (packed codes, scales, mins) in the cache layout."""
    codes, scales, mins = quantize_ref(x, bits, group_size, per_channel, scale_dtype)
    return pack_ref(codes, bits, per_channel), scales, mins


def dequantize_packed_ref(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int, group_size: int, per_channel: bool
) -> torch.Tensor:
    """Unpack and dequantize to float32 ``[..., T, D]``."""
    return dequantize_unpacked_ref(unpack_ref(packed, bits, per_channel), scales, mins, group_size, per_channel)
