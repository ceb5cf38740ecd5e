"""Fused Triton decode attention against float64 attention over the same dequantized cache.

Cache states come from the reference prefill + appends (so the quantized/residual boundary,
lazy flushes and ring wrap-around are real), buffers start as random garbage and the output is
poisoned with NaN. The kernel's relative error must stay within 2x of what PyTorch's own SDPA gets
in the same precision on the same dequantized K/V (flash-attention's rule), plus a float32 floor.

On CPU the kernel runs on the Triton interpreter with small shapes; GPU-marked cases repeat the
comparison at real sizes on CUDA.
"""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import triton
from kivi_helpers import BENCHMARKS, poisoned_cache, relative_error

from kivi_compile.config import CacheSpec
from kivi_compile.kernels.append import append_ref, store_prefill_ref
from kivi_compile.kernels.cache_layout import QuantizedKV, dequantize_cache_ref
from kivi_compile.kernels import decode_attention, decode_attention_mma, launch
from kivi_compile.kernels.decode_attention import decode_attention_ref, decode_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FLOOR = 2e-6  # float32 rounding differences between any two correct float32 computations
# The kernel dequantizes with one fused multiply-add in half precision; Triton's interpreter
# evaluates tl.fma as a multiply then an add (two roundings), so on CPU half precision gets 3x.
HALF_FACTOR_ON_INTERPRETER = 3.0
# Triton 3.6's interpreter multiplies bfloat16 dot operands as their raw uint16 bits.
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="interpreter has no bfloat16 tl.dot"),
)


def filled_cache(spec: CacheSpec, batch, heads, head_dim, dtype, prompt, steps, scale=None) -> QuantizedKV:
    """A cache after a prefill of ``prompt`` tokens and appends of ``steps`` tokens each."""
    total = prompt + sum(steps)
    capacity = 2 * spec.residual_length + max(steps, default=0)
    quant_tokens = -(-total // spec.group_size) * spec.group_size + spec.group_size
    kv = poisoned_cache(spec, batch, heads, head_dim, dtype, quant_tokens, capacity, DEVICE)
    scale = torch.ones(head_dim, device=DEVICE) if scale is None else scale

    def tokens(n: int) -> torch.Tensor:
        return (torch.randn(batch, heads, n, head_dim, device=DEVICE) * scale).to(dtype)

    store_prefill_ref(kv, tokens(prompt), spec.bits, spec.group_size, spec.residual_length, spec.per_channel)
    for n_new in steps:
        append_ref(kv, tokens(n_new), spec.bits, spec.group_size, spec.residual_length, spec.per_channel)
    return kv


def attention_f64(q, keys, values, mask, is_causal):
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q.double(), keys.double(), values.double(),
                                          attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double(),
                                          is_causal=is_causal)  # fmt: skip


def attention_same_precision(q, keys, values, mask, is_causal):
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.to(q.dtype).repeat_interleave(group, 1), values.to(q.dtype).repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal)


def check(q, key, value, spec_k, spec_v, mask=None, is_causal=False):
    keys = dequantize_cache_ref(key, spec_k.bits, spec_k.group_size, per_channel=True)
    values = dequantize_cache_ref(value, spec_v.bits, spec_v.group_size, per_channel=False)
    expected = attention_f64(q, keys, values, mask, is_causal)
    baseline_error = relative_error(attention_same_precision(q, keys, values, mask, is_causal), expected)
    out = torch.full_like(q, float("nan"))
    decode_attention_triton(q, key, value, mask, None, is_causal, spec_k.bits, spec_v.bits, spec_k.group_size, out=out)
    error = relative_error(out, expected)
    print(f"kernel error {error:.3e}, same-precision SDPA {baseline_error:.3e}")
    assert not out.isnan().any()
    factor = 2.0 if q.is_cuda or q.dtype == torch.float32 else HALF_FACTOR_ON_INTERPRETER
    assert error <= factor * baseline_error + FLOOR


CPU_CASES = [  # (q_heads, kv_heads, head_dim, k_bits, v_bits, group, residual, prompt, steps)
    (4, 4, 32, 2, 2, 8, 16, 5, []),  # T < G: residual only
    (4, 1, 32, 2, 2, 8, 16, 97, [1, 1, 1]),  # MQA, T not a multiple of R
    (8, 2, 64, 2, 2, 16, 32, 61, [1] * 9),  # GQA 4:1, flushes between steps
    (4, 2, 32, 4, 2, 8, 16, 300, [1] * 20),  # several splits of quantized tokens, ring wrapped
    (2, 2, 16, 8, 4, 8, 8, 43, [3, 3]),  # 8-bit keys, multi-token steps
    (2, 1, 32, 2, 2, 8, 16, 1100, [1]),  # long enough for two splits and their combine
    (4, 2, 64, 4, 4, 32, 32, 150, [1, 1]),  # blocks inside one key group: one scale row per block
    (4, 2, 32, 2, 2, 16, 64, 200, [1] * 6),  # blocks with keys quantized and values in the ring
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim", "k_bits", "v_bits", "group", "residual", "prompt", "steps"),
                         CPU_CASES)  # fmt: skip
