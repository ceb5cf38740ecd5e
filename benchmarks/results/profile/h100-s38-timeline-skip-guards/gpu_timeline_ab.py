"""Batch-1 decode-step timeline, Llama-2-7B shape: one compile, then timed generates alternating default guards
and skip_guard_eval_unsafe (bench_generate's --skip-guard-eval stance), 3 rounds; fp16 eager's step after."""
import sys, gc, statistics, torch
sys.path.insert(0, "benchmarks")
import profile_step_timeline as pst
from bench_generate import Method, build_model, synchronize
model = build_model("llama-2-7b", "cuda", torch.float16)
prompt = torch.randint(1, model.config.vocab_size, (1, 160), device="cuda")
NEW = 338
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
modes = {"default": False, "skip": True}
spans, steps_ms, gpu_ms = {m: {} for m in modes}, {m: [] for m in modes}, {m: [] for m in modes}
with Method("kivi-k2v2", model, "inductor", skip_guard_eval=True) as method:
    method.generate(prompt, NEW); synchronize("cuda")
    gc.collect(); gc.freeze()
    for round in range(int(__import__('os').environ.get('ROUNDS', 3))):
        for mode, skip in modes.items():
            torch.cuda.empty_cache()
            tl = pst.Timeline()
            import contextlib
            with tl.watching(model), (method.timed() if skip else contextlib.nullcontext()):
                method.generate(prompt, NEW, tl); synchronize("cuda")
            replayed = [s for s in tl.steps() if "replay" in s]
            for a, b, ms in pst.spans(replayed):
                spans[mode].setdefault(f"{a} -> {b}", []).append(ms)
            steps_ms[mode].append(pst.median_step_ms(replayed))
            gpu_ms[mode].append(statistics.median(tl.replay_gpu_ms()))
            print(round, mode, f"step {steps_ms[mode][-1]:.3f} ms, replay GPU {gpu_ms[mode][-1]:.3f}, "
                  f"{len(replayed)} replayed, graphs {method.backend.graphs_compiled}", flush=True)
    gc.unfreeze()
print(f"{'span (median of 3 rounds of medians)':44s}" + "".join(f"{m:>10s}" for m in modes))
for name in spans["default"]:
    print(f"{name:44s}" + "".join(f"{statistics.median(spans[m].get(name, [float('nan')])):10.3f}" for m in modes))
for label, d in (("decode step", steps_ms), ("replay on the GPU", gpu_ms)):
    print(f"{label:44s}" + "".join(f"{statistics.median(d[m]):10.3f}" for m in modes))
with Method("fp16", model, "inductor") as fp16:
    base = pst.median_step_ms(pst.timed_generate(fp16, prompt, NEW, "cuda").steps())
print(f"fp16 eager median step {base:.3f} ms; kivi default {base / statistics.median(steps_ms['default']):.2f}x, "
      f"skip {base / statistics.median(steps_ms['skip']):.2f}x")
