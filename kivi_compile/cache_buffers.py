"""How a KIVI cache holds its buffers: those that grow 2-D, one row per unit of quantized capacity.

Dynamo checks every inner tensor of every cache it is handed, each step. A 4-D ``[B, H, rows, cols]``
buffer whose rows grow has symbolic strides, which Dynamo checks against the other buffers' sizes:
Llama-2-7B's 64 caches of four such buffers made the decode frame's guard check 5.3x as long as a
dense cache's on an H100 host (1.16 against 0.22 ms, torch 2.11). Held as ``[units, elements of a
unit]``, where a unit is one granule (``group_size`` tokens) of quantized capacity, a buffer has one
symbolic size and fixed strides; so does the residual, held ``[capacity, B * H * D]`` (its capacity
changes only with multi-token appends).

The kernels take 4-D views of the same memory (``kernel_views``); the rewritten graph makes them
itself, from the held buffers it is given.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from kivi_compile.config import CacheSpec
from kivi_compile.kernels.cache_layout import QuantizedKV, lengths_tensor
from kivi_compile.kernels.quantize import tokens_per_code_row, tokens_per_scale_row


class HeldBuffers(NamedTuple):
    """A cache's inner tensors, as Dynamo sees them: all but the lengths ``[rows, elements of a row]``."""

    code_units: torch.Tensor  # uint8 [units, B * H * code rows of a unit * code cols]
    scale_units: torch.Tensor  # [units, B * H * scale rows of a unit * scale cols]
    min_units: torch.Tensor  # as scale_units
    residual_rows: torch.Tensor  # [residual capacity, B * H * D]
    lengths: torch.Tensor  # int64 [4], see cache_layout.py

    @property
    def growing(self) -> tuple[torch.Tensor, ...]:
        """The buffers whose rows grow with the cache (all but the lengths)."""
        return self[:-1]

    @property
    def quantized(self) -> tuple[torch.Tensor, ...]:
        """The buffers of the quantized tokens: codes, scales, minima."""
        return self.code_units, self.scale_units, self.min_units


def kernel_views(
    code_units: torch.Tensor,
    scale_units: torch.Tensor,
    min_units: torch.Tensor,
    residual_rows: torch.Tensor,
    lengths: torch.Tensor,
    heads: int,
    head_dim: int,
    bits: int,
    group_size: int,
    per_channel: bool,
) -> QuantizedKV:
    """The ``[B, H, rows, cols]`` views the kernels take (a node of the rewritten graph too, hence
    plain arguments)."""
    batch = residual_rows.shape[1] // (heads * head_dim)
    (code_rows, code_cols), (scale_rows, scale_cols) = _unit_rows(head_dim, bits, group_size, per_channel)

    def as_4d(held: torch.Tensor, rows_of_unit: int, cols: int) -> torch.Tensor:
        # Through 1-D: a direct [units, n] -> [B, H, units * rows, cols] view makes Dynamo's shape
        # reasoning guard the units to their value.
        return held.view(-1).view(batch, heads, held.shape[0] * rows_of_unit, cols)

    return QuantizedKV(
        as_4d(code_units, code_rows, code_cols),
        as_4d(scale_units, scale_rows, scale_cols),
        as_4d(min_units, scale_rows, scale_cols),
        as_4d(residual_rows, 1, head_dim),
        lengths,
    )


def _unit_rows(head_dim: int, bits: int, group_size: int, per_channel: bool) -> tuple[tuple[int, int], ...]:
    """(rows, cols) of the 4-D codes and of the 4-D scales that one unit (``group_size`` tokens) takes."""
    code_cols = head_dim if per_channel else head_dim * bits // 8
    scale_cols = head_dim if per_channel else head_dim // group_size
    return (
        (group_size // tokens_per_code_row(per_channel, bits), code_cols),
        (group_size // tokens_per_scale_row(per_channel, group_size), scale_cols),
    )


def views_of(held: HeldBuffers, spec: CacheSpec, heads: int, head_dim: int) -> QuantizedKV:
    """``kernel_views`` of a cache's held buffers."""
    return kernel_views(*held, heads, head_dim, spec.bits, spec.group_size, spec.per_channel)


def token_capacity(code_units: Any, residual_rows: Any, group_size: int) -> Any:
    """Tokens a cache's held buffers can hold (an int, or a SymInt for fake buffers)."""
    return code_units.shape[0] * group_size + residual_rows.shape[0]


def units_for(spec: CacheSpec, quant_tokens: int) -> int:
    """Units holding ``quant_tokens`` quantized tokens, at least 2 (no 0/1 specialisation)."""
    return max(2, -(-quant_tokens // spec.group_size))


def allocate_held(
    shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device | str, spec: CacheSpec, units: int,
    residual_tokens: int,
) -> HeldBuffers:  # fmt: skip
    """Zeroed buffers of a ``[B, H, *, D]`` cache of ``dtype``: ``units`` quantized units, ``residual_tokens``."""
    batch, heads, head_dim = shape
    unit = _unit_rows(head_dim, spec.bits, spec.group_size, spec.per_channel)
    (code_rows, code_cols), (scale_rows, scale_cols) = unit
    scale_elements = batch * heads * scale_rows * scale_cols
    return held_dynamic(HeldBuffers(
        code_units=torch.zeros(units, batch * heads * code_rows * code_cols, dtype=torch.uint8, device=device),
        scale_units=torch.zeros(units, scale_elements, dtype=dtype, device=device),
        min_units=torch.zeros(units, scale_elements, dtype=dtype, device=device),
        residual_rows=torch.zeros(residual_tokens, batch * heads * head_dim, dtype=dtype, device=device),
        lengths=lengths_tensor(0, 0, 0, device),
    ))  # fmt: skip


def held_dynamic(held: HeldBuffers) -> HeldBuffers:
    """``held``, its rows marked dynamic for Dynamo: growth does not recompile."""
    for rows in held.growing:
        torch._dynamo.maybe_mark_dynamic(rows, 0)
    return held
