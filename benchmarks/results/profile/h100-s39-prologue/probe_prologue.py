"""GPU probe: the split step's entry with its empty prologue skipped (as landed) against called (as before), in
alternating generates of one process; then what one prologue call costs (as found, again, with Dynamo's eval-frame
callback unset, forward alone). Medians in microseconds over the replayed batch-1 steps."""
import statistics, sys, time, collections, traceback
import torch
import torch._C._dynamo.eval_frame as ef
sys.path.insert(0, "benchmarks")
from bench_generate import Method, build_model, synchronize
from kivi_compile.step_graphs import StepGraphs

pc = time.perf_counter
mode = "skip"
spans = collections.defaultdict(list)
calls = collections.defaultdict(list)
seen = {}
original_call, original_body = StepGraphs.__call__, StepGraphs._run_body
entered = [0.0]

def call(self, *args):
    seen.setdefault("prologue", [n.op + ":" + str(n.target) for n in self.split.prologue.graph.nodes][:8])
    seen.setdefault("callback", repr(ef.get_eval_frame_callback()))
    if mode == "probe":
        split = self.split
        inputs = [args[i] for i in split.prologue_inputs]
        t0 = pc(); split.prologue(*inputs); t1 = pc(); split.prologue(*inputs); t2 = pc()
        prior = ef.set_eval_frame(None)
        t3 = pc(); split.prologue(*inputs); t4 = pc()
        ef.set_eval_frame(prior)
        t5 = pc(); split.prologue.forward(*inputs); t6 = pc()
        for name, a, b in (("first", t0, t1), ("again", t1, t2), ("callback unset", t3, t4), ("forward only", t5, t6)):
            calls[name].append((b - a) * 1e6)
    self._prologue = self.split.prologue if mode == "call" else None
    entered[0] = pc()
    return original_call(self, *args)

def run_body(self, *args):
    spans[mode].append((pc() - entered[0]) * 1e6)
    return original_body(self, *args)

StepGraphs.__call__, StepGraphs._run_body = call, run_body
model = build_model("llama-2-7b", "cuda", torch.float16)
prompt = torch.randint(1, model.config.vocab_size, (1, 160), device="cuda")
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
try:
    with Method("kivi-k2v2", model, "inductor") as method:
        method.generate(prompt, 64); synchronize("cuda")
        spans.clear()
        for mode in ("skip", "call", "skip", "call", "probe"):
            method.generate(prompt, 150); synchronize("cuda")
        print(seen, flush=True)
        print("split step -> body, us:", {k: round(statistics.median(v), 1) for k, v in spans.items() if k != "probe"})
        print("one prologue call, us:", {k: round(statistics.median(v), 1) for k, v in calls.items()}, flush=True)
except Exception:
    traceback.print_exc()
