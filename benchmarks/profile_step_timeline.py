"""Where a small batch's decode step goes, in order: host work before the CUDA-graph replay, the replay, after it.

At small batch a KIVI decode step replays its body from a CUDA graph (``KiviConfig.cuda_graphs``) and HF's
``generate`` then waits for the new token. Host work before the replay leaves the GPU idle; host work after
it overlaps the replay. This stamps every decode step at the calls below and times each replay on the GPU
with CUDA events, in a ``generate`` after a warm-up one (as ``bench_generate.py`` does: ``gc.freeze()``
after the warm-up, ``empty_cache()`` before the timed call). It prints the median of each span over the
replayed steps (on the CPU, where nothing is replayed, over all steps), and fp16 eager's median step from
the same process as the baseline. On a machine whose compile caches are cold the warm-up compiles every
graph and kernel first (over 150 s at Llama-2-7B's shape on an H100).

    python benchmarks/profile_step_timeline.py --batch 1
    python benchmarks/profile_step_timeline.py --shape tiny --device cpu --new 16   # smoke test: no replay

The span from the forward to the runtime is Dynamo's: its guards, then the graph's inputs. ``--dynamo NAME=0|1``
sets a boolean of ``torch._dynamo.config``, ``--guard-filter`` passes one of ``torch.compiler``'s guard filters
(or ``skip_shape_guards_unsafe``) to ``torch.compile`` and ``--skip-guard-eval`` times the generate under
``skip_guard_eval_unsafe`` (as ``bench_generate.py --skip-guard-eval`` does), to see what the guards cost (the
7B shape's 32 layers run on a CPU as ``--shape llama-2-7b-narrow --device cpu``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from tabulate import tabulate

from bench_generate import GUARD_FILTERS, KIVI_METHODS, SHAPES, Method, build_model, synchronize
from kivi_compile.runtime import KiviGraphRuntime
from kivi_compile.step_graphs import StepGraphs, _Recording

# A decode step's stamps, in the order they come. previous token: the last step's token reached the host;
# forward: HF calls the compiled forward; runtime: Dynamo's guards passed, it calls the backend's runtime;
# split step: the runtime reserved the caches' room, it calls the split step; body: the prologue ran;
# recording found: a recording fits the step's inputs; replay: the inputs are copied, the CUDA graph
# launches; replayed: the launch returned; runtime done: the caches are rebuilt; forward done: the forward
# returns; token: HF has the new token (it waited for the GPU).
POINTS = ("previous token", "forward", "runtime", "split step", "body", "recording found", "replay", "replayed",
          "runtime done", "forward done", "token")  # fmt: skip


class Timeline:
    """The stamps of one ``generate`` and the GPU time of its replays; also its token streamer."""

    def __init__(self) -> None:
        self.stamps: list[tuple[str, float]] = []
        self.replays: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def stamp(self, point: str) -> None:
        self.stamps.append((point, time.perf_counter()))

    def put(self, tokens: torch.Tensor) -> None:
        self.stamp("token")

    def end(self) -> None:
        pass

    @contextlib.contextmanager
    def watching(self, model: torch.nn.Module) -> Iterator[None]:
        """Stamp the forward, the runtime, the split step, its body and each replay while open."""
        stamped = [(model, "forward", "forward", "forward done"), (KiviGraphRuntime, "__call__", "runtime", "runtime done"),
                   (StepGraphs, "__call__", "split step", None), (StepGraphs, "_run_body", "body", None),
                   (_Recording, "replay", "recording found", None)]  # fmt: skip
        with contextlib.ExitStack() as stack:
            for owner, name, before, after in stamped:
                stack.enter_context(mock.patch.object(owner, name, self._stamped(getattr(owner, name), before, after)))
            stack.enter_context(mock.patch.object(torch.cuda.CUDAGraph, "replay", self._timed(torch.cuda.CUDAGraph.replay)))
            yield

    def _stamped(self, call: Callable, before: str, after: str | None = None) -> Callable:
        @functools.wraps(call)
        def stamped(*args, **kwargs):
            self.stamp(before)
            result = call(*args, **kwargs)
            if after is not None:
                self.stamp(after)
            return result

        return stamped

    def _timed(self, replay: Callable) -> Callable:
        @functools.wraps(replay)
        def timed(graph: torch.cuda.CUDAGraph) -> None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.stamp("replay")
            start.record()
            replay(graph)
            end.record()
            self.stamp("replayed")
            self.replays.append((start, end))

        return timed

    def steps(self) -> list[dict[str, float]]:
        """Each decode step's first stamp of each point (the prompt's token and the first token,
        prefill's, start no decode step)."""
        steps: list[dict[str, float]] = []
        current: dict[str, float] | None = None
        tokens = 0
        for point, seconds in self.stamps:
            if point == "token":
                tokens += 1
                if current is not None:
                    steps.append({**current, "token": seconds})
                current = {"previous token": seconds} if tokens >= 2 else None
            elif current is not None:
                current.setdefault(point, seconds)
        return steps

    def replay_gpu_ms(self) -> list[float]:
        return [start.elapsed_time(end) for start, end in self.replays]


