"""Host cost of calling a KIVI op, by how the op is registered (CPU, no GPU needed).

A decode step calls ``kivi::append_`` twice and ``kivi::decode_attention`` once per layer, so at
batch 1 the per-call overhead of the op registration is part of every token's latency. This times
an empty op with ``kivi::append_``'s schema registered two ways, under ``torch.no_grad`` as
``generate`` runs: ``torch.library.custom_op`` (Python autograd and view-tracking layers on every
call) and a schema on a ``torch.library.Library`` (how ``kernels/ops.py`` registers the ops).
Prints the median of several runs, microseconds per call, and the ratio to ``custom_op``.

    python benchmarks/bench_op_dispatch.py
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
from tabulate import tabulate
from torch import Tensor

_LIB = torch.library.Library("kivi_dispatch_bench", "DEF")
_SCHEMA = ("(Tensor(a!) codes, Tensor(b!) scales, Tensor(c!) mins, Tensor(d!) residual, Tensor(e!) lengths, "
           "Tensor new, int bits, int group_size, int residual_length, bool per_channel) -> ()")  # fmt: skip
_LIB.define("library_append_" + _SCHEMA)
_LIB.impl("library_append_", lambda *args: None, "CompositeExplicitAutograd")


@torch.library.custom_op("kivi_dispatch_bench::custom_op_append_", mutates_args=("codes", "scales", "mins", "residual",
                                                                                  "lengths"))  # fmt: skip
def custom_op_append_(codes: Tensor, scales: Tensor, mins: Tensor, residual: Tensor, lengths: Tensor, new: Tensor,
                      bits: int, group_size: int, residual_length: int, per_channel: bool) -> None:  # fmt: skip
    return None


def microseconds_per_call(op, calls: int = 2000, repeats: int = 9) -> float:
    args = (*(torch.randn(4) for _ in range(6)), 2, 32, 128, True)
    for _ in range(calls // 10):  # warm-up
        op(*args)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            op(*args)
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    ops = {
        "torch.library.custom_op": torch.ops.kivi_dispatch_bench.custom_op_append_.default,
        "Library + schema (kernels/ops.py)": torch.ops.kivi_dispatch_bench.library_append_.default,
    }
    with torch.no_grad():
        timings = {name: microseconds_per_call(op) for name, op in ops.items()}
    baseline = timings["torch.library.custom_op"]
    print(f"{platform.processor() or platform.machine()} | torch {torch.__version__} | empty op, append_'s schema")
    rows = [[name, us, baseline / us] for name, us in timings.items()]
    print(tabulate(rows, headers=["registration", "µs per call", "x faster than custom_op"], floatfmt=".1f"))


if __name__ == "__main__":
    main()
