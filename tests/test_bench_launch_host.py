"""``benchmarks/bench_launch_host.py`` on the CPU: both paths taken, kernels stood in, the stand-ins undone."""

from __future__ import annotations

from kivi_helpers import benchmark_script

from kivi_compile.kernels import decode_attention


def test_times_the_triton_and_the_gluon_paths_without_launching(monkeypatch):
    bench = benchmark_script("bench_launch_host", monkeypatch)
    kernel, tuned = decode_attention._decode_attention_kernel, dict(decode_attention._TUNED_PLANS)
    with bench.kernels_stood_in():
        assert isinstance(decode_attention._decode_attention_kernel, bench._NoLaunch)
        timed = [bench.microseconds_per_call(tokens, calls=20, repeats=2) for tokens in bench.CASES.values()]
    assert [path for path, _ in timed] == ["Triton", "Gluon"]
    assert all(microseconds > 0 for _, microseconds in timed)
    assert decode_attention._decode_attention_kernel is kernel and decode_attention._TUNED_PLANS == tuned
