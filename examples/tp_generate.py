"""Tensor-parallel generation with backend="kivi": each rank quantizes the KV cache of its own heads.

    python examples/tp_generate.py --save-tiny /tmp/tiny-llama          # a small random checkpoint
    torchrun --nproc-per-node 2 examples/tp_generate.py --model /tmp/tiny-llama --out tokens.json

The model is loaded with its own tensor-parallel plan when more than one process runs (NCCL on
GPUs, gloo on CPUs): attention projections are sharded by heads, so each rank's graph holds plain
tensors of its local heads and the KIVI pass rewrites it unchanged. Rank 0 prints the tokens,
throughput and each rank's KV-cache bytes (and peak GPU memory), and writes them to ``--out`` as
JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
import torch.distributed as dist
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import kivi_compile
from kivi_compile import KiviConfig
from kivi_compile.transformers_names import returned_cache


def save_tiny_llama(path: str) -> None:
    """A random 2-layer Llama (8 heads, 4 KV heads) whose heads and vocab split over 2 or 4 ranks."""
    config = LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=32, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def sharding_arguments(world_size: int) -> dict[str, object]:
    """from_pretrained's arguments that shard the model by its own plan over ``world_size`` ranks.
    Transformers whose ``DistributedConfig`` takes ``tp_size`` (5.17's docs use it) warn that a bare
    ``tp_plan`` is deprecated."""
    if world_size == 1:
        return {}
    config_class = getattr(transformers, "DistributedConfig", None)
    if config_class is None or "tp_size" not in {field.name for field in dataclasses.fields(config_class)}:
        return {"tp_plan": "auto"}
    return {"distributed_config": config_class(tp_size=world_size)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local checkpoint directory")
    parser.add_argument("--save-tiny", metavar="PATH", help="write a tiny random Llama checkpoint and exit")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--key-bits", type=int, default=2)
    parser.add_argument("--value-bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--residual-length", type=int, default=32)
    parser.add_argument("--compiler", choices=["inductor", "eager"], default="inductor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write rank 0's results here as JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.save_tiny:
        save_tiny_llama(args.save_tiny)
        return
    if not args.model:
        raise SystemExit("tp_generate.py: give --model PATH (or --save-tiny PATH first)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), **sharding_arguments(world_size)
    ).eval()
    device = model.device
    config = KiviConfig(
        key_bits=args.key_bits, value_bits=args.value_bits, group_size=args.group_size,
        residual_length=args.residual_length, compiler=args.compiler,
    )  # fmt: skip
    backend = kivi_compile.backend(config)
    model.forward = torch.compile(model.forward, backend=backend)

    torch.manual_seed(args.seed)  # the same prompt on every rank
    prompt = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt_tokens)).to(device)
    start = time.perf_counter()
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    kv_bytes = sum(layer.keys.nbytes_held() + layer.values.nbytes_held() for layer in returned_cache(out).layers)
    local = {
        "kv_bytes": kv_bytes,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "sites": [[site.phase, site.rewritten, site.kv_heads, site.query_heads] for r in backend.results for site in r.sites],
    }
    ranks = [local]
    if world_size > 1:
        ranks = [None] * world_size
        dist.all_gather_object(ranks, local)
    if int(os.environ.get("RANK", "0")) == 0:
        tokens = out.sequences[:, args.prompt_tokens :].tolist()
        result = {
            "world_size": world_size,
            "tokens": tokens,
            "tokens_per_second": args.batch * args.new_tokens / seconds,
            "graphs_compiled": backend.graphs_compiled,
            "ranks": ranks,
        }
        print(f"{world_size} rank(s): {result['tokens_per_second']:.1f} tok/s, graphs {backend.graphs_compiled}")
        for rank, info in enumerate(ranks):
            peak = "" if info["peak_gpu_bytes"] is None else f", peak GPU {info['peak_gpu_bytes'] / 2**30:.2f} GiB"
            print(f"  rank {rank}: KV cache {info['kv_bytes'] / 2**20:.2f} MiB{peak}; sites {info['sites'][:2]}")
        print(f"first row: {tokens[0][:16]}")
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(result, handle)
    if world_size > 1:
        dist.barrier()  # the ranks tear the process group down together, not one while the other still works
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
