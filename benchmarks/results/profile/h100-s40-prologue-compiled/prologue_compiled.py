"""The batch-1 split step's prologue: its code, then one call's time as the FX module (as before 48e777b) against the
step runner's Inductor-compiled prologue (as since), both called on each step's inputs, which must give equal results.
Medians over the steps after the first three, microseconds; "again" is a second call at once.

From the repository root, on the GPU machine (transformers 5.17 keeps the all-ones mask) and on the CPU machine
(one left pad, or transformers 5.25 drops the mask):

    python benchmarks/results/profile/h100-s40-prologue-compiled/prologue_compiled.py cuda llama-2-7b 0
    python benchmarks/results/profile/h100-s40-prologue-compiled/prologue_compiled.py cpu llama-2-7b-narrow 1
"""
import statistics, sys, time, traceback
import torch
sys.path.insert(0, "benchmarks")
from bench_generate import Method, build_model, synchronize
from kivi_compile.step_graphs import StepGraphs
import transformers

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
shape = sys.argv[2] if len(sys.argv) > 2 else "llama-2-7b"
pad = int(sys.argv[3]) if len(sys.argv) > 3 else 1
pc = time.perf_counter
seen, times = {}, {"fx": [], "fx again": [], "inductor": [], "inductor again": []}
original_call = StepGraphs.__call__

def sync():
    if device == "cuda":
        torch.cuda.synchronize()

def call(self, *args):
    split = self.split
    inputs = [args[i] for i in split.prologue_inputs]
    if "code" not in seen:
        seen["code"] = split.prologue.code
        seen["inputs"] = [(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in inputs]
        seen["compiled"] = self.prologue if self.prologue is not split.prologue else None
    compiled = seen["compiled"]
    if compiled is not None:
        sync(); t0 = pc(); split.prologue(*inputs); t1 = pc(); split.prologue(*inputs); t2 = pc(); sync()
        t3 = pc(); b = compiled(*inputs); t4 = pc(); compiled(*inputs); t5 = pc(); sync()
        a = split.prologue(*inputs)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), "compiled prologue differs"
        for k, v in zip(times, (t1 - t0, t2 - t1, t4 - t3, t5 - t4)):
            times[k].append(v * 1e6)
    return original_call(self, *args)

StepGraphs.__call__ = call
dtype = torch.float16 if device == "cuda" else torch.float32
model = build_model(shape, device, dtype)
prompt = torch.randint(1, model.config.vocab_size, (1, 160), device=device)
mask = torch.ones_like(prompt); mask[:, :pad] = 0
print(device, torch.__version__, transformers.__version__, flush=True)
try:
    with Method("kivi-k2v2", model, "inductor") as method:
        for n in (8, 64):
            model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            sync()
    print(seen["code"]); print(seen["inputs"])
    print("one prologue call, median us:", {k: round(statistics.median(v[3:]), 1) for k, v in times.items()}, "steps", len(times["fx"]))
except Exception:
    traceback.print_exc()
