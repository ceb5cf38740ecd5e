"""Where a decode step's host time goes at small batch: ``cProfile`` over ``generate`` on the GPU.

At batch 1 a decode step waits on the host (Python, dispatch, kernel launches), not the GPU; this
lists the functions that take that time. After a warm-up ``generate`` that compiles the graphs, one
``generate`` of ``--new`` tokens runs under the profiler; the tables are sorted by own time and by
cumulative time.

    python benchmarks/profile_host.py --method kivi-k2v2 --batch 1 --prompt 330 --new 20
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

from bench_generate import SHAPES, Method, build_model, synchronize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-2-7b")
    parser.add_argument("--method", default="kivi-k2v2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=330)
    parser.add_argument("--new", type=int, default=20)
    parser.add_argument("--rows", type=int, default=40, help="functions listed per table")
    parser.add_argument("--device", default="cuda", help="cpu runs the reference ops (a smoke test)")
    args = parser.parse_args()

    model = build_model(args.shape, args.device, torch.float16 if args.device == "cuda" else torch.float32)
    prompt = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt), device=args.device)

    with Method(args.method, model, "inductor") as method:

        def generate() -> None:
            method.generate(prompt, args.new)
            synchronize(args.device)

        generate()  # compiles
        profiler = cProfile.Profile()
        profiler.runcall(generate)
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.rows)
    stats.sort_stats("cumulative").print_stats(args.rows)


if __name__ == "__main__":
    main()