def test_decode_matches_float64(q_heads, kv_heads, head_dim, k_bits, v_bits, group, residual, prompt, steps, dtype):
    spec_k, spec_v = CacheSpec(True, k_bits, group, residual), CacheSpec(False, v_bits, group, residual)
    outliers = torch.rand(head_dim, device=DEVICE) * 6 + 0.2
    key = filled_cache(spec_k, 2, kv_heads, head_dim, dtype, prompt, steps, scale=outliers)
    value = filled_cache(spec_v, 2, kv_heads, head_dim, dtype, prompt, steps)
    q_len = steps[-1] if steps else 1
    q = torch.randn(2, q_heads, q_len, head_dim, device=DEVICE).to(dtype)
    check(q, key, value, spec_k, spec_v)


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_multi_token_step_with_causal_mask_and_padded_rows(mask_kind, dtype):
    """q_len 3 with HF's bottom-right causal mask; row 1 is left-padded (its first 7 keys hidden)."""
    spec_k, spec_v = CacheSpec(True, 2, 8, 16), CacheSpec(False, 2, 8, 16)
    key = filled_cache(spec_k, 2, 2, 32, dtype, 70, [3])
    value = filled_cache(spec_v, 2, 2, 32, dtype, 70, [3])
    seq_len, q_len = 73, 3
    visible = torch.ones(2, 1, q_len, seq_len, dtype=torch.bool, device=DEVICE).tril(seq_len - q_len)
    visible[1, :, :, :7] = False
    mask = visible if mask_kind == "bool" else torch.zeros(visible.shape, dtype=dtype, device=DEVICE).masked_fill(
        ~visible, torch.finfo(dtype).min)  # fmt: skip
    q = torch.randn(2, 8, q_len, 32, device=DEVICE).to(dtype)
    check(q, key, value, spec_k, spec_v, mask=mask)


def test_is_causal_uses_top_left_alignment():
    spec_k, spec_v = CacheSpec(True, 4, 8, 16), CacheSpec(False, 4, 8, 16)
    key = filled_cache(spec_k, 1, 2, 32, torch.float16, 40, [3])
    value = filled_cache(spec_v, 1, 2, 32, torch.float16, 40, [3])
    check(torch.randn(1, 2, 3, 32, device=DEVICE).half(), key, value, spec_k, spec_v, is_causal=True)


