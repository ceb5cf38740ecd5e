"""GPU probe: where the 0.69 ms between StepGraphs.__call__ and its body goes (0.05-0.07 ms on the CPU machine).
Times each line of StepGraphs.__call__ over a batch-1 Llama-2-7B generate (after a warm-up), then again with the
prologue GraphModule swapped for a plain function, then with gc disabled. Prints medians in microseconds."""
import gc, statistics, sys, time, collections
import torch
sys.path.insert(0, "benchmarks")
from bench_generate import Method, build_model, synchronize
from kivi_compile.step_graphs import StepGraphs

shape = sys.argv[1] if len(sys.argv) > 1 else "llama-2-7b"
device = "cuda" if torch.cuda.is_available() else "cpu"
pc = time.perf_counter
times = collections.defaultdict(list)

def instrumented(self, *args):
    t0 = pc(); split = self.split
    results = split.prologue(*(args[i] for i in split.prologue_inputs)); t1 = pc()
    split.prologue(*(args[i] for i in split.prologue_inputs)); times["prologue again"].append((pc() - t1) * 1e6)
    t1 = pc()
    body_args = [args[i] for i in split.body_inputs] + list(results); t2 = pc()
    [args[i] for i in split.body_inputs] + list(results); times["body_args again"].append((pc() - t2) * 1e6); t2 = pc()
    width = split.mask_width(args); t3 = pc()
    heads = split.batch_heads(args); t4 = pc()
    for name, a, b in (("prologue", t0, t1), ("body_args", t1, t2), ("mask_width", t2, t3), ("batch_heads", t3, t4)):
        times[name].append((b - a) * 1e6)
    outputs = self._run_body(body_args, width, heads)
    return [outputs[i] if source == "body" else results[i] for source, i in split.outputs]

StepGraphs.__call__ = instrumented
model = build_model(shape, device, torch.float16 if device == "cuda" else torch.float32)
prompt = torch.randint(1, model.config.vocab_size, (1, 160), device=device)
print(torch.cuda.get_device_name() if device == "cuda" else "cpu", torch.__version__, flush=True)
with Method("kivi-k2v2", model, "inductor") as method:
    method.generate(prompt, 338 if device == "cuda" else 12); synchronize(device)
    gc.collect(); gc.freeze()
    runners = [r.step_runner for r in method.backend.results if r.step_runner is not None]
    for label in ("as is", "prologue a plain function", "gc disabled"):
        if label == "prologue a plain function":
            for runner in runners:
                object.__setattr__(runner.split, "prologue", lambda *a: ())
        if label == "gc disabled":
            gc.disable()
        times.clear()
        method.generate(prompt, 338 if device == "cuda" else 12); synchronize(device)
        print(label, {k: round(statistics.median(v), 1) for k, v in times.items()}, flush=True)
    gc.enable()
