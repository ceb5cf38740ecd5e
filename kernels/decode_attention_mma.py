"""Decode attention over the blocks quantized on both sides, in Gluon: the 2- or 4-bit codes are
unpacked straight into the tensor cores' operand registers.

Why a second kernel: the Triton kernel (``decode_attention.py``) is bound by instruction issue, not
by memory (Nsight Compute on the H200, docs/results.md). Triton picks the register layouts itself,
and most of its main loop moves bytes into the layout its dots read. Gluon, Triton's
explicit-layout dialect, lets the layouts be written down: each lane loads exactly the codes of its
``mma.sync.m16n8k16`` fragments and turns each pair of them into two fp16 operands with one ``lop3``
and two half-precision operations (a shift a word for half of them), with no shared memory.

One warp per program and 32-token blocks (one key group). Lane ``(g, t) = (lane // 4, lane % 4)``.
Both products are taken transposed, so that the few query rows of a decode step are their N side
(8, or 16 above 8 rows) instead of a 16-row M side: ``Sᵀ = K Qᵀ`` (M = the block's tokens, N = query
rows, K = channels) and ``Oᵀ = Vᵀ Pᵀ`` (M = output channels, N = query rows, K = tokens). Up to 8
rows, the accumulator then holds 32 registers a lane instead of 64, the query 16 instead of 32, and
a block takes half the ``mma``s: 9-17% less GPU time than the untransposed products (H100).
For ``Sᵀ`` a lane needs tokens ``8j + g`` (rows ``g`` and ``g + 8`` of each 16-token tile) and
channels ``16c + 2t + e + 8f``. Neither index has to follow the cache's order, only to be the same
on both sides of the product:

- token ``ν = 8j + g`` is token ``4g + j`` of the block: byte row ``g`` of the packed keys (4 tokens
  per byte), code ``j`` of every byte. With 4-bit keys (2 tokens per byte) it is token
  ``2g + 16 (j // 2) + j % 2``: code ``j % 2`` of byte row ``g + 8 (j // 2)``, so each lane reads two
  byte rows;
- channel ``κ = 16c + 8f + 2t + e`` is channel ``32t + 4c + 2e + f``: lane ``t`` reads the 32
  contiguous bytes ``32t .. 32t + 31`` of its byte row, a fragment's pair ``e = 0, 1`` sits in bytes
  ``f`` and ``f + 2`` of a 32-bit word. One mask reads both codes where they lie, as the mantissa bits of
  two fp16 halves whose exponent makes the codes' lowest bit worth 1 (``2^(10 - bit) + code``); the
  codes of a word's bytes 1 and 3 first take one shift, the word's, to come below the exponent. Where
  the kernel does not load ahead, up to 8 rows (below), one ``prmt`` a word first swaps its bytes 1 and
  2: channel ``κ`` is then ``32t + 4c + 2f + e``, and the pairs of scales and mins the fragments need
  are pairs as loaded. The query is loaded in ``κ`` order.

For ``Oᵀ = Vᵀ Pᵀ`` (K = the tokens in ``ν`` order, M = output channels) the lane needs tokens
``8t .. 8t + 7`` and output channels ``μ = 8u + g``, taken as channel ``16g + u``: word ``g`` of each
of its tokens' packed values (words ``2g`` and ``2g + 1`` with 4 bits), inside one value group. A
fragment pairs two tokens of one channel, so the two tokens' words are interleaved by halves first.
``Pᵀ`` goes from the accumulator layout of ``Sᵀ`` to the operand layout in the warp's registers
(shuffles, no shared memory).

Masks (boolean or additive, as the Triton kernel takes them) are read in the score layout, row
``ν`` of a block being the token above. Rows that see no token yet (left padding) keep a maximum
of ``-inf`` and no weight, so the online softmax never subtracts ``-inf`` from ``-inf``.

One warp a program, so what hides the loop's latencies is other programs on the multiprocessor, or the
program's own loads of the next block's codes, scales and mins while it computes this one (which costs
registers, hence programs: see :func:`loads_ahead`).

The scope is what the layouts above are written for: float16, head_dim 128, 2- or 4-bit keys and
values (each its own), G = 32, one query token, at most 16 query rows per KV head, not causal. The
Triton kernel takes everything else, and the tail of every sequence here (blocks with a residual
side), which it combines with this kernel's partials.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .cache_layout import N_QUANT, QuantizedKV
from .launch import REGISTERS_PER_MULTIPROCESSOR, compiled_registers, launch_kernel
from .quantize import codes_per_byte

BLOCK = gl.constexpr(32)  # tokens per block: one key group
_N_QUANT = gl.constexpr(N_QUANT)
HEAD_DIM, GROUP_SIZE, MAX_ROWS = 128, 32, 16  # what the layouts below are written for
SUPPORTED_BITS = (2, 4)
# The splits fill one wave of programs and no more: in a prototype's sweep (B = 8, T = 32k, H200, 2026-12-02)
# the split that made more programs than fit at once took 0.772 ms against 0.626 for the one below it; on
# the H100 (twenty-seventh session), splits for 10 programs a multiprocessor where 8 fit took 27% more time.
# How many fit depends on the registers the compiler gave the kernel (programs_per_multiprocessor).
SCHEDULERS_PER_MULTIPROCESSOR = 4  # each with a quarter of the registers, given to a warp 256 at a time
MIN_TOKENS_PER_SPLIT = 128  # 4 blocks per split at least (not tuned)
# How far ahead each program asks L2 for its blocks. H100, B = 8, H = 32, T = 32k, 2-bit: 0, 2, 4 and 8
# blocks ahead took 0.529, 0.475, 0.483 and 0.575 ms (docs/results.md).
PREFETCH_BLOCKS = 2
# Registers a lane is held to where the kernel swaps its key words (see swaps_key_words): 16 programs a
# multiprocessor.
REGISTER_CAP = 128

_MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
_A = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_MMA, k_width=2))
_B = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=_MMA, k_width=2))
# Key words [c, t, g]: word c of lane (g, t) holds bytes 32t + 4c .. 32t + 4c + 3 of byte row g.
_KEY_WORDS = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[1, 0, 0], [2, 0, 0], [4, 0, 0]],
    lane_bases=[[0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
    warp_bases=[], block_bases=[], shape=[8, 4, 8]))  # fmt: skip
# Key scales [t, p]: lane t holds channels 32t + p (p = 4c + 2e + f) of the block's group, for every g.
_KEY_SCALES = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]],
    lane_bases=[[1, 0], [2, 0], [0, 0], [0, 0], [0, 0]],
    warp_bases=[], block_bases=[], shape=[4, 32]))  # fmt: skip
# Value words and scales [h, f, t, g, e]: word g of token 8t + 4e + 2h + f (nu = 16h + 8f + 2t + e).
_VALUE_WORDS = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 0, 0, 1], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]],
    lane_bases=[[0, 0, 1, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 4, 0]],
    warp_bases=[], block_bases=[], shape=[2, 2, 4, 8, 2]))  # fmt: skip


def code_bits_and_base(bits: int, at: int) -> tuple[int, int]:
    """The words that read the two ``bits``-bit codes at bit ``at`` of a word's halves in place: the
    codes' bits, and fp16 2^(10 - at) twice, whose mantissa bit ``at`` is worth 1. Then
    (word & code bits) | base is base + code in each half, exactly, up to ``at = 10 - bits``."""
    if at % 2 or not 0 <= at <= 10 - bits:
        raise ValueError(f"{bits}-bit codes at bit {at} do not fit the fp16 mantissa in place")
    code_bits = ((1 << bits) - 1) << at
    base = (10 - at + 15) << 10  # the exponent of 2^(10 - at), biased by 15
    return code_bits | code_bits << 16, base | base << 16


def _dequantize_pair(bits: int, at: int) -> str:
    """The asm that dequantizes the two codes that :func:`code_bits_and_base` reads of word $2: base + code
    in one lop3, minus base (exact: the code), times the scales ($3, $4) plus the mins ($5, $6) in one
    fma.f16x2, split into its two halves."""
    code_bits, base = code_bits_and_base(bits, at)
    return (f"{{ .reg .b32 base, x, s, m; mov.b32 base, {base:#x}; "
            f"lop3.b32 x, $2, {code_bits:#x}, base, 0xea; sub.f16x2 x, x, base; "
            f"mov.b32 s, {{$3, $4}}; mov.b32 m, {{$5, $6}}; fma.rn.f16x2 x, x, s, m; "
            f"mov.b32 {{$0, $1}}, x; }}")  # fmt: skip


# Indexed by the codes' bit in their half over 2: in place up to bit 10 - bits, the mantissa's top.
DEQUANTIZE_PAIRS_2 = gl.constexpr(tuple(_dequantize_pair(2, at) for at in range(0, 9, 2)))
DEQUANTIZE_PAIRS_4 = gl.constexpr(tuple(_dequantize_pair(4, at) for at in range(0, 7, 2)))
# The running maximum moves only when a row's grows by more than this (log2 units), so the accumulator
# is rarely rescaled; probabilities up to 2**8 keep fp16's relative precision.
RESCALE_THRESHOLD = gl.constexpr(8.0)
LOG2E = gl.constexpr(1.4426950408889634)
# Ask L2 for $3 bytes at $2 when $1 is not 0 (sm_90: one instruction for a whole range).
PREFETCH_L2 = gl.constexpr(
    "{ .reg .pred p; setp.ne.b32 p, $1, 0; @p cp.async.bulk.prefetch.L2.global [$2], $3; mov.b32 $0, 0; }"
)
# A word's bytes in the order 0, 2, 1, 3.
BYTES_0213 = gl.constexpr("prmt.b32 $0, $1, 0, 0x3120;")
# Let the next kernel on the stream, launched as a programmatic dependent, start (sm_90; $1 is not read).
LAUNCH_DEPENDENTS = gl.constexpr("griddepcontrol.launch_dependents; mov.b32 $0, 0;")


def _axis(parent, rank: int, axis: int):
    """The layout of an index along ``axis`` of a rank-``rank`` tensor in ``parent``."""
    layout = parent
    for dim in reversed(range(rank)):
        if dim != axis:
            layout = gl.SliceLayout(dim, layout)
    return layout


_KW_C, _KW_T, _KW_G = (gl.constexpr(_axis(_KEY_WORDS, 3, axis)) for axis in range(3))
_KS_T, _KS_P = (gl.constexpr(_axis(_KEY_SCALES, 2, axis)) for axis in range(2))
_VW_H, _VW_F, _VW_T, _VW_G, _VW_E = (gl.constexpr(_axis(_VALUE_WORDS, 5, axis)) for axis in range(5))


@gluon.jit
def _index(n: gl.constexpr, axis: gl.constexpr, rank: gl.constexpr, layout: gl.constexpr):
    """``arange(n)`` along ``axis`` of a rank-``rank`` tensor (size 1 on the other axes)."""
    x = gl.arange(0, n, layout=layout)
    if axis != 0:
        x = gl.expand_dims(x, 0)
    if axis != 1:
        x = gl.expand_dims(x, 1)
    if rank > 2 and axis != 2:
        x = gl.expand_dims(x, 2)
    if rank > 3 and axis != 3:
        x = gl.expand_dims(x, 3)
    if rank > 4 and axis != 4:
        x = gl.expand_dims(x, 4)
    return x


@gluon.jit
def _dequantized(words, high_words, AT: gl.constexpr, scale_lo, scale_hi, min_lo, min_hi, BITS: gl.constexpr):
    """``code * scale + min`` of the codes at bit ``AT`` of each word's halves as ``[..., 2]`` fp16 (low
    half first), with the scales and the mins of each half. Codes above the mantissa are read from
    ``high_words``, the words shifted right by 8. Each pair of scales (and mins) goes into one register
    inside the asm, so ptxas keeps the halves paired as the tensor cores read them."""
    if AT > 10 - BITS:
        words = high_words
    at: gl.constexpr = AT - 8 if AT > 10 - BITS else AT
    asm: gl.constexpr = DEQUANTIZE_PAIRS_2[at // 2] if BITS == 2 else DEQUANTIZE_PAIRS_4[at // 2]
    lo, hi = gl.inline_asm_elementwise(asm, "=h,=h,r,h,h,h,h", [words, scale_lo, scale_hi, min_lo, min_hi],
                                       dtype=(gl.float16, gl.float16), is_pure=True, pack=1)  # fmt: skip
    return gl.join(lo, hi)


@gluon.jit
def _block_token(g, j, KEY_BITS: gl.constexpr):
    """The block's token at column ``ν = 8j + g`` of the scores (see the module docstring)."""
    per_byte: gl.constexpr = 8 // KEY_BITS
    return per_byte * g + j % per_byte + 8 * per_byte * (j // per_byte)


@gluon.jit
def _on_key_words(x):
    """A ``[c, t]`` tensor as ``[c, t, 1]`` along the key words' axes (the same for every g)."""
    return gl.expand_dims(gl.convert_layout(x, gl.SliceLayout(2, _KEY_WORDS), assert_trivial=True), 2)


@gluon.jit
def _key_word_pairs(x, SWAPPED: gl.constexpr):
    """Key scales (or mins) ``[t, p]`` as ``[c, t, 1]`` tensors for (f, e) = 00, 01, 10, 11: channel
    ``p = 4c + 2f + e`` of the swapped words' pairs (:func:`_bytes_0213`), else ``p = 4c + 2e + f``."""
    if SWAPPED:  # to [c, t, f, e] (a conditional tuple is no constexpr for Triton 3.6's permute)
        x = gl.permute(gl.reshape(x, (4, 8, 2, 2)), (1, 0, 2, 3))
    else:
        x = gl.permute(gl.reshape(x, (4, 8, 2, 2)), (1, 0, 3, 2))
    e0, e1 = gl.split(x)  # [c, t, f] each
    f0e0, f1e0 = gl.split(e0)
    f0e1, f1e1 = gl.split(e1)
    return _on_key_words(f0e0), _on_key_words(f0e1), _on_key_words(f1e0), _on_key_words(f1e1)


@gluon.jit
def _key_lane(words, code: gl.constexpr, scale, group_min, BITS: gl.constexpr):
    """Keys of code ``code`` of each byte as ``[c, t, g, e, f]``: the pairs of bytes in the halves' low and
    high bytes, (0, 2) and (1, 3) as loaded, (0, 1) and (2, 3) swapped (:func:`_bytes_0213`)."""
    s00, s01, s10, s11 = scale
    m00, m01, m10, m11 = group_min
    high_words = words >> 8
    return gl.join(_dequantized(words, high_words, BITS * code, s00, s01, m00, m01, BITS),
                   _dequantized(words, high_words, 8 + BITS * code, s10, s11, m10, m11, BITS))  # fmt: skip


@gluon.jit
def _key_loads(kc, ks, km, start, word_offsets, scale_offsets, valid, BITS: gl.constexpr):
    """The block's key words (two sets with 4 bits), scales and mins as loaded (none where not ``valid``)."""
    rows = kc + start * (4 * BITS)  # the block's first byte row (32 words a row)
    words = gl.load(rows + word_offsets, mask=valid)
    more = words
    if BITS == 4:
        more = gl.load(rows + 8 * 32 + word_offsets, mask=valid)
    scale = gl.load(ks + (start // BLOCK) * 128 + scale_offsets, mask=valid)
    group_min = gl.load(km + (start // BLOCK) * 128 + scale_offsets, mask=valid)
    return words, more, scale, group_min


@gluon.jit
def _bytes_0213(words):
    """Key words with bytes 1 and 2 swapped (one ``prmt``): byte ``f`` of the two halves then holds channels
    ``4c + 2f`` and ``4c + 2f + 1``, whose scales (and mins) are pairs as loaded. Without it the pairs are
    channels ``4c + f`` and ``4c + f + 2``, and each pair of scales is made of two loaded registers."""
    return gl.inline_asm_elementwise(BYTES_0213, "=r,r", [words], dtype=gl.uint32, is_pure=True, pack=1)


@gluon.jit
def _key_words(loaded, SWAPPED: gl.constexpr):
    """Loaded key words as unsigned, their bytes ``SWAPPED`` or as loaded."""
    if SWAPPED:
        return _bytes_0213(loaded)
    return loaded.to(gl.uint32, bitcast=True)


@gluon.jit
def _key_operand(loaded, BITS: gl.constexpr, SWAPPED: gl.constexpr):
    """The block's keys (:func:`_key_loads`) as the ``[ν, κ]`` operand of ``Sᵀ = K Qᵀ``, dequantized in fp16,
    from words whose bytes are ``SWAPPED`` (:func:`_bytes_0213`) or not."""
    words = _key_words(loaded[0], SWAPPED)
    scale = _key_word_pairs(loaded[2], SWAPPED)
    group_min = _key_word_pairs(loaded[3], SWAPPED)
    if BITS == 2:  # tokens 4g + j: code j of byte row g
        x = gl.join(gl.join(_key_lane(words, 0, scale, group_min, BITS), _key_lane(words, 1, scale, group_min, BITS)),
                    gl.join(_key_lane(words, 2, scale, group_min, BITS), _key_lane(words, 3, scale, group_min, BITS)))
    else:  # tokens 2g + 16 j1 + j0: code j0 of byte row g + 8 j1
        more = _key_words(loaded[1], SWAPPED)
        x = gl.join(gl.join(_key_lane(words, 0, scale, group_min, BITS), _key_lane(words, 1, scale, group_min, BITS)),
                    gl.join(_key_lane(more, 0, scale, group_min, BITS), _key_lane(more, 1, scale, group_min, BITS)))
    # [c, t, g, e, f, j0, j1] -> [j1, j0, g, c, f, t, e]: nu = 8j + g, kappa = 16c + 8f + 2t + e
    return gl.convert_layout(gl.reshape(gl.permute(x, (6, 5, 2, 0, 4, 1, 3)), (32, 128)), _A, assert_trivial=True)


@gluon.jit
def _value_channel(halves, u: gl.constexpr, scale, group_min, BITS: gl.constexpr):
    """Values of output channel ``u`` of each lane's 16 channels (two tokens) as ``[h, f, t, g, e]`` fp16.
    ``halves`` hold the two tokens' codes of 16 // BITS channels each, one token per 16-bit half."""
    per_half: gl.constexpr = 16 // BITS
    words = halves[u // per_half]
    s_lo, s_hi = gl.split(scale)
    m_lo, m_hi = gl.split(group_min)
    return _dequantized(words, words >> 8, BITS * (u % per_half), s_lo, s_hi, m_lo, m_hi, BITS)


@gluon.jit
def _value_quad(halves, u: gl.constexpr, scale, group_min, BITS: gl.constexpr):
    """Channels ``u .. u + 3`` joined on two new trailing axes (bits 0 and 1 of the channel)."""
    return gl.join(gl.join(_value_channel(halves, u, scale, group_min, BITS),
                           _value_channel(halves, u + 1, scale, group_min, BITS)),
                   gl.join(_value_channel(halves, u + 2, scale, group_min, BITS),
                           _value_channel(halves, u + 3, scale, group_min, BITS)))  # fmt: skip


@gluon.jit
def _interleaved(words):
    """A ``[..., e]`` word of two tokens (e = 0, 1) as two words of both tokens' low and high halves."""
    first, second = gl.split(words)
    return (first & 0xFFFF) | (second << 16), (first >> 16) | (second & 0xFFFF0000)


@gluon.jit
def _value_loads(vc, vs, vm, start, word_offsets, scale_offsets, valid, BITS: gl.constexpr):
    """The block's value words (two sets with 4 bits), scales and mins as loaded (none where not ``valid``)."""
    codes = vc + start * (4 * BITS)  # the block's first token (4 * BITS words a token)
    words = gl.load(codes + word_offsets, mask=valid)  # word g: channels 16g .. 16g + 15 (2g with 4 bits)
    more = words
    if BITS == 4:
        more = gl.load(codes + word_offsets + 1, mask=valid)  # word 2g + 1
    scale = gl.load(vs + start * 4 + scale_offsets, mask=valid)
    group_min = gl.load(vm + start * 4 + scale_offsets, mask=valid)
    return words, more, scale, group_min


@gluon.jit
def _value_operand(loaded, BITS: gl.constexpr):
    """The block's values (:func:`_value_loads`) as the ``[μ, ν]`` operand of ``Oᵀ = Vᵀ Pᵀ``, dequantized in
    fp16."""
    halves = _interleaved(loaded[0].to(gl.uint32, bitcast=True))
    if BITS == 4:
        halves = halves + _interleaved(loaded[1].to(gl.uint32, bitcast=True))
    scale = loaded[2]
    group_min = loaded[3]
    v = gl.join(gl.join(_value_quad(halves, 0, scale, group_min, BITS), _value_quad(halves, 4, scale, group_min, BITS)),
                gl.join(_value_quad(halves, 8, scale, group_min, BITS),
                        _value_quad(halves, 12, scale, group_min, BITS)))  # fmt: skip
    # [h, f, t, g, e, u0, u1, u2, u3] -> [u3, u2, u1, u0, g, h, f, t, e]: mu = 8u + g, nu = 16h + 8f + 2t + e
    v = gl.reshape(gl.permute(v, (8, 7, 6, 5, 3, 0, 1, 2, 4)), (128, 32))
    return gl.convert_layout(v, _A, assert_trivial=True)


@gluon.jit
def _prefetch_range(pointer, size, wanted):
    """Asks L2 for ``size`` bytes from ``pointer`` when ``wanted``: one instruction for the warp."""
    gl.inline_asm_elementwise(PREFETCH_L2, "=r,r,l,r", [wanted.to(gl.int32), pointer.to(gl.int64), size],
                              dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _prefetch(kc, ks, km, vc, vs, vm, start, tokens, KEY_BITS: gl.constexpr, VALUE_BITS: gl.constexpr):
    """Asks L2 for the six arrays' bytes of ``tokens`` tokens from ``start`` (multiples of BLOCK; none when
    ``tokens`` is not positive). The loads of a one-warp program wait on each block in turn; with the
    bytes already in L2 they wait for L2, not for memory."""
    wanted = tokens > 0
    _prefetch_range(kc + start * (4 * KEY_BITS), tokens * (16 * KEY_BITS), wanted)  # codes: 16 x bits bytes a token
    _prefetch_range(ks + start * 4, tokens * 8, wanted)  # scales and mins: 8 bytes a token
    _prefetch_range(km + start * 4, tokens * 8, wanted)
    _prefetch_range(vc + start * (4 * VALUE_BITS), tokens * (16 * VALUE_BITS), wanted)
    _prefetch_range(vs + start * 4, tokens * 8, wanted)
    _prefetch_range(vm + start * 4, tokens * 8, wanted)


@gluon.jit
def _masked(scores, mask_ptrs, MASK_KIND: gl.constexpr):
    """Scores (log2 units) with a boolean (1: True attends) or additive (2) mask applied."""
    if MASK_KIND == 1:
        scores = gl.where(gl.load(mask_ptrs) != 0, scores, -float("inf"))
    elif MASK_KIND == 2:
        scores += gl.load(mask_ptrs).to(gl.float32) * LOG2E
    return scores


@gluon.jit
def _finite_max(row_max):
    """``row_max`` with ``-inf`` (rows that have seen nothing) as 0, so ``x - max`` is never NaN."""
    return gl.where(row_max == -float("inf"), 0.0, row_max)


# The mask's strides hold the sequence length, which grows every decode step: specializing on them
# (divisible by 16 or not) would compile the kernel again mid-generate. Nor is it specialized on the
# partials' count, so the kernel compiled to count its registers (programs_per_multiprocessor) is the
# one launched, whatever the splits.
@gluon.jit(do_not_specialize=("stride_mb", "stride_mh", "num_partials"))
def _quantized_blocks_kernel(
    q_ptr, stride_qb, stride_qh,
    kc_ptr, stride_kcb, stride_kch, ks_ptr, km_ptr, stride_ksb, stride_ksh, k_lengths_ptr,
    vc_ptr, stride_vcb, stride_vch, vs_ptr, vm_ptr, stride_vsb, stride_vsh, v_lengths_ptr,
    mask_ptr, stride_mb, stride_mh, stride_mt,
    acc_ptr, max_ptr, sum_ptr, qk_scale, kv_heads, tokens_per_split, num_partials,
    ROWS: gl.constexpr, MASK_KIND: gl.constexpr, PREFETCH: gl.constexpr, KEY_BITS: gl.constexpr,
    VALUE_BITS: gl.constexpr, NARROW_INDEX: gl.constexpr, LOADS_AHEAD: gl.constexpr, SWAPPED: gl.constexpr,
    DEPENDENTS_EARLY: gl.constexpr,
):  # fmt: skip
    """Partial attention (unnormalized ``acc``, row max and sum in log2 units) of the query rows of
    one KV head over one split of the blocks quantized on both sides. Codes are 32-bit words; the
    mask (``MASK_KIND`` 0 none, 1 boolean as bytes, 2 additive) is ``[B, Hq, T]`` by its strides.
    ``PREFETCH`` blocks ahead of the loop are asked of L2 (0: none). ``SWAPPED``: the key words' bytes 1
    and 2 are swapped (see :func:`swaps_key_words`). With ``DEPENDENTS_EARLY`` the next kernel may start once
    every program has started (see :func:`launches_dependents_early`)."""
    pid = gl.program_id(0)
    split = gl.program_id(1)
    if DEPENDENTS_EARLY:
        gl.inline_asm_elementwise(LAUNCH_DEPENDENTS, "=r,r", [pid], dtype=gl.int32, is_pure=False, pack=1)
    batch = (pid // kv_heads).to(gl.int64)
    kv_head = pid % kv_heads
    N: gl.constexpr = 8 if ROWS <= 8 else 16  # query rows padded to the products' N
    rows = gl.arange(0, N, layout=gl.SliceLayout(0, _B))
    kappa = gl.arange(0, 128, layout=gl.SliceLayout(1, _B))
    within = kappa % 16
    f, e = within // 8, within % 2  # kappa = 16c + 8f + 2t + e: channel 32t + 4c + 2f + e, else 32t + 4c + 2e + f
    channel = 32 * ((within % 8) // 2) + 4 * (kappa // 16) + (2 * f + e if SWAPPED else 2 * e + f)
    q = gl.load(q_ptr + batch * stride_qb + (kv_head * ROWS + rows)[None, :] * stride_qh + channel[:, None],
                mask=(rows < ROWS)[None, :], other=0.0)  # fmt: skip
    kc = kc_ptr + batch * stride_kcb + kv_head * stride_kch
    ks = ks_ptr + batch * stride_ksb + kv_head * stride_ksh
    km = km_ptr + batch * stride_ksb + kv_head * stride_ksh
    vc = vc_ptr + batch * stride_vcb + kv_head * stride_vch
    vs = vs_ptr + batch * stride_vsb + kv_head * stride_vsh
    vm = vm_ptr + batch * stride_vsb + kv_head * stride_vsh
    key_words = _index(8, 0, 3, _KW_C) + 8 * _index(4, 1, 3, _KW_T) + 32 * _index(8, 2, 3, _KW_G)
    key_scales = 32 * _index(4, 0, 2, _KS_T) + _index(32, 1, 2, _KS_P)
    # nu = 16h + 8f + 2t + e: g = 2t + e, j = 2h + f. Each offset is the lane's part (t, g) plus the part of
    # its registers (h, f, e), the same in every lane: kept apart, the second folds into the loads' immediates
    # (H100, twenty-eighth session: 168 registers instead of 198 with 2-bit codes, 1.10x as fast at T = 340).
    per_byte: gl.constexpr = 8 // KEY_BITS
    lane_tokens = (2 * per_byte) * _index(4, 2, 5, _VW_T)
    reg_tokens = _block_token(_index(2, 4, 5, _VW_E), 2 * _index(2, 0, 5, _VW_H) + _index(2, 1, 5, _VW_F), KEY_BITS)
    word = _index(8, 3, 5, _VW_G)
    value_words = (lane_tokens * (4 * VALUE_BITS) + word * (VALUE_BITS // 2)) + reg_tokens * (4 * VALUE_BITS)
    value_scales = (lane_tokens * 4 + word // 2) + reg_tokens * 4

    # Padding rows (ROWS .. N - 1) read the last row's mask: never past the mask's last head, and never stored.
    heads = kv_head * ROWS + gl.minimum(gl.arange(0, N, layout=gl.SliceLayout(0, _MMA)), ROWS - 1)
    nu = gl.arange(0, 32, layout=gl.SliceLayout(1, _MMA))
    mask_ptrs = (mask_ptr + batch * stride_mb + heads[None, :] * stride_mh
                 + _block_token(nu % 8, nu // 8, KEY_BITS)[:, None] * stride_mt)  # fmt: skip
    both_quantized = gl.minimum(gl.load(k_lengths_ptr + _N_QUANT), gl.load(v_lengths_ptr + _N_QUANT))
    if NARROW_INDEX:  # see narrow_index
        both_quantized = both_quantized.to(gl.int32)
    first = split * tokens_per_split
    last = gl.minimum(first + tokens_per_split, (both_quantized // BLOCK) * BLOCK)
    acc = gl.zeros([128, N], gl.float32, layout=_MMA)
    row_sum = gl.zeros([32, N], gl.float32, layout=_MMA)  # summed over the tokens at the end
    row_max = gl.full([N], -float("inf"), gl.float32, layout=gl.SliceLayout(0, _MMA))
    if PREFETCH > 0:
        _prefetch(kc, ks, km, vc, vs, vm, first, gl.minimum(PREFETCH * BLOCK, last - first), KEY_BITS, VALUE_BITS)
    if LOADS_AHEAD:
        key_ahead = _key_loads(kc, ks, km, first, key_words, key_scales, first < last, KEY_BITS)
        value_ahead = _value_loads(vc, vs, vm, first, value_words, value_scales, first < last, VALUE_BITS)
    for start in range(first, last, BLOCK):
        if PREFETCH > 0:
            ahead = start + PREFETCH * BLOCK
            _prefetch(kc, ks, km, vc, vs, vm, ahead, gl.where(ahead < last, BLOCK, 0), KEY_BITS, VALUE_BITS)
        if LOADS_AHEAD:
            key_block = key_ahead
            value_block = value_ahead
            # The last iteration loads its own block again rather than masking every load of every block:
            # masked loads zero their registers first (sm_90 compile: 765 instead of 710 instructions a block).
            following = gl.minimum(start + BLOCK, last - BLOCK)
            key_ahead = _key_loads(kc, ks, km, following, key_words, key_scales, None, KEY_BITS)
            value_ahead = _value_loads(vc, vs, vm, following, value_words, value_scales, None, VALUE_BITS)
        else:
            key_block = _key_loads(kc, ks, km, start, key_words, key_scales, None, KEY_BITS)
            value_block = _value_loads(vc, vs, vm, start, value_words, value_scales, None, VALUE_BITS)
        keys = _key_operand(key_block, KEY_BITS, SWAPPED)
        scores = gl.nvidia.ampere.mma_v2(keys, q, gl.zeros([32, N], gl.float32, layout=_MMA)) * qk_scale
        if MASK_KIND != 0:
            scores = _masked(scores, mask_ptrs + start * stride_mt, MASK_KIND)
        block_max = gl.max(scores, axis=0)
        if gl.max((block_max > row_max + RESCALE_THRESHOLD).to(gl.int32), axis=0) > 0:
            new_max = gl.maximum(row_max, block_max)
            rescale = gl.exp2(row_max - _finite_max(new_max))
            acc = acc * rescale[None, :]
            row_sum = row_sum * rescale[None, :]
            row_max = new_max
        probs = gl.exp2(scores - _finite_max(row_max)[None, :])
        row_sum += probs
        values = _value_operand(value_block, VALUE_BITS)
        acc = gl.nvidia.ampere.mma_v2(values, gl.convert_layout(probs.to(gl.float16), _B), acc)

    partial = (pid * num_partials + split) * 16
    r = gl.arange(0, N, layout=gl.SliceLayout(0, _MMA))
    mu = gl.arange(0, 128, layout=gl.SliceLayout(1, _MMA))
    gl.store(acc_ptr + (partial + r)[None, :] * 128 + (16 * (mu % 8) + mu // 8)[:, None], acc,
             mask=(r < ROWS)[None, :])  # fmt: skip
    gl.store(max_ptr + partial + r, row_max, mask=r < ROWS)
    gl.store(sum_ptr + partial + r, gl.sum(row_sum, axis=0), mask=r < ROWS)


@functools.lru_cache
def _capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability, asked once: ``mma.sync`` needs 8.0, the L2 bulk prefetch and
    programmatic dependent launch 9.0."""
    return torch.cuda.get_device_capability(device)


def _sm90(device: torch.device) -> bool:
    """Whether the GPU has sm_90's L2 bulk prefetch and programmatic dependent launch."""
    return device.type == "cuda" and _capability(device) >= (9, 0)


def launches_dependents_early(device: torch.device) -> bool:
    """Whether the kernel lets a programmatic dependent launched after it on its stream (the Triton tail)
    start once all its programs are running, not when they end: the tail then goes through its own tokens
    while the last of them finish, and waits for the kernel's end only to read its partials."""
    return _sm90(device)


def unsupported(q: torch.Tensor, key: QuantizedKV, value: QuantizedKV, key_bits: int, value_bits: int,
                group_size: int, is_causal: bool) -> str | None:  # fmt: skip
    """Why this kernel cannot take the quantized blocks of these inputs (None when it can)."""
    if not q.is_cuda or _capability(q.device) < (8, 0):
        return "needs a CUDA GPU with mma.sync (compute capability 8.0 or newer)"
    return inputs_unsupported(q, key, value, key_bits, value_bits, group_size, is_causal)


def inputs_unsupported(q: torch.Tensor, key: QuantizedKV, value: QuantizedKV, key_bits: int, value_bits: int,
                       group_size: int, is_causal: bool) -> str | None:  # fmt: skip
    """:func:`unsupported` less the GPU's: why the inputs are not what this kernel is written for."""
    _, q_heads, q_len, head_dim = q.shape
    rows = q_len * q_heads // key.residual.shape[1]
    if (q.dtype, head_dim, group_size) != (torch.float16, HEAD_DIM, GROUP_SIZE) or not {key_bits, value_bits} <= set(
        SUPPORTED_BITS
    ):
        return "written for float16, head_dim 128, 2- or 4-bit keys and values and G = 32"
    if is_causal:
        return "takes no is_causal (one query token over the whole cache needs none)"
    if rows > MAX_ROWS:
        return f"{rows} query rows per KV head exceed {MAX_ROWS}"
    if q.stride(-1) != 1 or q_len != 1:
        return "takes one query token per head, with contiguous channels"
    dense_rows = {
        "key codes": (key.codes, HEAD_DIM), "key scales": (key.scales, HEAD_DIM), "key mins": (key.mins, HEAD_DIM),
        "value codes": (value.codes, HEAD_DIM * value_bits // 8),
        "value scales": (value.scales, HEAD_DIM // GROUP_SIZE), "value mins": (value.mins, HEAD_DIM // GROUP_SIZE),
    }  # fmt: skip
    for name, (tensor, row) in dense_rows.items():
        if tensor.stride()[-2:] != (row, 1) or tensor.data_ptr() % 16:
            return f"{name} are not dense rows aligned to 16 bytes"
    if key.scales.stride() != key.mins.stride() or value.scales.stride() != value.mins.stride():
        return "scales and mins have different strides"
    return None


def quantized_capacity(key: QuantizedKV, value: QuantizedKV, key_bits: int) -> int:
    """The most tokens the buffers can hold quantized on both sides (their count is on the device)."""
    return min(key.codes.shape[-2] * codes_per_byte(key_bits), value.codes.shape[-2])


def loads_ahead(key_bits: int, value_bits: int, rows: int, mask_kind: int) -> bool:
    """Whether the kernel loads the next block while it computes this one, rather than each block where it
    uses it (then, up to 8 query rows, with its key words swapped: :func:`swaps_key_words`).

    Up to 8 rows (8-row products), 2-bit codes: loaded where used, the kernel fits 128 registers (126 to 128,
    H100, Triton 3.6), 16 programs a multiprocessor against 12 when it loads ahead (168 to 190), and is 1.01x to
    1.09x as fast (kernel alone, thirtieth session: B = 8, H = 32, T = 32k 1.047x, T = 4k 1.009x; B = 32,
    H = 32/8 1.031x, 1.061x with a mask; B = 192, T = 340 1.049x, 1.093x with a mask). 4-bit codes need their
    loads ahead: loaded where used they lost 13% at 12 programs and 21% at 16 (5/3 the bytes a token). With 16 rows the
    loads ahead spill when the scores are masked (sm_90 compile: 80-168 bytes); unmasked they fit (250
    registers, 8 programs, as without) and are 1.045x as fast at B = 8, H = 32/2, T = 32k (twenty-ninth session)."""
    if rows <= 8:
        return not key_bits == value_bits == 2
    return mask_kind == 0


def swaps_key_words(key_bits: int, value_bits: int, rows: int, mask_kind: int) -> bool:
    """Whether the kernel swaps its key words' bytes 1 and 2 (and is held to :data:`REGISTER_CAP` registers):
    where it loads each block where it uses it, up to 8 query rows.

    Loaded ahead, each pair of key scales is made as the registers pass to the next iteration (moves that loads
    ahead take anyway), and swapping the words' bytes only adds instructions (0.97x as fast, 2-bit, H100,
    thirtieth session). Loaded where they are used, the pairs would be made again for each use (sm_90 compile:
    144 prmt a block against 24 swapped). (16 masked rows, which load where they use too, compile to 861
    instructions a block swapped against 981: not yet timed.)"""
    return not loads_ahead(key_bits, value_bits, rows, mask_kind) and rows <= 8


def narrow_index(key_bits: int, value_bits: int, rows: int) -> bool:
    """Whether the kernel's token index is 32-bit for these codes and query rows: fewer registers and
    instructions (H100, sixteenth session: 3-11% faster with 2-bit codes, 7-8% slower with 4-bit ones)."""
    return key_bits == value_bits == 2 and rows <= 8


def programs_per_multiprocessor(q: torch.Tensor, key: QuantizedKV, value: QuantizedKV, key_bits: int,
                                value_bits: int, mask: torch.Tensor | None, mask_kind: int) -> int:  # fmt: skip
    """How many of the kernel's one-warp programs fit a multiprocessor at once for these inputs: as many as
    each scheduler's registers hold at the count the compiler gave the kernel (compiled here, not launched,
    the first time; its constexprs decide the count, the first call's strides standing for the others').
    On the H100 (Triton 3.6), 2-bit codes up to 8 query rows take 126 to 128 registers (held to
    :data:`REGISTER_CAP`), so 16 fit; 4-bit codes, which load ahead, 184 with one row, so 8."""
    rows = q.shape[1] // key.residual.shape[1]
    variant = (q.device, rows, mask_kind, key_bits, value_bits)
    fitting = _PROGRAMS_PER_MULTIPROCESSOR.get(variant)
    if fitting is None:
        partials = (torch.float32,) * 3  # dtypes stand for the partial buffers, which need the splits
        args, options = _arguments(q, key, value, key_bits, value_bits, mask, mask_kind, 1.0, BLOCK.value, 1,
                                   *partials)  # fmt: skip
        per_warp = 32 * -(-compiled_registers(_quantized_blocks_kernel, *args, **options) // 8) * 8
        per_scheduler = REGISTERS_PER_MULTIPROCESSOR // SCHEDULERS_PER_MULTIPROCESSOR // per_warp
        fitting = _PROGRAMS_PER_MULTIPROCESSOR[variant] = SCHEDULERS_PER_MULTIPROCESSOR * per_scheduler
    return fitting


_PROGRAMS_PER_MULTIPROCESSOR: dict[tuple, int] = {}


def num_splits(programs: int, multiprocessors: int, quantized_capacity: int, per_multiprocessor: int) -> int:
    """As many splits of the quantized blocks as fill one wave of programs, ``per_multiprocessor`` a
    multiprocessor (:func:`programs_per_multiprocessor`), and at least one."""
    fitting = per_multiprocessor * multiprocessors // programs
    return max(1, min(fitting, quantized_capacity // MIN_TOKENS_PER_SPLIT))


def launch(q: torch.Tensor, key: QuantizedKV, value: QuantizedKV, key_bits: int, value_bits: int,
           mask: torch.Tensor | None, mask_kind: int, qk_scale: float, capacity: int, splits: int, num_partials: int,
           acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor) -> None:  # fmt: skip
    """Partials ``0 .. splits - 1`` of each KV head (of ``num_partials``) over its quantized blocks;
    ``mask`` is ``[B, Hq, 1, T]`` (bool as uint8, ``mask_kind`` 1; additive, 2; None, 0), ``qk_scale`` in
    log2 units and ``capacity`` :func:`quantized_capacity`, which the caller has already taken."""
    tokens_per_split = -(-capacity // (splits * BLOCK.value)) * BLOCK.value
    args, options = _arguments(q, key, value, key_bits, value_bits, mask, mask_kind, qk_scale, tokens_per_split,
                               num_partials, acc, row_max, row_sum)  # fmt: skip
    launch_kernel(_quantized_blocks_kernel, (q.shape[0] * key.residual.shape[1], splits), *args, **options)


def _arguments(q: torch.Tensor, key: QuantizedKV, value: QuantizedKV, key_bits: int, value_bits: int,
               mask: torch.Tensor | None, mask_kind: int, qk_scale: float, tokens_per_split: int, num_partials: int,
               acc, row_max, row_sum) -> tuple[tuple, dict]:  # fmt: skip
    """The kernel's arguments and options for a launch (or a compile: the partials may be dtypes)."""
    kv_heads = key.residual.shape[1]
    rows = q.shape[1] // kv_heads
    key_words, value_words = key.codes.view(torch.int32), value.codes.view(torch.int32)
    mask_strides = (0, 0, 0) if mask is None else (mask.stride(0), mask.stride(1), mask.stride(3))
    args = (
        q, q.stride(0), q.stride(1),
        key_words, key_words.stride(0), key_words.stride(1), key.scales, key.mins, *key.scales.stride()[:2],
        key.lengths,
        value_words, value_words.stride(0), value_words.stride(1), value.scales, value.mins,
        *value.scales.stride()[:2], value.lengths,
        q if mask is None else mask, *mask_strides,  # any pointer when MASK_KIND is 0: never read
        acc, row_max, row_sum, qk_scale, kv_heads, tokens_per_split, num_partials,
    )  # fmt: skip
    swapped = swaps_key_words(key_bits, value_bits, rows, mask_kind)
    options = dict(
        ROWS=rows, MASK_KIND=mask_kind,
        PREFETCH=PREFETCH_BLOCKS if _sm90(q.device) else 0, KEY_BITS=key_bits,
        VALUE_BITS=value_bits, NARROW_INDEX=narrow_index(key_bits, value_bits, rows),
        LOADS_AHEAD=loads_ahead(key_bits, value_bits, rows, mask_kind), SWAPPED=swapped,
        DEPENDENTS_EARLY=launches_dependents_early(q.device), num_warps=1,
        **({"maxnreg": REGISTER_CAP} if swapped else {}),
    )  # fmt: skip
    return args, options
