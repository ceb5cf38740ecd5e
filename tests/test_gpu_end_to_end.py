"""End to end on a CUDA GPU (skipped without one): Inductor-compiled tiny models in half
precision follow the KIVI simulation, and the cache stays on the device."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kivi_helpers import compiled_against_simulation, compiled_greedy_output, relative_error, tiny_model

from kivi_compile import KiviCacheTensor, KiviConfig
from kivi_compile.kernels import decode_attention

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_replay_matches_the_unrecorded_step(dtype, monkeypatch):
    """Replayed steps give the logits of the same split graphs run directly, across cache growths,
    with left padding; every decode graph is recorded, a few times (once per cache capacity). Recorded
    launches take the plans of direct ones here: the plans tuned for replays split the sequence otherwise,
    which sums in another order (their own tests compare them with float64)."""
    monkeypatch.setattr(decode_attention, "_recording", lambda device: False)
    config = KiviConfig(group_size=32, residual_length=32)
    model = tiny_model("llama", dtype=dtype).cuda()
    prompt = torch.randint(1, model.config.vocab_size, (3, 37), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    mask[2, :30] = 0
    new_tokens = 200
    recorded, recorded_backend = compiled_greedy_output(model, prompt, new_tokens, config, attention_mask=mask)
    direct, _ = compiled_greedy_output(
        model, prompt, new_tokens, dataclasses.replace(config, cuda_graphs=False), attention_mask=mask
    )
    runners = [r.step_runner for r in recorded_backend.results if r.step_runner is not None]
    errors = [relative_error(a, b) for a, b in zip(recorded.logits, direct.logits)]
    print(f"{dtype}: recordings {[r.recordings_made for r in runners]}, steps {len(errors)}, "
          f"max logits error {max(errors):.2e}, same tokens {torch.equal(recorded.sequences, direct.sequences)}")
    assert runners and all(r.not_recorded == "" for r in runners)
    assert all(1 <= r.recordings_made <= new_tokens // 16 for r in runners)
    assert max(errors) <= 1e-2 and torch.equal(recorded.sequences[:, : 37 + 20], direct.sequences[:, : 37 + 20])
