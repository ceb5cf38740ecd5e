"""KiviCacheTensor: the prefill/flush schedule, memory held, errors, and behaviour as a tensor."""

from __future__ import annotations

import pytest
import torch
from kivi_helpers import fake_quant

from kivi_compile import KiviCacheTensor, KiviConfig
from kivi_compile import cache as cache_module
from kivi_compile.kernels.cache_layout import read_lengths

R, G = 32, 8
CONFIG = KiviConfig(key_bits=2, value_bits=2, group_size=G, residual_length=R)


def lengths(cache: KiviCacheTensor) -> tuple[int, int]:
    n_quant, n_residual, _ = read_lengths(cache.kv)
    return n_quant, n_residual


def expected_split(spec, seq_len: int) -> tuple[int, int]:
    """(quantized, residual) tokens right after a prefill or a flush, per the contract."""
    n_quant = seq_len // R * R if spec.per_channel else max(seq_len - R, 0)
    return n_quant, seq_len - n_quant


def expected_dense(history: torch.Tensor, spec, n_quant: int) -> torch.Tensor:
    quantized = fake_quant(history[:, :, :n_quant], spec.bits, spec.group_size, spec.per_channel)
    return torch.cat([quantized, history[:, :, n_quant:]], dim=-2)


@pytest.mark.parametrize("seq_len", [5, R - 1, R, 3 * R, 3 * R + 7])
@pytest.mark.parametrize("spec", [CONFIG.key_spec(), CONFIG.value_spec()], ids=["keys", "values"])
def test_prefill_split_and_contents(seq_len, spec):
    dense = torch.randn(2, 3, seq_len, 16)
    cache = KiviCacheTensor.from_dense(dense, spec)
    n_quant, n_residual = expected_split(spec, seq_len)
    assert lengths(cache) == (n_quant, n_residual)
    assert cache.shape == dense.shape and cache.dtype == dense.dtype
    torch.testing.assert_close(cache.dequantize(), expected_dense(dense, spec, n_quant), rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", [CONFIG.key_spec(), CONFIG.value_spec()], ids=["keys", "values"])
@pytest.mark.parametrize("step_sizes", [[1] * 110, [3, 1, 7, 2, 40, 1, 33, 50, 5, 29, 1]], ids=["one-token", "multi-token"])
def test_decode_schedule_across_several_key_flushes(spec, step_sizes):
    history = torch.randn(1, 2, 11, 16)
    cache = KiviCacheTensor.from_dense(history, spec)
    flushes = 0
    for n in step_sizes:
        new = torch.randn(1, 2, n, 16)
        before, _ = lengths(cache)
        past_len = history.shape[-2]
        history = torch.cat([history, new], dim=-2)
        cache = torch.cat([cache, new], dim=-2)  # quantize-on-append through the subclass
        # Lazy flush: attention at this step sees exactly the contract's state.
        n_quant, n_residual = lengths(cache)
        assert n_quant == expected_split(spec, past_len)[0]
        assert n_residual == history.shape[-2] - n_quant
        flushes += n_quant > before
        torch.testing.assert_close(cache.dequantize(), expected_dense(history, spec, n_quant), rtol=0, atol=1e-6)
    assert cache.shape[-2] == history.shape[-2]
    if spec.per_channel:
        assert flushes >= 3


def test_quantized_tokens_are_never_requantized():
    spec = CONFIG.key_spec()
    cache = KiviCacheTensor.from_dense(torch.randn(1, 1, R, 16), spec)
    codes_before = cache.codes[..., : R // 4, :].clone()
    for _ in range(2 * R):
        cache = torch.cat([cache, torch.randn(1, 1, 1, 16) * 100], dim=-2)  # far wider range later
    assert torch.equal(cache.codes[..., : R // 4, :], codes_before)


def test_growth_frees_the_old_buffers():
    """Every layer grows in the same step: old and new buffers of all of them must not coexist."""
    spec = CONFIG.value_spec()
    history = torch.randn(1, 2, 3 * R, 16)
    cache = KiviCacheTensor.from_dense(history, spec)
    old_buffers = (cache.codes, cache.scales, cache.mins, cache.residual)
    new = torch.randn(1, 2, 4 * R, 16)  # more than the reserved capacity
    grown = torch.cat([cache, new], dim=-2)
    assert all(buffer.untyped_storage().nbytes() == 0 for buffer in old_buffers)
    history = torch.cat([history, new], dim=-2)
    n_quant, _ = lengths(grown)
    torch.testing.assert_close(grown.dequantize(), expected_dense(history, spec, n_quant), rtol=0, atol=1e-6)


def _growths(spec, tokens: int) -> int:
    cache = KiviCacheTensor.from_dense(torch.randn(1, 2, 40, 16), spec)
    rows = {cache.codes.shape[-2]}
    for _ in range(tokens - 40):
        cache = torch.cat([cache, torch.randn(1, 2, 1, 16)], dim=-2)
        rows.add(cache.codes.shape[-2])
    return len(rows) - 1


@pytest.mark.parametrize("spec", [CONFIG.key_spec(), CONFIG.value_spec()], ids=["keys", "values"])
def test_held_buffers_grow_along_one_dynamic_dim_under_the_kernel_views(spec):
    """Dynamo sees the held 2-D buffers (one growing size each, marked dynamic); the kernels read 4-D
    views of the same memory."""
    cache = KiviCacheTensor.from_dense(torch.randn(2, 3, 40, 16), spec)
    held_rows = {tuple(buffer.shape[1:]) for buffer in cache.held.growing}
    capacities = set()
    for _ in range(300):
        cache = torch.cat([cache, torch.randn(2, 3, 1, 16)], dim=-2)
        capacities.add(cache.code_units.shape[0])
        assert {tuple(buffer.shape[1:]) for buffer in cache.held.growing} == held_rows
        for buffer, view in zip(cache.held, cache.kv):
            assert view.data_ptr() == buffer.data_ptr() and view.numel() == buffer.numel()
            marked = getattr(buffer, "_dynamo_weak_dynamic_indices", set())
            assert marked == ({0} if buffer is not cache.lengths else set())
    assert len(capacities) >= 3


@pytest.mark.parametrize("spec", [CONFIG.key_spec(), CONFIG.value_spec()], ids=["keys", "values"])
def test_small_caches_double_so_recorded_steps_are_rarely_recorded_again(spec, monkeypatch):
    """Each growth moves the buffers (a CUDA-graph step is recorded again): a cache whose doubling
    adds at most 4 MiB doubles; larger ones grow by 1/16 (here: a 64-byte allowance)."""
    doubling = _growths(spec, 1300)
    monkeypatch.setattr(cache_module, "_SMALL_GROWTH_BYTES", 64)
    sixteenths = _growths(spec, 1300)
    print(f"{spec.role}: {doubling} growths doubling, {sixteenths} by 1/16")
    assert doubling <= 7 and sixteenths >= 4 * doubling  # from 2 groups (16 tokens) to 1300: 2^7 = 128x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [3 * 128, 1000, 4099])
def test_memory_held_is_the_packed_size(dtype, tokens, monkeypatch):
    """Caches growing by 1/16 (the rule past the small caches' 4 MiB of doubling, set to 0 here)."""
    monkeypatch.setattr(cache_module, "_SMALL_GROWTH_BYTES", 0)
    batch, heads, head_dim = 2, 4, 64
    config = KiviConfig(group_size=32, residual_length=128)
    total, dense_bytes = 0, 0
    expected = 0
    for spec in (config.key_spec(), config.value_spec()):
        cache = KiviCacheTensor.from_dense(torch.randn(batch, heads, 40, head_dim, dtype=dtype), spec)
        for _ in range(0, tokens - 40, 7):
            cache = torch.cat([cache, torch.randn(batch, heads, 7, head_dim, dtype=dtype)], dim=-2)
        n_quant, n_residual = lengths(cache)
        elements = batch * heads * n_quant * head_dim
        scale_bytes = 2 * elements // spec.group_size * dtype.itemsize
        residual_bytes = batch * heads * (spec.residual_length + 7) * head_dim * dtype.itemsize
        expected += elements * spec.bits // 8 + scale_bytes + residual_bytes
        total += cache.nbytes_held()
        dense_bytes += cache.numel() * dtype.itemsize  # a dense cache of the same tokens
    print(f"{dtype} {tokens} tokens: held {total} B, expected {expected} B, dense {dense_bytes} B")
    assert abs(total - expected) <= 0.10 * expected
    if tokens >= 4000:  # once the full-precision residual is a small part of the cache
        assert total < dense_bytes / 4


def test_unfused_ops_dequantize_and_writes_raise():
    cache = KiviCacheTensor.from_dense(torch.randn(1, 2, 50, 16), CONFIG.value_spec())
    dense = cache.dequantize()
    assert not isinstance(cache * 2, KiviCacheTensor)
    torch.testing.assert_close(cache * 2, dense * 2)
    torch.testing.assert_close(cache[:, :, None].expand(1, 2, 3, 50, 16).reshape(1, 6, 50, 16)[:, 5], dense[:, 1])
    with pytest.raises(NotImplementedError, match="write into a KIVI-quantized cache"):
        cache.add_(1)
    assert "values" in repr(cache) and "bits=2" in repr(cache)


@pytest.mark.parametrize(
    ("dense", "message"),
    [
        (torch.randint(0, 5, (1, 2, 40, 16)), "float16, bfloat16 or float32"),
        (torch.randn(2, 40, 16), r"\[batch, heads, tokens, head_dim\]"),
        (torch.randn(1, 2, 40, 12), "does not divide the head dim 12"),
    ],
)
def test_bad_cache_input_is_a_clear_error(dense, message):
    with pytest.raises((TypeError, ValueError), match=message):
        KiviCacheTensor.from_dense(dense, CONFIG.value_spec())


def test_append_of_mismatched_shape_is_a_clear_error():
    cache = KiviCacheTensor.from_dense(torch.randn(1, 2, 40, 16), CONFIG.key_spec())
    with pytest.raises(ValueError, match="cannot append"):
        torch.cat([cache, torch.randn(1, 3, 1, 16)], dim=-2)
