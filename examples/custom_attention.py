"""A hand-written attention module with its own tuple KV cache, made KIVI by one decorator.

The module knows nothing about KIVI: it projects q/k/v, appends to its ``(past_k, past_v)`` tuple
with ``torch.cat`` and returns the new tuple as ``present``, expands its KV heads for GQA with
``repeat_interleave`` and calls ``F.scaled_dot_product_attention``. ``@kivi_compile.kivi(config)``
compiles every instance; the pass finds the cache append and rewrites it, so ``present`` comes back
as a quantized ``KiviCacheTensor`` and decode steps attend over it directly.

Runs on CPU in a few seconds (``compiler="eager"``: the rewritten graphs run as PyTorch
references; leave it out on a GPU to compile with Inductor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kivi_compile
from kivi_compile import KiviCacheTensor, KiviConfig, Report

CONFIG = KiviConfig(key_bits=2, value_bits=2, group_size=32, residual_length=32, compiler="eager")
VOCAB, WIDTH, HEADS, KV_HEADS, LAYERS = 256, 256, 8, 2, 2
PROMPT_TOKENS, NEW_TOKENS = 40, 48

KVCache = tuple[torch.Tensor, torch.Tensor]


@kivi_compile.kivi(CONFIG)
class CausalSelfAttention(nn.Module):
    """Grouped-query causal self-attention over a legacy ``(keys, values)`` cache, ``[B, H_kv, T, D]``."""

    def __init__(self, width: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.q_proj = nn.Linear(width, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, width, bias=False)

    def forward(self, x: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        batch, tokens, _ = x.shape
        q = self.q_proj(x).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        if past is None:
            past = (k[:, :, :0], v[:, :, :0])
        past_k, past_v = past
        keys, values = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        group = self.heads // self.kv_heads
        out = F.scaled_dot_product_attention(
            q, keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1), is_causal=tokens > 1
        )
        present = (keys, values)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1)), present


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = CausalSelfAttention(WIDTH, HEADS, KV_HEADS)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))

    def forward(self, x: torch.Tensor, past: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        attended, present = self.attn(self.norm1(x), past)
        x = x + attended
        return x + self.mlp(self.norm2(x)), present


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None) -> tuple[torch.Tensor, list[KVCache]]:
        x, presents = self.embed(tokens), []
        for i, block in enumerate(self.blocks):
            x, present = block(x, None if cache is None else cache[i])
            presents.append(present)
        return self.head(x), presents


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    model = TinyLM().eval()
    tokens = torch.randint(0, VOCAB, (1, PROMPT_TOKENS))
    logits, cache = model(tokens)  # prefill
    for _ in range(NEW_TOKENS):  # greedy decode steps
        next_token = logits[:, -1:].argmax(-1)
        tokens = torch.cat([tokens, next_token], dim=1)
        logits, cache = model(next_token, cache)

    keys, values = cache[0]
    assert isinstance(keys, KiviCacheTensor) and isinstance(values, KiviCacheTensor)
    print(f"prefill of {PROMPT_TOKENS} tokens, {NEW_TOKENS} decode steps; each layer's present is a "
          f"{type(keys).__name__} of shape {tuple(keys.shape)}\n")  # fmt: skip

    # Every CausalSelfAttention shares the class's backend: one prefill and one decode graph for all layers.
    report = Report.from_backend(CausalSelfAttention.kivi_backend)
    print(report.headline(), report.table(), *report.summary(), sep="\n")
    decode = next(graph for graph in report.graphs if graph.phase == "decode")
    changes = [line for line in decode.diff().splitlines() if line.startswith(("-    ", "+    ")) and "=" in line]
    print(f"\n{decode.title}, changed lines of the diff:", *(line[:120] for line in changes), sep="\n")


if __name__ == "__main__":
    main()
