"""Test helpers: tiny models, an independent KIVI simulation, error metrics.

The simulation re-implements the KIVI contract from the issue text with its own fake-quant code,
so the tests do not compare the product with itself.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)
from transformers.cache_utils import DynamicLayer

import kivi_compile
from kivi_compile import KiviConfig
from kivi_compile.cache import allocate_buffers
from kivi_compile.config import CacheSpec
from kivi_compile.kernels.cache_layout import QuantizedKV
from kivi_compile.transformers_names import cache_keyword, returned_cache


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_script(name: str, monkeypatch) -> ModuleType:
    """``benchmarks/<name>.py`` as a module; ``benchmarks/`` is importable while the test runs, for
    scripts that import their siblings (``from bench_generate import ...``)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


_TINY = dict(
    vocab_size=97,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
)


def tiny_model(family: str, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A 2-layer random-weight causal LM of an HF family (GQA 2:1, head_dim 32), eval mode."""
    kwargs = {**_TINY, "attn_implementation": "sdpa", **overrides}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**{"sliding_window": None, **kwargs}))
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def fake_quant(x: torch.Tensor, bits: int, group: int, per_channel: bool) -> torch.Tensor:
    """Quantize-dequantize ``x [B, H, T, D]`` per the contract, in float32 (independent code)."""
    if x.shape[-2] == 0:
        return x
    xf = x.float()
    if per_channel:  # groups of `group` tokens of one channel
        g = xf.reshape(*x.shape[:2], x.shape[2] // group, group, x.shape[3])
        lo, hi = g.min(dim=3, keepdim=True).values, g.max(dim=3, keepdim=True).values
    else:  # groups of `group` channels of one token
        g = xf.reshape(*x.shape[:3], x.shape[3] // group, group)
        lo, hi = g.min(dim=4, keepdim=True).values, g.max(dim=4, keepdim=True).values
    # Scales and minima are stored in the cache dtype (the model's), and codes use the stored ones.
    lo = lo.to(x.dtype).float()
    step = ((hi - lo) / (2**bits - 1)).to(x.dtype).float()
    code = torch.where(step > 0, ((g - lo) / torch.where(step > 0, step, 1.0)).round().clamp(0, 2**bits - 1), 0.0)
    return (code * step + lo).reshape(x.shape).to(x.dtype)


class SimulatedKiviLayer(DynamicLayer):
    """Keeps the full-precision history; returns what KIVI attention must see at each step."""

    def __init__(self, config: KiviConfig) -> None:
        super().__init__()
        self.kivi = config

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:  # prefill: attention in full precision
            self.dtype, self.device = key_states.dtype, key_states.device
            self.keys, self.values, self.is_initialized = key_states, value_states, True
            return self.keys, self.values
        past = self.keys.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        r, g = self.kivi.residual_length, self.kivi.group_size
        quant_k, quant_v = past // r * r, max(past - r, 0)
        keys = torch.cat([fake_quant(self.keys[:, :, :quant_k], self.kivi.key_bits, g, True), self.keys[:, :, quant_k:]], -2)
        values = torch.cat(
            [fake_quant(self.values[:, :, :quant_v], self.kivi.value_bits, g, False), self.values[:, :, quant_v:]], -2
        )
        return keys, values


def simulated_cache(
    model: torch.nn.Module, config: KiviConfig, quantized_layers: set[int] | None = None
) -> DynamicCache:
    """A cache that applies the KIVI contract to ``quantized_layers`` (default: all) and keeps the
    other layers in full precision."""
    cache = DynamicCache(config=model.config)
    layers = range(model.config.num_hidden_layers)
    cache.layers = [
        SimulatedKiviLayer(config) if quantized_layers is None or i in quantized_layers else DynamicLayer()
        for i in layers
    ]
    return cache


def greedy_output(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int,
    cache: DynamicCache | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """``generate``'s whole output for greedy generation of exactly ``new_tokens`` (logits kept),
    starting from ``cache`` when given; no padding unless ``attention_mask`` says so."""
    if cache is not None:
        kwargs[cache_keyword(model.forward)] = cache
    return model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )


def greedy(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, **kwargs):
    """Greedy generation returning (tokens, per-step logits [steps, B, V])."""
    out = greedy_output(model, input_ids, new_tokens, **kwargs)
    return out.sequences, torch.stack(out.logits)


def compiled_greedy_output(
    model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, config: KiviConfig, **kwargs
) -> tuple[object, kivi_compile.KiviBackend]:
    """``greedy_output`` through ``torch.compile`` with a fresh KIVI backend, and that backend.
    Dynamo starts afresh and the model's forward is put back afterwards."""
    torch._dynamo.reset()
    backend = kivi_compile.backend(config)
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend=backend)
    try:
        return greedy_output(model, input_ids, new_tokens, **kwargs), backend
    finally:
        model.forward = eager_forward
        torch._dynamo.reset()


class SimulationComparison(NamedTuple):
    error: float  # largest relative logit error of a compared step
    steps: int  # steps compared
    parted_at: int | None  # first step whose greedy token differs (None: the paths never part)
    backend: kivi_compile.KiviBackend
    cache: DynamicCache  # the compiled run's cache


def compiled_against_simulation(
    model: torch.nn.Module, prompt: torch.Tensor, config: KiviConfig, new_tokens: int, max_steps: int | None = None
) -> SimulationComparison:
    """Greedy generation through ``torch.compile`` with the KIVI backend against the simulation.

    Half-precision logits have near-ties (in bfloat16 the top two are often one ulp apart), so the
    greedy paths may part; the logits after that step are for other tokens. Steps are compared up to
    and including the one whose token differs, and at most ``max_steps``.
    """
    expected_tokens, expected_logits = greedy(model, prompt, new_tokens, cache=simulated_cache(model, config))
    backend = kivi_compile.backend(config)
    model.forward = torch.compile(model.forward, backend=backend)
    out = greedy_output(model, prompt, new_tokens)
    prompt_len = prompt.shape[1]
    same = (out.sequences[:, prompt_len:] == expected_tokens[:, prompt_len:]).all(dim=0).tolist()
    parted_at = same.index(False) if False in same else None
    steps = min(len(same) if parted_at is None else parted_at + 1, max_steps or len(same))
    error = max(relative_error(a, e) for a, e in zip(out.logits[:steps], expected_logits[:steps]))
    return SimulationComparison(error, steps, parted_at, backend, returned_cache(out))


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, sequence: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Prefill ``sequence[:, :prompt_len]``, then feed the rest one token at a time.

    Returns the next-token logits after the prompt and after each fed token, ``[steps, B, V]``.
    """
    cache_kwarg = {cache_keyword(model.forward): DynamicCache(config=model.config)}
    logits = [model(sequence[:, :prompt_len], **cache_kwarg, use_cache=True).logits[:, -1]]
    for position in range(prompt_len, sequence.shape[1]):
        out = model(sequence[:, position : position + 1], **cache_kwarg, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


def poisoned_cache(
    spec: CacheSpec, batch: int, heads: int, head_dim: int, dtype, quant_tokens: int, capacity: int, device
) -> QuantizedKV:
    """An empty cache whose buffers hold random garbage, so untouched rows are told apart."""
    like = torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=device)
    kv = allocate_buffers(like, spec, quant_tokens, capacity)
    kv.codes.random_(0, 256)
    for buffer in (kv.scales, kv.mins, kv.residual):
        buffer.normal_()
    return kv