def test_launches_after_the_first_reuse_its_tile(monkeypatch):
    """The first launch of a tuning key times the plans; later ones of the same key launch directly,
    and a different work class (here: many more programs) is timed again."""
    monkeypatch.setattr(decode_attention, "_TUNED_PLANS", {})
    timed = []
    fastest_plans = decode_attention._fastest_plans
    monkeypatch.setattr(decode_attention, "_fastest_plans", lambda *args: timed.append(args) or fastest_plans(*args))
    spec_k, spec_v = CacheSpec(True, 2, 16, 32), CacheSpec(False, 2, 16, 32)
    runs = []
    for batch in (1, 1, 64):
        key = filled_cache(spec_k, batch, 2, 32, torch.float32, 70, [1])
        value = filled_cache(spec_v, batch, 2, 32, torch.float32, 70, [1])
        q = torch.randn(batch, 4, 1, 32, device=DEVICE)
        runs.append((decode_attention_triton(q, key, value, None, None, False, 2, 2, 16),
                     decode_attention_ref(q, key, value, None, None, False, 2, 2, 16)))  # fmt: skip
    assert len(timed) == 2 and len(decode_attention._TUNED_PLANS) == 2
    for out, expected in runs:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def tuned_against_reference(caplog, kv_heads: int, prompt: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A launch that tunes (batch 1, float32, 2 bits, G = 16, R = 32): its output, the reference's,
    and the tuner's warnings about plans it left out."""
    spec_k, spec_v = CacheSpec(True, 2, 16, 32), CacheSpec(False, 2, 16, 32)
    key = filled_cache(spec_k, 1, kv_heads, 32, torch.float32, prompt, [1])
    value = filled_cache(spec_v, 1, kv_heads, 32, torch.float32, prompt, [1])
    q = torch.randn(1, 2 * kv_heads, 1, 32, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="kivi_compile.kernels"):
        out = decode_attention_triton(q, key, value, None, None, False, 2, 2, 16)
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    return out, decode_attention_ref(q, key, value, None, None, False, 2, 2, 16), warnings


def test_a_tile_that_disagrees_with_the_others_is_left_out(monkeypatch, caplog):
    """A miscompiled tile (simulated: its accumulators are shifted after each launch) is not used even
    when it times fastest, and a warning names each of its plans; the answer stays right. Its two
    plans do not outvote the other two tiles: the median takes one result per tile."""
    tiles = [triton.Config({"BLOCK_N": n}, num_warps=4) for n in (16, 32, 64)]
    Plan = decode_attention._Plan
    plans = [Plan(tiles[0], 4, 2), Plan(tiles[1], 4, 2), Plan(tiles[1], 8, 2), Plan(tiles[2], 4, 2)]
    monkeypatch.setattr(decode_attention, "_candidate_plans", lambda: plans)
    monkeypatch.setattr(decode_attention, "_TUNED_PLANS", {})
    kernel = decode_attention._decode_attention_kernel
    acc_index = list(inspect.signature(kernel.fn).parameters).index("acc_ptr")
    launched: list[int] = []

    class Miscompiled:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                kernel[grid](*args, **constexprs)
                launched.append(constexprs["BLOCK_N"])
                if constexprs["BLOCK_N"] == 32:
                    args[acc_index].sub_(1.0)

            return launch

    milliseconds, statistics = {16: 2.0, 32: 1.0, 64: 3.0}, []
    monkeypatch.setattr(decode_attention, "_decode_attention_kernel", Miscompiled())
    for timer in ("do_bench", "do_bench_cudagraph"):
        monkeypatch.setattr(triton.testing, timer, lambda fn, timer=timer, **options: statistics.append(
            (timer, options["return_mode"])) or fn() or milliseconds[launched[-1]])  # fmt: skip
    monkeypatch.setattr(decode_attention, "MIN_GRANULES_PER_SPLIT", 2)  # tile 32: 8 and 9 splits
    out, expected, warnings = tuned_against_reference(caplog, kv_heads=2, prompt=1000)
    assert list(decode_attention._TUNED_PLANS.values()) == [(plans[0], plans[0])]
    assert {timer for timer, _ in statistics} == {"do_bench", "do_bench_cudagraph"}
    assert all(mode == "median" for _, mode in statistics)  # not the mean
    assert len(warnings) == 2 and all(f"plan {plan} left out" in w for plan, w in zip(plans[1:3], warnings))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_plans_that_split_the_sequence_differently_agree(monkeypatch, caplog):
    """Plans differ in the tile and in how many programs share a multiprocessor, so in the number of
    splits: the tuner compares whole launches (split kernel and combine), and the one it keeps answers
    right. A plan that launches the same grid as an earlier one (the sequence caps the splits) is not tried."""
    (tile,) = decode_attention._configs()
    plans = [decode_attention._Plan(tile, per_multiprocessor, 2) for per_multiprocessor in (1, 4, 8)]
    monkeypatch.setattr(decode_attention, "_candidate_plans", lambda: plans)
    monkeypatch.setattr(decode_attention, "_TUNED_PLANS", {})
    splits, tried = [], []
    num_splits, agreeing_plans = decode_attention._num_splits, decode_attention._agreeing_plans
    monkeypatch.setattr(decode_attention, "_num_splits", lambda *args: splits.append(num_splits(*args)) or splits[-1])
    monkeypatch.setattr(decode_attention, "_agreeing_plans", lambda plans, *args: tried.extend(plans) or
                        agreeing_plans(plans, *args))  # fmt: skip
    for timer in ("do_bench", "do_bench_cudagraph"):
        monkeypatch.setattr(triton.testing, timer, lambda fn, **options: fn() or 1.0 / splits[-1])
    monkeypatch.setattr(decode_attention, "MIN_GRANULES_PER_SPLIT", 2)  # up to 9 splits of a 1k cache
    out, expected, warnings = tuned_against_reference(caplog, kv_heads=1, prompt=1000)
    assert not warnings and tried == plans[:2]  # 4 programs per multiprocessor already take all 9 splits
    assert set(splits) == {4, 9, 18}  # 18: the most that splits of one granule give (the tuning key's)
    assert list(decode_attention._TUNED_PLANS.values()) == [(plans[1], plans[1])]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_replays_from_a_cuda_graph_take_the_plan_fastest_on_the_gpu_alone(monkeypatch, caplog):
    """The tuner keeps two plans: for launches from the host the fastest under ``do_bench`` among plans of
    at least ``MIN_GRANULES_PER_SPLIT`` granules a split, for launches recorded into a CUDA graph the fastest
    replayed, which may split finer (the combine's launch then costs the host nothing). A recorded launch
    takes the second and answers right; a first launch of its shapes while recording is refused by name."""
    (tile,) = decode_attention._configs()
    Plan = decode_attention._Plan
    coarse, fine = Plan(tile, 4, decode_attention.MIN_GRANULES_PER_SPLIT), Plan(tile, 4, 1)
    monkeypatch.setattr(decode_attention, "_candidate_plans", lambda: [coarse, fine])
    monkeypatch.setattr(decode_attention, "_TUNED_PLANS", {})
    launched_splits = []
    launch_plan = decode_attention._launch_plan
    monkeypatch.setattr(decode_attention, "_launch_plan", lambda tile, splits, *args: launched_splits.append(splits)
                        or launch_plan(tile, splits, *args))  # fmt: skip
    # Launched from the host the fewer splits win, replayed the more.
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **options: fn() or launched_splits[-1])
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **options: fn() or 1.0 / launched_splits[-1])
    out, expected, warnings = tuned_against_reference(caplog, kv_heads=1, prompt=1000)
    assert not warnings and list(decode_attention._TUNED_PLANS.values()) == [(coarse, fine)]
    assert launched_splits[-1] == 2  # the launch after tuning: at least 8 of the 18 granules a split
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    monkeypatch.setattr(decode_attention, "_recording", lambda device: True)
    out, expected, _ = tuned_against_reference(caplog, kv_heads=1, prompt=1000)
    assert launched_splits[-1] == 16  # one wave of 4 programs on each of the interpreter's 4 "multiprocessors"
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    decode_attention._TUNED_PLANS.clear()
    with pytest.raises(RuntimeError, match="recorded into a CUDA graph; run it once unrecorded first"):
        tuned_against_reference(caplog, kv_heads=1, prompt=1000)


@pytest.mark.parametrize("granules_per_split", [decode_attention.MIN_GRANULES_PER_SPLIT, 1])
def test_splits_of_one_granule_take_left_padding_masks(granules_per_split, monkeypatch):
    """The finest splits a replayed plan may take, over a batch whose rows are left-padded (as ``generate``'s):
    some splits then hold no token a row attends to, or no token at all, and the combine must weigh them zero."""
    (tile,) = decode_attention._configs()
    plan = decode_attention._Plan(tile, 4, granules_per_split)
    monkeypatch.setattr(decode_attention, "_candidate_plans", lambda: [plan])
    monkeypatch.setattr(decode_attention, "_TUNED_PLANS", {})
    spec_k, spec_v = CacheSpec(True, 2, 8, 32), CacheSpec(False, 2, 8, 32)
    key = filled_cache(spec_k, 3, 2, 32, torch.float32, 37, [1] * 120)
    value = filled_cache(spec_v, 3, 2, 32, torch.float32, 37, [1] * 120)
    mask = torch.ones(3, 1, 1, 157, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :5] = False
    mask[2, ..., :100] = False  # the first of the four splits (64 tokens each) holds none of row 2's tokens
    check(torch.randn(3, 4, 1, 32, device=DEVICE), key, value, spec_k, spec_v, mask=mask)


