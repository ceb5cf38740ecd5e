"""Where one decode step's time goes: host wall time against GPU kernel time, by kernel kind.

For each method and batch size, after a warm-up ``generate`` that compiles every graph,
``generate`` calls of ``--short`` and ``--long`` new tokens run twice each, unprofiled for the wall
time and under ``torch.profiler`` for the kernels; their difference is ``long - short`` decode
steps, so prefill cancels out. Kernels are grouped by name (matrix multiplies, KIVI attention,
KIVI append, SDPA, cache concatenation, other). A step whose wall time is far above its GPU time
is bound by the host (Python, dispatch and kernel launches), not by the GPU.

    python benchmarks/profile_decode_step.py --batches 1,96 --prompt 330
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile

from bench_generate import SHAPES, Method, build_model

KINDS = (  # first match wins: (kind, substrings of the kernel name)
    ("kivi attention: gluon blocks", ("_quantized_blocks_kernel",)),
    ("kivi attention: triton", ("_decode_attention_kernel",)),
    ("kivi attention: combine", ("_combine_splits_kernel",)),
    ("kivi append", ("_append_kernel", "_append_kv_kernel")),
    ("matmul", ("gemm", "sm90_", "cutlass", "nvjet", "xmma", "splitk")),
    # Inductor names a fused kernel after the ops it holds: a rotary embedding that feeds the KIVI ops is
    # "triton_poi_fused_..._decode_attention_...", which the SDPA rule below would take.
    ("inductor fused", ("triton_poi_", "triton_red_", "triton_per_")),
    ("sdpa", ("flash", "fmha", "attention")),
    ("cache concat", ("CatArrayBatchedCopy",)),
)


def kind_of(kernel: str) -> str:
    return next((kind for kind, names in KINDS if any(name in kernel for name in names)), "other")


def generate(method: Method, prompt: torch.Tensor, new_tokens: int) -> float:
    """Wall seconds of one ``generate`` of ``new_tokens``."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    method.generate(prompt, new_tokens)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def kernel_time(method: Method, prompt: torch.Tensor, new_tokens: int) -> tuple[dict[str, float], int]:
    """(GPU microseconds by kernel name, kernel launches) of one ``generate``, from the profiler."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(method, prompt, new_tokens)
    by_name: dict[str, float] = defaultdict(float)
    launches = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name] += event.device_time
            launches += 1
    return by_name, launches


def per_step_ms(long: dict[str, float], short: dict[str, float], steps: int) -> dict[str, float]:
    """Milliseconds per decode step of each key: the long generate's microseconds less the short one's."""
    return {key: (long[key] - short.get(key, 0.0)) / steps / 1e3 for key in long}


def by_kind(kernels: dict[str, float]) -> dict[str, float]:
    """Each kernel's time added to its kind's (:func:`kind_of`)."""
    kinds: dict[str, float] = defaultdict(float)
    for name, time_ in kernels.items():
        kinds[kind_of(name)] += time_
    return dict(kinds)


def per_step(method: Method, batch: int, args) -> dict:
    """Wall time (unprofiled), GPU time by kind and launches of one decode step."""
    prompt = torch.randint(1, method.model.config.vocab_size, (batch, args.prompt), device="cuda")
    generate(method, prompt, args.long)  # compiles every graph the profiled steps need
    steps = args.long - args.short
    wall_ms = (generate(method, prompt, args.long) - generate(method, prompt, args.short)) / steps * 1e3
    (short, short_launches), (long, long_launches) = (kernel_time(method, prompt, n) for n in (args.short, args.long))
    kernels = per_step_ms(long, short, steps)
    gpu = by_kind(kernels)
    return dict(method=method.name, batch=batch, wall_ms=wall_ms, gpu_ms=sum(gpu.values()),
                launches=(long_launches - short_launches) / steps, kernels=kernels, **gpu)  # fmt: skip


def top_kernels(row: dict, count: int) -> list[list]:
    """The ``count`` kernels with the most GPU time per step in ``row``: method, batch, kind, ms, name."""
    ranked = sorted(row["kernels"].items(), key=lambda item: -item[1])[:count]
    return [[row["method"], row["batch"], kind_of(name), ms, name[:100]] for name, ms in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-2-7b")
    parser.add_argument("--prompt", type=int, default=330, help="tokens before the profiled steps")
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=20)
    parser.add_argument("--batches", default="1,96")
    parser.add_argument("--methods", default="fp16,kivi-k2v2")
    parser.add_argument("--top", type=int, default=0, help="also list each row's N kernels with the most GPU time")
    args = parser.parse_args()

    model = build_model(args.shape, "cuda", torch.float16)
    rows = []
    for name in args.methods.split(","):
        with Method(name, model, "inductor") as method:
            rows += [per_step(method, int(batch), args) for batch in args.batches.split(",")]
    kinds = [kind for kind, _ in KINDS] + ["other"]
    headers = ["method", "batch", "wall ms/step", "GPU ms/step", "launches/step", *(f"{k} ms" for k in kinds)]
    lines = [[r["method"], r["batch"], r["wall_ms"], r["gpu_ms"], r["launches"], *(r.get(k, 0.0) for k in kinds)]
             for r in rows]  # fmt: skip
    print(f"{args.shape}, prompt {args.prompt}, steps {args.short + 1}..{args.long} on {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")  # fmt: skip
    print(tabulate(lines, headers=headers, floatfmt=".3f", tablefmt="github"))
    if args.top:
        top = [line for row in rows for line in top_kernels(row, args.top)]
        headers = ["method", "batch", "kind", "ms/step", "kernel"]
        print(tabulate(top, headers=headers, floatfmt=".3f", tablefmt="github"))


if __name__ == "__main__":
    main()
