"""The quantizer and bit packing: exact layout, contract formula, error bounds, edge groups."""

from __future__ import annotations

import pytest
import torch

from kivi_compile.kernels.quantize import (
    dequantize_packed_ref,
    pack_ref,
    quantize_pack_ref,
    quantize_ref,
    unpack_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_packing_layout_is_first_element_in_lowest_bits(bits, per_channel):
    per_byte = 8 // bits
    shape = (2, 3, 4 * per_byte, 8) if per_channel else (2, 3, 5, 8)
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_ref(codes, bits, per_channel)
    axis = -2 if per_channel else -1
    lanes = codes.unflatten(axis, (-1, per_byte))
    expected = sum(lanes.select(axis, i).int() << (i * bits) for i in range(per_byte))
    assert packed.dtype == torch.uint8
    assert torch.equal(packed.int(), expected)
    assert torch.equal(unpack_ref(packed, bits, per_channel), codes)


def test_packing_example_by_hand():
    # Values, 2 bits: one token's channels [1, 2, 3, 0] -> 1 | 2 << 2 | 3 << 4 | 0 << 6 = 57.
    codes = torch.tensor([1, 2, 3, 0], dtype=torch.uint8).view(1, 1, 1, 4)
    assert pack_ref(codes, 2, per_channel=False).item() == 57


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_follow_the_contract(bits, per_channel, dtype):
    group = 8
    x = (torch.randn(2, 3, 24, 16) * 3).to(dtype)
    codes, scales, mins = quantize_ref(x, bits, group, per_channel, scale_dtype=dtype)
    axis = -2 if per_channel else -1
    groups = x.float().unflatten(axis, (-1, group))
    mn = groups.amin(axis, keepdim=True).to(dtype).float()
    scale = ((groups.amax(axis, keepdim=True) - mn) / (2**bits - 1)).to(dtype).float()
    expected = torch.clamp(torch.round((groups - mn) / scale), 0, 2**bits - 1).flatten(axis - 1, axis)
    assert torch.equal(codes.float(), expected)
    assert torch.equal(scales.float(), scale.squeeze(axis)) and torch.equal(mins.float(), mn.squeeze(axis))
    assert scales.dtype == dtype and codes.dtype == torch.uint8


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [32, 96])
def test_round_trip_error_is_within_half_a_step(bits, per_channel, dtype, tokens):
    group = 32
    x = torch.randn(1, 2, tokens, 64).to(dtype)
    packed, scales, mins = quantize_pack_ref(x, bits, group, per_channel, scale_dtype=dtype)
    restored = dequantize_packed_ref(packed, scales, mins, bits, group, per_channel)
    axis = -2 if per_channel else -1
    step = scales.float().repeat_interleave(group, dim=axis)
    # Half a step, plus the rounding of the stored scale and minimum in low precision.
    slack = 0 if dtype == torch.float32 else 2 ** -7 * (x.float().abs().amax() + step * (2**bits - 1)).amax()
    error = (restored - x.float()).abs()
    print(f"bits={bits} per_channel={per_channel} {dtype}: max error {error.max():.3e} (max step {step.max():.3e})")
    assert (error <= step / 2 * (1 + 1e-5) + slack + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_constant_group_dequantizes_to_its_value_exactly(bits, per_channel):
    x = torch.randn(1, 1, 8, 8)
    if per_channel:
        x[..., :, 3] = 0.75  # one channel constant over the group of 8 tokens
    else:
        x[..., 5, :] = -1.25  # one token constant over its 8 channels
    packed, scales, mins = quantize_pack_ref(x, bits, 8, per_channel, torch.float32)
    restored = dequantize_packed_ref(packed, scales, mins, bits, 8, per_channel)
    assert not restored.isnan().any()
    if per_channel:
        assert torch.equal(restored[..., :, 3], x[..., :, 3])
    else:
        assert torch.equal(restored[..., 5, :], x[..., 5, :])


def test_half_way_codes_round_to_even():
    # Group [0, 3] at 2 bits: scale 1; 0.5 -> 0 and 2.5 -> 2 (half to even), 1.5 -> 2.
    x = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.0, 3.0, 3.0, 3.0]).view(1, 1, 1, 8)
    codes, _, _ = quantize_ref(x, 2, 8, per_channel=False, scale_dtype=torch.float32)
    assert codes.flatten().tolist() == [0, 0, 2, 2, 3, 3, 3, 3]