def test_unsupported_inputs_are_named():
    spec = CacheSpec(True, 2, 8, 16)
    key = filled_cache(spec, 1, 1, 24, torch.float16, 20, [])
    with pytest.raises(ValueError, match="head_dim=24"):
        decode_attention_triton(torch.randn(1, 1, 1, 24).half(), key, key, None, None, False, 2, 2, 8)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim", "bits"), [(32, 32, 128, 2), (32, 8, 128, 2),
                                                                        (32, 8, 64, 4), (16, 1, 128, 2),
                                                                        (8, 4, 32, 4)])  # fmt: skip
def test_every_plan_matches_float64_at_real_sizes(q_heads, kv_heads, head_dim, bits, dtype, monkeypatch):
    """Each plan (tile and split) the tuner may pick, not only the one it picks here: three tiles, since
    dropped, computed wrong results on the H200 that the interpreter does not. A long cache (split
    sequence, all three loops) and a short one, with R = 32, where most blocks are quantized on one
    side only. The Gluon kernel is kept out (it would take the long fp16 cache's blocks)."""
    monkeypatch.setattr(decode_attention, "MMA_MIN_TOKEN_HEADS", float("inf"))
    q = torch.randn(4, q_heads, 1, head_dim, device=DEVICE).to(dtype)
    outliers = torch.rand(head_dim, device=DEVICE) * 6 + 0.2
    for prompt, steps, residual in ((4001, [1] * 70, 128), (45, [1] * 3, 32)):
        spec_k, spec_v = CacheSpec(True, bits, 32, residual), CacheSpec(False, bits, 32, residual)
        key = filled_cache(spec_k, 4, kv_heads, head_dim, dtype, prompt, steps, scale=outliers)
        value = filled_cache(spec_v, 4, kv_heads, head_dim, dtype, prompt, steps)
        for plan in decode_attention._candidate_plans():
            print(f"T = {prompt + sum(steps)}, R = {residual}, plan {plan}")
            monkeypatch.setattr(decode_attention, "_candidate_plans", lambda plan=plan: [plan])
            monkeypatch.setattr(decode_attention, "_TUNED_PLANS", {})
            check(q, key, value, spec_k, spec_v)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(32, 32), (32, 8)])
def test_a_recorded_launch_takes_the_replayed_plan_and_matches_float64(q_heads, kv_heads, monkeypatch):
    """A small batch's decode step recorded into a CUDA graph, as ``generate`` replays it (B = 1, T = 340):
    the recording takes the plan tuned for replays, and each replay with a new query matches float64 as a
    direct call must."""
    monkeypatch.setattr(decode_attention, "MMA_MIN_TOKEN_HEADS", float("inf"))
    monkeypatch.setattr(decode_attention, "_TUNED_PLANS", {})
    spec_k, spec_v = CacheSpec(True, 2, 32, 128), CacheSpec(False, 2, 32, 128)
    key = filled_cache(spec_k, 1, kv_heads, 128, torch.float16, 300, [1] * 40)
    value = filled_cache(spec_v, 1, kv_heads, 128, torch.float16, 300, [1] * 40)
    q = torch.randn(1, q_heads, 1, 128, device=DEVICE).half()
    replayed = torch.empty_like(q)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        decode_attention_triton(q, key, value, None, None, False, 2, 2, 32, replayed)  # tunes outside the recording
        with torch.cuda.graph(graph, stream=stream):
            decode_attention_triton(q, key, value, None, None, False, 2, 2, 32, replayed)
    ((launched_plan, replayed_plan),) = decode_attention._TUNED_PLANS.values()
    print(f"launched {launched_plan}, replayed {replayed_plan}")
    keys = dequantize_cache_ref(key, 2, 32, per_channel=True)
    values = dequantize_cache_ref(value, 2, 32, per_channel=False)
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        replayed.fill_(float("nan"))
        graph.replay()
        expected = attention_f64(q, keys, values, None, False)
        baseline_error = relative_error(attention_same_precision(q, keys, values, None, False), expected)
        assert relative_error(replayed, expected) <= 2.0 * baseline_error + FLOOR


def real_size_gluon_inputs(
    q_heads: int, kv_heads: int, key_bits: int, value_bits: int, prompt: int = 1000, steps=(1,) * 37,
    residual: int = 128,
) -> tuple[torch.Tensor, QuantizedKV, QuantizedKV, CacheSpec, CacheSpec]:
    """For the GPU tests of the real Gluon kernel (the interpreter's stand-in takes :func:`gluon_path_caches`):
    a one-token query over caches of 3 sequences, float16, D = 128, G = 32 (what the kernel is written for),
    whose keys have outlier channels, in :func:`check`'s order."""
    spec_k, spec_v = CacheSpec(True, key_bits, 32, residual), CacheSpec(False, value_bits, 32, residual)
    outliers = torch.rand(128, device=DEVICE) * 6 + 0.2
    key = filled_cache(spec_k, 3, kv_heads, 128, torch.float16, prompt, list(steps), scale=outliers)
    value = filled_cache(spec_v, 3, kv_heads, 128, torch.float16, prompt, list(steps))
    q = torch.randn(3, q_heads, 1, 128, device=DEVICE).half()
    return q, key, value, spec_k, spec_v


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize(("key_bits", "value_bits"), [(2, 2), (4, 4)])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(32, 32), (32, 8), (32, 4), (16, 1)])
@pytest.mark.parametrize(("prompt", "steps", "residual"), [(4001, [1] * 70, 128), (45, [1] * 3, 32),
                                                           (1000, [1] * 37, 128), (300, [1] * 5, 64)])  # fmt: skip
