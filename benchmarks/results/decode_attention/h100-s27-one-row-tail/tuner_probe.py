"""Which tail tile the tuner keeps at generate's first decode states (B512, T161 and T340, HF's all-True bool mask),
and each candidate's time there."""
import math
import torch
from kivi_compile.cache import KiviCacheTensor
from kivi_compile.config import KiviConfig
from kivi_compile.kernels import decode_attention as da

for tokens in (161, 340):
    torch.manual_seed(0)
    config = KiviConfig(2, 2, 32, 128)
    dense = torch.randn(512, 32, tokens, 128, device="cuda", dtype=torch.float16)
    key = KiviCacheTensor.from_dense(dense, config.key_spec()).kv
    value = KiviCacheTensor.from_dense(torch.randn_like(dense), config.value_spec()).kv
    del dense
    q = torch.randn(512, 32, 1, 128, device="cuda", dtype=torch.float16)
    mask = torch.ones(512, 1, 1, tokens, device="cuda", dtype=torch.bool)
    da._TUNED_TAIL_TILES.clear()
    da.decode_attention_triton(q, key, value, mask, None, False, 2, 2, 32)
    print(tokens, "kept", da._TUNED_TAIL_TILES)
    call = da._Call.of(q, key, value, mask.expand(512, 32, 1, tokens).view(torch.uint8), 1, False,
                       da.LOG2E / math.sqrt(128), 2, 2, 32)
    out = torch.empty_like(q)
    partials = da._partial_buffers(call, 1)
    for tile in da._tail_tiles(1):
        print(tokens, tile, "do_bench median ms", da.median_ms(lambda: da._launch_split_kernel(
            tile, 1, 1, call, 0, *partials, out, tail_block=32)), flush=True)
