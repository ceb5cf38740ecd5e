"""Batch-1 Llama-2-7B generate, the split step's prologue compiled (as landed) against the FX module (as before),
alternating in one process: median decode step (ms) of each generate."""
import statistics, sys
import torch
sys.path.insert(0, "benchmarks")
from bench_generate import Method, StepTimes, build_model, synchronize

model = build_model("llama-2-7b", "cuda", torch.float16)
prompt = torch.randint(1, model.config.vocab_size, (1, 160), device="cuda")
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
medians = {"compiled": [], "fx": []}
with Method("kivi-k2v2", model, "inductor") as method:
    method.generate(prompt, 338); synchronize("cuda")
    runners = [r.step_runner for r in method.backend.results if r.step_runner is not None]
    compiled = [r.prologue for r in runners]
    for round_ in range(3):
        for mode in ("compiled", "fx"):
            for runner, prologue in zip(runners, compiled):
                runner.prologue = prologue if mode == "compiled" else runner.split.prologue
            times = StepTimes()
            method.generate(prompt, 200, streamer=times); synchronize("cuda")
            gaps = [b - a for a, b in zip(times.stamps[2:], times.stamps[3:])]
            medians[mode].append(statistics.median(gaps) * 1e3)
print({k: [round(v, 2) for v in vs] for k, vs in medians.items()})
print("median step ms: compiled", round(statistics.median(medians["compiled"]), 2), "fx", round(statistics.median(medians["fx"]), 2))