def test_gluon_blocks_and_triton_tail_match_float64(q_heads, kv_heads, prompt, steps, residual, key_bits, value_bits,
                                                    monkeypatch):  # fmt: skip
    """The Gluon kernel over the blocks quantized on both sides (1, 4, 8 and 16 query rows per KV head,
    quantized lengths that are not multiples of its 32-token blocks, split or not) and the Triton
    kernel over the rest, combined; taken here for caches of any size."""
    monkeypatch.setattr(decode_attention, "MMA_MIN_TOKEN_HEADS", 0)
    q, key, value, spec_k, spec_v = real_size_gluon_inputs(q_heads, kv_heads, key_bits, value_bits, prompt, steps,
                                                           residual)  # fmt: skip
    assert decode_attention.mma_path_unsupported(q, key, value, False, key_bits, value_bits, 32) is None
    check(q, key, value, spec_k, spec_v)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize(("key_bits", "value_bits"), [(4, 2), (2, 4)])
def test_gluon_blocks_take_keys_and_values_of_different_bits(key_bits, value_bits, monkeypatch):
    """The key side's token order (4 or 2 tokens a byte) is the one the value side follows."""
    monkeypatch.setattr(decode_attention, "MMA_MIN_TOKEN_HEADS", 0)
    q, key, value, spec_k, spec_v = real_size_gluon_inputs(32, 8, key_bits, value_bits)
    assert decode_attention.uses_mma_path(q, key, value, False, key_bits, value_bits, 32)
    check(q, key, value, spec_k, spec_v)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(32, 32), (32, 8)])
def test_gluon_kernel_compiled_to_count_its_registers_is_the_one_launched(q_heads, kv_heads, monkeypatch):
    """The splits are fitted to the registers of a kernel compiled before the partial buffers exist; the
    launch over those splits must find it compiled (one specialization, not a second compile), and as
    many programs a multiprocessor as the splits are for must fit its registers."""
    monkeypatch.setattr(decode_attention, "MMA_MIN_TOKEN_HEADS", 0)
    monkeypatch.setattr(decode_attention_mma, "_PROGRAMS_PER_MULTIPROCESSOR", {})
    monkeypatch.setattr(launch, "_COMPILED", {})  # the launch goes through Triton's cache, cleared below
    kernel = decode_attention_mma._quantized_blocks_kernel
    compiled_kernels = kernel.device_caches[torch.cuda.current_device()][0]
    compiled_kernels.clear()  # Triton's in-memory compiles of the kernel; later tests load theirs from disk
    q, key, value, spec_k, spec_v = real_size_gluon_inputs(q_heads, kv_heads, 2, 2, prompt=4001, steps=[1] * 70)
    check(q, key, value, spec_k, spec_v)
    (compiled,) = compiled_kernels.values()
    (fitting,) = decode_attention_mma._PROGRAMS_PER_MULTIPROCESSOR.values()
    registers_per_warp = 32 * -(-compiled.n_regs // 8) * 8
    assert fitting * registers_per_warp <= 65536 < (fitting + 4) * registers_per_warp
    capacity = decode_attention_mma.quantized_capacity(key, value, 2)
    assert decode_attention_mma.num_splits(3 * kv_heads, decode_attention._multiprocessors(q.device), capacity,
                                           fitting) > 1  # fmt: skip


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(32, 32), (32, 8)])
def test_tail_started_early_waits_for_the_gluon_partials_in_a_cuda_graph(q_heads, kv_heads, monkeypatch):
    """On sm_90 the tail starts while the Gluon kernel runs (programmatic dependent launch) and waits for it
    only to read its partials. Recorded in a CUDA graph, as decode steps are, each replay with a new query
    gives what a direct call gives for it: a tail that read the partials before they were written, or the
    previous replay's, would not."""
    monkeypatch.setattr(decode_attention, "MMA_MIN_TOKEN_HEADS", 0)
    q, key, value, _, _ = real_size_gluon_inputs(q_heads, kv_heads, 2, 2, prompt=4001, steps=[1] * 70)
    if not decode_attention_mma.launches_dependents_early(q.device):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")

    def attend(out: torch.Tensor) -> None:
        decode_attention_triton(q, key, value, None, None, False, 2, 2, 32, out)

    replayed, direct = torch.empty_like(q), torch.empty_like(q)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        attend(replayed)  # tunes and compiles outside the recording
        with torch.cuda.graph(graph, stream=stream):
            attend(replayed)
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        replayed.fill_(float("nan"))
        graph.replay()
        direct.fill_(float("nan"))
        attend(direct)
        assert not direct.isnan().any() and torch.equal(replayed, direct)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(32, 32), (32, 8)])
def test_every_tail_tile_matches_float64(q_heads, kv_heads, bits, monkeypatch):
    """Each tile the tail may be tuned to, compiled for this GPU, as the only one."""
    monkeypatch.setattr(decode_attention, "MMA_MIN_TOKEN_HEADS", 0)
    q, key, value, spec_k, spec_v = real_size_gluon_inputs(q_heads, kv_heads, bits, bits)
    tail_tiles = decode_attention._tail_tiles(q_heads // kv_heads)
    assert len(tail_tiles) > 1
    for tile in tail_tiles:
        monkeypatch.setattr(decode_attention, "_tail_tiles", lambda rows, tile=tile: [tile])
        monkeypatch.setattr(decode_attention, "_TUNED_TAIL_TILES", {})
        check(q, key, value, spec_k, spec_v)
        assert list(decode_attention._TUNED_TAIL_TILES.values()) == [tile]


def left_padding_mask(padding: list[int], seq_len: int, kind: str, dtype: torch.dtype, heads: int) -> torch.Tensor:
    """Row ``b`` hides its first ``padding[b]`` tokens: boolean ``[B, 1, 1, T]``, or additive
    ``[B, heads, 1, T]`` with random biases on the visible tokens, different for each head, so that
    their scale and the rows' head order are checked too."""
    visible = torch.arange(seq_len, device=DEVICE) >= torch.tensor(padding, device=DEVICE)[:, None]
    visible = visible[:, None, None, :]
    if kind == "bool":
        return visible
    bias = torch.randn(len(padding), heads, 1, seq_len, device=DEVICE).to(dtype)
    return bias.masked_fill(~visible, torch.finfo(dtype).min)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(32, 32), (32, 8)])
