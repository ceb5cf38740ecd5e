"""Every family in the architecture matrix: sites found and rewritten, the decode step split for
CUDA graphs, no new graph breaks, and decode logits equal to the independent KIVI simulation (fp32,
1e-4 relative)."""

from __future__ import annotations

import pytest
from architecture_matrix import FAMILIES, run_family

# Families whose attention the pass must leave alone, and why.
UNREWRITTEN = {
    "gemma2 (logit soft-capping)": "soft-capping",
    "mistral (sliding window)": "not returned from the graph",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family):
    row = run_family(family)
    print(row)
    assert row.sites == 2  # two layers, one attention each
    if family in UNREWRITTEN:
        assert row.rewritten == 0 and UNREWRITTEN[family] in row.reasons
    else:
        assert row.rewritten == row.sites and row.reasons == "-"
        assert row.step_split == "yes"  # the decode step splits for CUDA graphs
    assert row.graphs_kivi <= row.graphs_plain  # no new graph breaks or recompiles
    assert row.max_error <= 1e-4


def test_encoder_decoder_quantizes_self_attention_and_leaves_cross_attention():
    import torch
    from kivi_helpers import SimulatedKiviLayer, greedy, relative_error
    from transformers import BartConfig, BartForConditionalGeneration, DynamicCache, EncoderDecoderCache

    import kivi_compile
    from architecture_matrix import MATRIX_CONFIG

    config = BartConfig(
        vocab_size=97, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = BartForConditionalGeneration(config).eval()
    prompt = torch.randint(3, 97, (2, 20))
    self_attention = DynamicCache()
    self_attention.layers = [SimulatedKiviLayer(MATRIX_CONFIG) for _ in range(config.decoder_layers)]
    simulated = EncoderDecoderCache(self_attention, DynamicCache())
    expected_tokens, expected = greedy(model, prompt, 80, cache=simulated)
    backend = kivi_compile.backend(MATRIX_CONFIG)
    model.forward = torch.compile(model.forward, backend=backend)
    tokens, logits = greedy(model, prompt, 80)
    error = max(relative_error(a, e) for a, e in zip(logits, expected))
    sites = [(site.module.rsplit(".", 1)[-1], site.rewritten) for result in backend.results for site in result.sites]
    print(f"bart: max step error {error:.2e}; sites {sorted(set(sites))}")
    assert torch.equal(tokens, expected_tokens) and error <= 1e-4
    assert set(sites) == {("self_attn", True), ("encoder_attn", False)}
