"""A/B of the append kernel: HEAD's (scratch/s38/old_append.py) vs the working tree's (new-token load beside the
lengths, ticket last), timed by bench_decode_attention.bench_append (B8 H32 D128 T4k 2-bit, 32 layers), alternating."""
import importlib.util, sys, statistics
sys.path.insert(0, "benchmarks")
import torch
import bench_decode_attention as bench
import kivi_compile.kernels.append as new
spec = importlib.util.spec_from_file_location("kivi_compile.kernels._old_append", "scratch/s38/old_append.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
print(torch.cuda.get_device_name(), torch.__version__)
fields = ["append_ms_typical", "append_ms_key_flush", "append_ms_amortized_gpu", "attention_ms_gpu", "append_share_gpu",
          "append_ms_amortized", "attention_ms", "append_share"]
results = {"old": [], "new": []}
for round in range(3):
    for name, module in (("old", old), ("new", new)):
        bench.launch_append_kv = module.launch_append_kv
        r = bench.bench_append()
        results[name].append(r)
        print(round, name, " ".join(f"{f}={r[f]:.4f}" for f in fields), flush=True)
for f in fields:
    o = statistics.median(r[f] for r in results["old"]); n = statistics.median(r[f] for r in results["new"])
    print(f"{f:28s} old {o:.4f} new {n:.4f} new/old {n / o:.3f}")