def test_gluon_blocks_take_padding_masks(q_heads, kv_heads, mask_kind, bits, monkeypatch):
    """Left-padded rows, as HF's batched generate passes them: one row hides nothing, one the first
    37 tokens (inside a block), one the first 300 (whole blocks and the first split: partials that see
    no token at all). The mask's columns follow the keys' token order, which the bits set."""
    monkeypatch.setattr(decode_attention, "MMA_MIN_TOKEN_HEADS", 0)
    q, key, value, spec_k, spec_v = real_size_gluon_inputs(q_heads, kv_heads, bits, bits)
    assert decode_attention.uses_mma_path(q, key, value, False, bits, bits, 32)
    mask = left_padding_mask([0, 37, 300], 1037, mask_kind, torch.float16, q_heads)
    check(q, key, value, spec_k, spec_v, mask=mask)


@pytest.mark.parametrize("bits, at", [(2, at) for at in range(0, 9, 2)] + [(4, at) for at in range(0, 7, 2)])
def test_gluon_codes_read_in_place_are_exact(bits, at):
    """The Gluon kernel's lop3 constants: every pair of codes at bit ``at`` of a word's halves, among random
    other bits, becomes base + code in fp16, and base + code - base is the code."""
    code_bits, base = decode_attention_mma.code_bits_and_base(bits, at)
    codes = torch.cartesian_prod(torch.arange(1 << bits), torch.arange(1 << bits))  # (low half, high half)
    noise = torch.randint(0, 1 << 32, (len(codes),), dtype=torch.int64)
    words = noise & ~code_bits | codes[:, 0] << at | codes[:, 1] << (16 + at)
    read = ((words & code_bits) | base).to(torch.int32).view(torch.float16).view(-1, 2)
    base_half = torch.tensor([base & 0xFFFF], dtype=torch.int16).view(torch.float16)
    assert torch.equal(read.float() - base_half.float(), codes.float())
    assert torch.equal(read - base_half, codes.to(torch.float16))  # the subtraction in fp16 is exact


@pytest.mark.parametrize("bits, at", [(2, 9), (2, 10), (4, 8)])
def test_gluon_codes_past_the_mantissa_are_refused(bits, at):
    with pytest.raises(ValueError, match=f"{bits}-bit codes at bit {at}"):
        decode_attention_mma.code_bits_and_base(bits, at)


def test_inputs_the_gluon_kernel_is_not_written_for_are_named():
    spec = CacheSpec(True, 2, 32, 32)
    key = filled_cache(spec, 1, 2, 128, torch.float16, 100, [])
    q = torch.randn(1, 2, 1, 128, device=DEVICE).half()
    unsupported = decode_attention_mma.inputs_unsupported  # every check but the GPU's, so it runs on CPU too
    value = filled_cache(CacheSpec(False, 2, 32, 32), 1, 2, 128, torch.float16, 100, [])
    assert unsupported(q, key, value, 2, 2, 32, False) is None
    assert "float16" in unsupported(q.bfloat16(), key, key, 2, 2, 32, False)
    assert "2- or 4-bit" in unsupported(q, key, key, 8, 2, 32, False)
    assert "2- or 4-bit" in unsupported(q, key, key, 2, 3, 32, False)
    assert "is_causal" in unsupported(q, key, key, 2, 2, 32, True)
    assert "exceed 16" in unsupported(torch.randn(1, 64, 1, 128, device=DEVICE).half(), key, key, 2, 2, 32, False)
    assert "one query token" in unsupported(torch.randn(1, 2, 3, 128, device=DEVICE).half(), key, key, 2, 2, 32,
                                            False)  # fmt: skip
    assert "dense rows" in unsupported(q, key._replace(codes=key.codes[..., 1:]), key, 2, 2, 32, False)


def test_the_gluon_kernel_compiles_for_sm_90_with_this_triton():
    """No CPU test runs the Gluon kernel (the interpreter takes :func:`gluon_stand_in`), so code that this
    Triton's Gluon front end or ptxas rejects would first fail on a GPU machine, as a conditional tuple given
    to ``gl.permute`` did with Triton 3.6 (thirty-first session). ``compile_gluon_kernel.py`` compiles each
    variant for sm_90 as a launch would (2-bit codes' swapped words under the register cap, loads ahead,
    masks, 16 rows), in a process of its own: this one interprets the kernels' Triton helpers."""
    variants = ["2,2,1,0", "2,2,8,1", "4,4,1,0", "4,2,4,2", "2,2,16,1"]
    done = subprocess.run([sys.executable, str(BENCHMARKS / "compile_gluon_kernel.py"), *variants],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    table = [line.split() for line in done.stdout.splitlines()[3:]]
    assert [",".join(row[:4]) for row in table] == variants
    registers = {",".join(row[:4]): int(row[4]) for row in table}
    assert registers["2,2,1,0"] <= decode_attention_mma.REGISTER_CAP and max(registers.values()) <= 255


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 33, 64])
def test_a_programs_query_rows_pad_to_a_power_of_two_of_at_least_16(rows):
    q = torch.randn(1, rows, 1, 8, device=DEVICE)
    key = QuantizedKV(*(torch.empty(1, 1, 4, 8, device=DEVICE) for _ in range(4)), torch.zeros(4, dtype=torch.int32))
    call = decode_attention._Call.of(q, key, key, None, 0, False, 1.0, 2, 2, 8)
    assert call.block_m == max(16, triton.next_power_of_2(rows))


