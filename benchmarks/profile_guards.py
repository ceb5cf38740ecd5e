"""What Dynamo's guards cost a decode step: the decode frame's guards, counted by kind and timed.

Before each call of a compiled frame Dynamo checks its guards against the frame's arguments. At small
batch that check is host time before the step's CUDA-graph replay, with the GPU idle. This compiles the
model with ``backend="eager"`` on HF's dense cache (the baseline: the model's guards without KIVI's caches),
then with KIVI, and runs a short ``generate`` with each. For each one's decode frame (the last compiled) it
counts the guards by kind, and times checks against the arguments the frame was compiled for, as soon as
it is compiled:
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
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo.guards as dynamo_guards
from tabulate import tabulate
from torch._C._dynamo.guards import DictGuardManager

from bench_generate import KIVI_METHODS, SHAPES, Method, build_model

BASELINE = "dense cache, backend=eager"


@contextlib.contextmanager
def timed_frames(rounds: int, repeats: int) -> Iterator[list[dict]]:
    """Each frame compiled meanwhile: its guard manager, and its checks timed against the arguments it was
    compiled for, at once (later steps change what those arguments reach: HF's dense cache replaces its tensors).

    Dynamo calls its testing hook once per compiled frame, after building the guards: the one place that
    hands out both.
    """
    if not hasattr(dynamo_guards, "guard_manager_testing_hook_fn"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._dynamo.guards.guard_manager_testing_hook_fn")
    frames: list[dict] = []

    def time_checks(manager: Any, scope: dict, *_: Any) -> None:  # older torch passes no third argument
        if not manager.check(scope):
            raise RuntimeError(f"guards fail on their own arguments: {manager.check_verbose(scope).verbose_code_parts}")
        warm, cold = (statistics.median(times) for times in zip(*(check_times_us(manager, scope, repeats)
                                                                    for _ in range(rounds))))  # fmt: skip
        frames.append(dict(manager=manager, warm_us=warm, cold_us=cold))

    previous = dynamo_guards.guard_manager_testing_hook_fn
    dynamo_guards.guard_manager_testing_hook_fn = time_checks
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


def decode_frame_rows(method: str, shape: str, device: str, prompt_len: int, new_tokens: int, rounds: int,
                      repeats: int) -> list[dict]:  # fmt: skip
    """Compile a model of ``shape`` with :data:`BASELINE`, then with ``method``; generate with each; their decode
    frames' (the last compiled) guards counted and timed."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = build_model(shape, device, dtype)
    prompt = torch.randint(1, model.config.vocab_size, (1, prompt_len), device=device)
    rows = []
    for name in (BASELINE, method):
        with timed_frames(rounds, repeats) as frames, compiled(name, model) as generate:
            generate(prompt, new_tokens)
        counts, objects, shape_relations = count_guards(frames[-1]["manager"])
        rows.append(dict(method=name, frames=len(frames), counts=counts, objects=objects,
                         shape_relations=shape_relations, warm_us=frames[-1]["warm_us"],
                         cold_us=frames[-1]["cold_us"]))  # fmt: skip
    return rows


@contextlib.contextmanager
def compiled(method: str, model: torch.nn.Module) -> Iterator[Callable[[torch.Tensor, int], None]]:
    """``model.forward`` compiled for ``method`` (a KIVI method, or :data:`BASELINE`) while open; yields the
    workload's ``generate``. Dynamo starts afresh on entry and exit."""
    if method != BASELINE:
        with Method(method, model, "eager") as kivi:
            yield kivi.generate
        return
    torch._dynamo.reset()
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend="eager")
    try:
        yield Method("fp16", model, "eager").generate
    finally:
        model.forward = eager_forward
        torch._dynamo.reset()


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

    rows = decode_frame_rows(args.method, args.shape, args.device, args.prompt, args.new, args.rounds, args.repeats)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{args.shape}, batch 1, prompt {args.prompt} + {args.new} new tokens, on {device}; "
          f"torch {torch.__version__}; the decode frame's guards, timed when compiled: medians of {args.rounds} "
          f"rounds of {args.repeats} checks")  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
