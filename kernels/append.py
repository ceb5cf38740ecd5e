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
import triton
import triton.language as tl

from .cache_layout import QuantizedKV, lengths_tensor, read_lengths, ring_positions, triton_layout_unsupported
from .launch import launch_kernel
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
    kv.lengths.copy_(lengths_tensor(n_quant, n_residual + n_new, start))


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
    kv.lengths.copy_(lengths_tensor(n_quant, seq_len - n_quant, 0))


# ---------------------------------------------------------------------------------------------
# Triton: one program per (batch row, KV head) flushes its slice and writes the new tokens; a
# layer's keys and values can share one launch (``_append_kv_kernel``: a second grid axis picks
# the cache), which halves the launches, the host time a small batch's decode step waits on.
#
# Lengths are read on the device (no host synchronisation). Every program reads them first and
# then takes a ticket (``lengths[TICKET]``); the program that draws the last ticket knows all
# others have read them and writes the new lengths, then resets the ticket to 0.
# Within a program the flush reads ring rows before the new tokens may overwrite them
# (``debug_barrier``), which matters when the ring is full.
# ---------------------------------------------------------------------------------------------

# Every program of a step's append holds registers for the largest path it may take, flush or not, and
# they set how many programs fit on a multiprocessor: 40 to 48 a thread on sm_90 (ptxas of triton 3.6, 4 warps).
KEY_FLUSH_ROWS = tl.constexpr(32)  # ring rows a thread loads back to back for a key group's min and max
NEW_TOKENS_TILE = 4  # rows of the copy of new tokens into the ring (a decode step has one)


@triton.jit
def round_half_even(x):
    """``torch.round`` for x >= -0.5: nearest integer, ties to even."""
    rounded = tl.floor(x + 0.5)
    is_tie = (rounded - x) == 0.5
    is_odd = (rounded - 2.0 * tl.floor(rounded * 0.5)) != 0.0
    return tl.where(is_tie & is_odd, rounded - 1.0, rounded)


@triton.jit
def round_to_dtype(x, dtype: tl.constexpr):
    """Float32 ``x`` rounded to ``dtype`` (to nearest, ties to even), returned as float32.

    bfloat16 is rounded with integer ops: Triton's interpreter truncates float32 -> bfloat16 casts,
    and the stored scales must equal the reference's bit for bit on CPU too.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def divide_rn(a, b):
    """``a / b`` rounded as IEEE division rounds it, for ``b`` in [2**-90, 2**70] and a quotient that is 0 or
    a normal float (what ``group_codes`` and float16 scales pass; tests/test_quantize_arithmetic.py checks
    it next to every tie). Newton steps from the hardware's approximate reciprocal: division's fast path
    without its slow-path branch, which kept ptxas from interleaving a thread's divisions."""
    r = 1.0 / b
    r = tl.fma(tl.fma(-b, r, 1.0), r, r)
    q = a * r
    q = tl.fma(tl.fma(-b, q, a), r, q)
    return tl.fma(tl.fma(-b, q, a), r, q)


@triton.jit
def group_scale(group_min, group_max, BITS: tl.constexpr, scale_dtype: tl.constexpr):
    """The stored min and scale of groups (float32, rounded to ``scale_dtype`` as the reference rounds them)."""
    levels: tl.constexpr = 2**BITS - 1
    group_min = round_to_dtype(group_min, scale_dtype)
    if scale_dtype == tl.float16:
        # A quotient too small for divide_rn (subnormal in float32) is 0 in float16 either way.
        scale = divide_rn(group_max - group_min, float(levels))
    else:
        scale = tl.math.div_rn(group_max - group_min, float(levels))
    return group_min, round_to_dtype(scale, scale_dtype)


@triton.jit
def group_codes(x, group_min, scale, BITS: tl.constexpr):
    """Codes (int32) of ``x`` against its group's stored min and scale (broadcast to ``x``)."""
    levels: tl.constexpr = 2**BITS - 1
    # Powers of two keep the divisor in divide_rn's range without changing the quotient.
    rescale = tl.where(scale < 2.0**-60, 2.0**64, tl.where(scale > 2.0**60, 2.0**-64, 1.0))
    safe_scale = tl.where(scale > 0, scale * rescale, 1.0)
    codes = round_half_even(divide_rn((x - group_min) * rescale, safe_scale))
    codes = tl.minimum(tl.maximum(codes, 0.0), float(levels))
    return tl.where(scale > 0, codes, 0.0).to(tl.int32)