def spans(steps: list[dict[str, float]]) -> list[tuple[str, str, float]]:
    """(from, to, median ms) between consecutive points that every step stamped."""
    points = [p for p in POINTS if all(p in step for step in steps)]
    return [(a, b, statistics.median((s[b] - s[a]) * 1e3 for s in steps)) for a, b in zip(points, points[1:])]


def timed_generate(method: Method, prompt: torch.Tensor, new_tokens: int, device: str) -> Timeline:
    """A warm-up ``generate``, then one under a ``Timeline``, as ``bench_generate.py`` runs them."""

    def generate(streamer: Timeline) -> None:
        method.generate(prompt, new_tokens, streamer)
        synchronize(device)

    generate(Timeline())
    gc.collect()
    gc.freeze()
    if device == "cuda":
        torch.cuda.empty_cache()
    timeline = Timeline()
    with timeline.watching(method.model), method.timed():
        generate(timeline)
    gc.unfreeze()
    return timeline


def set_dynamo_flag(setting: str) -> None:
    """``NAME=0|1`` -> ``torch._dynamo.config.NAME``; an unknown or non-boolean flag is an error."""
    name, _, value = setting.partition("=")
    if value not in ("0", "1") or not isinstance(getattr(torch._dynamo.config, name, None), bool):
        raise SystemExit(f"--dynamo {setting!r}: expected NAME=0|1 for a boolean of torch._dynamo.config")
    setattr(torch._dynamo.config, name, value == "1")


def median_step_ms(steps: list[dict[str, float]]) -> float:
    return statistics.median((s["token"] - s["previous token"]) * 1e3 for s in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--method", choices=list(KIVI_METHODS), default="kivi-k2v2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=160)
    parser.add_argument("--new", type=int, default=338)
    parser.add_argument("--dynamo", action="append", default=[], metavar="NAME=0|1",
                        help="set the boolean torch._dynamo.config.NAME (repeatable)")
    parser.add_argument("--guard-filter", choices=sorted(GUARD_FILTERS), default=None)
    parser.add_argument("--skip-guard-eval", action="store_true",
                        help="the timed generate under torch's skip_guard_eval_unsafe stance (bench_generate.py's)")
    args = parser.parse_args()
    for setting in args.dynamo:
        set_dynamo_flag(setting)

    model = build_model(args.shape, args.device, torch.float16 if args.device == "cuda" else torch.float32)
    prompt = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt), device=args.device)
    with Method(args.method, model, "inductor", guard_filter=args.guard_filter,
                skip_guard_eval=args.skip_guard_eval) as method:  # fmt: skip
        timeline = timed_generate(method, prompt, args.new, args.device)
        graphs, recordings = method.backend.graphs_compiled, method.recordings_made()
    steps = timeline.steps()
    replayed = [s for s in steps if "replay" in s]
    measured = replayed or steps
    step_ms = median_step_ms(measured)
    rows = [[f"{a} -> {b}", ms, ms / step_ms] for a, b, ms in spans(measured)]
    rows.append(["decode step", step_ms, 1.0])
    if timeline.replays:
        gpu_ms = statistics.median(timeline.replay_gpu_ms())
        rows.append(["replay on the GPU (CUDA events)", gpu_ms, gpu_ms / step_ms])
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    guards = ", ".join([*args.dynamo, *filter(None, [args.guard_filter])]) or "default guards"
    if args.skip_guard_eval:
        guards += ", guard evaluation skipped (skip_guard_eval_unsafe)"
    print(f"{args.shape}, batch {args.batch}, prompt {args.prompt} + {args.new} new tokens, {args.method} on "
          f"{device_name}, torch {torch.__version__}, {guards}: {len(replayed)} of {len(steps)} decode steps "
          f"replayed, {recordings} recordings, {graphs} graphs")  # fmt: skip
    print(tabulate(rows, headers=["span (median over the steps)", "ms", "share of the step"], floatfmt=".3f",
                   tablefmt="github"), flush=True)  # fmt: skip
    with Method("fp16", model, "inductor") as fp16:
        baseline_ms = median_step_ms(timed_generate(fp16, prompt, args.new, args.device).steps())
    print(f"fp16 eager, same process: median step {baseline_ms:.3f} ms; {args.method}: {baseline_ms / step_ms:.2f}x")

if __name__ == "__main__":
    main()
