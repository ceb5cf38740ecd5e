"""The timeline with every guard but the symbolic-shape ones (what they cost a step), from the repository root:

    python benchmarks/results/profile/cpu-s30-no-shape-guards.py

Its output is appended to cpu-s30-dynamo-guards.log; the last line counts the guards the filter saw, by type."""
import sys, runpy, collections
import torch
seen = collections.Counter()
def skip_shape_guards_unsafe(entries):
    seen.update(e.guard_type for e in entries)
    return [e.guard_type != "SHAPE_ENV" for e in entries]
torch.compiler.skip_shape_guards_unsafe = skip_shape_guards_unsafe
sys.argv = ["profile_step_timeline.py", "--shape", "llama-2-7b-narrow", "--device", "cpu", "--prompt", "40", "--new", "60",
            "--guard-filter", "skip_shape_guards_unsafe"]
sys.path.insert(0, "benchmarks")
try:
    runpy.run_path("benchmarks/profile_step_timeline.py", run_name="__main__")
finally:
    print(dict(seen))
