"""profile_decode_step's arithmetic on the CPU: per-step milliseconds and the kernels ranked by time."""

import pytest

from kivi_helpers import benchmark_script


@pytest.fixture
def profile_script(monkeypatch):
    return benchmark_script("profile_decode_step", monkeypatch)


def test_a_steps_time_is_the_long_generate_less_the_short_one(profile_script):
    long = {"gemm_a": 9_000.0, "_append_kernel": 1_300.0}  # microseconds over a whole generate
    short = {"gemm_a": 1_000.0}  # the append ran only in the long one
    per_step = profile_script.per_step_ms(long, short, steps=4)
    assert per_step == pytest.approx({"gemm_a": 2.0, "_append_kernel": 0.325})
    assert profile_script.by_kind(per_step) == pytest.approx({"matmul": 2.0, "kivi append": 0.325})


def test_the_top_kernels_come_slowest_first_with_their_kind(profile_script):
    kernels = {"triton_poi_fused_cat_cos_decode_attention_mul_0": 0.2, "sm90_xmma_gemm_f16": 5.0,
               "_decode_attention_kernel": 1.5, "_append_kv_kernel": 0.1}  # fmt: skip
    row = {"method": "kivi-k2v2", "batch": 512, "kernels": kernels}
    top = profile_script.top_kernels(row, 3)
    assert [line[4] for line in top] == ["sm90_xmma_gemm_f16", "_decode_attention_kernel",
                                         "triton_poi_fused_cat_cos_decode_attention_mul_0"]  # fmt: skip
    # Inductor's fused rotary kernel is named after the KIVI op it feeds; it is not attention.
    assert [line[2] for line in top] == ["matmul", "kivi attention: triton", "inductor fused"]
    assert all(line[:2] == ["kivi-k2v2", 512] for line in top)