@triton.jit
def quantize_groups(x, AXIS: tl.constexpr, BITS: tl.constexpr, scale_dtype: tl.constexpr):
    """Codes (int32, same shape as ``x``), scale and min (``scale_dtype``) of groups along ``AXIS``.

    Mirrors ``quantize_ref`` operation by operation (divisions rounded as IEEE division rounds them,
    stored-dtype rounding of the min and scale before the codes are computed) so that codes match it exactly.
    """
    group_min, scale = group_scale(tl.min(x, axis=AXIS), tl.max(x, axis=AXIS), BITS, scale_dtype)
    codes = group_codes(x, tl.expand_dims(group_min, AXIS), tl.expand_dims(scale, AXIS), BITS)
    return codes, scale.to(scale_dtype), group_min.to(scale_dtype)


@triton.jit
def pack_lanes(codes, BITS: tl.constexpr):
    """Pack ``codes [..., P]`` (lane axis last, P = 8 // BITS) into bytes, lane 0 lowest."""
    lanes: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, lanes) * BITS
    return tl.sum(codes << shifts, axis=len(codes.shape) - 1).to(tl.uint8)


@triton.jit
def ring_row(row, capacity):
    """``row % capacity`` for ``row < 2 * capacity``."""
    return tl.where(row >= capacity, row - capacity, row)


