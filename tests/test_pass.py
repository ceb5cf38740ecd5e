"""The FX pass on hand-written attention: what it rewrites, what it leaves alone, and why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kivi_helpers import fake_quant, relative_error, tiny_model

import kivi_compile
from kivi_compile import KiviCacheTensor, KiviConfig

CONFIG = KiviConfig(key_bits=2, value_bits=4, group_size=16, residual_length=32, compiler="eager")


def tuple_cache_attention(q, k, v, past_k, past_v):
    """A custom module's step: legacy tuple cache, GQA by repeat_interleave."""
    keys = torch.cat([past_k, k], dim=2)
    values = torch.cat([past_v, v], dim=2)
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q, keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1), is_causal=q.shape[2] > 1
    )
    return out, keys, values


def simulated_attention(q, keys, values, past_len):
    r = CONFIG.residual_length
    quant_k, quant_v = past_len // r * r, max(past_len - r, 0)
    k = torch.cat([fake_quant(keys[:, :, :quant_k], 2, 16, True), keys[:, :, quant_k:]], dim=2)
    v = torch.cat([fake_quant(values[:, :, :quant_v], 4, 16, False), values[:, :, quant_v:]], dim=2)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("kv_heads", [1, 2])  # MQA and GQA 2:1
def test_tuple_cache_module_is_rewritten_and_follows_the_contract(kv_heads):
    batch, q_heads, dim, prompt = 2, 4, 32, 45
    backend = kivi_compile.backend(CONFIG)
    step = torch.compile(tuple_cache_attention, backend=backend)
    keys, values = torch.randn(batch, kv_heads, prompt, dim), torch.randn(batch, kv_heads, prompt, dim)
    empty = torch.empty(batch, kv_heads, 0, dim)
    _, past_k, past_v = step(torch.randn(batch, q_heads, prompt, dim), keys, values, empty, empty)
    assert isinstance(past_k, KiviCacheTensor) and isinstance(past_v, KiviCacheTensor)
    for _ in range(3 * CONFIG.residual_length + 3):
        q, k, v = torch.randn(batch, q_heads, 1, dim), torch.randn(batch, kv_heads, 1, dim), torch.randn(batch, kv_heads, 1, dim)
        out, past_k, past_v = step(q, k, v, past_k, past_v)
        expected = simulated_attention(q, torch.cat([keys, k], 2), torch.cat([values, v], 2), keys.shape[2])
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        assert relative_error(out, expected) <= 1e-5
    assert past_k.shape == keys.shape
    assert backend.graphs_compiled == 2
    assert [site.rewritten for result in backend.results for site in result.sites] == [True, True]
    assert [site.phase for result in backend.results for site in result.sites] == ["prefill", "decode"]


def cross_attention(q, memory, w_k, w_v):
    return F.scaled_dot_product_attention(q, memory @ w_k, memory @ w_v)


def self_attention_without_cache_store(q, k, v, past_k, past_v):
    keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values)  # the concatenation is not kept


@pytest.mark.parametrize(
    ("fn", "args", "reason"),
    [
        (
            cross_attention,
            (torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(16, 16), torch.randn(16, 16)),
            "keys are not produced by a KV-cache torch.cat",
        ),
        (
            self_attention_without_cache_store,
            (torch.randn(1, 2, 3, 16), *(torch.randn(1, 2, n, 16) for n in (3, 3, 4, 4))),
            "keys cat is not returned from the graph",
        ),
    ],
)
def test_unrecognised_attention_is_left_exactly_as_it_was(fn, args, reason):
    backend = kivi_compile.backend(CONFIG)
    out = torch.compile(fn, backend=backend)(*args)
    assert torch.equal(out, fn(*args))
    (site,) = backend.results[0].sites
    assert not site.rewritten and reason in site.reason


def test_unrecognised_model_generates_exactly_what_it_does_without_the_backend():
    from architecture_matrix import FAMILIES, tiny_family_model

    model = tiny_family_model(*FAMILIES["gemma2 (logit soft-capping)"])  # tanh between q·kᵀ and softmax
    prompt = torch.randint(1, model.config.vocab_size, (1, 20))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kwargs)
    backend = kivi_compile.backend(CONFIG)
    model.forward = torch.compile(model.forward, backend=backend)
    assert torch.equal(model.generate(prompt, **kwargs), expected)
    assert not any(site.rewritten for result in backend.results for site in result.sites)


