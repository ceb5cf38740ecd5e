"""``@kivi_compile.kivi`` on a class, an instance and a function, and ``kivi_compile.compile`` on HF models.

The decorated code is a hand-written attention with a legacy ``(keys, values)`` tuple cache. Its
outputs are compared with the same code run uncompiled over the past as the KIVI contract says
attention must see it (``kivi_helpers.fake_quant``: independent quantize-dequantize code).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kivi_helpers import fake_quant, greedy, relative_error, simulated_cache, tiny_model
from torch import nn

import kivi_compile
from kivi_compile import KiviCacheTensor, KiviConfig

CONFIG = KiviConfig(key_bits=2, value_bits=4, group_size=16, residual_length=32, compiler="eager")
WIDTH, HEADS, KV_HEADS = 64, 4, 2
PROMPT = 45  # not a multiple of R or G
STEPS = CONFIG.residual_length + 3  # crosses a key flush


class TupleCacheAttention(nn.Module):
    """q/k/v projections, ``torch.cat`` onto a ``(past_k, past_v)`` tuple returned as ``present``, GQA by
    ``repeat_interleave``, SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = WIDTH // HEADS
        self.q_proj = nn.Linear(WIDTH, WIDTH)
        self.k_proj = nn.Linear(WIDTH, KV_HEADS * self.head_dim)
        self.v_proj = nn.Linear(WIDTH, KV_HEADS * self.head_dim)

    def forward(self, x, past=None):
        batch, tokens, _ = x.shape
        q = self.q_proj(x).view(batch, tokens, HEADS, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, KV_HEADS, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, KV_HEADS, self.head_dim).transpose(1, 2)
        out, keys, values = tuple_cache_step(q, k, v, *(past if past is not None else (k[:, :, :0], v[:, :, :0])))
        return out.transpose(1, 2).reshape(batch, tokens, WIDTH), (keys, values)


def tuple_cache_step(q, k, v, past_k, past_v):
    keys, values = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q, keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1), is_causal=q.shape[2] > 1
    )
    return out, keys, values


@kivi_compile.kivi(CONFIG)
class KiviTupleCacheAttention(TupleCacheAttention):
    """The same module, decorated where it is defined."""


