"""Whole op (Gluon kernel + Triton tail), the tail launched as a programmatic dependent or not, alternating
in one process: do_bench median (L2 flushed, host time in) and CUDA-graph replay median (GPU alone)."""
import os
import statistics

import torch
import triton
from tabulate import tabulate
from triton.testing import do_bench, do_bench_cudagraph

from kivi_compile.cache import KiviCacheTensor
from kivi_compile.config import KiviConfig
from kivi_compile.kernels import decode_attention as da
from kivi_compile.kernels import decode_attention_mma as mma

ROUNDS = int(os.environ.get("ROUNDS", 3))
SHAPES = [(8, 32, 32, 32768, 2), (8, 32, 32, 32768, 4), (32, 32, 8, 32768, 2), (8, 32, 32, 4096, 2),
          (8, 32, 32, 1024, 2), (192, 32, 32, 340, 2), (8, 32, 2, 32768, 2)]
early = mma.launches_dependents_early
variants = {"serial": lambda device: False, "dependent": early}
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
table = []
for batch, q_heads, kv_heads, tokens, bits in SHAPES:
    torch.manual_seed(0)
    config = KiviConfig(key_bits=bits, value_bits=bits, group_size=32, residual_length=128)
    dense = torch.randn(batch, kv_heads, tokens, 128, device="cuda", dtype=torch.float16)
    key = KiviCacheTensor.from_dense(dense, config.key_spec()).kv
    value = KiviCacheTensor.from_dense(torch.randn_like(dense), config.value_spec()).kv
    del dense
    q = torch.randn(batch, q_heads, 1, 128, device="cuda", dtype=torch.float16)
    outs = {name: torch.empty_like(q) for name in variants}

    def op(name):
        mma.launches_dependents_early = variants[name]  # the op reads it at each call
        da.decode_attention_triton(q, key, value, None, None, False, bits, bits, 32, outs[name])

    for name in variants:
        op(name)
    torch.cuda.synchronize()
    diff = ((outs["dependent"].float() - outs["serial"].float()).abs().max() / outs["serial"].float().abs().max()).item()
    graphs = {}
    for name in variants:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        mma.launches_dependents_early = variants[name]
        with torch.cuda.stream(stream):
            da.decode_attention_triton(q, key, value, None, None, False, bits, bits, 32, outs[name])
            with torch.cuda.graph(graph, stream=stream):
                da.decode_attention_triton(q, key, value, None, None, False, bits, bits, 32, outs[name])
        graphs[name] = graph
    outs["serial"].zero_(); outs["dependent"].zero_()
    graphs["serial"].replay(); graphs["dependent"].replay(); torch.cuda.synchronize()
    graph_diff = ((outs["dependent"].float() - outs["serial"].float()).abs().max() / outs["serial"].float().abs().max()).item()
    times = {name: ([], []) for name in variants}
    for _ in range(ROUNDS):
        for name in variants:
            op(name)
            times[name][0].append(do_bench(lambda: da.decode_attention_triton(
                q, key, value, None, None, False, bits, bits, 32, outs[name]), return_mode="median"))
            times[name][1].append(do_bench(graphs[name].replay, return_mode="median"))
    base = statistics.median(times["serial"][1])
    for name in variants:
        bench, alone = statistics.median(times[name][0]), statistics.median(times[name][1])
        table.append((f"B{batch} H{q_heads}/{kv_heads} T{tokens}", bits, name, f"{bench:.4f}", f"{alone:.4f}",
                      f"{base / alone:.3f}", f"{diff:.1e}", f"{graph_diff:.1e}"))
    print(tabulate(table[-2:], tablefmt="plain"), flush=True)
print(tabulate(table, headers=["case", "bits", "tail", "do_bench ms", "graph replay ms", "x serial (graph)",
                               "out diff", "graph out diff"]))