def counted_triton_launches(monkeypatch) -> dict[str, int]:
    """Launches that go through ``JITFunction.run`` (Triton's own path), per kernel; a compile that
    launches nothing (``warmup``, as :func:`decode_attention_mma.programs_per_multiprocessor` asks) is none."""
    counts = {}
    kernels = {"gluon": decode_attention_mma._quantized_blocks_kernel, "split": decode_attention._decode_attention_kernel,
               "combine": decode_attention._combine_splits_kernel}  # fmt: skip
    for name, kernel in kernels.items():
        counts[name] = 0

        def counted(*args, _run=kernel.run, _name=name, **kwargs):
            counts[_name] += not kwargs["warmup"]
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)
    return counts


@pytest.mark.gpu
@on_gpu
def test_launches_after_the_first_go_straight_to_the_compiled_launcher(monkeypatch):
    """The second call launches the Gluon kernel and the tail (which combines) through their compiled
    launchers (not ``JITFunction.run``) and answers exactly as the first; a mask is another
    specialization (``MASK_KIND``), which goes through Triton once. No launch of earlier tests counts."""
    monkeypatch.setattr(launch, "_COMPILED", {})
    monkeypatch.setattr(decode_attention, "MMA_MIN_TOKEN_HEADS", 0)
    spec_k, spec_v = CacheSpec(True, 2, 32, 128), CacheSpec(False, 2, 32, 128)
    key = filled_cache(spec_k, 3, 8, 128, torch.float16, 1000, [1] * 5)
    value = filled_cache(spec_v, 3, 8, 128, torch.float16, 1000, [1] * 5)
    q = torch.randn(3, 32, 1, 128, device=DEVICE).half()
    first = decode_attention_triton(q, key, value, None, None, False, 2, 2, 32)
    counts = counted_triton_launches(monkeypatch)
    again = decode_attention_triton(q, key, value, None, None, False, 2, 2, 32)
    assert counts == {"gluon": 0, "split": 0, "combine": 0}
    assert torch.equal(again, first)
    mask = left_padding_mask([0, 37, 300], 1005, "bool", torch.float16, 32)
    check(q, key, value, spec_k, spec_v, mask=mask)
    assert counts["gluon"] == 1
    check(q, key, value, spec_k, spec_v, mask=mask)
    assert counts["gluon"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_the_gluon_kernel_needs_a_cuda_gpu():
    spec = CacheSpec(True, 2, 32, 32)
    key = filled_cache(spec, 1, 2, 128, torch.float16, 100, [])
    q = torch.randn(1, 2, 1, 128).half()
    assert "CUDA" in decode_attention.mma_path_unsupported(q, key, key, False, 2, 2, 32)


def gluon_stand_in(q, key, value, key_bits, value_bits, mask, mask_kind, qk_scale, capacity, splits, num_partials,
                   acc, row_max, row_sum):  # fmt: skip
    """The Gluon kernel's contract, played by PyTorch for caches of 2 batch rows, 2 KV heads, D = 32 and
    G = 8: partial 0 of each KV head holds its blocks quantized on both sides, rounded down to 32 tokens;
    the other splits are empty."""
    n_quant = min(int(key.lengths[0]), int(value.lengths[0])) // 32 * 32
    keys = dequantize_cache_ref(key, key_bits, 8, per_channel=True)[:, :, :n_quant]
    values = dequantize_cache_ref(value, value_bits, 8, per_channel=False)[:, :, :n_quant]
    rows = q.shape[1] // keys.shape[1]
    scores = q.float().view(2, 2, rows, 32) @ keys.transpose(-1, -2) * qk_scale  # log2 units
    if mask_kind:
        block_mask = mask[..., :n_quant].reshape(scores.shape)
        if mask_kind == 1:
            scores = scores.masked_fill(block_mask == 0, float("-inf"))
        else:
            scores = scores + block_mask.float() * decode_attention.LOG2E.value
    top = scores.amax(-1)
    probs = torch.exp2(scores - top.clamp_min(torch.finfo(torch.float32).min)[..., None])
    row_max.fill_(float("-inf"))
    row_sum.zero_()
    acc.zero_()
    first_split = torch.arange(4, device=q.device) * num_partials * 16  # partial 0 of each KV head
    index = (first_split[:, None] + torch.arange(rows, device=q.device)).flatten()
    row_max[index], row_sum[index] = top.flatten(), probs.sum(-1).flatten()
    acc[index] = (probs @ values).reshape(-1, 32)


def use_gluon_stand_in(monkeypatch) -> None:
    """Every decode-attention call takes the Gluon path, with :func:`gluon_stand_in` as the Gluon kernel."""
    stand_in = types.SimpleNamespace(launch=gluon_stand_in, BLOCK=decode_attention_mma.BLOCK,
                                     quantized_capacity=decode_attention_mma.quantized_capacity,
                                     num_splits=decode_attention_mma.num_splits,
                                     launches_dependents_early=decode_attention_mma.launches_dependents_early,
                                     programs_per_multiprocessor=lambda *inputs: 8)  # fmt: skip
    monkeypatch.setattr(decode_attention, "mma_blocks", stand_in)
    monkeypatch.setattr(decode_attention, "mma_path_unsupported", lambda *args: None)
    monkeypatch.setattr(decode_attention, "MMA_MIN_TOKEN_HEADS", 0)


def gluon_path_caches(bits: int) -> tuple[CacheSpec, CacheSpec, QuantizedKV, QuantizedKV]:
    """Key and value caches of 130 tokens (+ 5 appended) for :func:`gluon_stand_in`, with their specs."""
    spec_k, spec_v = CacheSpec(True, bits, 8, 32), CacheSpec(False, bits, 8, 32)
    key = filled_cache(spec_k, 2, 2, 32, torch.float32, 130, [1] * 5)
    value = filled_cache(spec_v, 2, 2, 32, torch.float32, 130, [1] * 5)
    return spec_k, spec_v, key, value


@pytest.mark.parametrize("q_heads", [4, 2])
@pytest.mark.parametrize(("mask_kind", "bits"), [(None, 2), ("bool", 2), ("additive", 2), ("bool", 4)])
def test_the_triton_tail_completes_and_combines_the_gluon_partials(mask_kind, bits, q_heads, monkeypatch):
    """The Triton kernel's tail launch, which combines the Gluon kernel's partials (played by PyTorch,
    :func:`gluon_stand_in`) with its own, runs here on the interpreter, and no combine kernel does. The
    tail starts at token 96, an odd multiple of 32, and takes a block whose keys are quantized and values
    are not. With a mask, row 1's padding hides every quantized block: its partial sees no token
    (maximum ``-inf``). Query heads share KV heads 2:1 or not at all."""
    spec_k, spec_v, key, value = gluon_path_caches(bits)
    q = torch.randn(2, q_heads, 1, 32, device=DEVICE)
    mask = None if mask_kind is None else left_padding_mask([37, 100], 135, mask_kind, torch.float32, q_heads)
    use_gluon_stand_in(monkeypatch)
    launches = counted_triton_launches(monkeypatch)
    check(q, key, value, spec_k, spec_v, mask=mask)
    assert launches["split"] > 0 and launches["combine"] == 0


def test_one_query_row_keeps_a_tail_tile_of_its_own(monkeypatch):
    """A decode step of multi-head attention (one query row per KV head) takes the row-slot tile for its tail,
    and grouped heads in the same process still get a tensor-core tile: the two used to share a tuning key
    (the padded 16 rows), and the grouped call then launched the one-row tile (a compile-time assertion on
    the H100, twenty-second session)."""
    monkeypatch.setattr(decode_attention, "_TUNED_TAIL_TILES", {})
    use_gluon_stand_in(monkeypatch)
    spec_k, spec_v, key, value = gluon_path_caches(2)
    for q_heads in (2, 4):  # one query row per KV head first, then two
        check(torch.randn(2, q_heads, 1, 32, device=DEVICE), key, value, spec_k, spec_v)
    kept = {tuning_key[1]: tile for tuning_key, tile in decode_attention._TUNED_TAIL_TILES.items()}
    assert kept[1] is decode_attention.ONE_ROW_TILE
    assert kept[2].kwargs.get("BLOCK_M") is None


def test_the_tail_takes_its_fastest_agreeing_tile(monkeypatch, caplog):
    """The tail's tile is timed once per tuning key among the tiles that divide the Gluon kernel's
    32-token blocks (the 64-token tile never runs): a tile whose output differs from the first tile's
    (simulated: its accumulators shifted) is left out with a warning, and the fastest of the rest is kept."""
    tiles = [triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in ((16, 4), (32, 4), (32, 2), (64, 4))]
    monkeypatch.setattr(decode_attention, "_configs", lambda: tiles)
    monkeypatch.setattr(decode_attention, "_TUNED_TAIL_TILES", {})
    use_gluon_stand_in(monkeypatch)
    kernel = decode_attention._decode_attention_kernel
    parameters = list(inspect.signature(kernel.fn).parameters)
    out_index = parameters.index("out_ptr")
    launched: list[tuple[int, int]] = []

    class MiscompiledTile:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                kernel[grid](*args, **constexprs)
                launched.append((constexprs["BLOCK_N"], constexprs["num_warps"]))
                if launched[-1] == (32, 4):  # the tail's output goes wrong
                    args[out_index].sub_(1.0)

            return launch

    milliseconds = {(16, 4): 2.0, (32, 4): 1.0, (32, 2): 1.5}
    monkeypatch.setattr(decode_attention, "_decode_attention_kernel", MiscompiledTile())
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **options: fn() or milliseconds[launched[-1]])
    spec_k, spec_v, key, value = gluon_path_caches(2)
    q = torch.randn(2, 4, 1, 32, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="kivi_compile.kernels"):
        for _ in range(2):
            check(q, key, value, spec_k, spec_v)
    assert list(decode_attention._TUNED_TAIL_TILES.values()) == [tiles[2]]
    assert set(launched) == {(16, 4), (32, 4), (32, 2)} and launched[-1] == (32, 2)
    assert launched.count((32, 4)) == 1  # tuned once: the second call launches the kept tile directly
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warnings) == 1 and f"tail tile {tiles[1]} left out" in warnings[0]


def test_the_tail_refuses_tiles_longer_than_the_gluon_blocks():
    """The tail starts on a multiple of the Gluon kernel's 32-token blocks, not always on one of a
    64-token tile's: such a tile would count the tokens at the residual boundary twice."""
    spec_k, spec_v = CacheSpec(True, 2, 8, 16), CacheSpec(False, 2, 8, 16)
    key = filled_cache(spec_k, 1, 1, 32, torch.float32, 130, [])
    value = filled_cache(spec_v, 1, 1, 32, torch.float32, 130, [])
    q = torch.randn(1, 1, 1, 32, device=DEVICE)
    call = decode_attention._Call.of(q, key, value, None, 0, False, 1.0, 2, 2, 8)
    partials = decode_attention._partial_buffers(call, 2)
    with pytest.raises(Exception, match="must divide the Gluon kernel's blocks"):
        decode_attention._launch_split_kernel(triton.Config({"BLOCK_N": 64}, num_warps=4), 1, 2, call, 0, *partials,
                                              torch.empty_like(q), tail_block=32)  # fmt: skip
