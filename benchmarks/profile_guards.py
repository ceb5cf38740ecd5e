"""What Dynamo's guards cost a decode step: the decode frame's guards, counted by kind and timed.

Before each call of a compiled frame Dynamo checks its guards against the frame's arguments. At small
batch that check is host time before the step's CUDA-graph replay, with the GPU idle. This compiles two
copies of the model in one process: one with KIVI, one with ``backend="eager"`` on HF's dense cache (the
baseline: the same model's guards without KIVI's caches). It runs a short ``generate`` with each. For the decode frame
(the last one compiled) it counts the guards by kind and times a check against the arguments the frame
was compiled for:
- ``warm``: the median of repeated checks, with the guarded objects in the CPU caches;
- ``cold``: the median of torch's ``profile_guard_manager``, which flushes the CPU caches before a check. A
  real step also reaches its guards after other work has evicted them.

    python benchmarks/profile_guards.py                     # Llama-2-7B's 32 layers at a narrow width, CPU
    python benchmarks/profile_guards.py --shape llama-2-7b --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch._dynamo.guards as dynamo_guards
from tabulate import tabulate
from torch._C._dynamo.guards import DictGuardManager

from bench_generate import KIVI_METHODS, SHAPES, Method, build_model

BASELINE = "dense cache, backend=eager"


@contextlib.contextmanager
def captured_guards() -> Iterator[list[tuple[Any, dict]]]:
    """Each frame compiled meanwhile: its guard manager and the arguments it was compiled for.

    Dynamo calls its testing hook once per compiled frame, after building the guards: the one place that
    hands out both.
    """
    if not hasattr(dynamo_guards, "guard_manager_testing_hook_fn"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._dynamo.guards.guard_manager_testing_hook_fn")
    frames: list[tuple[Any, dict]] = []
    previous = dynamo_guards.guard_manager_testing_hook_fn
    # Older torch passes (manager, scope), newer (manager, scope, builder).
    dynamo_guards.guard_manager_testing_hook_fn = lambda manager, scope, *_: frames.append((manager, dict(scope)))
    try:
        yield frames
    finally:
        dynamo_guards.guard_manager_testing_hook_fn = previous


def count_guards(manager: Any) -> tuple[Counter, int, int]:
    """Guards by kind over the whole tree; the objects the check fetches (one per node of the tree); the
    lines of the symbolic-shape guards, which run after the tree."""
    counts: Counter = Counter()
    nodes = 0

    def visit(node: Any) -> None:
        nonlocal nodes
        nodes += 1
        counts.update(type(leaf).__name__ for leaf in node.get_leaf_guards())
        children = list(node.get_child_managers())
        if isinstance(node, DictGuardManager):
            children += [m for pair in node.get_key_value_managers().values() for m in pair if m is not None]
        for child in children:
            visit(child)

    visit(manager.root)
    shape_relations = sum(len(guard.verbose_code_parts()) for guard in manager.root.get_epilogue_lambda_guards())
    return counts, nodes, shape_relations


def check_times_us(manager: Any, scope: dict, repeats: int) -> tuple[float, float]:
    """(warm, cold) microseconds of one check of ``manager`` against ``scope``; see the module docstring."""
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        manager.check(scope)
        warm.append((time.perf_counter() - start) * 1e6)
    cold = [dynamo_guards.profile_guard_manager(manager.root, scope, 1) for _ in range(repeats)]
    return statistics.median(warm), statistics.median(cold)


@contextlib.contextmanager
def decode_frames(method: str, shape: str, device: str, prompt_len: int, new_tokens: int) -> Iterator[list[dict]]:
    """Compile a model of ``shape`` for ``method``, and another for :data:`BASELINE`; generate with each. While
    open, both stay compiled (their guards read globals Dynamo installs for them): yields their decode frames."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    kivi_model, dense_model = build_model(shape, device, dtype), build_model(shape, device, dtype)
    prompt = torch.randint(1, kivi_model.config.vocab_size, (1, prompt_len), device=device)
    with captured_guards() as frames, Method(method, kivi_model, "eager") as kivi:  # Dynamo reset on entry and exit
        kivi.generate(prompt, new_tokens)
        compiled = {method: frames[:]}
        dense_model.forward = torch.compile(dense_model.forward, backend="eager")
        Method("fp16", dense_model, "eager").generate(prompt, new_tokens)
        compiled[BASELINE] = frames[len(compiled[method]) :]
        decode = []
        for name in (BASELINE, method):
            manager, scope = compiled[name][-1]
            # The frame's arguments as generate passed them; generate runs under no_grad, which the guards check.
            with torch.no_grad():
                if not manager.check(scope):
                    raise RuntimeError(f"{name}'s guards fail on their own arguments: "
                                       f"{manager.check_verbose(scope).verbose_code_parts}")  # fmt: skip
            decode.append(dict(method=name, frames=len(compiled[name]), manager=manager, scope=scope))
        yield decode


def profile(frames: list[dict], rounds: int, repeats: int) -> list[dict]:
    """Count each frame's guards; time their checks in alternating rounds (medians of the rounds' medians)."""
    times: dict[str, list[tuple[float, float]]] = {frame["method"]: [] for frame in frames}
    with torch.no_grad():
        for _ in range(rounds):
            for frame in frames:
                times[frame["method"]].append(check_times_us(frame["manager"], frame["scope"], repeats))
    rows = []
    for frame in frames:
        counts, objects, shape_relations = count_guards(frame["manager"])
        warm, cold = (statistics.median(column) for column in zip(*times[frame["method"]]))
        rows.append(dict(method=frame["method"], frames=frame["frames"], counts=counts, objects=objects,
                         shape_relations=shape_relations, warm_us=warm, cold_us=cold))  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    baseline = next(row for row in rows if row["method"] == BASELINE)
    kinds = ("TENSOR_MATCH", "DIMENSION_DYNAMIC_MARKING_GUARD", "NO_TENSOR_ALIASING")
    cells = [
        [row["method"], row["frames"], sum(row["counts"].values()), *(row["counts"][kind] for kind in kinds),
         row["shape_relations"], row["objects"], f"{row['warm_us']:.0f}", f"{row['warm_us'] / baseline['warm_us']:.2f}",
         f"{row['cold_us']:.0f}", f"{row['cold_us'] / baseline['cold_us']:.2f}"]
        for row in rows
    ]  # fmt: skip
    headers = ["method", "frames compiled", "guards", "tensor checks", "dim-marking checks", "no-aliasing checks",
               "shape relations", "objects fetched", "warm us", "warm / baseline", "cold us", "cold / baseline"]
    return tabulate(cells, headers=headers, tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-2-7b-narrow")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", choices=list(KIVI_METHODS), default="kivi-k2v2")
    parser.add_argument("--prompt", type=int, default=160)
    parser.add_argument("--new", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=100, help="checks timed per round, warm and cold each")
    args = parser.parse_args()

    with decode_frames(args.method, args.shape, args.device, args.prompt, args.new) as frames:
        rows = profile(frames, args.rounds, args.repeats)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{args.shape}, batch 1, prompt {args.prompt} + {args.new} new tokens, on {device}; "
          f"torch {torch.__version__}; the decode frame's guards, medians of {args.rounds} alternating rounds "
          f"of {args.repeats} checks")  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
