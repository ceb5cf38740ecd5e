"""Fused KIVI decode attention vs fp16 SDPA on the GPU, and the cost of quantize-on-append.

For each shape (batch B, query heads H, KV heads Hkv, head dim D, cached tokens T, bits, group G;
residual R = 128, one query token) the same run times, as medians of ``triton.testing.do_bench``
(each call launched from Python, as a caller without CUDA graphs sees it):

- ``sdpa``:   ``F.scaled_dot_product_attention`` over the fp16 K/V (``enable_gqa`` for GQA), the baseline;
- ``ref``:    the PyTorch reference op (dequantize everything, then attend), for T <= --ref-max-tokens;
- ``kernel``: what the op runs on CUDA: for the shapes it is written for (float16, D = 128, 2-bit,
  G = 32), the Gluon kernel over the blocks quantized on both sides plus the Triton kernel over the
  rest; otherwise the fused Triton kernel alone (its tuned plan is named, and the plan its replays take);
- ``triton``: the fused Triton kernel alone over the whole cache, with its tuned plan;
- ``gpu`` columns: SDPA and ``kernel`` again, replayed from a CUDA graph (``do_bench_cudagraph``): the
  GPU's time alone (a recorded launch of the Triton kernel takes the plan tuned for replays). Where a
  call's kernels take less time than the host needs to launch them (small B*T), ``do_bench`` times the
  host; the two columns tell the cases apart.

GB/s is over the bytes each must read (fp16 K/V for SDPA; codes, scales, minima and residual for
KIVI); ``of copy`` compares with a device-to-device copy measured in the same run. The append
table times one decode step's appends for all layers (K and V) against the step's attention.

    python benchmarks/bench_decode_attention.py --out benchmarks/results/decode_attention
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from tabulate import tabulate

from kivi_compile.cache import KiviCacheTensor
from kivi_compile.config import KiviConfig
from kivi_compile.kernels.append import launch_append_kv
from kivi_compile.kernels.cache_layout import read_lengths
from kivi_compile.kernels import decode_attention
from kivi_compile.kernels.decode_attention import (decode_attention_ref, decode_attention_triton, median_ms,
                                                   replayed_ms)

RESIDUAL = 128
# (B, H, Hkv, D, T, bits, G): the acceptance shapes first, then the trend in T and G.
SHAPES = [
    *[(8, 32, 32, 128, t, bits, 32) for bits in (2, 4) for t in (1024, 4096, 8192, 32768)],
    (8, 32, 32, 128, 32768, 2, 64),
    (32, 32, 8, 128, 4096, 2, 32),
    (32, 32, 8, 128, 32768, 2, 32),
    (32, 32, 8, 128, 32768, 4, 32),
    (1, 32, 32, 128, 32768, 2, 32),
    (8, 32, 32, 64, 32768, 2, 32),
    *[(batch, 32, 32, 128, 340, 2, 32) for batch in (1, 96, 192)],  # bench_generate's mid-run decode step
]


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + written over time)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def kivi_caches(keys: torch.Tensor, values: torch.Tensor, config: KiviConfig) -> tuple[KiviCacheTensor, ...]:
    return KiviCacheTensor.from_dense(keys, config.key_spec()), KiviCacheTensor.from_dense(values, config.value_spec())


def used_bytes(cache: KiviCacheTensor) -> int:
    """Bytes the kernel reads: the quantized tokens' codes/scales/mins and the residual tokens."""
    n_quant, n_residual, _ = read_lengths(cache.kv)
    spec = cache.spec
    batch, heads, _, head_dim = cache.shape
    per_token = head_dim * spec.bits / 8 + 2 * (head_dim / spec.group_size) * cache.scales.element_size()
    return int(batch * heads * (n_quant * per_token + n_residual * head_dim * cache.residual.element_size()))


@contextlib.contextmanager
def triton_kernel_only() -> Iterator[None]:
    """Launches inside run the Triton kernel over every block, as on a Triton without Gluon."""
    gluon_blocks, decode_attention.mma_blocks = decode_attention.mma_blocks, None
    try:
        yield
    finally:
        decode_attention.mma_blocks = gluon_blocks


