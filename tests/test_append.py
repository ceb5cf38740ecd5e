"""Triton quantize-on-append against the PyTorch reference: identical codes, scales, residual and
lengths after a prefill and a run of appends (flushes, ring wrap-around, multi-token steps).

On CPU the kernel runs on the Triton interpreter with small shapes; GPU-marked cases repeat the
comparison at real sizes on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from kivi_helpers import poisoned_cache

from kivi_compile.cache import allocate_buffers
from kivi_compile.config import CacheSpec
from kivi_compile.kernels.append import append_kv_ref, append_ref, append_triton, launch_append_kv, store_prefill_ref
from kivi_compile.kernels.cache_layout import QuantizedKV, lengths_tensor, read_lengths

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def clone(kv: QuantizedKV) -> QuantizedKV:
    return QuantizedKV(*(t.clone() for t in kv))


def assert_same_cache(actual: QuantizedKV, expected: QuantizedKV, step: str) -> None:
    for name, a, e in zip(QuantizedKV._fields, actual, expected):
        mismatches = (a != e).sum().item()
        assert mismatches == 0, f"{step}: {name} differs in {mismatches} of {a.numel()} elements"


def run_appends(spec, *, batch, heads, head_dim, dtype, prompt, steps):
    """Prefill ``prompt`` tokens, then append ``steps`` (new-token counts) via both paths."""
    residual_length = spec.residual_length
    total = prompt + sum(steps)
    capacity = residual_length + max(steps) + (residual_length - 1)  # room for the worst lazy flush
    quant_tokens = -(-total // spec.group_size) * spec.group_size + spec.group_size
    expected = poisoned_cache(spec, batch, heads, head_dim, dtype, quant_tokens, capacity, DEVICE)
    scale = torch.rand(head_dim, device=DEVICE) * 4 + 0.1  # outlier channels, as keys have
    store_prefill_ref(expected, torch.randn(batch, heads, prompt, head_dim, device=DEVICE).mul(scale).to(dtype),
                      spec.bits, spec.group_size, residual_length, spec.per_channel)  # fmt: skip
    actual = clone(expected)
    for index, n_new in enumerate(steps):
        new = torch.randn(batch, heads, n_new, head_dim, device=DEVICE).mul(scale).to(dtype)
        append_ref(expected, new, spec.bits, spec.group_size, residual_length, spec.per_channel)
        append_triton(actual, new, spec.bits, spec.group_size, residual_length, spec.per_channel)
        assert_same_cache(actual, expected, f"step {index} ({n_new} new, lengths {read_lengths(expected)})")
    return expected


CPU_CASES = [  # (per_channel, bits, group, residual, prompt, steps)
    (True, 2, 8, 16, 13, [1] * 21),  # keys: flush at every 16th token, T % R != 0
    (True, 4, 8, 8, 5, [3, 3, 1, 3, 3, 3]),  # multi-token steps: ring wraps, flush of 2R after a big step
    (True, 8, 16, 16, 40, [1, 1, 17, 1]),
    (True, 2, 8, 24, 30, [1] * 19 + [26, 1]),  # R = 3G (an odd count of groups), a 26-token step
    (True, 4, 8, 64, 70, [1] * 58 + [67]),  # R = 8G, a 67-token step onto a full residual
    (False, 2, 8, 16, 7, [1] * 14),  # values: T < R at first, sliding window after
    (False, 4, 16, 16, 37, [3, 1, 5, 1]),
    (False, 8, 8, 8, 3, [2] * 9),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("per_channel", "bits", "group", "residual", "prompt", "steps"), CPU_CASES)
def test_triton_append_matches_reference(per_channel, bits, group, residual, prompt, steps, dtype):
    spec = CacheSpec(per_channel, bits, group, residual)
    final = run_appends(spec, batch=2, heads=3, head_dim=32, dtype=dtype, prompt=prompt, steps=steps)
    n_quant, n_residual, _ = read_lengths(final)
    assert n_quant > 0 and n_quant + n_residual == prompt + sum(steps)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_triton_append_matches_reference_at_real_sizes(per_channel, bits, dtype):
    spec = CacheSpec(per_channel, bits, 32, 128)
    run_appends(spec, batch=4, heads=32, head_dim=128, dtype=dtype, prompt=301, steps=[1] * 130 + [5, 1, 7])


def run_fused_appends(key_spec, value_spec, *, batch, heads, key_dim, value_dim, dtype, prompt, steps):
    """Prefill both caches, then append ``steps`` with two reference appends and one fused launch."""
    group, residual = key_spec.group_size, key_spec.residual_length
    capacity = residual + max(steps) + residual - 1
    quant_tokens = -(-(prompt + sum(steps)) // group) * group + group
    expected = []
    for spec, head_dim in ((key_spec, key_dim), (value_spec, value_dim)):
        kv = poisoned_cache(spec, batch, heads, head_dim, dtype, quant_tokens, capacity, DEVICE)
        dense = torch.randn(batch, heads, prompt, head_dim, device=DEVICE).to(dtype)
        store_prefill_ref(kv, dense, spec.bits, group, residual, spec.per_channel)
        expected.append(kv)
    actual = [clone(kv) for kv in expected]
    bits = (key_spec.bits, value_spec.bits, group, residual, key_spec.per_channel)
    for index, n_new in enumerate(steps):
        new_key = torch.randn(batch, heads, n_new, key_dim, device=DEVICE).to(dtype)
        new_value = torch.randn(batch, heads, n_new, value_dim, device=DEVICE).to(dtype)
        append_kv_ref(*expected, new_key, new_value, *bits)
        launch_append_kv(*actual, new_key, new_value, *bits)
        for role, a, e in zip(("keys", "values"), actual, expected):
            assert_same_cache(a, e, f"step {index}, {role} (lengths {read_lengths(e)})")
    assert all(read_lengths(kv)[0] > 0 for kv in expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("key_bits", "value_bits", "key_per_channel"), [(2, 2, True), (4, 2, True), (8, 4, False)])
def test_one_launch_appends_keys_and_values_like_the_reference(key_bits, value_bits, key_per_channel, dtype):
    """``launch_append_kv`` (grid ``(B * H, 2)``) leaves both caches as two reference appends do,
    values with another head dim than keys, through key flushes and the values' sliding window."""
    key_spec, value_spec = CacheSpec(key_per_channel, key_bits, 8, 16), CacheSpec(False, value_bits, 8, 16)
    run_fused_appends(key_spec, value_spec, batch=2, heads=3, key_dim=32, value_dim=16, dtype=dtype, prompt=11,
                      steps=[1] * 18 + [3, 1])  # fmt: skip


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("key_bits", "value_bits"), [(2, 2), (4, 4)])
def test_one_launch_appends_keys_and_values_at_real_sizes(key_bits, value_bits, dtype):
    key_spec, value_spec = CacheSpec(True, key_bits, 32, 128), CacheSpec(False, value_bits, 32, 128)
    run_fused_appends(key_spec, value_spec, batch=4, heads=8, key_dim=128, value_dim=128, dtype=dtype, prompt=301,
                      steps=[1] * 130 + [5, 1, 7])  # fmt: skip