def test_group_size_that_does_not_divide_the_head_dim_is_a_clear_error():
    model = tiny_model("llama", head_dim=48)
    model.forward = torch.compile(model.forward, backend=kivi_compile.backend(KiviConfig(group_size=32)))
    prompt = torch.randint(1, model.config.vocab_size, (1, 8))
    with pytest.raises(Exception, match="group_size=32 does not divide the head dim 48"):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, pad_token_id=0)


def _contract_view(history: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The past as KIVI attention must see it before this step's append."""
    r, g = CONFIG.residual_length, CONFIG.group_size
    quantized = history.shape[2] // r * r if per_channel else max(history.shape[2] - r, 0)
    bits = CONFIG.key_bits if per_channel else CONFIG.value_bits
    return torch.cat([fake_quant(history[:, :, :quantized], bits, g, per_channel), history[:, :, quantized:]], dim=2)


def sdpa_variant_step(q, k, v, past_k, past_v, mask, variant: str):
    keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
    if variant == "enable_gqa":
        out = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    elif variant == "explicit_scale":
        out = F.scaled_dot_product_attention(q, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), scale=0.3)
    elif variant == "is_causal":  # SDPA's top-left alignment, kept exactly
        out = F.scaled_dot_product_attention(q, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), is_causal=True)
    else:  # "bool_mask" / "additive_mask"
        out = F.scaled_dot_product_attention(q, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), attn_mask=mask)
    return out, keys, values


@pytest.mark.parametrize("variant", ["enable_gqa", "explicit_scale", "is_causal", "bool_mask", "additive_mask"])
@pytest.mark.parametrize("q_len", [1, 3])
def test_sdpa_variants_follow_the_contract(variant, q_len):
    batch, kv_heads, dim, prompt = 2, 2, 32, 40
    step = torch.compile(sdpa_variant_step, backend=(backend := kivi_compile.backend(CONFIG)))

    pads = torch.tensor([0, 5])  # left pads per row: hidden from every query, like HF's padding mask

    def mask_for(total: int, rows: int = q_len, holes: bool = True) -> torch.Tensor | None:
        visible = torch.rand(batch, 1, rows, total) > (0.2 if holes else 0.0)  # random holes in decode steps
        visible &= (torch.arange(total) >= pads[:, None])[:, None, None, :]
        visible[..., -1] = True  # every query sees at least one key
        if variant == "bool_mask":
            return visible
        if variant == "additive_mask":
            return torch.zeros(visible.shape).masked_fill(~visible, float("-inf")) + torch.randn(visible.shape) * 0.1
        return None

    keys, values = torch.randn(batch, kv_heads, prompt, dim), torch.randn(batch, kv_heads, prompt, dim)
    empty = torch.empty(batch, kv_heads, 0, dim)
    _, past_k, past_v = step(torch.randn(batch, 4, prompt, dim), keys, values, empty, empty, mask_for(prompt, prompt, holes=False), variant)
    for _ in range(25):
        q = torch.randn(batch, 4, q_len, dim)
        k, v = torch.randn(batch, kv_heads, q_len, dim), torch.randn(batch, kv_heads, q_len, dim)
        mask = mask_for(keys.shape[2] + q_len)
        out, past_k, past_v = step(q, k, v, past_k, past_v, mask, variant)
        seen_keys = keys.clone()
        if variant in ("bool_mask", "additive_mask"):  # pads stay out of the key groups' ranges
            for row, pad in enumerate(pads.tolist()):
                seen_keys[row, :, :pad] = keys[row, :, pad : pad + 1]
        expected, _, _ = sdpa_variant_step(
            q, k, v, _contract_view(seen_keys, True), _contract_view(values, False), mask, variant
        )
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        assert relative_error(out, expected) <= 1e-5
    assert all(site.rewritten for result in backend.results for site in result.sites)
    assert backend.graphs_compiled <= 3