def bench_shape(batch, heads, kv_heads, head_dim, seq_len, bits, group, ref_max_tokens) -> dict:
    config = KiviConfig(key_bits=bits, value_bits=bits, group_size=group, residual_length=RESIDUAL)
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.float16)
    keys = torch.randn(batch, kv_heads, seq_len, head_dim, device="cuda", dtype=torch.float16)
    values = torch.randn_like(keys)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=kv_heads != heads)

    sdpa_ms, sdpa_gpu_ms = median_ms(sdpa), replayed_ms(sdpa)
    sdpa_bytes = 2 * keys.numel() * keys.element_size()
    key, value = kivi_caches(keys, values, config)
    del keys, values

    def attention() -> torch.Tensor:
        return decode_attention_triton(q, key.kv, value.kv, None, None, False, bits, bits, group)

    kernel_ms = median_ms(attention)  # tunes first: the graph below replays the tuned launch
    kernel_gpu_ms = replayed_ms(attention)
    gluon = decode_attention.uses_mma_path(q, key.kv, value.kv, False, bits, bits, group)
    with triton_kernel_only():
        decode_attention._TUNED_PLANS.clear()  # each shape is timed with the plan fastest for it
        triton_ms = median_ms(attention)
    ((plan, replayed_plan),) = decode_attention._TUNED_PLANS.values()
    ref_ms = None
    if seq_len <= ref_max_tokens:
        ref_ms = median_ms(lambda: decode_attention_ref(q, key.kv, value.kv, None, None, False, bits, bits, group),
                           warmup=5, rep=50)  # fmt: skip
    kivi_bytes = used_bytes(key) + used_bytes(value)
    return dict(B=batch, H=heads, Hkv=kv_heads, D=head_dim, T=seq_len, bits=bits, G=group,
                sdpa_ms=sdpa_ms, ref_ms=ref_ms, kernel_ms=kernel_ms, triton_ms=triton_ms,
                sdpa_gbps=sdpa_bytes / sdpa_ms / 1e6, kernel_gbps=kivi_bytes / kernel_ms / 1e6,
                kernel="gluon + triton tail" if gluon else f"triton {plan}", triton_plan=str(plan),
                triton_replayed_plan=str(replayed_plan),
                bytes_ratio=sdpa_bytes / kivi_bytes, speedup=sdpa_ms / kernel_ms, sdpa_gpu_ms=sdpa_gpu_ms,
                kernel_gpu_ms=kernel_gpu_ms, speedup_gpu=sdpa_gpu_ms / kernel_gpu_ms)  # fmt: skip