@pytest.mark.gpu
@on_gpu
def test_one_launch_keeps_the_lengths_across_many_programs_and_steps():
    """The ticket protocol at a large grid: 6,144 programs a cache (B = 192, H = 32), 260 steps with two key
    flushes; the lengths and every buffer equal the reference's after each step."""
    key_spec, value_spec = CacheSpec(True, 2, 32, 128), CacheSpec(False, 2, 32, 128)
    run_fused_appends(key_spec, value_spec, batch=192, heads=32, key_dim=128, value_dim=128, dtype=torch.float16,
                      prompt=200, steps=[1] * 260)  # fmt: skip


@pytest.mark.gpu
@on_gpu
def test_append_reaches_batch_rows_past_two_gigabytes():
    """A key cache of 2**26 tokens a head, 2-bit: the second batch row's codes start 2**31 bytes in, past 32-bit
    offsets. Its key flush and new token land where the reference puts them, and nowhere else."""
    spec, batch, head_dim, residual_length = CacheSpec(True, 2, 32, 128), 2, 128, 128
    quant_tokens = 1 << 26
    big = allocate_buffers(torch.empty(batch, 1, 0, head_dim, dtype=torch.float16, device="cuda"), spec,
                           quant_tokens, residual_length + 1)  # fmt: skip
    assert big.codes[1].data_ptr() - big.codes.data_ptr() >= 1 << 31
    residual = torch.randn(batch, 1, residual_length, head_dim, device="cuda", dtype=torch.float16)
    big.residual[..., :residual_length, :] = residual
    big.lengths.copy_(lengths_tensor(quant_tokens - residual_length, residual_length, 0, "cuda"))
    small = allocate_buffers(residual, spec, residual_length, residual_length + 1)
    small.residual[..., :residual_length, :] = residual
    small.lengths.copy_(lengths_tensor(0, residual_length, 0, "cuda"))
    new = torch.randn(batch, 1, 1, head_dim, device="cuda", dtype=torch.float16)

    append_triton(big, new, spec.bits, spec.group_size, residual_length, spec.per_channel)
    append_ref(small, new, spec.bits, spec.group_size, residual_length, spec.per_channel)

    flushed_code_rows, flushed_scale_rows = small.codes.shape[-2], small.scales.shape[-2]
    assert torch.equal(big.codes[..., -flushed_code_rows:, :], small.codes)
    assert torch.equal(big.scales[..., -flushed_scale_rows:, :], small.scales)
    assert torch.equal(big.mins[..., -flushed_scale_rows:, :], small.mins)
    assert torch.equal(big.residual, small.residual)
    assert not big.codes[..., :-flushed_code_rows, :].any() and not big.scales[..., :-flushed_scale_rows, :].any()
    assert read_lengths(big) == (quant_tokens, 1, residual_length)
