"""Session 27: the Gluon path's Triton tail alone per tile (TILES="n:w:r,..."), and the whole op, for kernels package
copies (argv: name=dir, the first is the baseline), alternating in one process; CUDA-graph medians, error against
the float32 PyTorch reference. SHAPES env: "batch:q_heads:kv_heads:tokens:bits[:mask]" separated by commas."""
import importlib
import math
import os
import statistics
import sys
import types

import torch
import triton
from tabulate import tabulate
from triton.testing import do_bench_cudagraph

from kivi_compile.cache import KiviCacheTensor
from kivi_compile.config import KiviConfig


def kernels_copy(name: str, path: str):
    package = types.ModuleType(name)
    package.__path__ = [path]
    sys.modules[name] = package
    return importlib.import_module(f"{name}.decode_attention")


VARIANTS = [(spec.split("=")[0], kernels_copy("ab_" + spec.split("=")[0], spec.split("=")[1])) for spec in sys.argv[1:]]
TILE_SPECS = [tuple(int(x) for x in spec.split(":")) for spec in os.environ["TILES"].split(",")]
TILES = {f"N{n}w{w}r{r}": triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=1, maxnreg=r) for n, w, r in TILE_SPECS}
SHAPES = [tuple(spec.split(":")) for spec in os.environ["SHAPES"].split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "2"))
OP = os.environ.get("OP", "1") == "1"

table = []
for spec in SHAPES:
    batch, q_heads, kv_heads, tokens, bits = (int(x) for x in spec[:5])
    with_mask = len(spec) > 5 and spec[5] == "mask"
    torch.manual_seed(0)
    config = KiviConfig(key_bits=bits, value_bits=bits, group_size=32, residual_length=128)
    dense = torch.randn(batch, kv_heads, tokens, 128, device="cuda", dtype=torch.float16)
    key = KiviCacheTensor.from_dense(dense, config.key_spec()).kv
    value = KiviCacheTensor.from_dense(torch.randn_like(dense), config.value_spec()).kv
    del dense
    q = torch.randn(batch, q_heads, 1, 128, device="cuda", dtype=torch.float16)
    # HF's mask in generate on the GPU machine's transformers: boolean, all True, as wide as the sequence
    mask = torch.ones(batch, 1, 1, tokens, device="cuda", dtype=torch.bool) if with_mask else None
    base_da = VARIANTS[0][1]
    reference = base_da.decode_attention_ref(q, key, value, mask, None, False, bits, bits, 32).float()
    lengths = f"kq {int(key.lengths[0])} vq {int(value.lengths[0])}"
    launches = {}
    for name, da in VARIANTS:
        mask_arg = None if mask is None else mask.expand(batch, q_heads, 1, tokens).view(torch.uint8)
        call = da._Call.of(q, key, value, mask_arg, 1 if with_mask else 0, False, da.LOG2E / math.sqrt(128),
                           bits, bits, 32)
        mma = da.mma_blocks
        capacity = mma.quantized_capacity(key, value, bits)
        narrow = mma.narrow_index(bits, bits, q_heads // kv_heads)
        splits = mma.num_splits(call.programs, da._multiprocessors(q.device), capacity, narrow)
        partials = da._partial_buffers(call, splits)
        mma.launch(q, key, value, bits, bits, call.mask, call.mask_kind, call.qk_scale, capacity, splits, splits,
                   narrow, *partials)
        out = torch.full_like(q, float("nan"))
        for tile_name, tile in TILES.items():
            launches[(name, tile_name)] = (lambda tile=tile, da=da, call=call, partials=partials, out=out, splits=splits:
                                           da._launch_split_kernel(tile, 1, splits, call, 0, *partials, out,
                                                                   tail_block=32), out)
        if OP:
            op_out = torch.full_like(q, float("nan"))
            launches[(name, "op")] = (lambda da=da, op_out=op_out: da.decode_attention_triton(
                q, key, value, mask, None, False, bits, bits, 32, out=op_out), op_out)
    errors = {}
    for key_ in list(launches):
        try:
            launches[key_][0]()
            torch.cuda.synchronize()
            errors[key_] = ((launches[key_][1].float() - reference).norm() / reference.norm()).item()
        except Exception as error:  # a tile this GPU cannot compile
            print("skip", key_, type(error).__name__, str(error)[:200], flush=True)
            del launches[key_]
    times = {key_: [] for key_ in launches}
    for round_ in range(ROUNDS):
        order = list(launches) if round_ % 2 == 0 else list(reversed(launches))
        for key_ in order:
            times[key_].append(do_bench_cudagraph(launches[key_][0], return_mode="median"))
    base = statistics.median(times[(VARIANTS[0][0], next(iter(TILES)))])
    for key_ in launches:
        name, what = key_
        gpu = statistics.median(times[key_])
        table.append([f"B{batch} H{q_heads}/{kv_heads} T{tokens} ({lengths}){' mask' if with_mask else ''}", bits,
                      "whole op" if what == "op" else f"tail {what}", name, gpu,
                      base / gpu if what != "op" else float("nan"), errors[key_]])
        print(table[-1], flush=True)
    del key, value, launches

print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
print(tabulate(table, headers=["case", "bits", "launch", "variant", "GPU alone ms", "x first tile of first variant",
                               "rel err vs reference"], floatfmt=".4f"))  # fmt: skip
for name, _ in VARIANTS:
    for kernel, compiled_by_key in sys.modules[f"ab_{name}.launch"]._COMPILED.values():
        for key_, compiled in compiled_by_key.items():
            if "decode_attention_kernel" in compiled.name:
                print(name, compiled.name, [o for o in key_[2] if o[0] in ("BLOCK_N", "BLOCK_M", "num_warps", "maxnreg", "MASK_KIND", "K_BITS")],
                      "registers", compiled.n_regs, "spills", compiled.n_spills)
if os.environ.get("AB_JSON"):
    import json
    with open(os.environ["AB_JSON"], "w") as f:
        json.dump(table, f)
