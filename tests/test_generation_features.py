"""Generation features through backend="kivi": beam search, sampling, multi-token steps with
crop (prompt-lookup decoding), and half-precision models, each against the KIVI simulation."""

from __future__ import annotations

import pytest
import torch
from kivi_helpers import relative_error, simulated_cache, tiny_model

import kivi_compile
from kivi_compile import KiviConfig
from kivi_compile.transformers_names import cache_keyword

CONFIG = KiviConfig(key_bits=2, value_bits=2, group_size=32, residual_length=32, compiler="eager")
PROMPT_LEN, NEW_TOKENS = 37, 70


def run(model, prompt, kivi: bool, dtype_config: KiviConfig = CONFIG, seed: int = 0, **kwargs):
    """Generate with the compiled model (kivi=True) or the simulation (kivi=False)."""
    if not kivi:
        kwargs[cache_keyword(model.forward)] = simulated_cache(model, dtype_config)
    torch.manual_seed(seed)
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kwargs,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits)


def compile_kivi(model, config: KiviConfig = CONFIG):
    backend = kivi_compile.backend(config)
    model.forward = torch.compile(model.forward, backend=backend)
    return backend


@pytest.mark.parametrize(
    "strategy",
    [dict(num_beams=4, do_sample=False), dict(do_sample=True, top_k=20, temperature=0.9)],
    ids=["beam-search-4", "sampling"],
)
def test_strategy_matches_the_simulation(strategy):
    model = tiny_model("llama")
    prompt = torch.randint(1, model.config.vocab_size, (2, PROMPT_LEN))
    expected_tokens, expected_logits = run(model, prompt, kivi=False, **strategy)
    backend = compile_kivi(model)
    tokens, logits = run(model, prompt, kivi=True, **strategy)
    error = max(relative_error(a, e) for a, e in zip(logits, expected_logits))
    print(f"{strategy}: max step error {error:.2e}, graphs {backend.graphs_compiled}")
    assert torch.equal(tokens, expected_tokens)
    assert error <= 1e-4
    assert all(site.rewritten for result in backend.results for site in result.sites)
    assert backend.graphs_compiled <= 4


def test_prompt_lookup_decoding_multi_token_steps_and_crop():
    model = tiny_model("llama")
    motif = torch.randint(1, model.config.vocab_size, (12,))
    prompt = torch.cat([motif, motif, motif, motif[:1]])[None]  # repeated n-grams: candidates get proposed
    expected_tokens, _ = run(model, prompt, kivi=False, do_sample=False, prompt_lookup_num_tokens=4)
    compile_kivi(model)
    compiled_forward, calls = model.forward, []

    def counting_forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1])
        return compiled_forward(*args, **kwargs)

    model.forward = counting_forward
    tokens, _ = run(model, prompt, kivi=True, do_sample=False, prompt_lookup_num_tokens=4)
    print(f"forward calls: {len(calls)} for {NEW_TOKENS} tokens; tokens per call {calls}")
    assert torch.equal(tokens, expected_tokens)
    assert max(calls[1:]) > 1  # multi-token verification steps (rejected candidates are cropped)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
def test_half_precision_models_follow_the_simulation(dtype, tolerance):
    model = tiny_model("llama", dtype=dtype)
    prompt = torch.randint(1, model.config.vocab_size, (1, PROMPT_LEN))
    _, expected_logits = run(model, prompt, kivi=False, do_sample=False)
    compile_kivi(model)
    _, logits = run(model, prompt, kivi=True, do_sample=False)
    steps = 10  # before greedy paths may part on near-ties
    error = max(relative_error(a, e) for a, e in zip(logits[:steps], expected_logits[:steps]))
    print(f"{dtype}: max step error over the first {steps} steps {error:.2e}")
    assert error <= tolerance
