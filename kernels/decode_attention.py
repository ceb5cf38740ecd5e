"""Attention of new queries over a KIVI cache: the PyTorch reference and the fused Triton kernel.

``q [B, Hq, n, D]`` attends over the logical keys/values ``dequant(quantized) ++ residual``
(``[B, Hkv, T, D]``), with ``Hq = g * Hkv``: query head ``h`` reads KV head ``h // g`` (the
``repeat_kv`` / ``repeat_interleave`` convention), without materialising repeated K/V.
``attn_mask`` follows ``F.scaled_dot_product_attention``: boolean (True = attend) or additive,
broadcastable to ``[B, Hq, n, T]``; ``is_causal`` uses SDPA's top-left alignment. Scores, softmax
and the value product run in float32; the output has the query's dtype.

The Triton kernel is flash-decoding over the packed cache: grid ``(B * Hkv, S)``. Program
``(b * Hkv + h, s)`` holds the ``g * n`` query rows of KV head ``h`` (so each KV head is read once
for its whole query group, GQA and MQA included) and runs an online softmax over the ``s``-th
chunk of the sequence, dequantizing codes in registers; blocks quantized on both sides, blocks
whose keys are quantized and values still in the ring, the other mixed blocks and the residual-ring
blocks each get their own loop, so the common blocks carry no masks.
A second kernel combines the ``S`` partial results; with ``S = 1`` (batches that fill the GPU on
their own, short sequences) the first one normalizes and stores the output itself, one launch
instead of two. Lengths are read on the device; ``S`` and the chunk are chosen from the buffers'
capacity so nothing waits for the host. The tile and ``S`` are tuned twice per shape: for launches
from the host, whose time a small batch waits on, and for launches recorded into a CUDA graph (a
decode step replayed by ``generate``), which may split the sequence finer since replays cost the
host nothing.

For the common large decode step (float16, head_dim 128, 2- or 4-bit, G = 32, one token) the
blocks quantized on both sides run instead on a Gluon kernel (``decode_attention_mma.py``; 2.8x
faster at 2 bits and 3.5x at 4 bits, B = 8, T = 32k on the H100), and this kernel only adds the
rest of each sequence and combines it with the Gluon kernel's partials: two launches in all. On sm_90
the tail starts while the Gluon kernel's last programs run (programmatic dependent launch) and waits for
that kernel only before it reads the partials. With one
query row per KV head (multi-head attention) that tail may take ``ONE_ROW_TILE``: no tensor-core tile
padded from one row to 16, but a running softmax per token slot of a block on the CUDA cores, folded once
at the end (:func:`_attend_slots`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from .cache_layout import QuantizedKV, dequantize_cache_ref, triton_layout_unsupported
from .launch import REGISTERS_PER_MULTIPROCESSOR, launch_kernel
from .quantize import codes_per_byte

try:
    from . import decode_attention_mma as mma_blocks
except (ImportError, AttributeError):  # a Triton whose Gluon lacks what it uses (written for 3.6)
    mma_blocks = None

logger = logging.getLogger("kivi_compile.kernels")


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
        attn_mask = attn_mask[..., :seq_len]  # a step's mask buffer may be wider than the cache
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
    key_per_channel: bool = True,
) -> torch.Tensor:
    """``softmax(scale * q Kᵀ + mask) V`` over the dequantized cache ++ residual.

    Keys are grouped per channel (KIVI) unless ``key_per_channel`` is False (the paper's ablation).
    """
    keys = dequantize_cache_ref(key, key_bits, group_size, per_channel=key_per_channel)
    values = dequantize_cache_ref(value, value_bits, group_size, per_channel=False)
    return attention_over_dense_ref(q, keys, values, attn_mask, scale, is_causal)


# ---------------------------------------------------------------------------------------------
# Triton
#
# Blocks quantized on both sides are read compactly: the packed bytes once, each key scale row once
# (when a block lies inside one key group), each value scale once per byte column, and the next
# block's loads are issued before the current block is used. Their codes are split into lanes in
# registers and left lane-major: a block's tokens and the value channels are permuted
# (``_block_token_order``, ``_value_channel_order``) instead of interleaving the lanes back, and the
# output is stored in channel order. Codes become floats without an int-to-float conversion
# (``_unpack``) and are dequantized with one multiply-add in the cache dtype, the operand type of the
# tensor-core dots. Boundary blocks (one side quantized, or the residual ring) take the general
# per-element path for keys (``_dequantize_keys``) and the same lane-major loads for values.
# ---------------------------------------------------------------------------------------------

LOG2E = tl.constexpr(1.4426950408889634)  # scores are in log2 units: exp2 in the kernels
MAX_QUERY_ROWS = 64  # g * n rows of one KV head held by a program; more falls back to the reference
GRANULE = 64  # tokens; the sequence is split between programs in whole granules (a multiple of BLOCK_N)
# Launched from the host, a split of fewer than 512 tokens saves less GPU time than the combine costs,
# and the combine is one more launch: host time, which is what a small batch's decode step waits on.
# Replayed from a CUDA graph, a launch costs the host nothing: splits may be as short as one granule.
MIN_GRANULES_PER_SPLIT = 8
MIN_GRANULES_PER_REPLAYED_SPLIT = 1
# Programs wanted per multiprocessor when the sequence is split (4 beat 2 on the H200: B=8, T=32k,
# 2-bit, 1.27 vs 1.39 ms); more programs keep more loads in flight. A tile whose register cap lets
# more programs share a multiprocessor is also tried split for all of them (:func:`_plans`).
PROGRAMS_PER_MULTIPROCESSOR = 4
# The most programs per multiprocessor a plan splits for (more fit only under a lower register cap).
MOST_PROGRAMS_PER_MULTIPROCESSOR = 8
# The Gluon kernel takes the quantized blocks only when there are at least this many (tokens the buffers
# can hold quantized x KV heads x batch): below it the step is bound by the host's launch time, which the
# Gluon path's two launches (with the tail's combine) add to. H100, fifteenth session, both paths of the op
# in one process (do_bench ms, GPU alone ms): B = 8, T = 1k (229k): 0.0637 against 0.0607, 0.0275 against
# 0.0543; B = 1, T = 4k (127k): 0.0688 against 0.0499, 0.0316 against 0.0405.
MMA_MIN_TOKEN_HEADS = 1 << 17
# Plans whose result differs from the median of the tiles' results by more than this are not used
# (:func:`_agreeing_plans`).
TILE_DISAGREEMENT = 1e-2


def _interpreting() -> bool:
    """Triton's CPU interpreter runs the kernels (the CPU machines' tests): one tile each, nothing to time."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    """Tile shapes with a register cap: uncapped, the compiler takes all 255 registers a thread and
    only 8 warps fit on a multiprocessor, too few to hide the loads' latency. One on the interpreter."""
    if _interpreting():
        return [triton.Config({"BLOCK_N": 16}, num_warps=4)]
    # None spills in the main loop. Compiled for the H200 (Triton 3.6), three tiles gave wrong results
    # that the interpreter does not give: (32, 4, 96) at head_dim 32 in the loop over mixed blocks
    # (relative error 0.07-0.89; the same tile capped at 128 was right), and at all five shapes of
    # the real-size test (16, 4, 96) and (16, 2, 128) (0.02-0.10 and 0.03-0.64). (64, 8, 128) was never
    # the fastest in the 14 cases (7 shapes, fp16 and bf16) of an A/B on the H200; it is the third
    # opinion that lets the cross-check (:func:`_agreeing_plans`) tell which of two tiles is wrong.
    shapes = ((32, 4, 128), (32, 2, 168), (64, 8, 128))
    # Two pipeline stages won no shape on the H100 (tried at 16-64 tokens, 4-8 warps).
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=1, maxnreg=r) for n, w, r in shapes]