def contract_view(history: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The past as KIVI attention must see it before this step's append."""
    r = CONFIG.residual_length
    quantized = history.shape[2] // r * r if per_channel else max(history.shape[2] - r, 0)
    bits = CONFIG.key_bits if per_channel else CONFIG.value_bits
    view = fake_quant(history[:, :, :quantized], bits, CONFIG.group_size, per_channel)
    return torch.cat([view, history[:, :, quantized:]], dim=2)


def assert_module_follows_the_contract(kivi_module: nn.Module, plain: nn.Module) -> None:
    x = torch.randn(2, PROMPT, WIDTH)
    out, past = kivi_module(x)
    expected, history = plain(x)
    assert isinstance(past[0], KiviCacheTensor) and isinstance(past[1], KiviCacheTensor)
    errors = [relative_error(out, expected)]  # prefill: full precision
    for _ in range(STEPS):
        x = torch.randn(2, 1, WIDTH)
        out, past = kivi_module(x, past)
        expected, _ = plain(x, (contract_view(history[0], True), contract_view(history[1], False)))
        _, history = plain(x, history)
        errors.append(relative_error(out, expected))
    print(f"max relative error {max(errors):.2e}, mean {sum(errors) / len(errors):.2e}")
    assert max(errors) <= 1e-5
    assert past[0].shape == history[0].shape == (2, KV_HEADS, PROMPT + STEPS, WIDTH // HEADS)


def assert_prefill_and_decode_rewritten(backend: kivi_compile.KiviBackend) -> None:
    sites = [site for result in backend.results for site in result.sites]
    assert [(site.phase, site.rewritten) for site in sites] == [("prefill", True), ("decode", True)]


def test_decorated_class_follows_the_contract_and_its_instances_share_the_backend():
    first, second = KiviTupleCacheAttention(), KiviTupleCacheAttention()
    plain = TupleCacheAttention()
    plain.load_state_dict(first.state_dict())
    assert_module_follows_the_contract(first, plain)
    assert first.kivi_backend is second.kivi_backend is KiviTupleCacheAttention.kivi_backend
    assert_prefill_and_decode_rewritten(first.kivi_backend)

    _, past = second(torch.randn(2, PROMPT, WIDTH))  # same shapes: reuses the first instance's graphs
    second(torch.randn(2, 1, WIDTH), past)
    assert first.kivi_backend.graphs_compiled == 2
    assert plain._compiled_call_impl is None  # the undecorated base class is left alone


def test_decorated_instance_follows_the_contract():
    module = TupleCacheAttention()
    plain = TupleCacheAttention()
    plain.load_state_dict(module.state_dict())
    assert kivi_compile.kivi(CONFIG)(module) is module
    assert_module_follows_the_contract(module, plain)
    assert module.kivi_backend.config == CONFIG
    assert_prefill_and_decode_rewritten(module.kivi_backend)


def test_decorated_function_follows_the_contract():
    step = kivi_compile.kivi(CONFIG)(tuple_cache_step)
    q = torch.randn(2, HEADS, PROMPT, 16)
    k, v = torch.randn(2, KV_HEADS, PROMPT, 16), torch.randn(2, KV_HEADS, PROMPT, 16)
    empty = k[:, :, :0]
    _, past_k, past_v = step(q, k, v, empty, empty)
    history_k, history_v = k, v
    errors = []
    for _ in range(STEPS):
        q, k, v = torch.randn(2, HEADS, 1, 16), torch.randn(2, KV_HEADS, 1, 16), torch.randn(2, KV_HEADS, 1, 16)
        out, past_k, past_v = step(q, k, v, past_k, past_v)
        expected, _, _ = tuple_cache_step(q, k, v, contract_view(history_k, True), contract_view(history_v, False))
        history_k, history_v = torch.cat([history_k, k], 2), torch.cat([history_v, v], 2)
        errors.append(relative_error(out, expected))
    print(f"max relative error {max(errors):.2e}")
    assert max(errors) <= 1e-5
    assert isinstance(past_k, KiviCacheTensor) and past_k.shape == history_k.shape
    assert step.__name__ == "tuple_cache_step"
    assert_prefill_and_decode_rewritten(step.kivi_backend)


def test_bare_decorator_uses_the_default_config():
    step = kivi_compile.kivi(tuple_cache_step)
    assert step.kivi_backend.config == KiviConfig()
    assert step.kivi_backend.results == []  # nothing runs until it is called


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: kivi_compile.kivi(CONFIG)(42), "got int"),
        (lambda: kivi_compile.kivi(CONFIG)(type("Plain", (), {})), "not the plain class Plain"),
        (lambda: kivi_compile.kivi({"key_bits": 2}), "config must be a KiviConfig, got dict"),
        (lambda: kivi_compile.kivi(CONFIG, backend="eager")(tuple_cache_step), "configure it with a KiviConfig"),
        (lambda: kivi_compile.compile(tiny_model("llama"), backend="eager"), "configure it with a KiviConfig"),
        (lambda: kivi_compile.compile(object()), "a model with a forward method"),
    ],
)
def test_misuse_is_a_type_error_that_says_what_to_do(make, message):
    with pytest.raises(TypeError, match=message):
        make()


def test_compile_hf_model_generates_what_the_kivi_contract_defines():
    config = KiviConfig(group_size=32, residual_length=32, compiler="eager")
    model = tiny_model("llama")
    prompt = torch.randint(1, model.config.vocab_size, (1, 37))
    new_tokens = config.residual_length + 5
    expected_tokens, expected_logits = greedy(model, prompt, new_tokens, cache=simulated_cache(model, config))

    assert kivi_compile.compile(model, config) is model
    tokens, logits = greedy(model, prompt, new_tokens)
    errors = [relative_error(a, e) for a, e in zip(logits, expected_logits)]
    print(f"max step error {max(errors):.2e}")
    assert max(errors) <= 1e-4
    assert torch.equal(tokens, expected_tokens)
    phases = [(site.phase, site.rewritten) for result in model.kivi_backend.results for site in result.sites]
    assert phases == [("prefill", True)] * 2 + [("decode", True)] * 2
