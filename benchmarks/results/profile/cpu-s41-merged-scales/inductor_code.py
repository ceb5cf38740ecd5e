"""Inductor's decode code for a tiny Llama (CPU): do the KIVI ops get views of the held buffers, no copies?"""
import sys, torch, logging
sys.path.insert(0, "tests")
from kivi_helpers import tiny_model, greedy_output
import kivi_compile
from kivi_compile import KiviConfig
from torch._inductor import config as ic
codes = []
import torch._inductor.graph as g
orig = g.GraphLowering.compile_to_module
def capture(self, *a, **k):
    mod = orig(self, *a, **k)
    codes.append(open(mod.__file__).read())
    return mod
g.GraphLowering.compile_to_module = capture
torch.manual_seed(0)
model = tiny_model("llama", num_hidden_layers=2)
backend = kivi_compile.backend(KiviConfig(group_size=32, residual_length=32))
model.forward = torch.compile(model.forward, backend=backend)
prompt = torch.randint(0, 90, (1, 40))
greedy_output(model, prompt, 8)
for c in codes:
    if "kivi.decode_attention" in c or "kivi.append_kv_" in c:
        for line in c.splitlines():
            if "kivi." in line or "copy_" in line or "clone" in line or "empty_strided" in line and "uint8" in line:
                print(line.strip()[:700])
        print("=====")
