"""End-to-end generation: throughput and peak memory against batch size, KIVI vs fp16.

Builds a model of an HF shape (default Llama-2-7B) with random weights directly on the GPU and
runs KIVI's own memory/speed workload (prompt 160, 338 new tokens) for each method, sweeping the
batch size until it runs out of memory:

- ``fp16``:   HF eager, ``DynamicCache`` (the baseline).
- ``quanto``: HF ``QuantizedCache`` with optimum-quanto 2-bit, when optimum-quanto is importable.
- ``kivi-k2v2``, ``kivi-k4v4``: ``torch.compile(model.forward, backend=kivi_compile.backend(...))``
  with G=32, R=128.

Tokens per second count generated tokens (batch x new tokens) over the whole ``generate`` call,
prompt included, after a warm-up call of the same workload: it compiles the graphs and keeps each
sequence length's one-time costs (kernel variants, plans, library heuristics) out of the timed call,
for every method. A shorter ``--warmup-new`` leaves them in (on the H200, fp16's median step at
batch 1 was 60.3 ms after a 4-token warm-up in one run, 33.6 ms after a full one in another). The
median and slowest decode steps are reported too, Python's full garbage collections (count and
longest), the CUDA graphs KIVI recorded (one per cache capacity, each on a step that runs directly)
and, on CUDA, the allocator's cudaMalloc calls, its retries after freeing its cache and the peak it
reserved, during the timed call; a batch that runs out of memory keeps what PyTorch said the allocator held.
After each warm-up ``gc.freeze()`` (``--no-freeze-gc`` to skip) moves every live object
out of the collector's reach, as serving stacks do once started: a full collection over a compiled
model's objects took 0.94 s of one batch-1 run. Prints a tabulate table with the ratio
to the fp16 baseline at the same batch size and at each method's best batch, and each method's largest
batch that fits (with the batch that ran out of memory, if one did), and writes JSON + a PNG plot
(throughput and peak memory against batch size) to ``--out``. On a terminal, each ``generate`` draws a
progress bar on stderr.

``--skip-guard-eval`` runs each timed KIVI ``generate`` under ``torch.compiler.set_stance("fail_on_recompile",
skip_guard_eval_unsafe=True)``: after the warm-up, Dynamo checks only the guards that tell its compiled graphs
apart, not each of those it installs on the model's modules, its cache and the cache's tensors (torch's own
opt-in for a warm model whose inputs keep their shapes; a step that would recompile raises). Its rows are
named ``+skip-guards``.

    python benchmarks/bench_generate.py --out benchmarks/results/generate
    python benchmarks/bench_generate.py --shape tiny --device cpu --batches 1,2 --new 24   # smoke test
    python benchmarks/bench_generate.py --batches 1,256 kivi-k2v2=1,384,512   # per-method batch lists
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM

import kivi_compile
from kivi_compile import KiviConfig

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),  # fmt: skip
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),  # fmt: skip
    # Llama-2-7B's 32 layers of 32 heads at a width a CPU runs: the host work of its decode step (Dynamo's guards).
    "llama-2-7b-narrow": dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32, vocab_size=1000),  # fmt: skip
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=1000),  # fmt: skip
}
# The progress bar on a terminal: its width in characters, and the least time between two redraws.
PROGRESS_WIDTH = 30
PROGRESS_EVERY_S = 0.5
KIVI_METHODS = {
    "kivi-k2v2": KiviConfig(key_bits=2, value_bits=2, group_size=32, residual_length=128),
    "kivi-k4v4": KiviConfig(key_bits=4, value_bits=4, group_size=32, residual_length=128),
}


def keep_all_but_shape_guards(entries: list) -> list[bool]:
    """A guard filter that drops the symbolic-shape guards (unsafe: a new shape reuses the graph), to time them."""
    return [entry.guard_type != "SHAPE_ENV" for entry in entries]


# Guard filters for ``torch.compile``'s ``guard_filter_fn``, by name: torch.compiler's, and one of ours.
GUARD_FILTERS = {
    **{name: getattr(torch.compiler, name)
       for name in dir(torch.compiler) if name.endswith("_unsafe") and "guard" in name},  # fmt: skip
    "skip_shape_guards_unsafe": keep_all_but_shape_guards,
}


def build_model(shape: str, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def quanto_available() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


class Method:
    """One way of running ``generate``: how to set the model up, and the extra generate kwargs."""

    def __init__(self, name: str, model: LlamaForCausalLM, compiler: str, cuda_graphs: bool = True,
                 guard_filter: str | None = None, skip_guard_eval: bool = False) -> None:  # fmt: skip
        """``guard_filter`` names one of :data:`GUARD_FILTERS` (``skip_guard_on_all_nn_modules_unsafe``...),
        passed to ``torch.compile`` as ``guard_filter_fn``; ``skip_guard_eval``: see :meth:`timed`."""
        self.name, self.model = name, model
        self.skip_guard_eval = skip_guard_eval and name in KIVI_METHODS
        self.label = f"{name}+skip-guards" if self.skip_guard_eval else name
        self.eager_forward = model.forward
        self.guard_filter_fn = GUARD_FILTERS[guard_filter] if guard_filter else None
        self.backend = None
        if name in KIVI_METHODS:
            config = KiviConfig(**{**KIVI_METHODS[name].__dict__, "compiler": compiler, "cuda_graphs": cuda_graphs})
            self.backend = kivi_compile.backend(config)

    def recordings_made(self) -> int | None:
        """CUDA graphs the backend's decode steps recorded so far (None: not a KIVI method)."""
        if self.backend is None:
            return None
        return sum(r.step_runner.recordings_made for r in self.backend.results if r.step_runner is not None)

    def __enter__(self) -> Method:
        torch._dynamo.reset()
        if self.backend is not None:
            # torch.compile pops guard_filter_fn from the options it is given: a dict of its own each time.
            options = {"guard_filter_fn": self.guard_filter_fn} if self.guard_filter_fn else None
            self.model.forward = torch.compile(self.eager_forward, backend=self.backend, options=options)
        return self

    def __exit__(self, *exc) -> None:
        self.model.forward = self.eager_forward
        torch._dynamo.reset()

    def timed(self) -> contextlib.AbstractContextManager:
        """The stance of a timed ``generate``, after its warm-up: with ``skip_guard_eval``, Dynamo evaluates only
        the guards that tell its compiled graphs apart, and a step that would recompile raises."""
        if not self.skip_guard_eval:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True)

    def generate_kwargs(self) -> dict:
        if self.name == "quanto":
            return dict(cache_implementation="quantized", cache_config={"backend": "quanto", "nbits": 2})
        return {}

    def generate(self, prompt: torch.Tensor, new_tokens: int, streamer: Any = None) -> None:
        """The workload's greedy ``generate``: exactly ``new_tokens`` for each prompt (none padded)."""
        self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer,
                            **self.generate_kwargs())  # fmt: skip


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepTimes:
    """A ``generate`` streamer that stamps each token's arrival. HF hands it the prompt, then each
    step's tokens (copied to the host, so a stamp follows the step's GPU work), so the gaps between
    stamps are the decode steps: their median is the steady state, their maximum shows one-time
    costs inside the run (a kernel compiled or tuned for a new shape, a cache growing).

    Given a terminal, it also draws a progress bar there, redrawn at most every
    ``PROGRESS_EVERY_S`` seconds so that drawing stays out of the timing."""

    def __init__(self, label: str = "", new_tokens: int = 0, terminal: TextIO | None = None) -> None:
        self.stamps: list[float] = []
        self._label, self._new_tokens, self._terminal = label, new_tokens, terminal
        self._drawn = float("-inf")

    def put(self, tokens: torch.Tensor) -> None:
        now = time.perf_counter()
        self.stamps.append(now)
        if self._terminal is not None and now - self._drawn >= PROGRESS_EVERY_S:
            self._drawn = now
            self._draw()

    def end(self) -> None:
        if self._terminal is not None:
            self._draw()
            self._terminal.write("\n")

    def _draw(self) -> None:
        done = max(0, len(self.stamps) - 1)  # the first stamp is the prompt's
        filled = PROGRESS_WIDTH * done // max(1, self._new_tokens)
        bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
        last = f", last step {(self.stamps[-1] - self.stamps[-2]) * 1e3:.1f} ms" if done >= 2 else ""
        self._terminal.write(f"\r{self._label} [{bar}] {done}/{self._new_tokens} tokens{last}")
        self._terminal.flush()

    def decode_step_ms(self) -> list[float]:
        return [(later - earlier) * 1e3 for earlier, later in zip(self.stamps[1:], self.stamps[2:])]


