"""Session 31: the split step's prologue per decode step (CPU, llama-2-7b-narrow): its nodes and time."""
import statistics, sys, time
sys.path.insert(0, "benchmarks")
import torch
from unittest import mock
from bench_generate import Method, build_model
from kivi_compile.step_graphs import StepGraphs

model = build_model("llama-2-7b-narrow", "cpu", torch.float32)
prompt = torch.randint(1, model.config.vocab_size, (1, 40))
with Method("kivi-k2v2", model, "inductor") as method:
    method.generate(prompt, 8)
    times, runner = [], []
    orig = StepGraphs.__call__
    def step(self, *args):
        runner.append(self)
        split = self.split
        t0 = time.perf_counter()
        split.prologue(*(args[i] for i in split.prologue_inputs))
        times.append((time.perf_counter() - t0) * 1e3)
        return orig(self, *args)
    with mock.patch.object(StepGraphs, "__call__", step):
        method.generate(prompt, 40)
    print(f"prologue: median {statistics.median(times):.3f} ms over {len(times)} steps")
    print(runner[0].split.prologue.code)
