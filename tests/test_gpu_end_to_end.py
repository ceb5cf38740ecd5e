"""End to end on a CUDA GPU (skipped without one): Inductor-compiled tiny models in half
precision follow the KIVI simulation, and the cache stays on the device."""

from __future__ import annotations

import pytest
import torch
from kivi_helpers import compiled_against_simulation, tiny_model

from kivi_compile import KiviCacheTensor, KiviConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    ("family", "dtype", "bits"), [("llama", torch.float16, 2), ("mistral", torch.bfloat16, 4)]
)
def test_inductor_on_cuda_follows_the_simulation(family, dtype, bits):
    config = KiviConfig(key_bits=bits, value_bits=bits, group_size=32, residual_length=32)
    model = tiny_model(family, dtype=dtype).cuda()
    prompt = torch.randint(1, model.config.vocab_size, (4, 45), device="cuda")
    result = compiled_against_simulation(model, prompt, config, new_tokens=100, max_steps=10)
    print(f"{family} {dtype} K{bits}V{bits}: max error {result.error:.2e} over {result.steps} steps (paths part at "
          f"step {result.parted_at}), graphs {result.backend.graphs_compiled}")
    # The simulation attends with CUDA's half-precision SDPA kernels, KIVI in float32.
    assert result.error <= (5e-3 if dtype == torch.float16 else 2e-2)
    assert result.backend.graphs_compiled <= 4
    cache = result.cache.layers[0].keys
    assert isinstance(cache, KiviCacheTensor) and cache.codes.is_cuda
