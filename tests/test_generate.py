"""End to end: HF models compiled with backend="kivi" generate exactly what KIVI defines."""

from __future__ import annotations

import pytest
import torch
from kivi_helpers import greedy, relative_error, simulated_cache, teacher_forced, tiny_model

import kivi_compile
from kivi_compile import KiviCacheTensor, KiviConfig
from kivi_compile.transformers_names import returned_cache

PROMPT_LEN = 37  # odd, and not a multiple of R: exercises both residuals after prefill


def compiled(model, config: KiviConfig):
    backend = kivi_compile.backend(config)
    model.forward = torch.compile(model.forward, backend=backend)
    return backend


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("residual_length", [32, 128])
def test_logits_match_fake_quant_simulation(family, bits, residual_length):
    config = KiviConfig(key_bits=bits, value_bits=bits, group_size=32, residual_length=residual_length, compiler="eager")
    model = tiny_model(family)
    prompt = torch.randint(1, model.config.vocab_size, (1, PROMPT_LEN))
    new_tokens = 3 * residual_length + 5  # >= 3 key flushes after the prompt
    expected_tokens, expected_logits = greedy(model, prompt, new_tokens, cache=simulated_cache(model, config))

    backend = compiled(model, config)
    tokens, logits = greedy(model, prompt, new_tokens)

    errors = torch.tensor([relative_error(a, e) for a, e in zip(logits, expected_logits)])
    print(f"{family} K{bits}V{bits} R={residual_length}: max step error {errors.max():.2e}, mean {errors.mean():.2e}")
    assert errors.max() <= 1e-4
    assert torch.equal(tokens, expected_tokens)
    assert all(result.rewritten == model.config.num_hidden_layers for result in backend.results)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_eight_bits_stays_close_to_the_uncompiled_model(family):
    model = tiny_model(family)
    sequence = torch.randint(1, model.config.vocab_size, (1, PROMPT_LEN + 80))
    fp_logits = teacher_forced(model, sequence, PROMPT_LEN)
    compiled(model, KiviConfig(key_bits=8, value_bits=8, residual_length=32, compiler="eager"))
    logits = teacher_forced(model, sequence, PROMPT_LEN)
    errors = torch.tensor([relative_error(a, e) for a, e in zip(logits, fp_logits)])
    print(f"{family} K8V8 vs fp32: max step error {errors.max():.2e}")
    assert errors.max() <= 5e-3


def test_graph_count_per_generate_and_no_recompile_on_second_call():
    model = tiny_model("llama")
    backend = compiled(model, KiviConfig(residual_length=32, compiler="eager"))
    prompt = torch.randint(1, model.config.vocab_size, (2, PROMPT_LEN))
    first, _ = greedy(model, prompt, 100)  # crosses several capacity growths and key flushes
    after_first = backend.graphs_compiled
    second, _ = greedy(model, prompt, 100)
    print(f"graphs compiled: first generate {after_first}, second {backend.graphs_compiled - after_first}")
    assert after_first <= 4
    assert backend.graphs_compiled == after_first
    assert torch.equal(first, second)


def test_a_warm_model_generates_the_same_with_guard_evaluation_skipped():
    """torch's opt-in for a warm model (``bench_generate.py --skip-guard-eval``): Dynamo checks only the guards
    that tell the prefill and decode graphs apart, and still picks the right one for every step."""
    model = tiny_model("llama")
    backend = compiled(model, KiviConfig(residual_length=32, compiler="eager"))
    prompt = torch.randint(1, model.config.vocab_size, (2, PROMPT_LEN))
    guarded, _ = greedy(model, prompt, 70)  # crosses capacity growths and key flushes
    after_warm_up = backend.graphs_compiled
    with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
        unguarded, _ = greedy(model, prompt, 70)
    assert backend.graphs_compiled == after_warm_up
    assert torch.equal(unguarded, guarded)


def test_cache_left_in_the_model_is_quantized():
    model = tiny_model("llama")
    compiled(model, KiviConfig(residual_length=32, compiler="eager"))
    prompt = torch.randint(1, model.config.vocab_size, (1, PROMPT_LEN))
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
        return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    layer = returned_cache(out).layers[0]
    assert isinstance(layer.keys, KiviCacheTensor) and isinstance(layer.values, KiviCacheTensor)
    assert returned_cache(out).get_seq_length() == PROMPT_LEN + 19  # the last token is not fed back


@pytest.mark.inductor
def test_inductor_matches_eager_backend():
    model = tiny_model("llama")
    prompt = torch.randint(1, model.config.vocab_size, (1, PROMPT_LEN))
    eager_config = KiviConfig(residual_length=32, compiler="eager")
    _, expected_logits = greedy(model, prompt, 40, cache=simulated_cache(model, eager_config))
    backend = compiled(model, KiviConfig(residual_length=32))  # Inductor by default
    _, logits = greedy(model, prompt, 40)
    errors = torch.tensor([relative_error(a, e) for a, e in zip(logits, expected_logits)])
    print(f"inductor vs simulation: max step error {errors.max():.2e}, graphs {backend.graphs_compiled}")
    # Inductor may round the projections differently, which can move a value across a code boundary.
    assert errors.max() <= 1e-2
    assert backend.graphs_compiled <= 4


def test_string_backend_resolves_without_importing_the_package():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda x: x * 2, backend='kivi')\n"
        "assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))\n"
        "print('kivi_compile' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
