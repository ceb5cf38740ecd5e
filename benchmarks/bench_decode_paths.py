"""The op's two paths at the small sizes around the Gluon path's threshold (GPU machine).

``decode_attention.MMA_MIN_TOKEN_HEADS`` sends a call to the Gluon kernel and the Triton tail when the
buffers hold at least that many quantized token-heads, and to the Triton kernel alone below it. This
times both paths at each shape, in one process, in alternating rounds: ``do_bench`` medians (host launch
time included, as in a decode step without CUDA graphs) and the GPU's time alone (a CUDA graph's
replay), with fp16 SDPA beside them and the largest difference between the paths' outputs.

    python benchmarks/bench_decode_paths.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
import triton
from bench_decode_attention import kivi_caches
from tabulate import tabulate

from kivi_compile.config import KiviConfig
from kivi_compile.kernels import decode_attention, decode_attention_mma
from kivi_compile.kernels.decode_attention import median_ms, replayed_ms

# (batch, query heads, KV heads, cached tokens), 2-bit, G = 32, R = 128, head_dim 128
SHAPES = [(8, 32, 32, 1024), (8, 32, 32, 2048), (32, 32, 8, 1024), (96, 32, 32, 340), (8, 32, 32, 4096),
          (1, 32, 32, 4096), (1, 32, 32, 1024), (1, 32, 32, 340)]  # fmt: skip
ROUNDS = 3
PATHS = {"triton": float("inf"), "gluon": 0}  # the threshold that sends every call down each path


def bench_shape(batch: int, heads: int, kv_heads: int, tokens: int) -> list:
    torch.manual_seed(0)
    config = KiviConfig(key_bits=2, value_bits=2, group_size=32, residual_length=128)
    q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.float16)
    keys = torch.randn(batch, kv_heads, tokens, 128, device="cuda", dtype=torch.float16)
    values = torch.randn_like(keys)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=kv_heads != heads)

    key, value = kivi_caches(keys, values, config)

    def op() -> torch.Tensor:
        return decode_attention.decode_attention_triton(q, key.kv, value.kv, None, None, False, 2, 2, 32)

    outputs = {}
    for path, threshold in PATHS.items():
        decode_attention.MMA_MIN_TOKEN_HEADS = threshold
        outputs[path] = op().float()
    times = {name: [] for name in ("sdpa", *PATHS)}
    gpu = {name: [] for name in times}
    for _ in range(ROUNDS):
        times["sdpa"].append(median_ms(sdpa))
        gpu["sdpa"].append(replayed_ms(sdpa))
        for path, threshold in PATHS.items():
            decode_attention.MMA_MIN_TOKEN_HEADS = threshold
            times[path].append(median_ms(op))
            gpu[path].append(replayed_ms(op))
    ms = {name: statistics.median(values) for name, values in times.items()}
    gpu_ms = {name: statistics.median(values) for name, values in gpu.items()}
    token_heads = batch * kv_heads * decode_attention_mma.quantized_capacity(key.kv, value.kv, 2)
    return [batch, f"{heads}/{kv_heads}", tokens, token_heads, ms["sdpa"], ms["triton"], ms["gluon"],
            gpu_ms["sdpa"], gpu_ms["triton"], gpu_ms["gluon"], gpu_ms["sdpa"] / gpu_ms["triton"],
            gpu_ms["sdpa"] / gpu_ms["gluon"], (outputs["triton"] - outputs["gluon"]).abs().max().item()]  # fmt: skip


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_paths.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"threshold {decode_attention.MMA_MIN_TOKEN_HEADS} token-heads")  # fmt: skip
    threshold = decode_attention.MMA_MIN_TOKEN_HEADS
    try:
        rows = [bench_shape(*shape) for shape in SHAPES]
    finally:
        decode_attention.MMA_MIN_TOKEN_HEADS = threshold
    print(tabulate(rows, headers=["B", "H/Hkv", "T", "token-heads", "sdpa ms", "triton ms", "gluon ms", "sdpa GPU",
                                  "triton GPU", "gluon GPU", "x sdpa triton GPU", "x sdpa gluon GPU", "max diff"],
                   floatfmt=".4f"))  # fmt: skip


if __name__ == "__main__":
    main()
