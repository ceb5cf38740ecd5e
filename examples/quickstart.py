"""Quickstart: a tiny random Llama on CPU, compiled with backend="kivi".

Generates with a KIVI K2V2 cache, then reports the KV-cache bytes against an fp16 cache and how
often KIVI picks the same next token as the uncompiled fp16 model when both read the same text.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kivi_compile.transformers_names import cache_keyword, returned_cache

PROMPT_TOKENS, NEW_TOKENS = 200, 300


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.float16).eval()


@torch.no_grad()
def next_token_choices(model, sequence: torch.Tensor) -> torch.Tensor:
    """Argmax next token after the prompt and after each later token, feeding ``sequence``."""
    # the keyword is `cache` from transformers 5.24, `past_key_values` before
    cache_kwarg = {cache_keyword(model.forward): DynamicCache(config=model.config)}
    logits = [model(sequence[:, :PROMPT_TOKENS], **cache_kwarg).logits[:, -1]]
    for position in range(PROMPT_TOKENS, sequence.shape[1] - 1):
        logits.append(model(sequence[:, position : position + 1], **cache_kwarg).logits[:, -1])
    return torch.stack(logits).argmax(-1)


def main() -> None:
    model = tiny_llama()
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS))
    fp16_sequence = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    fp16_choices = next_token_choices(model, fp16_sequence)

    model.forward = torch.compile(model.forward, backend="kivi")  # K2V2, G=32, R=128
    start = time.perf_counter()
    out = model.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    seconds = time.perf_counter() - start
    cache = returned_cache(out)
    kivi_bytes = sum(layer.keys.nbytes_held() + layer.values.nbytes_held() for layer in cache.layers)
    fp16_bytes = sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers)
    agreement = (next_token_choices(model, fp16_sequence) == fp16_choices).float().mean().item()

    print(f"generated {out.sequences.shape[1] - PROMPT_TOKENS} tokens with backend='kivi' in {seconds:.1f} s")
    print(f"KV cache after {cache.get_seq_length()} tokens: fp16 {fp16_bytes / 2**20:.2f} MiB, "
          f"KIVI {kivi_bytes / 2**20:.2f} MiB ({fp16_bytes / kivi_bytes:.1f}x smaller)")  # fmt: skip
    print(f"next-token agreement with the fp16 model on the same text: {agreement:.1%}")


if __name__ == "__main__":
    main()