# The tail's tile for one query row per KV head (a decode step of multi-head attention): ``BLOCK_M = 1``
# takes :func:`_attend_slots` instead of tensor-core products padded to 16 rows. H100, twenty-second
# session, tail alone at B = 512, T = 311 to 400, 2-bit: 0.37-0.42 ms against 0.46-0.47 for (32, 2, 168),
# 0.42 against 0.59 with HF's all-True boolean mask; at 4 bits (B = 192) 4% slower, so it is a candidate
# of the tuner, not the rule. 32 tokens spilled 88-190 bytes, a 128-register cap 50-120.
ONE_ROW_TILE = triton.Config({"BLOCK_N": 16, "BLOCK_M": 1}, num_warps=2, num_stages=1, maxnreg=168)


@triton.jit
def _unpack(packed, shift, BITS: tl.constexpr, DTYPE: tl.constexpr):
    """Codes ``(packed >> shift) & (2**BITS - 1)`` of uint8 tensors, as exact ``DTYPE``.

    No int-to-float conversion (a quarter-rate instruction on Hopper): OR-ing a small integer into
    the mantissa of ``2**k`` gives the float ``2**k + code``; subtracting ``2**k`` leaves ``code``.
    """
    codes = (packed.to(tl.int16) >> shift) & (2**BITS - 1)
    if DTYPE == tl.float16:
        return (codes | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    elif DTYPE == tl.bfloat16 and BITS < 8:
        return (codes | 0x4300).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        return ((codes.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0).to(DTYPE)


@triton.jit
def _dequantize_lanes(packed, scale, offset, BITS: tl.constexpr):
    """``codes * scale + offset`` of each lane of ``packed [X, Y]`` (scale and offset broadcast to
    ``[X, Y]``), as ``[X, Y, P]`` with lane ``i`` (bits ``i * BITS`` and up) at ``[:, :, i]``.
    Scaling each lane before joining keeps the scales in the codes' layout. ``tl.join`` stacks on a
    new last axis, so ``join(join(l0, l2), join(l1, l3))`` holds lane ``2 * a + b`` at ``[.., a, b]``."""
    dtype: tl.constexpr = scale.dtype
    if BITS == 8:
        return tl.expand_dims(_unpack(packed, 0, BITS, dtype) * scale + offset, 2)
    elif BITS == 4:
        return tl.join(_unpack(packed, 0, BITS, dtype) * scale + offset,
                       _unpack(packed, 4, BITS, dtype) * scale + offset)  # fmt: skip
    else:
        pairs = tl.join(tl.join(_unpack(packed, 0, BITS, dtype) * scale + offset,
                                _unpack(packed, 4, BITS, dtype) * scale + offset),
                        tl.join(_unpack(packed, 2, BITS, dtype) * scale + offset,
                                _unpack(packed, 6, BITS, dtype) * scale + offset))  # fmt: skip
        return tl.reshape(pairs, (packed.shape[0], packed.shape[1], 4))


@triton.jit
def _block_token_order(BLOCK_N: tl.constexpr, KEY_LANES: tl.constexpr):
    """Token (from the block's start) at each row of a both-quantized block: lane-major,
    ``row = lane * (BLOCK_N / Pk) + byte row``, the order the key lanes come out in."""
    rows = tl.arange(0, BLOCK_N)
    return (rows % (BLOCK_N // KEY_LANES)) * KEY_LANES + rows // (BLOCK_N // KEY_LANES)


@triton.jit
def _value_channel_order(HEAD_DIM: tl.constexpr, VALUE_LANES: tl.constexpr, LANE_MAJOR: tl.constexpr):
    """Value channel at each column of a value tile and of the accumulator: lane-major,
    ``column = lane * (D / Pv) + byte``, the order the value lanes come out in, or the channels' own."""
    columns = tl.arange(0, HEAD_DIM)
    if not LANE_MAJOR:
        return columns
    return (columns % (HEAD_DIM // VALUE_LANES)) * VALUE_LANES + columns // (HEAD_DIM // VALUE_LANES)


@triton.jit
def _load_quantized_keys(kc_ptr, ks_ptr, km_ptr, stride_kct, stride_kcd, stride_kst, stride_ksd, block_start, present,
                         channels, K_BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Raw loads of one block of quantized keys (nothing when ``present`` is False): bytes
    ``[BLOCK_N / Pk, D]`` with their scales/mins (``[D]``, or per byte row when the block spans key groups)."""
    key_lanes: tl.constexpr = 8 // K_BITS
    present = tl.full([1, 1], 1, tl.int1) & present  # a tensor also where ``present`` is a Python bool
    key_rows = tl.arange(0, BLOCK_N // key_lanes)
    key_codes = tl.load(kc_ptr + (block_start // key_lanes + key_rows)[:, None] * stride_kct
                        + channels[None, :] * stride_kcd, mask=present, other=0)  # fmt: skip
    if BLOCK_N <= GROUP_SIZE:
        key_offsets = ((block_start // GROUP_SIZE) * stride_kst + channels * stride_ksd)[None, :]
    else:  # byte row r holds tokens r * Pk .. r * Pk + Pk - 1, all in group r // (G / Pk)
        key_groups = block_start // GROUP_SIZE + key_rows // (GROUP_SIZE // key_lanes)
        key_offsets = key_groups[:, None] * stride_kst + channels[None, :] * stride_ksd
    key_scale = tl.load(ks_ptr + key_offsets, mask=present, other=0.0)
    return key_codes, key_scale, tl.load(km_ptr + key_offsets, mask=present, other=0.0)


@triton.jit
def _load_quantized_block(
    kc_ptr, ks_ptr, km_ptr, stride_kct, stride_kcd, stride_kst, stride_ksd,
    vc_ptr, vs_ptr, vm_ptr, stride_vct, stride_vcd, stride_vst, stride_vsd,
    block_start, present, channels, block_order,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Raw loads of one block quantized on both sides (nothing when ``present`` is False):
    :func:`_load_quantized_keys`, and value bytes ``[BLOCK_N, D / Pv]`` (rows in ``block_order``, the
    kernel's :func:`_block_token_order`) with a scale/min per byte."""
    key_codes, key_scale, key_min = _load_quantized_keys(kc_ptr, ks_ptr, km_ptr, stride_kct, stride_kcd, stride_kst,
                                                         stride_ksd, block_start, present, channels,
                                                         K_BITS, GROUP_SIZE, BLOCK_N)  # fmt: skip
    present = tl.full([1, 1], 1, tl.int1) & present
    value_codes, value_scale, value_min = _load_values(vc_ptr, vs_ptr, vm_ptr, stride_vct, stride_vcd, stride_vst,
                                                       stride_vsd, block_start + block_order, present,
                                                       V_BITS, GROUP_SIZE, HEAD_DIM)  # fmt: skip
    return key_codes, key_scale, key_min, value_codes, value_scale, value_min


@triton.jit
def _load_values(codes_ptr, scales_ptr, mins_ptr, stride_ct, stride_cd, stride_st, stride_sd, tokens, valid,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """Packed value bytes ``[tokens, D / P]`` and a scale/min per byte (``valid`` broadcasts to them)."""
    lanes: tl.constexpr = 8 // BITS
    byte_columns = tl.arange(0, HEAD_DIM // lanes)
    codes = tl.load(codes_ptr + tokens[:, None] * stride_ct + byte_columns[None, :] * stride_cd, mask=valid, other=0)
    offsets = tokens[:, None] * stride_st + (byte_columns // (GROUP_SIZE // lanes))[None, :] * stride_sd
    scale = tl.load(scales_ptr + offsets, mask=valid, other=0.0)
    return codes, scale, tl.load(mins_ptr + offsets, mask=valid, other=0.0)


@triton.jit
def _dequantize_values(codes, scale, offset, BITS: tl.constexpr, HEAD_DIM: tl.constexpr, LANE_MAJOR: tl.constexpr):
    """Values ``[tokens, D]`` from :func:`_load_values`' tiles, columns in :func:`_value_channel_order`."""
    values = _dequantize_lanes(codes, scale, offset, BITS)  # [tokens, D / P, P]
    if LANE_MAJOR:
        values = tl.permute(values, (0, 2, 1))
    return tl.reshape(values, (codes.shape[0], HEAD_DIM))


@triton.jit
def _block_keys(key_codes, key_scale, key_min, K_BITS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Keys ``[BLOCK_N, D]`` in the cache dtype from :func:`_load_quantized_keys`' tiles, tokens in
    :func:`_block_token_order` (each lane's codes stay together: no registers shuffled to interleave them)."""
    keys = _dequantize_lanes(key_codes, key_scale, key_min, K_BITS)  # [BLOCK_N / Pk, D, Pk]
    return tl.reshape(tl.permute(keys, (2, 0, 1)), (BLOCK_N, HEAD_DIM))


@triton.jit
def _dequantize_block(key_codes, key_scale, key_min, value_codes, value_scale, value_min,
                      K_BITS: tl.constexpr, V_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr, LANE_MAJOR: tl.constexpr):  # fmt: skip
    """Keys and values ``[BLOCK_N, D]`` from :func:`_load_quantized_block`'s tiles: :func:`_block_keys`,
    and values with channels in :func:`_value_channel_order`."""
    return (_block_keys(key_codes, key_scale, key_min, K_BITS, BLOCK_N, HEAD_DIM),
            _dequantize_values(value_codes, value_scale, value_min, V_BITS, HEAD_DIM, LANE_MAJOR))  # fmt: skip


@triton.jit
def _dequantize_keys(codes_ptr, scales_ptr, mins_ptr, stride_ct, stride_cd, stride_st, stride_sd,
                     tokens, channels, valid, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr):  # fmt: skip
    """Per-channel keys ``[tokens, D]`` in the cache dtype; ``tokens`` count from the pointers' rows."""
    lanes: tl.constexpr = 8 // BITS
    packed = tl.load(codes_ptr + (tokens // lanes)[:, None] * stride_ct + channels[None, :] * stride_cd,
                     mask=valid[:, None], other=0)  # fmt: skip
    group_offsets = (tokens // GROUP_SIZE)[:, None] * stride_st + channels[None, :] * stride_sd
    scale = tl.load(scales_ptr + group_offsets, mask=valid[:, None], other=0.0)
    group_min = tl.load(mins_ptr + group_offsets, mask=valid[:, None], other=0.0)
    shift = ((tokens % lanes) * BITS).to(tl.int16)
    return tl.fma(_unpack(packed, shift[:, None], BITS, scale.dtype), scale, group_min)


@triton.jit
def _ring_row(tokens, first_residual, start, capacity):
    """The ring row of each residual token. ``start < capacity`` and a valid token is less than
    ``capacity`` past ``first_residual``, so the ring wraps at most once: a compare and a subtract
    instead of an integer remainder per row (most of a residual block's address arithmetic)."""
    rows = start + tokens - first_residual
    return tl.where(rows >= capacity, rows - capacity, rows)


@triton.jit
def _ring_rows(residual_ptr, stride_t, stride_d, tokens, first_residual, start, capacity, channels, valid):
    """Residual tokens ``[tokens, D]`` (logical positions ``tokens``) from the ring buffer."""
    rows = _ring_row(tokens, first_residual, start, capacity)
    offsets = rows[:, None] * stride_t + channels[None, :] * stride_d
    return tl.load(residual_ptr + offsets, mask=valid[:, None], other=0.0)


@triton.jit
def _value_ring_rows(residual_ptr, stride_t, stride_d, tokens, first_residual, start, capacity, valid,
                     LANES: tl.constexpr, HEAD_DIM: tl.constexpr, LANE_MAJOR: tl.constexpr):  # fmt: skip
    """:func:`_ring_rows` of all channels, columns in :func:`_value_channel_order`. Lane-major, they are
    loaded as ``[tokens, D / P, P]`` (adjacent channels last, so the loads stay vectorized) and permuted in
    registers; the compiler then gives each thread a row of its own, a quarter of each sector used (Nsight
    Compute, H100, eleventh session)."""
    if not LANE_MAJOR:
        return _ring_rows(residual_ptr, stride_t, stride_d, tokens, first_residual, start, capacity,
                          tl.arange(0, HEAD_DIM), valid)  # fmt: skip
    rows = _ring_row(tokens, first_residual, start, capacity)
    channels = tl.arange(0, HEAD_DIM // LANES)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    offsets = rows[:, None, None] * stride_t + channels[None, :, :] * stride_d
    x = tl.load(residual_ptr + offsets, mask=valid[:, None, None], other=0.0)
    return tl.reshape(tl.permute(x, (0, 2, 1)), (tokens.shape[0], HEAD_DIM))


@triton.jit
def _attend(q, keys, values, tokens, valid, acc, row_max, row_sum, qk_scale,
            mask_ptrs, stride_mt, row_valid, q_pos,
            MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One online-softmax step over a block of keys/values (rows of ``q`` x tokens)."""
    if q.shape[0] == 1:
        return _attend_slots(q, keys, values, tokens, valid, acc, row_max, row_sum, qk_scale, mask_ptrs, stride_mt,
                             q_pos, MASK_KIND, IS_CAUSAL)  # fmt: skip
    scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * qk_scale
    if MASK_KIND == 1:  # boolean, True = attend
        keep = tl.load(mask_ptrs + tokens[None, :] * stride_mt, mask=row_valid[:, None] & valid[None, :], other=0)
        scores = tl.where(keep != 0, scores, float("-inf"))
    if MASK_KIND == 2:  # additive
        bias = tl.load(mask_ptrs + tokens[None, :] * stride_mt, mask=row_valid[:, None] & valid[None, :], other=0.0)
        scores += bias.to(tl.float32) * LOG2E
    if IS_CAUSAL:  # SDPA's top-left alignment
        scores = tl.where(tokens[None, :] <= q_pos[:, None], scores, float("-inf"))
    scores = tl.where(valid[None, :], scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that see nothing yet
    probs = tl.exp2(scores - safe_max[:, None])
    rescale = tl.exp2(row_max - safe_max)
    row_sum = row_sum * rescale + tl.sum(probs, axis=1)
    acc = acc * rescale[:, None] + tl.dot(probs.to(q.dtype), values, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _attend_slots(q, keys, values, tokens, valid, acc, slot_max, slot_sum, qk_scale, mask_ptrs, stride_mt, q_pos,
                  MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):  # fmt: skip
    """:func:`_attend` for one query row, on the CUDA cores: each of a block's ``BLOCK_N`` rows is a slot with its
    own running maximum, sum and accumulator (``acc [BLOCK_N, D]``), so a block needs no reduction across
    tokens; :func:`_merge_slots` folds the slots once, at the end."""
    scores = tl.sum(q.to(tl.float32) * keys.to(tl.float32), axis=1) * qk_scale
    if MASK_KIND == 1:
        keep = tl.load(mask_ptrs + tokens[None, :] * stride_mt, mask=valid[None, :], other=0)
        scores = tl.where(tl.reshape(keep, (keys.shape[0],)) != 0, scores, float("-inf"))
    if MASK_KIND == 2:
        bias = tl.load(mask_ptrs + tokens[None, :] * stride_mt, mask=valid[None, :], other=0.0)
        scores += tl.reshape(bias, (keys.shape[0],)).to(tl.float32) * LOG2E
    if IS_CAUSAL:
        scores = tl.where(tokens <= tl.max(q_pos, axis=0), scores, float("-inf"))
    scores = tl.where(valid, scores, float("-inf"))
    new_max = tl.maximum(slot_max, scores)
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    probs = tl.exp2(scores - safe_max)
    rescale = tl.exp2(slot_max - safe_max)
    slot_sum = slot_sum * rescale + probs
    acc = acc * rescale[:, None] + probs[:, None] * values.to(tl.float32)
    return acc, new_max, slot_sum


@triton.jit
def _merge_slots(acc, slot_max, slot_sum):
    """One row ``acc [1, D]``, maximum and sum ``[1]`` from :func:`_attend_slots`' slots."""
    top = tl.max(slot_max, axis=0)
    weight = tl.exp2(slot_max - tl.where(top == float("-inf"), 0.0, top))
    row = tl.sum(acc * weight[:, None], axis=0)[None, :]
    return row, tl.max(slot_max[None, :], axis=1), tl.sum((slot_sum * weight)[None, :], axis=1)


@triton.jit
def _store_rows(out_ptr, stride_ob, stride_oh, stride_on, stride_od, out, batch, heads, q_pos, channels, row_valid):
    """Rows ``(head, query position)`` of one batch entry into ``out [B, Hq, n, D]``."""
    offsets = batch * stride_ob + heads * stride_oh + q_pos * stride_on
    tl.store(out_ptr + offsets[:, None] + channels[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None])  # fmt: skip


@triton.jit
def _with_partials(acc, row_max, row_sum, acc_ptr, max_ptr, sum_ptr, first, count, rows, row_valid, channels,
                   PARTIAL_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """``acc`` and ``row_sum`` (relative to ``row_max``, log2 units) merged with the partials ``first ..
    first + count - 1`` (``PARTIAL_ROWS`` rows each), relative to the largest maximum of them all; ``channels``
    are ``acc``'s columns."""
    top = row_max
    for partial in range(first, first + count):
        top = tl.maximum(top, tl.load(max_ptr + partial * PARTIAL_ROWS + rows, mask=row_valid, other=float("-inf")))
    safe_top = tl.where(top == float("-inf"), 0.0, top)  # rows that saw no token anywhere
    weight = tl.exp2(row_max - safe_top)
    acc = acc * weight[:, None]
    row_sum = row_sum * weight
    for partial in range(first, first + count):
        offsets = partial * PARTIAL_ROWS + rows
        weight = tl.exp2(tl.load(max_ptr + offsets, mask=row_valid, other=float("-inf")) - safe_top)
        row_sum += weight * tl.load(sum_ptr + offsets, mask=row_valid, other=0.0)
        acc += weight[:, None] * tl.load(acc_ptr + offsets[:, None] * HEAD_DIM + channels[None, :],
                                         mask=row_valid[:, None], other=0.0)  # fmt: skip
    return acc, row_sum


# Arguments that change with the sequence length during a generate, which Triton would otherwise
# specialize on (divisible by 16 or not), compiling the kernel again mid-run: the mask's strides
# hold its length, the residual capacities R plus the tokens of a step. Only row offsets of the mask
# and the ring's index use them, so the hints they lose cost no vector loads of the cache.
UNSPECIALIZED_ARGS = ("stride_mb", "stride_mh", "stride_mn", "k_capacity", "v_capacity")


@triton.jit(do_not_specialize=UNSPECIALIZED_ARGS)
def _decode_attention_kernel(
    q_ptr, stride_qb, stride_qh, stride_qn, stride_qd,
    kc_ptr, stride_kcb, stride_kch, stride_kct, stride_kcd,
    ks_ptr, km_ptr, stride_ksb, stride_ksh, stride_kst, stride_ksd,
    kr_ptr, stride_krb, stride_krh, stride_krt, stride_krd,
    k_lengths_ptr,
    vc_ptr, stride_vcb, stride_vch, stride_vct, stride_vcd,
    vs_ptr, vm_ptr, stride_vsb, stride_vsh, stride_vst, stride_vsd,
    vr_ptr, stride_vrb, stride_vrh, stride_vrt, stride_vrd,
    v_lengths_ptr,
    mask_ptr, stride_mb, stride_mh, stride_mn, stride_mt,
    acc_ptr, max_ptr, sum_ptr, out_ptr, stride_ob, stride_oh, stride_on, stride_od,
    qk_scale, kv_heads, k_capacity, v_capacity, num_splits, tokens_per_split,
    SINGLE_SPLIT: tl.constexpr, Q_LEN: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    PARTIAL_ROWS: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
    TAIL_BLOCK: tl.constexpr = 0, DEPENDENT_LAUNCH: tl.constexpr = False,
):  # fmt: skip
    tl.static_assert(BLOCK_M >= GROUP * Q_LEN)
    tl.static_assert(GROUP_SIZE % (8 // V_BITS) == 0)
    pid, split = tl.program_id(0), tl.program_id(1)
    batch, kv_head = pid // kv_heads, pid % kv_heads

    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * Q_LEN
    heads = kv_head * GROUP + rows // Q_LEN
    q_pos = rows % Q_LEN
    channels = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + q_pos[:, None] * stride_qn
                + channels[None, :] * stride_qd, mask=row_valid[:, None], other=0.0)  # fmt: skip
    mask_ptrs = mask_ptr + batch * stride_mb + heads[:, None] * stride_mh + q_pos[:, None] * stride_mn

    batch = batch.to(tl.int64)  # whole-cache offsets can pass 2**31 elements
    kc_ptr += batch * stride_kcb + kv_head * stride_kch
    ks_ptr += batch * stride_ksb + kv_head * stride_ksh
    km_ptr += batch * stride_ksb + kv_head * stride_ksh
    kr_ptr += batch * stride_krb + kv_head * stride_krh
    vc_ptr += batch * stride_vcb + kv_head * stride_vch
    vs_ptr += batch * stride_vsb + kv_head * stride_vsh
    vm_ptr += batch * stride_vsb + kv_head * stride_vsh
    vr_ptr += batch * stride_vrb + kv_head * stride_vrh
    k_quantized, k_start = tl.load(k_lengths_ptr + 0), tl.load(k_lengths_ptr + 2)
    v_quantized, v_start = tl.load(v_lengths_ptr + 0), tl.load(v_lengths_ptr + 2)
    seq_len = k_quantized + tl.load(k_lengths_ptr + 1)

    SLOTS: tl.constexpr = BLOCK_M == 1  # one query row: :func:`_attend_slots`, a slot per row of a block
    STATE_ROWS: tl.constexpr = BLOCK_N if SLOTS else BLOCK_M
    acc = tl.zeros([STATE_ROWS, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([STATE_ROWS], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([STATE_ROWS], dtype=tl.float32)
    in_block = tl.arange(0, BLOCK_N)
    block_order = _block_token_order(BLOCK_N, 8 // K_BITS)
    # Lane-major value columns spare the quantized blocks a shuffle of their lanes but load ring rows badly
    # (:func:`_value_ring_rows`): the whole sequence is mostly the former, the tail after the Gluon kernel's
    # blocks mostly the latter.
    VALUES_LANE_MAJOR: tl.constexpr = TAIL_BLOCK == 0
    value_channels = _value_channel_order(HEAD_DIM, 8 // V_BITS, VALUES_LANE_MAJOR)
    if TAIL_BLOCK > 0:  # the blocks before are the Gluon kernel's (decode_attention_mma.py), in its partials
        # The loops below need the tail to start on a block of theirs (a 64-token tile after 32-token blocks
        # counts the tokens at the residual boundary twice).
        tl.static_assert(TAIL_BLOCK % BLOCK_N == 0, "the tail's tile must divide the Gluon kernel's blocks")
        first = (tl.minimum(k_quantized, v_quantized) // TAIL_BLOCK) * TAIL_BLOCK
        last = seq_len
    else:
        first = split * tokens_per_split
        last = tl.minimum(first + tokens_per_split, seq_len)
    # This split's blocks fall in four runs, one loop each: quantized on both sides; keys quantized and
    # values in their ring (keys flush R tokens at a time, values one, so in a decode step up to R tokens
    # lie here, much of the Gluon path's tail); the few other blocks quantized on one side only or
    # straddling a boundary; both rings.
    both_quantized_end = (tl.minimum(k_quantized, v_quantized) // BLOCK_N) * BLOCK_N
    both_residual_start = tl.cdiv(tl.maximum(k_quantized, v_quantized), BLOCK_N) * BLOCK_N
    all_valid = tl.full([BLOCK_N], 1, tl.int1)
    quantized_end = tl.minimum(last, both_quantized_end)
    next_block = _load_quantized_block(kc_ptr, ks_ptr, km_ptr, stride_kct, stride_kcd, stride_kst, stride_ksd,
                                       vc_ptr, vs_ptr, vm_ptr, stride_vct, stride_vcd, stride_vst, stride_vsd,
                                       first, first < quantized_end, channels, block_order,
                                       K_BITS, V_BITS, GROUP_SIZE, BLOCK_N, HEAD_DIM)  # fmt: skip
    for block_start in range(first, quantized_end, BLOCK_N):
        block = next_block  # loaded one iteration ahead, so two blocks' loads are in flight
        next_block = _load_quantized_block(kc_ptr, ks_ptr, km_ptr, stride_kct, stride_kcd, stride_kst, stride_ksd,
                                           vc_ptr, vs_ptr, vm_ptr, stride_vct, stride_vcd, stride_vst, stride_vsd,
                                           block_start + BLOCK_N, block_start + BLOCK_N < quantized_end,
                                           channels, block_order,
                                           K_BITS, V_BITS, GROUP_SIZE, BLOCK_N, HEAD_DIM)  # fmt: skip
        keys, values = _dequantize_block(*block, K_BITS, V_BITS, BLOCK_N, HEAD_DIM, VALUES_LANE_MAJOR)
        acc, row_max, row_sum = _attend(q, keys, values, block_start + block_order, all_valid, acc, row_max,
                                        row_sum, qk_scale, mask_ptrs, stride_mt, row_valid, q_pos,
                                        MASK_KIND, IS_CAUSAL, DOT_PRECISION)  # fmt: skip
    mixed_start = tl.maximum(first, both_quantized_end)
    mixed_end = tl.minimum(last, both_residual_start)
    keys_only_start = tl.minimum(tl.maximum(tl.cdiv(v_quantized, BLOCK_N) * BLOCK_N, mixed_start), mixed_end)
    keys_only_end = tl.minimum(tl.maximum((k_quantized // BLOCK_N) * BLOCK_N, keys_only_start), mixed_end)
    for block_start in range(keys_only_start, keys_only_end, BLOCK_N):
        if SLOTS:  # keys dequantized per element, in the ring rows' layout: the slots' sums need no shuffle of them
            tokens = block_start + in_block
            valid = tokens < last
            keys = _dequantize_keys(kc_ptr, ks_ptr, km_ptr, stride_kct, stride_kcd, stride_kst, stride_ksd,
                                    tokens, channels, valid, K_BITS, GROUP_SIZE)  # fmt: skip
        else:
            tokens = block_start + block_order
            valid = tokens < last
            key_block = _load_quantized_keys(kc_ptr, ks_ptr, km_ptr, stride_kct, stride_kcd, stride_kst, stride_ksd,
                                             block_start, True, channels, K_BITS, GROUP_SIZE, BLOCK_N)  # fmt: skip
            keys = _block_keys(*key_block, K_BITS, BLOCK_N, HEAD_DIM)
        values = _value_ring_rows(vr_ptr, stride_vrt, stride_vrd, tokens, v_quantized, v_start, v_capacity,
                                  valid, 8 // V_BITS, HEAD_DIM, VALUES_LANE_MAJOR)  # fmt: skip
        acc, row_max, row_sum = _attend(q, keys, values, tokens, valid, acc, row_max, row_sum, qk_scale,
                                        mask_ptrs, stride_mt, row_valid, q_pos,
                                        MASK_KIND, IS_CAUSAL, DOT_PRECISION)  # fmt: skip
    skipped = keys_only_end - keys_only_start
    for position in range(mixed_start, mixed_end - skipped, BLOCK_N):
        block_start = tl.where(position < keys_only_start, position, position + skipped)
        tokens = block_start + in_block
        valid = tokens < last
        k_is_quantized = tokens < k_quantized
        keys = tl.where(
            k_is_quantized[:, None],
            _dequantize_keys(kc_ptr, ks_ptr, km_ptr, stride_kct, stride_kcd, stride_kst, stride_ksd,
                             tokens, channels, valid & k_is_quantized, K_BITS, GROUP_SIZE),
            _ring_rows(kr_ptr, stride_krt, stride_krd, tokens, k_quantized, k_start, k_capacity, channels,
                       valid & ~k_is_quantized),
        )  # fmt: skip
        v_is_quantized = tokens < v_quantized
        values = tl.where(
            v_is_quantized[:, None],
            _dequantize_values(*_load_values(vc_ptr, vs_ptr, vm_ptr, stride_vct, stride_vcd, stride_vst, stride_vsd,
                                             tokens, (valid & v_is_quantized)[:, None], V_BITS, GROUP_SIZE, HEAD_DIM),
                               V_BITS, HEAD_DIM, VALUES_LANE_MAJOR),
            _value_ring_rows(vr_ptr, stride_vrt, stride_vrd, tokens, v_quantized, v_start, v_capacity,
                             valid & ~v_is_quantized, 8 // V_BITS, HEAD_DIM, VALUES_LANE_MAJOR),
        )  # fmt: skip
        acc, row_max, row_sum = _attend(q, keys, values, tokens, valid, acc, row_max, row_sum, qk_scale,
                                        mask_ptrs, stride_mt, row_valid, q_pos,
                                        MASK_KIND, IS_CAUSAL, DOT_PRECISION)  # fmt: skip
    for block_start in range(tl.maximum(first, both_residual_start), last, BLOCK_N):
        tokens = block_start + in_block
        valid = tokens < last
        keys = _ring_rows(kr_ptr, stride_krt, stride_krd, tokens, k_quantized, k_start, k_capacity, channels, valid)
        values = _value_ring_rows(vr_ptr, stride_vrt, stride_vrd, tokens, v_quantized, v_start, v_capacity,
                                  valid, 8 // V_BITS, HEAD_DIM, VALUES_LANE_MAJOR)  # fmt: skip
        acc, row_max, row_sum = _attend(q, keys, values, tokens, valid, acc, row_max, row_sum, qk_scale,
                                        mask_ptrs, stride_mt, row_valid, q_pos,
                                        MASK_KIND, IS_CAUSAL, DOT_PRECISION)  # fmt: skip

    if SLOTS:
        acc, row_max, row_sum = _merge_slots(acc, row_max, row_sum)
    if TAIL_BLOCK > 0:  # the Gluon kernel, launched before on this stream, wrote the ``num_splits`` others
        if DEPENDENT_LAUNCH:  # started while the Gluon kernel ran: its partials are there once it has ended
            tl.extra.cuda.gdc_wait()
        acc, row_sum = _with_partials(acc, row_max, row_sum, acc_ptr, max_ptr, sum_ptr, pid * num_splits, num_splits,
                                      rows, row_valid, value_channels, PARTIAL_ROWS, HEAD_DIM)  # fmt: skip
    if SINGLE_SPLIT or TAIL_BLOCK > 0:  # the whole sequence is in this program's sums: normalize and store
        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]  # 0 only in padding rows, never stored
        _store_rows(out_ptr, stride_ob, stride_oh, stride_on, stride_od, out, batch, heads, q_pos, value_channels,
                    row_valid)  # fmt: skip
    else:
        partial = pid * num_splits + split
        tl.store(acc_ptr + (partial * PARTIAL_ROWS + rows)[:, None] * HEAD_DIM + value_channels[None, :], acc,
                 mask=row_valid[:, None])  # fmt: skip
        tl.store(max_ptr + partial * PARTIAL_ROWS + rows, row_max, mask=row_valid)
        tl.store(sum_ptr + partial * PARTIAL_ROWS + rows, row_sum, mask=row_valid)


@triton.jit
def _combine_splits_kernel(
    acc_ptr, max_ptr, sum_ptr, out_ptr, stride_ob, stride_oh, stride_on, stride_od, kv_heads, num_partials,
    Q_LEN: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``out = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s`` over one KV head's partials."""
    pid = tl.program_id(0)
    batch, kv_head = pid // kv_heads, pid % kv_heads
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * Q_LEN  # only these rows of the partials were written
    channels = tl.arange(0, HEAD_DIM)
    out, total = _with_partials(tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32),  # no sums of its own
                                tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
                                tl.zeros([BLOCK_M], dtype=tl.float32), acc_ptr, max_ptr, sum_ptr, pid * num_partials,
                                num_partials, rows, row_valid, channels, BLOCK_M, HEAD_DIM)  # fmt: skip
    out = out / tl.where(total > 0, total, 1.0)[:, None]  # 0 only in padding rows, never stored
    _store_rows(out_ptr, stride_ob, stride_oh, stride_on, stride_od, out, batch, kv_head * GROUP + rows // Q_LEN,
                rows % Q_LEN, channels, row_valid)  # fmt: skip


def triton_decode_unsupported(
    q: torch.Tensor, key: QuantizedKV, value: QuantizedKV, group_size: int, key_per_channel: bool
) -> str | None:
    """Why the Triton kernel cannot take these inputs (None when it can); the op then runs the reference."""
    _, q_heads, q_len, head_dim = q.shape
    kv_heads = key.residual.shape[1]
    if not key_per_channel:
        return "keys grouped per token (the ablation) have no Triton kernel"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"query dtype {q.dtype} is not float16, bfloat16 or float32"
    if q_heads % kv_heads:
        return f"{q_heads} query heads do not split evenly over {kv_heads} KV heads"
    if q_len * (q_heads // kv_heads) > MAX_QUERY_ROWS:
        return f"q_len * query heads per KV head = {q_len * (q_heads // kv_heads)} exceeds {MAX_QUERY_ROWS}"
    if key.residual.dtype != q.dtype or value.residual.dtype != q.dtype:
        return f"cache dtype {key.residual.dtype}/{value.residual.dtype} differs from the query's {q.dtype}"
    return triton_layout_unsupported(head_dim, group_size, key, value)


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


class _Plan(NamedTuple):
    """How to launch: a tile, how many of its programs a split sequence puts on each multiprocessor, and
    the fewest granules a split takes."""

    tile: triton.Config
    programs_per_multiprocessor: int
    granules_per_split: int

    def __str__(self) -> str:
        tile = self.tile
        return (f"N{tile.kwargs['BLOCK_N']}w{tile.num_warps}s{tile.num_stages}r{tile.maxnreg}"
                f"p{self.programs_per_multiprocessor}g{self.granules_per_split}")  # fmt: skip


def _plans(granules_per_split: int) -> list[_Plan]:
    """Each tile split for ``PROGRAMS_PER_MULTIPROCESSOR`` programs per multiprocessor and, when its
    register cap lets more share one, for as many as fit: one full wave with more warps to hide latency."""
    plans = []
    for tile in _configs():
        fitting = PROGRAMS_PER_MULTIPROCESSOR
        if tile.maxnreg is not None:
            fitting = REGISTERS_PER_MULTIPROCESSOR // (tile.maxnreg * 32 * tile.num_warps)
        fitting = min(max(PROGRAMS_PER_MULTIPROCESSOR, fitting), MOST_PROGRAMS_PER_MULTIPROCESSOR)
        for per_multiprocessor in sorted({PROGRAMS_PER_MULTIPROCESSOR, fitting}):
            plans.append(_Plan(tile, per_multiprocessor, granules_per_split))
    return plans


def _candidate_plans() -> list[_Plan]:
    """The plans the tuner compares: split for launches from the host, then, where launches may be timed
    (not on the interpreter), split more finely for replays."""
    if _interpreting():
        return _plans(MIN_GRANULES_PER_SPLIT)
    return [*_plans(MIN_GRANULES_PER_SPLIT), *_plans(MIN_GRANULES_PER_REPLAYED_SPLIT)]


class _TunedPlans(NamedTuple):
    """The fastest plan launched from the host (timed by ``do_bench``, where the host's time counts once it
    exceeds the GPU's) and the fastest replayed from a CUDA graph (the GPU's time alone)."""

    launched: _Plan
    replayed: _Plan


def _num_splits(programs: int, max_splits: int, per_multiprocessor: int, device: torch.device) -> int:
    """Enough splits of the sequence for ``per_multiprocessor`` programs per multiprocessor."""
    wanted = -(-per_multiprocessor * _multiprocessors(device) // programs)
    return max(1, min(wanted, max_splits))


def _power_of_4_class(count: int) -> int:
    return count.bit_length() // 2


def _work_class(programs: int, device: torch.device) -> int:
    """How many programs share a multiprocessor before the sequence is split, in powers of 4. The
    fastest plan depends on it: a grid of 32 programs (B=1) waits on each program's latency, one of
    3,072 (B=96) on throughput. A decode step's grid keeps its class from step to step."""
    return _power_of_4_class(-(-programs // _multiprocessors(device)))


# The fastest plans for each tuning key (the kernel's shape constexprs, the tensors' dtypes, the work
# class and the splits of the plans that split most, in powers of 4). Launches after the first of a
# key launch directly: Triton's autotuner scans the ~60 arguments on every call (0.19 ms of host time
# per launch under cProfile on the GPU machine, 6 ms of a batch-1 decode step of a 32-layer model),
# and it can tune neither the split nor on the grid.
_TUNED_PLANS: dict[tuple, _TunedPlans] = {}


def _fastest_plans(launch: Callable[[_Plan], None], splits: Callable[[_Plan], int], out: torch.Tensor) -> _TunedPlans:
    """The agreeing plans with the lowest median time of a whole launch (split kernel and combine), launched
    from the host and replayed. Plans that launch the same grid here (a sequence too short to split further,
    or a batch that fills the GPU unsplit) are tried once, as the first of them: timing noise does not pick
    between them."""
    distinct: dict[tuple[triton.Config, int], _Plan] = {}
    for plan in _candidate_plans():
        distinct.setdefault((plan.tile, splits(plan)), plan)
    plans = list(distinct.values())
    if len(plans) == 1:
        return _TunedPlans(plans[0], plans[0])
    plans = _agreeing_plans(plans, launch, out)
    launched = [plan for plan in plans if plan.granules_per_split == MIN_GRANULES_PER_SPLIT] or plans
    return _TunedPlans(
        min(launched, key=lambda plan: median_ms(lambda: launch(plan))),
        min(plans, key=lambda plan: replayed_ms(lambda: launch(plan), rep=REPLAY_TIMING_MS)),
    )


def median_ms(launch: Callable[[], object], **options) -> float:
    """``do_bench``'s median (its default is the mean, which one slow launch of the host drags up); how the
    tuners here and the benchmarks time a launch."""
    return triton.testing.do_bench(launch, return_mode="median", **options)


# Milliseconds of replays ``replayed_ms`` times per plan when tuning (its default, 20 ms, would add about
# 0.2 s per plan to each tuning key's first launch).
REPLAY_TIMING_MS = 5


def replayed_ms(launch: Callable[[], object], **options) -> float:
    """The median GPU time of ``launch`` recorded into a CUDA graph and replayed (``do_bench_cudagraph``):
    no host time in it, as in a decode step replayed from a graph."""
    return triton.testing.do_bench_cudagraph(launch, return_mode="median", **options)


def _recording(device: torch.device) -> bool:
    """Whether this launch is being recorded into a CUDA graph (to be replayed without host time)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _agreeing_plans(plans: list[_Plan], launch: Callable[[_Plan], None], out: torch.Tensor) -> list[_Plan]:
    """The plans that compile and whose output agrees with the elementwise median of the tiles' outputs.

    A guard against miscompiled tiles (three so far, see :func:`_configs`): correct plans differ only
    in the order of their sums. The median takes one output per tile, since the plans of a tile share
    its compiled code and would be wrong together. A plan that disagrees is left out with a warning
    instead of answering wrongly.
    """
    results: dict[_Plan, torch.Tensor] = {}
    for plan in plans:
        out.zero_()  # rows a launch leaves alone compare equal
        try:
            launch(plan)
        except (OutOfResources, CompileTimeAssertionFailure, PTXASError):  # a tile this GPU cannot hold
            continue
        results[plan] = out.float().nan_to_num()
    if not results:
        raise RuntimeError("Triton KIVI decode attention: no tile compiles for these inputs")
    one_per_tile = {plan.tile: result for plan, result in results.items()}
    median = torch.stack(list(one_per_tile.values())).median(dim=0).values
    agreeing = []
    for plan, result in results.items():
        disagreement = _relative_difference(result, median)
        if disagreement <= TILE_DISAGREEMENT:
            agreeing.append(plan)
        else:
            logger.warning("Triton KIVI decode attention: plan %s left out, its result differs from the tiles' "
                           "median by %.2g (relative)", plan, disagreement)  # fmt: skip
    if not agreeing:
        raise RuntimeError("Triton KIVI decode attention: the plans' results disagree; no plan is trusted")
    return agreeing


def _relative_difference(result: torch.Tensor, reference: torch.Tensor) -> float:
    """``|result - reference| / |reference|`` (Frobenius norms), how two tiles' outputs are compared."""
    return ((result - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def decode_attention_triton(
    q: torch.Tensor,
    key: QuantizedKV,
    value: QuantizedKV,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    is_causal: bool,
    key_bits: int,
    value_bits: int,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused Triton :func:`decode_attention_ref` (keys per channel).

    Args:
        q: ``[B, Hq, n, D]`` float16/bfloat16/float32, ``n * Hq / Hkv <= 64``, D a power of two.
        key, value: the cache's buffers (``[B, Hkv, ...]``); lengths are read on the device.
        attn_mask: bool or additive, broadcastable to ``[B, Hq, n, T']`` with ``T' >= T``, the cache
            length; columns past T are not read (a recorded step's mask buffer is as wide as the
            cache's capacity).
        out: optional ``[B, Hq, n, D]`` tensor to write into.
    Returns:
        ``[B, Hq, n, D]`` in ``q``'s dtype.
    """
    reason = triton_decode_unsupported(q, key, value, group_size, key_per_channel=True)
    if reason is not None:
        raise ValueError(f"Triton KIVI decode attention: {reason}")
    return launch_decode_attention(q, key, value, attn_mask, scale, is_causal, key_bits, value_bits, group_size, out)


def launch_decode_attention(
    q: torch.Tensor,
    key: QuantizedKV,
    value: QuantizedKV,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    is_causal: bool,
    key_bits: int,
    value_bits: int,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`decode_attention_triton` for inputs :func:`triton_decode_unsupported` already accepted
    (the op checks them once; each check costs host time in every layer of every step)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = key.residual.shape[1]
    out = torch.empty_like(q) if out is None else out
    if attn_mask is None:
        mask_kind, mask = 0, None
    else:
        mask = attn_mask.expand(batch, q_heads, q_len, attn_mask.shape[-1])
        mask_kind = 1 if mask.dtype == torch.bool else 2
        mask = mask.view(torch.uint8) if mask_kind == 1 else mask
    qk_scale = (1.0 / math.sqrt(head_dim) if scale is None else scale) * LOG2E.value
    call = _Call.of(q, key, value, mask, mask_kind, is_causal, qk_scale, key_bits, value_bits, group_size)
    if uses_mma_path(q, key, value, is_causal, key_bits, value_bits, group_size):
        _launch_mma_path(call, out)
        return out
    # The longest sequence the buffers can hold bounds the tokens (their count is on the device).
    capacity = min(key.codes.shape[-2] * codes_per_byte(key_bits) + key.residual.shape[-2],
                   value.codes.shape[-2] + value.residual.shape[-2])  # fmt: skip
    granules = -(-capacity // GRANULE)

    def splits(plan: _Plan) -> int:
        max_splits = max(1, granules // plan.granules_per_split)
        return _num_splits(batch * kv_heads, max_splits, plan.programs_per_multiprocessor, q.device)

    def launch(plan: _Plan) -> None:
        _launch_plan(plan.tile, splits(plan), call, granules, out)

    # A grid that fills the GPU unsplit keeps its key as the cache grows: no plan splits it.
    most_splits = [
        _num_splits(batch * kv_heads, max(1, granules // fewest), MOST_PROGRAMS_PER_MULTIPROCESSOR, q.device)
        for fewest in (MIN_GRANULES_PER_SPLIT, MIN_GRANULES_PER_REPLAYED_SPLIT)
    ]
    tuning_key = (head_dim, q_heads // kv_heads, q_len, key_bits, value_bits, group_size, q.dtype,
                  None if mask is None else mask.dtype, _work_class(batch * kv_heads, q.device),
                  *map(_power_of_4_class, most_splits))  # fmt: skip
    tuned = _TUNED_PLANS.get(tuning_key)
    if tuned is None:
        if _recording(q.device):
            raise RuntimeError("Triton KIVI decode attention: the first launch of these shapes is being recorded "
                               "into a CUDA graph; run it once unrecorded first, which tunes its launch")  # fmt: skip
        tuned = _TUNED_PLANS[tuning_key] = _fastest_plans(launch, splits, out)
    replayed = tuned.replayed is not tuned.launched and _recording(q.device)
    launch(tuned.replayed if replayed else tuned.launched)
    return out


def uses_mma_path(
    q: torch.Tensor, key: QuantizedKV, value: QuantizedKV, is_causal: bool, key_bits: int, value_bits: int,
    group_size: int,
) -> bool:  # fmt: skip
    """Whether the blocks quantized on both sides run on the Gluon kernel: it takes the inputs, and
    there are enough of them (``MMA_MIN_TOKEN_HEADS``)."""
    # The size first: it is the cheap check, and it turns away every small (host-bound) step.
    if mma_blocks is None:
        return False
    if q.shape[0] * key.residual.shape[1] * mma_blocks.quantized_capacity(key, value, key_bits) < MMA_MIN_TOKEN_HEADS:
        return False
    return mma_path_unsupported(q, key, value, is_causal, key_bits, value_bits, group_size) is None


def mma_path_unsupported(
    q: torch.Tensor, key: QuantizedKV, value: QuantizedKV, is_causal: bool, key_bits: int, value_bits: int,
    group_size: int,
) -> str | None:  # fmt: skip
    """Why the blocks quantized on both sides cannot run on the Gluon kernel (None when they can)."""
    if mma_blocks is None:
        return "this Triton has no Gluon"
    return mma_blocks.unsupported(q, key, value, key_bits, value_bits, group_size, is_causal)


class _Call(NamedTuple):
    """One attention call as the kernels take it: the mask expanded to ``[B, Hq, n, T]`` (bool as
    uint8; ``mask_kind`` 0 none, 1 bool, 2 additive) and the scale in log2 units. Made by :meth:`of`,
    which takes ``programs`` and ``block_m`` once: the launches of one call read them up to nine times."""

    q: torch.Tensor
    key: QuantizedKV
    value: QuantizedKV
    mask: torch.Tensor | None
    mask_kind: int
    is_causal: bool
    qk_scale: float
    key_bits: int
    value_bits: int
    group_size: int
    programs: int  # one per KV head of each batch entry (times the splits)
    block_m: int  # query rows a program holds (its KV head's g * n), padded to a tensor-core tile

    @classmethod
    def of(cls, q: torch.Tensor, key: QuantizedKV, value: QuantizedKV, mask: torch.Tensor | None, mask_kind: int,
           is_causal: bool, qk_scale: float, key_bits: int, value_bits: int, group_size: int) -> _Call:  # fmt: skip
        batch, q_heads, q_len, _ = q.shape
        kv_heads = key.residual.shape[1]
        rows = q_len * q_heads // kv_heads
        # Not triton.next_power_of_2: a ConstexprFunction, a few microseconds of host time per call.
        block_m = max(16, 1 << (rows - 1).bit_length())
        return cls(q, key, value, mask, mask_kind, is_causal, qk_scale, key_bits, value_bits, group_size,
                   batch * kv_heads, block_m)  # fmt: skip


def _launch_plan(tile: triton.Config, num_splits: int, call: _Call, granules: int, out: torch.Tensor) -> None:
    """The split kernel with ``tile`` over ``num_splits`` splits and, for more than one, the combine."""
    tokens_per_split = -(-granules // num_splits) * GRANULE
    if num_splits == 1:  # the kernel writes ``out`` itself; the partial buffers are never touched
        _launch_split_kernel(tile, 1, 1, call, tokens_per_split, out, out, out, out)
        return
    partials = _partial_buffers(call, num_splits)
    _launch_split_kernel(tile, num_splits, num_splits, call, tokens_per_split, *partials, out)
    _launch_combine(call, num_splits, *partials, out)


def _launch_mma_path(call: _Call, out: torch.Tensor) -> None:
    """The Gluon kernel over the blocks quantized on both sides (in splits), then the Triton kernel over the
    rest of each sequence, which combines the Gluon kernel's partials with its own and stores ``out``."""
    capacity = mma_blocks.quantized_capacity(call.key, call.value, call.key_bits)
    fitting = mma_blocks.programs_per_multiprocessor(call.q, call.key, call.value, call.key_bits, call.value_bits,
                                                     call.mask, call.mask_kind)  # fmt: skip
    splits = mma_blocks.num_splits(call.programs, _multiprocessors(call.q.device), capacity, fitting)
    partials = _partial_buffers(call, splits)
    mma_blocks.launch(call.q, call.key, call.value, call.key_bits, call.value_bits, call.mask, call.mask_kind,
                      call.qk_scale, capacity, splits, splits, *partials)  # fmt: skip

    # The tail's own blocks need none of the Gluon kernel's results: it may start as that kernel's programs end.
    dependent = mma_blocks.launches_dependents_early(call.q.device)

    def tail(tile: triton.Config) -> None:
        _launch_split_kernel(tile, 1, splits, call, 0, *partials, out, tail_block=mma_blocks.BLOCK.value,
                             dependent=dependent)  # fmt: skip

    mask_dtype = None if call.mask is None else call.mask.dtype
    rows = call.q.shape[1] // call.key.residual.shape[1]
    query_rows = call.q.shape[2] * rows  # not the padded block_m: one row may take ONE_ROW_TILE, 2 to 16 not
    tuning_key = ("tail", query_rows, call.key_bits, call.value_bits, mask_dtype,
                  _work_class(call.programs, call.q.device))  # fmt: skip
    tile = _TUNED_TAIL_TILES.get(tuning_key)
    if tile is None:
        tile = _TUNED_TAIL_TILES[tuning_key] = _fastest_tail_tile(tail, out, query_rows)
    tail(tile)


# The tail's tile for each tuning key. On the H100 (eleventh session), 32 tokens on 2 warps took 9-13% less
# time than on 4 warps at B = 192 to 512, T = 340 to 372 (6k-16k programs), and 13-157% more with 256 programs.
# Two pipeline stages made every tail tile slower there (twelfth session: 30-52% at B = 192 to 512).
_TUNED_TAIL_TILES: dict[tuple, triton.Config] = {}


def _tail_tiles(query_rows: int) -> list[triton.Config]:
    """The tiles the tail may take: those whose tokens divide the Gluon kernel's blocks and, for one query
    row, :data:`ONE_ROW_TILE`, the only one on the interpreter (nothing to time there)."""
    tiles = [tile for tile in _configs() if mma_blocks.BLOCK.value % tile.kwargs["BLOCK_N"] == 0]
    if query_rows != 1:
        return tiles
    if _interpreting():
        return [ONE_ROW_TILE]
    return [*tiles, ONE_ROW_TILE]


def _fastest_tail_tile(tail: Callable[[triton.Config], None], out: torch.Tensor, query_rows: int) -> triton.Config:
    """The fastest of :func:`_tail_tiles`, among those whose output agrees with the first one's (the
    tail's only tile until the eleventh session, tested at every GPU shape)."""
    first, *others = _tail_tiles(query_rows)
    tail(first)
    expected = out.to(torch.float32, copy=True)
    candidates = [first]
    for tile in others:
        try:
            tail(tile)
        except (OutOfResources, CompileTimeAssertionFailure, PTXASError):  # a tile this GPU cannot hold
            continue
        disagreement = _relative_difference(out.float(), expected)
        if disagreement <= TILE_DISAGREEMENT:
            candidates.append(tile)
        else:
            logger.warning("Triton KIVI decode attention: tail tile %s left out, its result differs from the "
                           "first tile's by %.2g (relative)", tile, disagreement)  # fmt: skip
    fastest = first if len(candidates) == 1 else min(candidates, key=lambda tile: median_ms(lambda: tail(tile)))
    logger.info("Triton KIVI decode attention: the tail takes tile %s (of %d that agree)", fastest, len(candidates))
    return fastest


def _partial_buffers(call: _Call, num_partials: int) -> tuple[torch.Tensor, ...]:
    """Unnormalized outputs, row maxima and row sums of ``num_partials`` partial results per KV head."""
    rows = call.programs * num_partials * call.block_m
    q = call.q
    return (torch.empty(rows, q.shape[-1], dtype=torch.float32, device=q.device),
            torch.empty(rows, dtype=torch.float32, device=q.device),
            torch.empty(rows, dtype=torch.float32, device=q.device))  # fmt: skip


def _launch_split_kernel(
    tile: triton.Config,
    grid_splits: int,
    num_partials: int,
    call: _Call,
    tokens_per_split: int,
    acc: torch.Tensor,
    row_max: torch.Tensor,
    row_sum: torch.Tensor,
    out: torch.Tensor,
    tail_block: int = 0,
    dependent: bool = False,
) -> None:
    """``_decode_attention_kernel`` over ``grid_splits`` splits writing partials of ``num_partials``
    (``out`` itself when that is 1); with ``tail_block``, over the tail after the Gluon kernel's blocks,
    combined with the Gluon kernel's ``num_partials`` partials into ``out``, and with ``dependent`` too,
    launched while the Gluon kernel runs (programmatic dependent launch)."""
    q, key, value, mask = call.q, call.key, call.value, call.mask
    _, q_heads, q_len, head_dim = q.shape
    kv_heads = key.residual.shape[1]
    mask_strides = (0, 0, 0, 0) if mask is None else mask.stride()
    launch_kernel(
        _decode_attention_kernel, (call.programs, grid_splits),
        q, *q.stride(),
        key.codes, *key.codes.stride(), key.scales, key.mins, *key.scales.stride(),
        key.residual, *key.residual.stride(), key.lengths,
        value.codes, *value.codes.stride(), value.scales, value.mins, *value.scales.stride(),
        value.residual, *value.residual.stride(), value.lengths,
        q if mask is None else mask, *mask_strides,  # any pointer when MASK_KIND is 0: never read
        acc, row_max, row_sum, out, *out.stride(),
        call.qk_scale, kv_heads, key.residual.shape[-2], value.residual.shape[-2], num_partials, tokens_per_split,
        SINGLE_SPLIT=num_partials == 1 and not tail_block, Q_LEN=q_len, GROUP=q_heads // kv_heads, HEAD_DIM=head_dim,
        PARTIAL_ROWS=call.block_m, K_BITS=call.key_bits, V_BITS=call.value_bits, GROUP_SIZE=call.group_size,
        MASK_KIND=call.mask_kind, IS_CAUSAL=call.is_causal, TAIL_BLOCK=tail_block,
        DEPENDENT_LAUNCH=dependent, launch_pdl=dependent, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **{"BLOCK_M": call.block_m, **tile.all_kwargs()},  # ONE_ROW_TILE holds one query row
    )  # fmt: skip


def _launch_combine(
    call: _Call, num_partials: int, acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor, out: torch.Tensor
) -> None:
    _, q_heads, q_len, head_dim = call.q.shape
    kv_heads = call.key.residual.shape[1]
    launch_kernel(
        _combine_splits_kernel, (call.programs,),
        acc, row_max, row_sum, out, *out.stride(), kv_heads, num_partials,
        Q_LEN=q_len, GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=call.block_m,
    )  # fmt: skip
