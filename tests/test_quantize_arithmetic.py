"""The append kernels' quantization arithmetic against IEEE division, where rounding decides a code.

``divide_rn`` replaces the hardware's division with Newton steps, so the codes it gives are checked at
quotients next to every tie ``k + 1/2`` (the only place an error of one ulp changes a code), for every
positive fp16 and bf16 scale on the GPU (a sample of them on the interpreter) and random float32 ones.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kivi_compile.kernels.append import group_codes, group_scale

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ULP_STEPS = (-2, -1, 0, 1, 2)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _quantize_elements_kernel(
    x_ptr, min_ptr, max_ptr, codes_ptr, scales_ptr, n, BITS: tl.constexpr, SCALE_DTYPE: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """Each element its own group: its scale (float32, already rounded to ``SCALE_DTYPE``) and code."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    group_min, scale = group_scale(tl.load(min_ptr + offsets, mask=inside, other=0.0),
                                   tl.load(max_ptr + offsets, mask=inside, other=1.0), BITS, SCALE_DTYPE)  # fmt: skip
    tl.store(scales_ptr + offsets, scale, mask=inside)
    tl.store(codes_ptr + offsets, group_codes(x, group_min, scale, BITS), mask=inside)


def positive_scales(dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Every positive finite value of a 16-bit dtype, or log-uniform float32 ones (subnormals included)."""
    if dtype is torch.float32:
        exponents = torch.rand(200_000, generator=generator, dtype=torch.float64) * 250 - 149
        return torch.exp2(exponents).float().unique()
    finite = torch.finfo(dtype).max
    every = torch.arange(1, 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    return every[every <= finite].float()


def near_ties(scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, group min, group max) per element: groups of [0, levels * scale], x a few ulps off each tie."""
    levels = 2**bits - 1
    scales = scales[torch.isfinite(scales * levels * 2)]
    group_max = (scales * levels).repeat_interleave(levels * len(ULP_STEPS))
    halves = torch.arange(levels, dtype=torch.float32).repeat_interleave(len(ULP_STEPS)) + 0.5
    ties = (scales[:, None] * halves[None, :]).flatten()
    x = ties.view(torch.int32) + torch.tensor(ULP_STEPS, dtype=torch.int32).repeat(levels * len(scales))
    return x.view(torch.float32), torch.zeros_like(group_max), group_max


def reference_codes(x, group_min, group_max, bits, scale_dtype):
    """``quantize_ref``'s arithmetic, one element per group: IEEE division by the stored scale."""
    levels = torch.full((), 2**bits - 1, dtype=torch.float32, device=x.device)
    mn = group_min.to(scale_dtype).float()
    scale = ((group_max - mn) / levels).to(scale_dtype).float()
    codes = torch.round((x - mn) / torch.where(scale > 0, scale, 1.0)).clamp(0, 2**bits - 1)
    return torch.where(scale > 0, codes, 0.0).to(torch.int32), scale


def check_codes(scale_dtype: torch.dtype, bits: int, sample: int | None) -> None:
    generator = torch.Generator().manual_seed(bits)
    scales = positive_scales(scale_dtype, generator)
    if sample is not None:
        scales = scales[torch.randperm(len(scales), generator=generator)[:sample]]
    x, group_min, group_max = near_ties(scales, bits)
    # Groups spanning float32 subnormals, whose scale quotient is subnormal too.
    tiny_spans = torch.tensor([2.0**-149, 2.0**-140, 2.0**-127, 1e-38, 3 * 2.0**-126, 2.0**-120])
    x, group_min, group_max = (torch.cat([t, extra]).to(DEVICE) for t, extra in
                               zip((x, group_min, group_max), (tiny_spans / 2, torch.zeros(6), tiny_spans)))  # fmt: skip
    expected_codes, expected_scales = reference_codes(x, group_min, group_max, bits, scale_dtype)
    codes = torch.full_like(x, -1, dtype=torch.int32)
    scales = torch.full_like(x, float("nan"))
    block = 1024
    _quantize_elements_kernel[(triton.cdiv(len(x), block),)](
        x, group_min, group_max, codes, scales, len(x), BITS=bits, SCALE_DTYPE=TL_DTYPES[scale_dtype], BLOCK=block
    )
    assert torch.equal(scales, expected_scales)
    wrong = (codes != expected_codes).nonzero().flatten()
    assert len(wrong) == 0, (
        f"{len(wrong)} of {len(x)} codes differ, first x={x[wrong[:3]].tolist()} "
        f"scale={expected_scales[wrong[:3]].tolist()}: {codes[wrong[:3]].tolist()} vs {expected_codes[wrong[:3]].tolist()}"
    )


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_codes_next_to_ties_match_ieee_division(scale_dtype, bits):
    check_codes(scale_dtype, bits, sample=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_codes_next_to_ties_match_ieee_division_for_every_scale(scale_dtype, bits):
    check_codes(scale_dtype, bits, sample=None)
