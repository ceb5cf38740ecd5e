"""The Gluon kernel of kernels package copies (argv: name=dir@programs_per_SM, or @auto: as many as the
compiled specialization's registers let fit, 4 schedulers x 16k registers; the first is the baseline), launched alone, alternating in one process: do_bench median and CUDA-graph median per round, and
the merged partial results' difference (each against the float64 attention over the same quantized blocks)."""
import importlib
import math
import statistics
import sys
import types
from pathlib import Path

import torch
import triton
from tabulate import tabulate
from triton.testing import do_bench, do_bench_cudagraph

from kivi_compile.cache import KiviCacheTensor
from kivi_compile.config import KiviConfig
from kivi_compile.kernels import decode_attention as da
from kivi_compile.kernels.cache_layout import dequantize_cache_ref



def kernels_copy(name: str, path: str):
    """The Gluon kernel module of a kernels package copy at ``path``, imported as package ``name``."""
    package = types.ModuleType(name)
    package.__path__ = [path]
    sys.modules[name] = package
    return importlib.import_module(f"{name}.decode_attention_mma")


VARIANTS = []
for spec in sys.argv[1:]:
    name, rest = spec.split("=")
    path, per_sm = rest.split("@")
    VARIANTS.append((name, kernels_copy(f"ab_{name}", path), 0 if per_sm == "auto" else int(per_sm)))
fold = VARIANTS[-1][1]

SMS = torch.cuda.get_device_properties(0).multi_processor_count
# (batch, q heads, kv heads, tokens, bits)
SHAPES = [(8, 32, 32, 32768, 2), (8, 32, 32, 32768, 4), (32, 32, 8, 32768, 2), (8, 32, 32, 4096, 2),
          (192, 32, 32, 340, 2), (8, 32, 2, 32768, 2), (8, 32, 32, 1024, 2), (32, 32, 4, 32768, 4)]
SHAPES = [SHAPES[int(i)] for i in __import__("os").environ.get("SHAPES", "0,1,2,3,4,5").split(",")]
# MASKED=1: a boolean mask (as uint8, mask kind 1) hiding each row's first 7 tokens, as left padding does
MASKED = __import__("os").environ.get("MASKED") == "1"
ROUNDS = int(__import__('os').environ.get('ROUNDS', 3))


def merged(acc, row_max, row_sum, programs, num_partials, splits, rows):
    acc = acc.view(programs, num_partials, -1, 128)[:, :splits, :rows]
    row_max = row_max.view(programs, num_partials, -1)[:, :splits, :rows]
    row_sum = row_sum.view(programs, num_partials, -1)[:, :splits, :rows]
    top = row_max.amax(1, keepdim=True)
    weight = torch.exp2(row_max - top)
    return (acc * weight[..., None]).sum(1) / (row_sum * weight).sum(1)[..., None]


table = []
for batch, q_heads, kv_heads, tokens, bits in SHAPES:
    torch.manual_seed(0)
    config = KiviConfig(key_bits=bits, value_bits=bits, group_size=32, residual_length=128)
    dense = torch.randn(batch, kv_heads, tokens, 128, device="cuda", dtype=torch.float16)
    key = KiviCacheTensor.from_dense(dense, config.key_spec()).kv
    value = KiviCacheTensor.from_dense(torch.randn_like(dense), config.value_spec()).kv
    del dense
    q = torch.randn(batch, q_heads, 1, 128, device="cuda", dtype=torch.float16)
    mask = None
    if MASKED:
        mask = torch.ones(batch, q_heads, 1, tokens + 200, device="cuda", dtype=torch.uint8)
        mask[..., :7] = 0
    call = da._Call.of(q, key, value, mask, int(MASKED), False, da.LOG2E / math.sqrt(128), bits, bits, 32)
    capacity = fold.quantized_capacity(key, value, bits)
    rows = q_heads // kv_heads
    variants = {}
    for name, module, per_sm in VARIANTS:
        def launcher(splits, module=module):
            partials = da._partial_buffers(call, splits + 1)
            return partials, lambda: module.launch(q, key, value, bits, bits, mask, int(MASKED), call.qk_scale, capacity, splits,
                                                   splits + 1, *partials)
        if per_sm == 0:  # auto: compile with one split, then fit the registers it took
            compiled_table = sys.modules[f"ab_{name}.launch"]._COMPILED
            compiled_table.clear()
            launcher(1)[1]()
            (compiled,) = list(compiled_table.values())[0][1].values()
            per_sm = 4 * (16384 // (32 * (-(-compiled.n_regs // 8) * 8)))
            print(name, f"B{batch} H{q_heads}/{kv_heads} T{tokens}", bits, "registers", compiled.n_regs,
                  "spills", compiled.n_spills, "programs/SM", per_sm, flush=True)
        splits = max(1, min(per_sm * SMS // call.programs, capacity // 128))
        partials, launch = launcher(splits)
        launch()
        torch.cuda.synchronize()
        variants[name] = (launch, merged(*partials, call.programs, splits + 1, splits, rows).clone(), splits)
    # float64 attention over the blocks quantized on both sides (tokens below the quantized length, whole blocks)
    quantized = (min(int(key.lengths[0]), int(value.lengths[0])) // 32) * 32  # N_QUANT is index 0
    err = {}
    if batch * kv_heads * tokens <= 8 * 32 * 4096 and not MASKED:
        k = dequantize_cache_ref(key, bits, 32, True)[:, :, :quantized].double()
        v = dequantize_cache_ref(value, bits, 32, False)[:, :, :quantized].double()
        qq = q.double().view(batch, kv_heads, rows, 128)
        expected = torch.softmax(qq @ k.transpose(-1, -2) / math.sqrt(128), -1) @ v
        expected = expected.view(batch * kv_heads, rows, 128)
        for name, (_, out, _) in variants.items():
            err[name] = ((out.double() - expected).norm() / expected.norm()).item()
    times = {name: ([], []) for name in variants}
    for round_ in range(ROUNDS):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name][0].append(do_bench(variants[name][0], return_mode="median"))
            times[name][1].append(do_bench_cudagraph(variants[name][0], return_mode="median"))
    base = statistics.median(times[VARIANTS[0][0]][1])
    for name, (launch, out, splits) in variants.items():
        bench_ms, graph_ms = statistics.median(times[name][0]), statistics.median(times[name][1])
        diff = ((out.float() - variants[VARIANTS[0][0]][1].float()).norm() / variants[VARIANTS[0][0]][1].float().norm()).item()
        table.append([f"B{batch} H{q_heads}/{kv_heads} T{tokens}" + (" mask" if MASKED else ""), bits, name, splits, bench_ms, graph_ms,
                      base / graph_ms, diff, err.get(name, float("nan"))])
        print(table[-1], flush=True)
    del key, value

print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {SMS} SMs")
print(tabulate(table, headers=["case", "bits", "kernel", "splits", "do_bench ms", "GPU alone ms", "x head (GPU alone)",
                               "rel diff vs head", "rel err vs fp64"], floatfmt=".4f"))  # fmt: skip
for name, module, _ in VARIANTS:
    for kernel, compiled_by_key in sys.modules[f"ab_{name}.launch"]._COMPILED.values():
        for compiled in compiled_by_key.values():
            print(name, compiled.name, "registers", compiled.n_regs, "spills", compiled.n_spills)
