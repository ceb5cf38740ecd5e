"""One call of the op (Gluon kernel + Triton tail) inside cudaProfilerStart/Stop, for ncu.
argv: bits batch heads kv_heads tokens"""
import sys
import torch
from kivi_compile.cache import KiviCacheTensor
from kivi_compile.config import KiviConfig
from kivi_compile.kernels import decode_attention as da

bits, batch, heads, kv_heads, tokens = map(int, sys.argv[1:6])
config = KiviConfig(key_bits=bits, value_bits=bits, group_size=32, residual_length=128)
q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.float16)
dense = torch.randn(batch, kv_heads, tokens, 128, device="cuda", dtype=torch.float16)
key = KiviCacheTensor.from_dense(dense, config.key_spec()).kv
value = KiviCacheTensor.from_dense(torch.randn_like(dense), config.value_spec()).kv
del dense
out = torch.empty_like(q)
launch = lambda: da.decode_attention_triton(q, key, value, None, None, False, bits, bits, 32, out)
launch()
print(f"op {da.median_ms(launch):.4f} ms (do_bench median)", flush=True)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
launch()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
