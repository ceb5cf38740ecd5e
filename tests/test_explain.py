"""``kivi_compile.explain`` and its ``Report``: sites, reasons, cache cost, diff, JSON round trip."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from architecture_matrix import FAMILIES, tiny_family_model
from kivi_helpers import tiny_model
from test_decorator import KiviTupleCacheAttention, TupleCacheAttention
from torch import nn

import kivi_compile
from kivi_compile import KiviCacheTensor, KiviConfig, Report
from kivi_compile.report import fp16_bytes_per_token, kivi_bytes_per_token
from kivi_compile.transformers_names import cache_keyword, returned_cache

CONFIG = KiviConfig(key_bits=2, value_bits=2, group_size=32, residual_length=32)
# The keyword the decode step passes the cache under, in the graph's input names (``cache`` from
# transformers 5.24).
CACHE = cache_keyword(transformers.LlamaForCausalLM.forward)


def explain_causal_lm(model: nn.Module, prompt_len: int = 13) -> Report:
    prompt = torch.randint(1, model.config.vocab_size, (1, prompt_len))
    return kivi_compile.explain(model, prompt, attention_mask=torch.ones_like(prompt), config=CONFIG)


def test_bytes_per_token_by_hand():
    # 8 KV heads x 128: fp16 K and V are 2 x 1024 x 2 bytes. K2V2 G=32: codes 2 x 1024 x 2 / 8 = 512 bytes;
    # keys: 1024 channels x 2 fp16 params per 32 tokens = 128 bytes; values: 8 x 4 groups x 2 x 2 = 128 bytes.
    assert fp16_bytes_per_token(8, 128) == 4096
    assert kivi_bytes_per_token(8, 128, KiviConfig(key_bits=2, value_bits=2, group_size=32)) == 512 + 128 + 128
    assert kivi_bytes_per_token(8, 128, KiviConfig(key_bits=4, value_bits=2, group_size=32)) == 768 + 128 + 128
    assert kivi_bytes_per_token(1, 64, KiviConfig(key_bits=8, value_bits=8, group_size=16, residual_length=32)) == (
        128 + 16 + 16
    )


def test_llama_prefill_and_decode_sites():
    model = tiny_model("llama")  # 2 layers, 4 query heads over 2 KV heads of 32
    report = explain_causal_lm(model)

    assert [graph.phase for graph in report.graphs] == ["prefill", "decode"]
    assert report.config.compiler.value == "eager"  # explain never runs Inductor
    for site, (graph, layer) in zip(report.sites, [(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert (site.graph, site.module) == (graph, f"model.layers.{layer}.self_attn")
        assert (site.rewritten, site.reason) == (True, None)
        assert (site.pattern, site.head_sharing, site.head_dim) == ("sdpa", "GQA 2:1", 32)
        assert "sdpa_attention.py" in site.location and site.source.startswith("sdpa_attention.py:")
        assert (site.fp16_bytes_per_token, site.kivi_bytes_per_token) == (256, 48)
    assert report.sites[2].kv_source == f"L_kwargs_{CACHE}_layers_0_keys"

    table = report.table()
    print(table)
    assert "model.layers.1.self_attn" in table and "GQA 2:1" in table
    assert f"L_kwargs_{CACHE}_layers_1_keys" in table
    assert [line.split()[-4:] for line in table.splitlines()[2:]] == [["yes", "256", "48", "-"]] * 4
    assert report.summary()[1] == (
        "graph 1 (decode): 2 of 2 attention site(s) rewritten; "
        "K/V cache per token over them: fp16 512 B, KIVI 96 B (5.3x smaller); "
        "decode step split for CUDA graphs (run directly: not on CUDA)"
    )

    diff = report.diff()
    print("\n".join(diff.splitlines()[:40]))
    assert "--- graph 1 (decode) before" in diff and "+++ graph 1 (decode) after KIVI" in diff
    assert f"-    L_kwargs_{CACHE}_layers_0_keys : kivi_compile_cache_KiviCacheTensor," in diff
    assert f"+    l_kwargs_{CACHE}_layers_0_keys_code_units," in diff
    assert f"-    keys = torch.cat([l_kwargs_{CACHE}_layers_0_keys, k_embed], dim = -2)" in diff
    assert diff.count("= torch.ops.kivi.decode_attention.default(") == 2  # one per layer
    assert diff.count("= torch.ops.kivi.append_kv_.default(") == 2  # keys and values together, per layer
    assert "+    key_validity = kivi_compile_padding_key_validity(" in diff  # prefill: pads kept out of key groups


def test_explain_leaves_the_model_uncompiled():
    model = tiny_model("llama")
    explain_causal_lm(model)
    assert "forward" not in vars(model) and model._compiled_call_impl is None
    out = model(torch.randint(1, 97, (1, 5)), use_cache=True)
    assert not isinstance(returned_cache(out).layers[0].keys, KiviCacheTensor)


def test_gpt2_fused_qkv_sites():
    report = explain_causal_lm(tiny_family_model(*FAMILIES["gpt2 (fused qkv)"]))
    assert [(site.phase, site.module, site.rewritten) for site in report.sites] == [
        ("prefill", "transformer.h.0.attn", True), ("prefill", "transformer.h.1.attn", True),
        ("decode", "transformer.h.0.attn", True), ("decode", "transformer.h.1.attn", True),
    ]  # fmt: skip
    assert {(site.head_sharing, site.fp16_bytes_per_token, site.kivi_bytes_per_token) for site in report.sites} == {
        ("MHA", 512, 96)
    }
    assert "4/4 MHA" in report.table()


class SoftCappedAttention(nn.Module):
    """Tuple-cache eager attention with logit soft-capping: a score transform KIVI leaves alone."""

    def forward(self, q, k, v, past_k, past_v):
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        scores = torch.tanh(q @ keys.transpose(-1, -2) / 30.0) * 30.0
        return torch.softmax(scores, dim=-1) @ values, keys, values


def test_unsupported_attention_shows_its_reason_and_an_unchanged_graph():
    q, k, v = (torch.randn(1, 2, 7, 32) for _ in range(3))
    report = kivi_compile.explain(SoftCappedAttention(), q, k, v, k[:, :, :0], v[:, :, :0], config=CONFIG)
    (site,) = report.sites
    assert not site.rewritten and site.pattern == "eager"
    assert "scores go through tanh" in site.reason
    assert site.kivi_bytes_per_token is None
    table = report.table()
    print(table)
    row = table.splitlines()[2]
    assert " no " in row and "scores go through tanh between q·kᵀ and the softmax" in row
    assert report.diff() == "graph 0 (unknown): unchanged"
    assert report.summary() == ["graph 0 (unknown): 0 of 1 attention site(s) rewritten"]


def test_explain_captures_a_decorated_module_with_its_own_backend():
    module = KiviTupleCacheAttention()
    before = len(module.kivi_backend.results)
    report = kivi_compile.explain(module, torch.randn(1, 9, 64), config=KiviConfig(group_size=16))
    assert [(site.phase, site.rewritten, site.head_sharing) for site in report.sites] == [("prefill", True, "GQA 2:1")]
    assert report.config.group_size == 16
    assert len(module.kivi_backend.results) == before  # the decorator's backend saw nothing


def test_explain_a_decode_step_of_a_function_given_a_kivi_cache():
    plain = TupleCacheAttention()
    decorated = kivi_compile.kivi(KiviConfig(group_size=16, compiler="eager"))(TupleCacheAttention())
    _, past = decorated(torch.randn(1, 9, 64))
    report = kivi_compile.explain(plain.forward, torch.randn(1, 1, 64), past, config=KiviConfig(group_size=16))
    (site,) = report.sites
    assert (site.phase, site.rewritten, site.kv_source) == ("decode", True, "L_past_0_")


def test_group_size_that_does_not_fit_is_a_value_error():
    with pytest.raises(ValueError, match="group_size=32 does not divide the head dim 48"):
        explain_causal_lm(tiny_model("llama", head_dim=48))


def test_json_round_trip_markdown_and_colour():
    report = explain_causal_lm(tiny_model("llama"))
    data = json.loads(json.dumps(report.to_dict()))
    assert Report.from_dict(data) == report
    assert data["config"] == dict(
        key_bits=2, value_bits=2, group_size=32, residual_length=32, compiler="eager", per_channel_keys=True,
        cuda_graphs=True,
    )
    assert data["graphs"][1]["sites"][0]["kivi_bytes_per_token"] == 48
    with pytest.raises(ValueError, match="report version 99"):
        Report.from_dict({**data, "version": 99})

    markdown = report.to_markdown()
    assert markdown.splitlines()[2].startswith("|   graph | phase ")
    assert "```diff\n--- graph 0 (prefill) before" in markdown
    assert "\033[32myes\033[0m" in report.table(color=True)
    assert "\033[31m-    keys = torch.cat(" in report.diff(color=True)
    assert "\033[" not in report.to_text()