@triton.jit
def _flush_keys(
    residual_ptr, codes_ptr, scales_ptr, mins_ptr,
    stride_rt, stride_rd, stride_ct, stride_cd, stride_st, stride_sd,
    n_quant, start, capacity, n_flush,
    BITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Quantize ``n_flush`` (a multiple of G) ring tokens per channel, G tokens per group.

    Each thread holds whole channels and walks the group's tokens one row at a time (a row's load is
    coalesced across threads): the min, max and byte packing along tokens stay in its registers, with no
    exchange between threads. Tiles of tokens x channels had ptxas spend 6 barriers and ~370 instructions
    on 4 elements a thread, 66 us a layer at B = 8 on the H100.
    """
    lanes: tl.constexpr = 8 // BITS
    tl.static_assert(GROUP % lanes == 0)
    rows_at_once: tl.constexpr = KEY_FLUSH_ROWS if KEY_FLUSH_ROWS < GROUP else GROUP
    channels = tl.arange(0, HEAD_DIM)
    residual_ptrs = residual_ptr + channels * stride_rd
    for group in range(0, n_flush // GROUP):
        first_row = (start + group * GROUP) % capacity
        group_min = tl.full([HEAD_DIM], float("inf"), tl.float32)
        group_max = tl.full([HEAD_DIM], float("-inf"), tl.float32)
        for chunk in range(0, GROUP, rows_at_once):
            for token in tl.static_range(rows_at_once):
                x = tl.load(residual_ptrs + ring_row(first_row + chunk + token, capacity) * stride_rt).to(tl.float32)
                group_min = tl.minimum(group_min, x)
                group_max = tl.maximum(group_max, x)
        group_min, scale = group_scale(group_min, group_max, BITS, scales_ptr.dtype.element_ty)
        code_row = (n_quant + group * GROUP) // lanes
        for byte in range(GROUP // lanes):
            packed = tl.zeros([HEAD_DIM], tl.int32)
            for lane in tl.static_range(lanes):
                row = ring_row(first_row + byte * lanes + lane, capacity)
                x = tl.load(residual_ptrs + row * stride_rt).to(tl.float32)
                packed |= group_codes(x, group_min, scale, BITS) << (lane * BITS)
            tl.store(codes_ptr + (code_row + byte) * stride_ct + channels * stride_cd, packed.to(tl.uint8))
        scale_row = (n_quant + group * GROUP) // GROUP
        tl.store(scales_ptr + scale_row * stride_st + channels * stride_sd, scale.to(scales_ptr.dtype.element_ty))
        tl.store(mins_ptr + scale_row * stride_st + channels * stride_sd, group_min.to(mins_ptr.dtype.element_ty))


@triton.jit
def _flush_values(
    residual_ptr, codes_ptr, scales_ptr, mins_ptr,
    stride_rt, stride_rd, stride_ct, stride_cd, stride_st, stride_sd,
    n_quant, start, capacity, n_flush,
    BITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Quantize ``n_flush`` ring tokens per token, G channels per group, one token at a time: a decode
    step flushes one token, and a tile of several quantizes masked-out rows for nothing (16-row tiles
    made one step's appends at B = 384 take 9.76 ms for 32 layers on the H100, against 5.31)."""
    lanes: tl.constexpr = 8 // BITS
    n_groups: tl.constexpr = HEAD_DIM // GROUP
    tl.static_assert(HEAD_DIM % GROUP == 0)
    group_ids = tl.arange(0, n_groups)
    channels = group_ids[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    byte_cols = tl.arange(0, HEAD_DIM // lanes)
    for token in range(0, n_flush):
        x = tl.load(residual_ptr + ((start + token) % capacity) * stride_rt + channels * stride_rd).to(tl.float32)
        codes, scale, group_min = quantize_groups(x, 1, BITS, scales_ptr.dtype.element_ty)
        out_row = n_quant + token
        tl.store(codes_ptr + out_row * stride_ct + byte_cols * stride_cd,
                 pack_lanes(tl.reshape(codes, (HEAD_DIM // lanes, lanes)), BITS))  # fmt: skip
        tl.store(scales_ptr + out_row * stride_st + group_ids * stride_sd, scale)
        tl.store(mins_ptr + out_row * stride_st + group_ids * stride_sd, group_min)


@triton.jit
def _append_one(
    pid, new_ptr, residual_ptr, codes_ptr, scales_ptr, mins_ptr, lengths_ptr,
    stride_nb, stride_nh, stride_nt, stride_nd,
    stride_rb, stride_rh, stride_rt, stride_rd,
    stride_cb, stride_ch, stride_ct, stride_cd,
    stride_sb, stride_sh, stride_st, stride_sd,
    heads, capacity, n_new,
    BITS: tl.constexpr, GROUP: tl.constexpr, RESIDUAL: tl.constexpr, PER_CHANNEL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Program ``pid`` (one batch row and head, of ``tl.num_programs(0)``) of one cache's append."""
    batch, head = (pid // heads).to(tl.int64), pid % heads  # whole-cache offsets can pass 2**31 elements
    # int64 on the device; token indices within one head's buffers fit 32 bits, in half the registers.
    n_quant = tl.load(lengths_ptr + 0).to(tl.int32)
    n_residual = tl.load(lengths_ptr + 1).to(tl.int32)
    start = tl.load(lengths_ptr + 2).to(tl.int32)
    # One thread takes the ticket: the barrier puts every warp's reads of the lengths before it.
    tl.debug_barrier()
    ticket = tl.atomic_add(lengths_ptr + 3, 1, sem="acq_rel")

    residual_ptr += batch * stride_rb + head * stride_rh
    codes_ptr += batch * stride_cb + head * stride_ch
    scales_ptr += batch * stride_sb + head * stride_sh
    mins_ptr += batch * stride_sb + head * stride_sh
    if PER_CHANNEL:
        n_flush = (n_residual // RESIDUAL) * RESIDUAL
        _flush_keys(residual_ptr, codes_ptr, scales_ptr, mins_ptr,
                    stride_rt, stride_rd, stride_ct, stride_cd, stride_st, stride_sd,
                    n_quant, start, capacity, n_flush, BITS, GROUP, HEAD_DIM)  # fmt: skip
    else:
        n_flush = tl.maximum(n_residual - RESIDUAL, 0)
        _flush_values(residual_ptr, codes_ptr, scales_ptr, mins_ptr,
                      stride_rt, stride_rd, stride_ct, stride_cd, stride_st, stride_sd,
                      n_quant, start, capacity, n_flush, BITS, GROUP, HEAD_DIM)  # fmt: skip
    tl.debug_barrier()

    channels = tl.arange(0, HEAD_DIM)
    new_ptr += batch * stride_nb + head * stride_nh
    for first in range(0, n_new, BLOCK_T):
        tokens = first + tl.arange(0, BLOCK_T)
        valid = tokens < n_new
        x = tl.load(new_ptr + tokens[:, None] * stride_nt + channels[None, :] * stride_nd, mask=valid[:, None])
        rows = (start + n_residual + tokens) % capacity
        tl.store(residual_ptr + rows[:, None] * stride_rt + channels[None, :] * stride_rd,
                 x.to(residual_ptr.dtype.element_ty), mask=valid[:, None])  # fmt: skip

    if ticket == tl.num_programs(0) - 1:
        tl.store(lengths_ptr + 0, n_quant + n_flush)
        tl.store(lengths_ptr + 1, n_residual - n_flush + n_new)
        tl.store(lengths_ptr + 2, (start + n_flush) % capacity)
        tl.store(lengths_ptr + 3, 0)


@triton.jit
def _append_kernel(
    new_ptr, residual_ptr, codes_ptr, scales_ptr, mins_ptr, lengths_ptr,
    stride_nb, stride_nh, stride_nt, stride_nd,
    stride_rb, stride_rh, stride_rt, stride_rd,
    stride_cb, stride_ch, stride_ct, stride_cd,
    stride_sb, stride_sh, stride_st, stride_sd,
    heads, capacity, n_new,
    BITS: tl.constexpr, GROUP: tl.constexpr, RESIDUAL: tl.constexpr, PER_CHANNEL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    _append_one(tl.program_id(0), new_ptr, residual_ptr, codes_ptr, scales_ptr, mins_ptr, lengths_ptr,
                stride_nb, stride_nh, stride_nt, stride_nd, stride_rb, stride_rh, stride_rt, stride_rd,
                stride_cb, stride_ch, stride_ct, stride_cd, stride_sb, stride_sh, stride_st, stride_sd,
                heads, capacity, n_new, BITS, GROUP, RESIDUAL, PER_CHANNEL, HEAD_DIM, BLOCK_T)  # fmt: skip


@triton.jit
def _append_kv_kernel(
    k_new_ptr, k_residual_ptr, k_codes_ptr, k_scales_ptr, k_mins_ptr, k_lengths_ptr,
    k_stride_nb, k_stride_nh, k_stride_nt, k_stride_nd,
    k_stride_rb, k_stride_rh, k_stride_rt, k_stride_rd,
    k_stride_cb, k_stride_ch, k_stride_ct, k_stride_cd,
    k_stride_sb, k_stride_sh, k_stride_st, k_stride_sd,
    v_new_ptr, v_residual_ptr, v_codes_ptr, v_scales_ptr, v_mins_ptr, v_lengths_ptr,
    v_stride_nb, v_stride_nh, v_stride_nt, v_stride_nd,
    v_stride_rb, v_stride_rh, v_stride_rt, v_stride_rd,
    v_stride_cb, v_stride_ch, v_stride_ct, v_stride_cd,
    v_stride_sb, v_stride_sh, v_stride_st, v_stride_sd,
    heads, k_capacity, v_capacity, n_new,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, GROUP: tl.constexpr, RESIDUAL: tl.constexpr,
    K_PER_CHANNEL: tl.constexpr, K_HEAD_DIM: tl.constexpr, V_HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Both appends of a layer in one launch (grid ``(B * H, 2)``: keys, then values), half the launches."""
    if tl.program_id(1) == 0:
        _append_one(tl.program_id(0), k_new_ptr, k_residual_ptr, k_codes_ptr, k_scales_ptr, k_mins_ptr, k_lengths_ptr,
                    k_stride_nb, k_stride_nh, k_stride_nt, k_stride_nd, k_stride_rb, k_stride_rh, k_stride_rt,
                    k_stride_rd, k_stride_cb, k_stride_ch, k_stride_ct, k_stride_cd, k_stride_sb, k_stride_sh,
                    k_stride_st, k_stride_sd, heads, k_capacity, n_new,
                    K_BITS, GROUP, RESIDUAL, K_PER_CHANNEL, K_HEAD_DIM, BLOCK_T)  # fmt: skip
    else:
        _append_one(tl.program_id(0), v_new_ptr, v_residual_ptr, v_codes_ptr, v_scales_ptr, v_mins_ptr, v_lengths_ptr,
                    v_stride_nb, v_stride_nh, v_stride_nt, v_stride_nd, v_stride_rb, v_stride_rh, v_stride_rt,
                    v_stride_rd, v_stride_cb, v_stride_ch, v_stride_ct, v_stride_cd, v_stride_sb, v_stride_sh,
                    v_stride_st, v_stride_sd, heads, v_capacity, n_new,
                    V_BITS, GROUP, RESIDUAL, False, V_HEAD_DIM, BLOCK_T)  # fmt: skip


def triton_append_unsupported(kv: QuantizedKV, new: torch.Tensor, group_size: int) -> str | None:
    """Why the Triton append cannot take these inputs (None when it can)."""
    return triton_layout_unsupported(new.shape[-1], group_size, kv)


def append_triton(
    kv: QuantizedKV, new: torch.Tensor, bits: int, group_size: int, residual_length: int, per_channel: bool
) -> None:
    """Triton :func:`append_ref`: same flush and append, lengths updated on the device.

    The caller reserves capacity first (``KiviCacheTensor.appended`` does): checking it here
    would need the lengths on the host, a synchronisation per layer and step.
    """
    reason = triton_append_unsupported(kv, new, group_size)
    if reason is not None:
        raise ValueError(f"Triton KIVI append: {reason}")
    launch_append(kv, new, bits, group_size, residual_length, per_channel)


def launch_append(
    kv: QuantizedKV, new: torch.Tensor, bits: int, group_size: int, residual_length: int, per_channel: bool
) -> None:
    """:func:`append_triton` for inputs :func:`triton_append_unsupported` already accepted (the op
    checks them once)."""
    batch, heads, n_new, head_dim = new.shape
    launch_kernel(
        _append_kernel, (batch * heads,),
        new, kv.residual, kv.codes, kv.scales, kv.mins, kv.lengths,
        *new.stride(), *kv.residual.stride(), *kv.codes.stride(), *kv.scales.stride(),
        heads, kv.residual.shape[-2], n_new,
        BITS=bits, GROUP=group_size, RESIDUAL=residual_length, PER_CHANNEL=per_channel,
        HEAD_DIM=head_dim, BLOCK_T=NEW_TOKENS_TILE,
    )  # fmt: skip


def append_kv_ref(
    key: QuantizedKV,
    value: QuantizedKV,
    new_key: torch.Tensor,
    new_value: torch.Tensor,
    key_bits: int,
    value_bits: int,
    group_size: int,
    residual_length: int,
    key_per_channel: bool,
) -> None:
    """:func:`append_ref` of a layer's keys and values (values are grouped per token)."""
    append_ref(key, new_key, key_bits, group_size, residual_length, key_per_channel)
    append_ref(value, new_value, value_bits, group_size, residual_length, per_channel=False)


def launch_append_kv(
    key: QuantizedKV,
    value: QuantizedKV,
    new_key: torch.Tensor,
    new_value: torch.Tensor,
    key_bits: int,
    value_bits: int,
    group_size: int,
    residual_length: int,
    key_per_channel: bool,
) -> None:
    """Triton :func:`append_kv_ref` in one launch, for inputs :func:`triton_append_unsupported`
    already accepted on both sides (the op checks them)."""
    batch, heads, n_new, _ = new_key.shape
    launch_kernel(
        _append_kv_kernel, (batch * heads, 2),
        new_key, key.residual, key.codes, key.scales, key.mins, key.lengths,
        *new_key.stride(), *key.residual.stride(), *key.codes.stride(), *key.scales.stride(),
        new_value, value.residual, value.codes, value.scales, value.mins, value.lengths,
        *new_value.stride(), *value.residual.stride(), *value.codes.stride(), *value.scales.stride(),
        heads, key.residual.shape[-2], value.residual.shape[-2], n_new,
        K_BITS=key_bits, V_BITS=value_bits, GROUP=group_size, RESIDUAL=residual_length,
        K_PER_CHANNEL=key_per_channel, K_HEAD_DIM=new_key.shape[-1], V_HEAD_DIM=new_value.shape[-1],
        BLOCK_T=NEW_TOKENS_TILE,
    )  # fmt: skip
