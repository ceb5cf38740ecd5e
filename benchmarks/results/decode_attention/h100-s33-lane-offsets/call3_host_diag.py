"""Why the op's do_bench time went up at some shapes: host time per call (perf_counter, no sync), do_bench
medians x3, GPU alone, and a cProfile of 200 calls; with the splits fitted to registers and forced to 8/SM."""
import cProfile, pstats, io, sys, time, statistics
import torch, triton
from triton.testing import do_bench, do_bench_cudagraph
sys.path.insert(0, "benchmarks")
from bench_decode_attention import kivi_caches
from kivi_compile.config import KiviConfig
from kivi_compile.kernels import decode_attention, decode_attention_mma as mma
from kivi_compile.kernels.decode_attention import decode_attention_triton

CASES = [(8, 32, 32, 1024, 2), (8, 32, 32, 4096, 2), (8, 32, 32, 1024, 4), (32, 32, 8, 4096, 2), (8, 32, 32, 4096, 4)]
real = mma.programs_per_multiprocessor
for forced in (None, 8):
    mma.programs_per_multiprocessor = real if forced is None else (lambda *a, f=forced: f)
    for b, h, hkv, t, bits in CASES:
        config = KiviConfig(key_bits=bits, value_bits=bits, group_size=32, residual_length=128)
        q = torch.randn(b, h, 1, 128, device="cuda", dtype=torch.float16)
        keys = torch.randn(b, hkv, t, 128, device="cuda", dtype=torch.float16)
        key, value = kivi_caches(keys, torch.randn_like(keys), config)
        fn = lambda: decode_attention_triton(q, key.kv, value.kv, None, None, False, bits, bits, 32)
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        host = []
        for _ in range(200):
            t0 = time.perf_counter(); fn(); host.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
        benches = [do_bench(fn, return_mode="median") for _ in range(3)]
        gpu = do_bench_cudagraph(fn, return_mode="median")
        print(f"forced={forced} B{b} H{h}/{hkv} T{t} {bits}-bit: host median {statistics.median(host):.4f} ms "
              f"(p90 {sorted(host)[180]:.4f}), do_bench {' '.join(f'{x:.4f}' for x in benches)}, GPU {gpu:.4f}", flush=True)
        if forced is None and t == 4096 and bits == 2 and hkv == 32:
            pr = cProfile.Profile(); pr.enable()
            for _ in range(200):
                fn()
            pr.disable(); torch.cuda.synchronize()
            s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18); print(s.getvalue()[:5000])
