"""Compile the Gluon decode kernel for sm_90 on a machine without a GPU: registers and spills per variant.

The GPU machines run another Triton than the CPU machines (3.6 against 3.9 here), and no CPU test runs
the Gluon kernel (Triton's interpreter cannot), so a change one Triton's Gluon front end or ptxas rejects
shows first on a GPU. This compiles the kernel as a launch on an H100 would, from the arguments the launch
code builds for small CPU inputs, for each variant named ``key_bits,value_bits,rows,mask_kind`` (mask kind
0 none, 1 boolean, 2 additive), and prints the registers and local-memory (spill) bytes ptxas reports.
Run it under each Triton a change must work with, e.g. a virtual environment with the GPU machines' 3.6:

    python benchmarks/compile_gluon_kernel.py 2,2,1,0 2,2,8,1 4,4,1,0 4,2,4,2 2,2,16,1
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # the kernels' helpers must be compiled, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from tabulate import tabulate  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import CompiledKernel  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from kivi_compile.cache import KiviCacheTensor  # noqa: E402
from kivi_compile.config import KiviConfig  # noqa: E402
from kivi_compile.kernels import decode_attention_mma  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)


def compile_variant(key_bits: int, value_bits: int, rows: int, mask_kind: int) -> CompiledKernel:
    """The kernel compiled for the H100 with the constexprs and options a launch with these inputs passes."""
    config = KiviConfig(key_bits=key_bits, value_bits=value_bits, group_size=32, residual_length=128)
    key = KiviCacheTensor.from_dense(torch.randn(1, 1, 300, 128).half(), config.key_spec()).kv
    value = KiviCacheTensor.from_dense(torch.randn(1, 1, 300, 128).half(), config.value_spec()).kv
    q = torch.randn(1, rows, 1, 128).half()
    mask = {0: None, 1: torch.ones(1, rows, 1, 128, dtype=torch.uint8), 2: torch.zeros(1, rows, 1, 128).half()}
    partials = (torch.empty(16, 128), torch.empty(16), torch.empty(16))
    with mock.patch.object(decode_attention_mma, "_sm90", lambda device: True):  # the H100's constexprs
        args, options = decode_attention_mma._arguments(q, key, value, key_bits, value_bits, mask[mask_kind],
                                                        mask_kind, 1.0, 128, 1, *partials)  # fmt: skip
    kernel = decode_attention_mma._quantized_blocks_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    compile_options = {name: options.pop(name) for name in ("num_warps", "maxnreg") if name in options}
    values = {**dict(zip(names, args)), **options}
    signature = {name: "constexpr" if name in options else mangle_type(values[name]) for name in names}
    constexprs = {(i,): options[name] for i, name in enumerate(names) if name in options}
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, param) in enumerate(zip(names, kernel.params))
               if name not in options and not param.do_not_specialize and _multiple_of_16(values[name])}  # fmt: skip
    source = GluonASTSource(kernel, signature, constexprs, aligned)
    return triton.compile(source, target=H100, options=compile_options)


def _multiple_of_16(value: object) -> bool:
    """Whether a launch would specialize the argument as divisible by 16 (pointers' addresses, integers)."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and value % 16 == 0


def resource_usage(compiled: CompiledKernel) -> tuple[str, str]:
    """(registers, spill bytes) of a compiled kernel from ``cuobjdump -res-usage`` (Triton ships it)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    registers, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return (registers.group(1) if registers else "-"), (stack.group(1) if stack else "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="key_bits,value_bits,rows,mask_kind")
    variants = [tuple(map(int, variant.split(","))) for variant in parser.parse_args().variants]
    rows = []
    for variant in variants:
        registers, spilled = resource_usage(compile_variant(*variant))
        rows.append([*variant, registers, spilled])
    print(f"triton {triton.__version__}, sm_90")
    print(tabulate(rows, headers=["key bits", "value bits", "query rows", "mask kind", "registers", "spill bytes"]))


if __name__ == "__main__":
    main()
