"""Host time of one decode-attention call's own Python, on the CPU (no GPU needed).

At small batch a decode step waits on the host: on the GPU machines one call of the op took 100-230 us
of host time at B = 8 (thirteenth session), Triton's launches included. This times the part this
project writes, with every kernel replaced by a stand-in that launches nothing: choosing the path,
the plan or the tail's tile, allocating the partial buffers and gathering some 60 launch arguments.
Two paths: the Triton kernel alone (B = 8, T = 512, one launch: below the Gluon path's threshold the
sequence is not split) and the Gluon kernel and the Triton tail, which combines (B = 8, T = 4k, every
input check but the GPU's). Medians of several runs, us per call.

    python benchmarks/bench_launch_host.py
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from tabulate import tabulate

from kivi_compile.cache import KiviCacheTensor
from kivi_compile.config import KiviConfig
from kivi_compile.kernels import decode_attention, decode_attention_mma

CASES = {"Triton kernel": 512, "Gluon kernel + tail": 4096}  # tokens cached, B = 8


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` takes the arguments, runs nothing."""

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _first_plan(launch: Callable, splits: Callable, out: torch.Tensor) -> decode_attention._TunedPlans:
    """Tuning stood in: the first candidate plan, for launches and replays alike."""
    plan = decode_attention._candidate_plans()[0]
    return decode_attention._TunedPlans(plan, plan)


@contextlib.contextmanager
def kernels_stood_in() -> Iterator[None]:
    """Every kernel launches nothing; the Gluon path is open to CPU tensors; tuning picks the first
    candidate (it times launches, which there are none of)."""
    da, mma = decode_attention, decode_attention_mma
    patches = [
        mock.patch.object(da, "_decode_attention_kernel", _NoLaunch()),
        mock.patch.object(da, "_combine_splits_kernel", _NoLaunch()),
        mock.patch.object(mma, "_quantized_blocks_kernel", _NoLaunch()),
        # The compile that counts the kernel's registers runs once per variant, not per call: here it reports
        # the H100's 126 (2-bit codes, one query row).
        mock.patch.object(mma, "compiled_registers", lambda kernel, *args, **options: 126),
        mock.patch.object(mma, "_PROGRAMS_PER_MULTIPROCESSOR", {}),
        mock.patch.object(mma, "unsupported", mma.inputs_unsupported),
        mock.patch.object(mma, "_sm90", lambda device: True),  # the H100's launch options
        mock.patch.object(da, "_fastest_plans", _first_plan),
        mock.patch.object(da, "_fastest_tail_tile", lambda launch, out, rows: da._tail_tiles(rows)[0]),
        mock.patch.object(da, "_TUNED_PLANS", {}),
        mock.patch.object(da, "_TUNED_TAIL_TILES", {}),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def microseconds_per_call(tokens: int, calls: int = 4000, repeats: int = 15) -> tuple[str, float]:
    """The path the op takes for B = 8, H = 32, D = 128, 2-bit, G = 32 and ``tokens``, and its median
    host time per call."""
    config = KiviConfig(key_bits=2, value_bits=2, group_size=32, residual_length=128)
    dense = torch.randn(8, 32, tokens, 128, dtype=torch.float16)
    key = KiviCacheTensor.from_dense(dense, config.key_spec()).kv
    value = KiviCacheTensor.from_dense(torch.randn_like(dense), config.value_spec()).kv
    q = torch.randn(8, 32, 1, 128, dtype=torch.float16)
    out = torch.empty_like(q)
    path = "Gluon" if decode_attention.uses_mma_path(q, key, value, False, 2, 2, 32) else "Triton"
    runs = []
    for _ in range(repeats + 1):  # the first run is a warm-up
        start = time.perf_counter()
        for _ in range(calls):
            decode_attention.launch_decode_attention(q, key, value, None, None, False, 2, 2, 32, out)
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return path, statistics.median(runs[1:])


def main() -> None:
    with kernels_stood_in():
        rows = [[case, *microseconds_per_call(tokens)] for case, tokens in CASES.items()]
    print(f"{platform.processor() or platform.machine()} | torch {torch.__version__} | B=8 H=32 D=128 2-bit G=32")
    print(tabulate(rows, headers=["call", "path taken", "µs per call"], floatfmt=".1f"))


if __name__ == "__main__":
    main()