def allocator_counts(device: str) -> Counter:
    """The CUDA caching allocator's cudaMalloc calls and its retries after freeing its cache (each a
    device-wide synchronization): candidates for a slow step when the cache grows near full memory."""
    if device != "cuda":
        return Counter()
    stats = torch.cuda.memory_stats()
    return Counter(device_allocs=stats.get("num_device_alloc", 0), alloc_retries=stats.get("num_alloc_retries", 0))


class FullCollections:
    """Python's full (generation 2) garbage collections while open, and the longest: a candidate for
    a slow step once the heap holds the compiled graphs' many objects."""

    def __init__(self) -> None:
        self.count = 0
        self.longest_ms = 0.0
        self._started = 0.0

    def _observe(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.longest_ms = max(self.longest_ms, (time.perf_counter() - self._started) * 1e3)

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self._observe)
        return self

    def __exit__(self, *exc_info) -> None:
        gc.callbacks.remove(self._observe)


def run_once(
    method: Method, batch: int, prompt_len: int, new_tokens: int, device: str, label: str = ""
) -> tuple[float, int, list[float], dict]:
    """(seconds, peak bytes allocated, decode step milliseconds, allocator and garbage-collector counts)
    of one ``generate`` of ``new_tokens`` for ``batch`` prompts; ``label`` names its progress bar (drawn
    when stderr is a terminal). On CUDA the counts also hold the peak the allocator reserved: it adds the
    free blocks no request could reuse, so it tells how close a batch came to running out of memory."""
    prompt = torch.randint(1, method.model.config.vocab_size, (batch, prompt_len), device=device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    steps = StepTimes(label, new_tokens, sys.stderr if sys.stderr.isatty() else None)
    synchronize(device)
    allocator_before = allocator_counts(device)
    start = time.perf_counter()
    with FullCollections() as collections:
        method.generate(prompt, new_tokens, steps)
        synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    allocator = allocator_counts(device)
    allocator.subtract(allocator_before)
    events = dict(allocator, full_gcs=collections.count, longest_full_gc_ms=collections.longest_ms)
    if device == "cuda":
        events["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return seconds, peak, steps.decode_step_ms(), events


def sweep(method: Method, batches: list[int], args) -> Iterator[dict]:
    """One row per batch size, until the first that runs out of memory (its row included)."""
    with method:
        for batch in batches:
            compiled_before = method.backend.graphs_compiled if method.backend else 0
            try:
                label = f"{method.label} batch {batch}"
                run_once(method, batch, args.prompt, args.warmup_new, args.device, f"{label}, warm-up")  # compiles
                if args.freeze_gc:  # garbage first: frozen cycles would keep the warm-up's caches
                    gc.collect()
                    gc.freeze()
                recorded_before = method.recordings_made()
                with method.timed():
                    seconds, peak, step_ms, events = run_once(method, batch, args.prompt, args.new, args.device, label)
            except torch.OutOfMemoryError as error:
                if sys.stderr.isatty():  # end the unfinished progress bar's line
                    sys.stderr.write("\n")
                state = memory_state(error)
                print(f"{method.label:>10} batch {batch:>4}: out of memory: {state}", flush=True)
                yield dict(method=method.label, batch=batch, oom=True, memory_state=state)
                return
            graphs = method.backend.graphs_compiled - compiled_before if method.backend else None
            if method.backend is not None:
                events["cuda_graphs_recorded"] = method.recordings_made() - recorded_before
            row = dict(method=method.label, batch=batch, oom=False, seconds=seconds,
                       tokens_per_second=batch * args.new / seconds, peak_gib=peak / 2**30, graphs=graphs,
                       median_step_ms=statistics.median(step_ms), slowest_step_ms=max(step_ms),
                       slowest_step=step_ms.index(max(step_ms)) + 1, **events)  # fmt: skip
            print(f"{method.label:>10} batch {batch:>4}: {row['tokens_per_second']:9.1f} tok/s, "
                  f"peak {row['peak_gib']:6.2f} GiB, graphs {graphs}, decode step median "
                  f"{row['median_step_ms']:.1f} ms, slowest {row['slowest_step_ms']:.1f} ms "
                  f"(step {row['slowest_step']}), {events}", flush=True)  # fmt: skip
            yield row


def memory_state(error: torch.OutOfMemoryError) -> str:
    """What the allocator held when ``error`` was raised (the request, what was free, allocated and
    reserved but unallocated), without the advice that follows in PyTorch's message."""
    return str(error).split(" If reserved but unallocated")[0].split("\n")[0]


def graphs_per_batch(rows: list[dict]) -> dict[str, list[int | None]]:
    """Graphs compiled at each batch size: the first is one fresh generate's (warm-up included),
    later ones add none unless that batch size recompiles."""
    graphs: dict[str, list[int | None]] = {}
    for row in rows:
        if not row["oom"]:
            graphs.setdefault(row["method"], []).append(row["graphs"])
    return graphs


def largest_batches(rows: list[dict]) -> dict[str, dict[str, int | None]]:
    """Per method, the largest batch that ran and the batch that ran out of memory (None: none did;
    the sweep stops at the first)."""
    largest: dict[str, dict[str, int | None]] = {}
    for row in rows:
        entry = largest.setdefault(row["method"], {"fits": None, "out_of_memory": None})
        if row["oom"]:
            entry["out_of_memory"] = row["batch"]
        else:
            entry["fits"] = max(row["batch"], entry["fits"] or 0)
    return largest


def describe_largest(largest: dict[str, dict[str, int | None]]) -> str:
    """``largest_batches`` in words: what a sweep that stopped short of memory can and cannot say."""
    parts = []
    for name, entry in largest.items():
        fits = "none" if entry["fits"] is None else entry["fits"]
        tried = "none tried ran out of memory" if entry["out_of_memory"] is None else (
            f"{entry['out_of_memory']} ran out of memory")  # fmt: skip
        parts.append(f"{name} {fits} ({tried})")
    return "largest batch that fits: " + ", ".join(parts)


def table(rows: list[dict]) -> str:
    baseline = {r["batch"]: r["tokens_per_second"] for r in rows if r["method"] == "fp16" and not r["oom"]}
    best_baseline = max(baseline.values(), default=float("nan"))
    lines = []
    for r in rows:
        if r["oom"]:
            lines.append([r["method"], r["batch"], "OOM", "", "", "", "", "", ""])
            continue
        same = r["tokens_per_second"] / baseline[r["batch"]] if r["batch"] in baseline else float("nan")
        lines.append([r["method"], r["batch"], f"{r['tokens_per_second']:.1f}", f"{r['peak_gib']:.2f}",
                      r["graphs"] if r["graphs"] is not None else "-", f"{r['median_step_ms']:.1f}",
                      f"{r['slowest_step_ms']:.1f}", f"{same:.2f}",
                      f"{r['tokens_per_second'] / best_baseline:.2f}"])  # fmt: skip
    headers = ["method", "batch", "tok/s", "peak GiB", "graphs (warm-up incl.)", "median step ms", "slowest step ms",
               "x fp16 same batch", "x fp16 best batch"]  # fmt: skip
    return tabulate(lines, headers=headers, tablefmt="github")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        done = [r for r in rows if r["method"] == name and not r["oom"]]
        speed.plot([r["batch"] for r in done], [r["tokens_per_second"] for r in done], marker="o", label=name)
        memory.plot([r["batch"] for r in done], [r["peak_gib"] for r in done], marker="o", label=name)
    for axis, label in ((speed, "generated tokens / s"), (memory, "peak GPU memory (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def batch_lists(specs: list[str]) -> dict[str | None, list[int]]:
    """``["1,96", "fp16=1,256"]`` -> ``{None: [1, 96], "fp16": [1, 256]}`` (None: every other method)."""
    lists: dict[str | None, list[int]] = {}
    for spec in specs:
        name, _, sizes = spec.rpartition("=")
        lists[name or None] = [int(b) for b in sizes.split(",")]
    if None not in lists:
        raise SystemExit("--batches needs a list for every method (one without METHOD=)")
    return lists


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt", type=int, default=160)
    parser.add_argument("--new", type=int, default=338)
    parser.add_argument("--warmup-new", type=int, default=None,
                        help="new tokens of the warm-up generate (default: --new, which keeps every one-time "
                             "cost of a sequence length out of the timed run)")  # fmt: skip
    parser.add_argument("--batches", nargs="+", default=["1,16,64,96,128,192,256,384,512"],
                        help="comma-separated batch sizes for every method; METHOD=b1,b2 overrides one method's")  # fmt: skip
    parser.add_argument("--methods", default="fp16,quanto,kivi-k2v2,kivi-k4v4")
    parser.add_argument("--compiler", choices=["inductor", "eager"], default="inductor")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="KiviConfig.cuda_graphs: replay KIVI's decode steps from CUDA graphs")  # fmt: skip
    parser.add_argument("--freeze-gc", action=argparse.BooleanOptionalAction, default=True,
                        help="gc.freeze() after each warm-up, as serving stacks do once started: the compiled "
                             "graphs' objects leave the collector's full passes (which took up to 0.94 s)")  # fmt: skip
    parser.add_argument("--skip-guard-eval", action="store_true",
                        help="time KIVI's generate under torch's skip_guard_eval_unsafe stance (see above)")
    parser.add_argument("--out", default="benchmarks/results/generate")
    args = parser.parse_args()
    if args.warmup_new is None:
        args.warmup_new = args.new

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = build_model(args.shape, args.device, dtype)
    batches = batch_lists(args.batches)
    names = [n for n in args.methods.split(",") if n != "quanto" or quanto_available()]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    header = (f"{args.shape} ({dtype}), prompt {args.prompt} + {args.new} new tokens (warm-up {args.warmup_new}), "
              f"on {device_name}; torch {torch.__version__}, kivi compiler {args.compiler}, "
              f"CUDA graphs {'on' if args.cuda_graphs else 'off'}, gc.freeze() after warm-up "
              f"{'on' if args.freeze_gc else 'off'}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for name in names:
        method = Method(name, model, args.compiler, args.cuda_graphs, skip_guard_eval=args.skip_guard_eval)
        for row in sweep(method, batches.get(name, batches[None]), args):
            rows.append(row)  # saved as it comes, so a run cut short keeps the rows it finished
            result = dict(header=header, graphs=graphs_per_batch(rows), largest_batch=largest_batches(rows), rows=rows)
            (out / "bench_generate.json").write_text(json.dumps(result, indent=1))

    print(header)
    print("graphs compiled per batch size (first = a fresh generate):", graphs_per_batch(rows))
    print(describe_largest(largest_batches(rows)))
    print(table(rows))
    try:
        plot(rows, out / "bench_generate.png")
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