def bench_append(batch=8, heads=32, head_dim=128, seq_len=4096, bits=2, group=32, layers=32) -> dict:
    """One step's appends for all layers (one launch per layer for its K and V) vs that step's
    attention, at T = ``seq_len``.

    Each timed append starts from set lengths: values always hold R + 1 residual tokens (the
    steady state: one token flushes per step); keys hold R / 2 (a typical step) or R (the step
    every R that flushes a whole block). Times are ``do_bench`` medians (host launch time included, as
    in a decode step without CUDA graphs) and, in the ``_gpu`` fields, the GPU's time alone.
    """
    if seq_len % RESIDUAL:  # the key-flush step writes tokens T - R .. T, past what a prefill of T reserves
        raise ValueError(f"bench_append: seq_len={seq_len} is not a multiple of R={RESIDUAL}; the timed steps "
                         "set lengths whose key flush needs the quantized capacity of a multiple of R")
    config = KiviConfig(key_bits=bits, value_bits=bits, group_size=group, residual_length=RESIDUAL)
    dense = torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=torch.float16)
    key, value = kivi_caches(dense, dense.clone(), config)
    del dense
    new = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.float16)
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.float16)
    prefilled = {cache.spec.role: cache.lengths.clone() for cache in (key, value)}
    starts = {
        "typical": (torch.tensor([seq_len - RESIDUAL, RESIDUAL // 2, 0, 0]), torch.tensor([seq_len - RESIDUAL - 1, RESIDUAL + 1, 0, 0])),
        "key flush": (torch.tensor([seq_len - RESIDUAL, RESIDUAL, 0, 0]), torch.tensor([seq_len - RESIDUAL - 1, RESIDUAL + 1, 0, 0])),
    }  # fmt: skip

    def timed_step(case: str) -> tuple[float, float]:
        """The append's time from ``case``'s lengths: ``do_bench`` and GPU alone (the reset's taken off)."""
        lengths = [t.cuda() for t in starts[case]]

        def reset() -> None:
            key.lengths.copy_(lengths[0])
            value.lengths.copy_(lengths[1])

        def step() -> None:
            reset()
            launch_append_kv(key.kv, value.kv, new, new, bits, bits, group, RESIDUAL, key.spec.per_channel)

        return median_ms(step) - median_ms(reset), replayed_ms(step) - replayed_ms(reset)

    (typical_ms, typical_gpu_ms), (flush_ms, flush_gpu_ms) = timed_step("typical"), timed_step("key flush")
    key.lengths.copy_(prefilled["keys"])
    value.lengths.copy_(prefilled["values"])

    def attention() -> torch.Tensor:
        return decode_attention_triton(q, key.kv, value.kv, None, None, False, bits, bits, group)

    attention_ms, attention_gpu_ms = median_ms(attention), replayed_ms(attention)
    amortized_ms = typical_ms + (flush_ms - typical_ms) / RESIDUAL
    amortized_gpu_ms = typical_gpu_ms + (flush_gpu_ms - typical_gpu_ms) / RESIDUAL
    return dict(B=batch, H=heads, D=head_dim, T=seq_len, bits=bits, layers=layers,
                append_ms_typical=layers * typical_ms, append_ms_key_flush=layers * flush_ms,
                append_ms_amortized=layers * amortized_ms, attention_ms=layers * attention_ms,
                append_share=amortized_ms / attention_ms, append_ms_amortized_gpu=layers * amortized_gpu_ms,
                attention_ms_gpu=layers * attention_gpu_ms, append_share_gpu=amortized_gpu_ms / attention_gpu_ms)  # fmt: skip


def plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    fig, ax = plt.subplots(figsize=(6, 4))
    for bits in sorted({r["bits"] for r in rows}):
        series = [r for r in rows if (r["B"], r["H"], r["Hkv"], r["D"], r["G"], r["bits"]) == (8, 32, 32, 128, 32, bits)]
        ax.plot([r["T"] for r in series], [r["speedup"] for r in series], marker="o", label=f"{bits}-bit, G=32")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set(xscale="log", xlabel="cached tokens T", ylabel="speed-up over fp16 SDPA", title="B=8, H=32, D=128")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return f"plot: {path}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_attention"))
    parser.add_argument("--ref-max-tokens", type=int, default=8192, help="time the reference up to this T")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_attention.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    print(f"{device} | torch {torch.__version__} | triton {triton.__version__} | {time.strftime('%Y-%m-%d')}")
    copy_gbps = copy_bandwidth()
    print(f"device copy: {copy_gbps:,.0f} GB/s")
    rows = []
    for shape in SHAPES:  # one line per shape as it finishes, so a run cut short still reports
        row = bench_shape(*shape, args.ref_max_tokens)
        row["of_copy"] = row["kernel_gbps"] / copy_gbps
        print(f"{shape}: sdpa {row['sdpa_ms']:.3f} ms, kernel {row['kernel_ms']:.3f} ms ({row['kernel']}), "
              f"triton alone {row['triton_ms']:.3f} ms, x{row['speedup']:.2f}; GPU alone: sdpa "
              f"{row['sdpa_gpu_ms']:.3f} ms, kernel {row['kernel_gpu_ms']:.3f} ms, x{row['speedup_gpu']:.2f}",
              flush=True)  # fmt: skip
        rows.append(row)
    headers = ["B", "H", "Hkv", "D", "T", "bits", "G", "sdpa_ms", "ref_ms", "kernel_ms", "triton_ms", "sdpa_gbps",
               "kernel_gbps", "of_copy", "kernel", "bytes_ratio", "speedup", "sdpa_gpu_ms", "kernel_gpu_ms",
               "speedup_gpu"]  # fmt: skip
    print(tabulate([[r[h] for h in headers] for r in rows], headers=headers, floatfmt=".3f"))
    append = bench_append()
    print(tabulate([append.values()], headers=list(append), floatfmt=".4f"))
    with open(args.out / "decode_attention.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d"),
                copy_gbps=copy_gbps)  # fmt: skip
    (args.out / "decode_attention.json").write_text(json.dumps(dict(meta=meta, rows=rows, append=append), indent=1))
    print(plot(rows, args.out / "decode_attention.png"))


if __name__ == "__main__":
    main()
