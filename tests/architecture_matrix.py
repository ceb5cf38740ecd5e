"""Architecture matrix: tiny random HF models of many families through backend="kivi".

For each family: the attention sites the pass found and rewrote (or why not), Dynamo graphs per
``generate`` with KIVI against a plain ``backend="eager"`` run (no new graph breaks), and the
largest per-step relative error of the decode logits against the independent fake-quant
simulation in ``kivi_helpers``. Run ``python tests/architecture_matrix.py`` for the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from kivi_helpers import greedy, relative_error, seed_everything, simulated_cache
from transformers import AutoConfig, AutoModelForCausalLM

import kivi_compile
from kivi_compile import KiviConfig

MATRIX_CONFIG = KiviConfig(key_bits=2, value_bits=2, group_size=32, residual_length=32, compiler="eager")
PROMPT_LEN = 37
NEW_TOKENS = 3 * MATRIX_CONFIG.residual_length + 5

_DECODER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_DECODER, num_key_value_heads=2)),
    "mistral": ("mistral", dict(_DECODER, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("qwen2", dict(_DECODER, num_key_value_heads=2)),
    "qwen3": ("qwen3", dict(_DECODER, num_key_value_heads=2, head_dim=32)),
    "phi3": ("phi3", dict(_DECODER, num_key_value_heads=2, pad_token_id=0)),
    "gemma (MQA)": ("gemma", dict(_DECODER, num_key_value_heads=1, head_dim=32)),
    "gpt-neox (partial rotary)": ("gpt_neox", dict(_DECODER, rotary_pct=0.25)),
    "opt": ("opt", dict(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=128)),  # fmt: skip
    "gpt2 (fused qkv)": ("gpt2", dict(n_embd=128, n_layer=2, n_head=4)),
    "stablelm (partial rotary)": ("stablelm", dict(_DECODER, num_key_value_heads=2, partial_rotary_factor=0.25)),
    "starcoder2": ("starcoder2", dict(_DECODER, num_key_value_heads=2, sliding_window=None)),
    "falcon (MQA)": ("falcon", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                                    new_decoder_architecture=False)),  # fmt: skip
    "falcon (new decoder)": ("falcon", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                            num_kv_heads=2, new_decoder_architecture=True)),  # fmt: skip
    "llama (eager attention)": ("llama", dict(_DECODER, num_key_value_heads=2, attn_implementation="eager")),
    "gpt2 (eager attention)": ("gpt2", dict(n_embd=128, n_layer=2, n_head=4, attn_implementation="eager")),
    "qwen2 (eager attention)": ("qwen2", dict(_DECODER, num_key_value_heads=2, attn_implementation="eager")),
    "gemma2 (logit soft-capping)": ("gemma2", dict(_DECODER, num_key_value_heads=2, head_dim=32,
                                                   attn_implementation="eager", sliding_window=4096)),  # fmt: skip
    "mistral (sliding window)": ("mistral", dict(_DECODER, num_key_value_heads=2, sliding_window=24)),
}


@dataclass
class MatrixRow:
    family: str
    sites: int  # attention sites in the decode graph
    rewritten: int
    reasons: str
    graphs_kivi: int
    graphs_plain: int
    max_error: float
    step_split: str  # "yes", or why the decode step is not split for CUDA graphs ("-": no KIVI decode)


def tiny_family_model(model_type: str, overrides: dict) -> torch.nn.Module:
    settings = dict(vocab_size=97, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    seed_everything(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _graphs_per_generate(model, backend, prompt) -> int:
    torch._dynamo.reset()
    counted = []

    def counting_backend(gm, example_inputs):
        counted.append(gm)
        return backend(gm, example_inputs)

    forward = model.forward
    model.forward = torch.compile(forward, backend=counting_backend)
    try:
        greedy(model, prompt, NEW_TOKENS)
    finally:
        model.forward = forward
    return len(counted)


def _layer_index(module: str) -> int:
    return int(re.search(r"\.(\d+)\.", f".{module}.").group(1))


def run_family(family: str) -> MatrixRow:
    model_type, overrides = FAMILIES[family]
    model = tiny_family_model(model_type, overrides)
    prompt = torch.randint(1, model.config.vocab_size, (1, PROMPT_LEN))

    plain_graphs = _graphs_per_generate(model, lambda gm, _: gm.forward, prompt)
    torch._dynamo.reset()
    backend = kivi_compile.backend(MATRIX_CONFIG)
    forward = model.forward
    model.forward = torch.compile(forward, backend=backend)
    try:
        tokens, logits = greedy(model, prompt, NEW_TOKENS)
    finally:
        model.forward = forward
    decode = [result for result in backend.results if any(site.phase == "decode" for site in result.sites)]
    sites = (decode or backend.results)[-1].sites if backend.results else []
    # Expected: the KIVI contract on the layers the pass reports rewritten, full precision elsewhere.
    quantized = {_layer_index(site.module) for site in sites if site.rewritten}
    cache = simulated_cache(model, MATRIX_CONFIG, quantized_layers=quantized)
    expected_tokens, expected = greedy(model, prompt, NEW_TOKENS, cache=cache)
    steps = min(len(logits), len(expected))
    error = max(relative_error(logits[i], expected[i]) for i in range(steps))
    if not torch.equal(tokens, expected_tokens):
        error = max(error, float("inf"))
    return MatrixRow(
        family=family,
        sites=len(sites),
        rewritten=sum(site.rewritten for site in sites),
        reasons="; ".join(sorted({site.reason for site in sites if not site.rewritten})) or "-",
        graphs_kivi=backend.graphs_compiled,
        graphs_plain=plain_graphs,
        max_error=error,
        step_split=_step_split(decode),
    )


def _step_split(decode_results: list) -> str:
    steps = {result.step_graph for result in decode_results if result.step_graph}
    if not steps:
        return "-"
    return "yes" if all(result.step_runner is not None for result in decode_results) else "; ".join(sorted(steps))


def main() -> None:
    from tabulate import tabulate

    rows = []
    for family in FAMILIES:
        row = run_family(family)
        rows.append([row.family, row.sites, row.rewritten, row.reasons, f"{row.graphs_kivi} / {row.graphs_plain}",
                     row.step_split, f"{row.max_error:.1e}"])  # fmt: skip
    headers = ["family", "sites", "rewritten", "reason (if not all)", "graphs kivi / plain",
               "decode step split for CUDA graphs", "max logit error"]  # fmt: skip
    print(f"K{MATRIX_CONFIG.key_bits}V{MATRIX_CONFIG.value_bits} G={MATRIX_CONFIG.group_size} "
          f"R={MATRIX_CONFIG.residual_length}, fp32, prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens, "
          f"torch {torch.__version__}")  # fmt: skip
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
