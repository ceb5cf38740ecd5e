"""Quantize-on-append for a KIVI cache, in plain PyTorch (the ground truth).

Flush schedule (KIVI): keys flush whole R-token blocks while the key residual holds >= R tokens;
values flush the oldest ``n_residual - R`` tokens, so the value residual is a sliding window of
the last R. The flush is lazy: it runs at the start of the next append, which leaves attention
over ``quantized ++ residual`` exactly as if it had run right after the previous step.
Already-quantized tokens are never touched again.

``store_prefill_ref`` applies the same rule to a whole prompt: keys quantize the first
``T - T % R`` tokens, values the first ``max(T - R, 0)``; the rest goes to the residual.
"""

from __future__ import annotations

import torch

from .cache_layout import QuantizedKV, read_lengths, ring_positions
from .quantize import quantize_pack_ref, tokens_per_code_row, tokens_per_scale_row


def flush_count(n_residual: int, residual_length: int, per_channel: bool) -> int:
    """How many of the oldest residual tokens the schedule quantizes now."""
    if per_channel:
        return (n_residual // residual_length) * residual_length
    return max(n_residual - residual_length, 0)


def write_quantized_ref(
    kv: QuantizedKV, tokens: torch.Tensor, at: int, bits: int, group_size: int, per_channel: bool
) -> None:
    """Quantize ``tokens [B, H, m, D]`` and write them as quantized tokens ``at .. at + m``."""
    codes, scales, mins = quantize_pack_ref(tokens, bits, group_size, per_channel, kv.scales.dtype)
    code_row = at // tokens_per_code_row(per_channel, bits)
    scale_row = at // tokens_per_scale_row(per_channel, group_size)
    kv.codes[..., code_row : code_row + codes.shape[-2], :] = codes
    kv.scales[..., scale_row : scale_row + scales.shape[-2], :] = scales
    kv.mins[..., scale_row : scale_row + mins.shape[-2], :] = mins


def _check_capacity(kv: QuantizedKV, n_quant: int, n_residual: int, per_channel: bool, bits: int) -> None:
    quant_capacity = kv.codes.shape[-2] * tokens_per_code_row(per_channel, bits)
    if n_quant > quant_capacity or n_residual > kv.residual.shape[-2]:
        raise RuntimeError(
            f"KIVI cache capacity exceeded: need {n_quant} quantized / {n_residual} residual tokens, "
            f"have {quant_capacity} / {kv.residual.shape[-2]}; reserve capacity before appending"
        )


def append_ref(
    kv: QuantizedKV, new: torch.Tensor, bits: int, group_size: int, residual_length: int, per_channel: bool
) -> None:
    """Flush per the schedule, then append ``new [B, H, n, D]`` to the residual. Mutates ``kv``."""
    n_quant, n_residual, start = read_lengths(kv)
    capacity = kv.residual.shape[-2]
    flushed = flush_count(n_residual, residual_length, per_channel)
    n_new = new.shape[-2]
    _check_capacity(kv, n_quant + flushed, n_residual - flushed + n_new, per_channel, bits)
    if flushed:
        oldest = kv.residual.index_select(-2, ring_positions(start, flushed, capacity, new.device))
        write_quantized_ref(kv, oldest, n_quant, bits, group_size, per_channel)
        n_quant, n_residual, start = n_quant + flushed, n_residual - flushed, (start + flushed) % capacity
    rows = ring_positions(start + n_residual, n_new, capacity, new.device)
    kv.residual.index_copy_(-2, rows, new.to(kv.residual.dtype))
    kv.lengths.copy_(torch.tensor([n_quant, n_residual + n_new, start], dtype=kv.lengths.dtype))


def store_prefill_ref(
    kv: QuantizedKV, dense: torch.Tensor, bits: int, group_size: int, residual_length: int, per_channel: bool
) -> None:
    """Fill an empty ``kv`` with a prompt's ``dense [B, H, T, D]`` keys or values. Mutates ``kv``."""
    seq_len = dense.shape[-2]
    n_quant = flush_count(seq_len, residual_length, per_channel)
    _check_capacity(kv, n_quant, seq_len - n_quant, per_channel, bits)
    if n_quant:
        write_quantized_ref(kv, dense[..., :n_quant, :], 0, bits, group_size, per_channel)
    kv.residual[..., : seq_len - n_quant, :] = dense[..., n_quant:, :]
    kv.lengths.copy_(torch.tensor([n_quant, seq_len - n_quant, 0], dtype=kv.lengths.dtype))
