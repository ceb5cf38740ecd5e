"""``benchmarks/bench_generate.py`` on the CPU: a sweep's rows, the largest batch that fits, the progress bar."""

from __future__ import annotations

import argparse
import io

import pytest
import torch
from kivi_helpers import benchmark_script


@pytest.fixture
def bench(monkeypatch):
    return benchmark_script("bench_generate", monkeypatch)


def test_sweep_times_each_method_and_batch(bench):
    model = bench.build_model("tiny", "cpu", torch.float32)
    args = argparse.Namespace(prompt=19, new=7, warmup_new=7, device="cpu", freeze_gc=False)
    rows = []
    for name in ("fp16", "kivi-k2v2"):
        rows += bench.sweep(bench.Method(name, model, "eager"), [1, 3], args)
    assert [(r["method"], r["batch"], r["oom"]) for r in rows] == [
        ("fp16", 1, False), ("fp16", 3, False), ("kivi-k2v2", 1, False), ("kivi-k2v2", 3, False),
    ]  # fmt: skip
    for row in rows:
        assert row["tokens_per_second"] > 0 and row["median_step_ms"] > 0
        assert row["tokens_per_second"] == pytest.approx(row["batch"] * 7 / row["seconds"])
    assert [r["graphs"] for r in rows] == [None, None, 2, 2]  # batch 1 is specialized; 3 compiles dynamic
    assert bench.largest_batches(rows) == {
        "fp16": {"fits": 3, "out_of_memory": None}, "kivi-k2v2": {"fits": 3, "out_of_memory": None},
    }  # fmt: skip


def test_a_batch_that_runs_out_of_memory_records_the_allocators_state(bench, monkeypatch, capsys):
    """The OOM row keeps what PyTorch said the allocator held (the request, allocated, reserved but not
    allocated), without its advice, and the sweep stops there."""
    message = (
        "CUDA out of memory. Tried to allocate 538.00 MiB. GPU 0 has a total capacity of 79.19 GiB of which "
        "301.06 MiB is free. Of the allocated memory 70.12 GiB is allocated by PyTorch, and 8.23 GiB is reserved "
        "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
    )
    calls = []

    def run_once(method, batch, *args):
        calls.append(batch)
        if batch == 3:
            raise torch.OutOfMemoryError(message)
        return 1.0, 0, [1.0], {}

    monkeypatch.setattr(bench, "run_once", run_once)
    model = bench.build_model("tiny", "cpu", torch.float32)
    args = argparse.Namespace(prompt=19, new=7, warmup_new=7, device="cpu", freeze_gc=False)
    rows = list(bench.sweep(bench.Method("fp16", model, "eager"), [1, 3, 5], args))
    assert calls == [1, 1, 3]  # warm-up and timed run at batch 1, then the warm-up that failed
    assert [(r["batch"], r["oom"]) for r in rows] == [(1, False), (3, True)]
    state = rows[1]["memory_state"]
    assert state.startswith("CUDA out of memory. Tried to allocate 538.00 MiB.") and state.endswith("unallocated.")
    assert "expandable_segments" not in state
    assert f"fp16 batch    3: out of memory: {state}" in capsys.readouterr().out


def test_largest_batch_names_the_batch_that_ran_out_of_memory(bench):
    rows = [
        dict(method="fp16", batch=96, oom=False), dict(method="fp16", batch=192, oom=False),
        dict(method="fp16", batch=256, oom=True), dict(method="kivi-k2v2", batch=512, oom=False),
        dict(method="quanto", batch=1, oom=True),
    ]  # fmt: skip
    largest = bench.largest_batches(rows)
    assert largest == {
        "fp16": {"fits": 192, "out_of_memory": 256},
        "kivi-k2v2": {"fits": 512, "out_of_memory": None},
        "quanto": {"fits": None, "out_of_memory": 1},
    }
    assert bench.describe_largest(largest) == (
        "largest batch that fits: fp16 192 (256 ran out of memory), kivi-k2v2 512 (none tried ran out of memory), "
        "quanto none (1 ran out of memory)"
    )


def test_progress_bar_redraws_at_most_every_interval(bench, monkeypatch):
    clock = iter([0.0, 0.1, 0.2, 0.7, 0.8])  # the prompt, then four tokens
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    terminal = io.StringIO()
    steps = bench.StepTimes("kivi batch 8", 4, terminal)
    for _ in range(5):
        steps.put(torch.zeros(1))
    steps.end()
    draws = terminal.getvalue().split("\r")[1:]
    width = bench.PROGRESS_WIDTH
    assert draws == [
        f"kivi batch 8 [{'.' * width}] 0/4 tokens",  # the prompt, at 0.0 s
        f"kivi batch 8 [{'#' * (width * 3 // 4)}{'.' * (width - width * 3 // 4)}] 3/4 tokens, last step 500.0 ms",
        f"kivi batch 8 [{'#' * width}] 4/4 tokens, last step 100.0 ms\n",  # end() draws the last state
    ]
    assert steps.decode_step_ms() == pytest.approx([100.0, 500.0, 100.0])


def test_timed_runs_can_skip_guard_evaluation(bench, monkeypatch):
    """``--skip-guard-eval``: KIVI's timed generate, not its warm-up, runs under the stance (a recompile there
    would raise) and its rows say so; fp16 eager compiles nothing, so it keeps its name."""
    run_once, stances = bench.run_once, []

    def watched(*args, **kwargs):
        stances.append(torch._dynamo.eval_frame._stance)
        return run_once(*args, **kwargs)

    monkeypatch.setattr(bench, "run_once", watched)
    model = bench.build_model("tiny", "cpu", torch.float32)
    args = argparse.Namespace(prompt=19, new=7, warmup_new=7, device="cpu", freeze_gc=False)
    rows = list(bench.sweep(bench.Method("kivi-k2v2", model, "eager", skip_guard_eval=True), [1], args))
    assert [(r["method"], r["graphs"]) for r in rows] == [("kivi-k2v2+skip-guards", 2)]
    assert [(s.stance, s.skip_guard_eval_unsafe) for s in stances] == [("default", False), ("fail_on_recompile", True)]
    assert bench.Method("fp16", model, "eager", skip_guard_eval=True).label == "fp16"
