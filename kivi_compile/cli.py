"""``kivi-diff``: what the KIVI pass does to a model, as a table of attention sites and a graph diff.

    kivi-diff --arch llama --layers 2                # a tiny random model of an HF family
    kivi-diff --model ./my-checkpoint                # a local checkpoint directory, offline
    kivi-diff --callable mypkg.attn:make_example     # make_example() -> (fn_or_module, args[, kwargs])

It runs ``kivi_compile.explain`` on CPU (a prefill and one decode step for a causal LM). Bad input
(an unknown family, a missing path, a callable that does not import, invalid KIVI settings) ends
with exit status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kivi_compile.config import KiviConfig
from kivi_compile.inspection import ConfigMismatch, explain
from kivi_compile.report import Report

_DECODER = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4)
# Tiny settings per model_type (head_dim 32, so the default group size of 32 fits).
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(_DECODER, num_key_value_heads=2),
    "mistral": dict(_DECODER, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(_DECODER, num_key_value_heads=2),
    "qwen3": dict(_DECODER, num_key_value_heads=2, head_dim=32),
    "phi3": dict(_DECODER, num_key_value_heads=2, pad_token_id=0),
    "gemma": dict(_DECODER, num_key_value_heads=1, head_dim=32),
    "gemma2": dict(_DECODER, num_key_value_heads=2, head_dim=32, sliding_window=4096, attn_implementation="eager"),
    "gpt2": dict(hidden_size=128, num_attention_heads=4),
    "gpt_neox": dict(_DECODER, rotary_pct=0.25),
    "opt": dict(hidden_size=128, ffn_dim=256, num_attention_heads=4, word_embed_proj_dim=128),
    "stablelm": dict(_DECODER, num_key_value_heads=2, partial_rotary_factor=0.25),
    "starcoder2": dict(_DECODER, num_key_value_heads=2, sliding_window=None),
    "falcon": dict(hidden_size=128, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True),
}
_COMMON = dict(vocab_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
EXIT_BAD_INPUT = 2


class CliError(Exception):
    """A problem with the user's input: reported as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kivi-diff", description="Show which attention sites KIVI rewrites, why not, and the graph diff."
    )
    subject = parser.add_mutually_exclusive_group(required=True)
    subject.add_argument("--arch", help=f"tiny random model of an HF family: {', '.join(FAMILIES)}")
    subject.add_argument("--model", metavar="PATH", help="local checkpoint directory (loaded offline)")
    subject.add_argument("--callable", metavar="MODULE:FACTORY", help="factory() -> (fn_or_module, args[, kwargs])")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers for --arch (default 2)")
    parser.add_argument("--prompt-length", type=int, default=16, help="prompt tokens for --arch/--model (default 16)")
    parser.add_argument("--attn", choices=["sdpa", "eager"], help="attention implementation for --arch/--model")
    defaults = KiviConfig()
    parser.add_argument("--key-bits", type=int, default=defaults.key_bits, help="2, 4 or 8 (default %(default)s)")
    parser.add_argument("--value-bits", type=int, default=defaults.value_bits, help="2, 4 or 8 (default %(default)s)")
    parser.add_argument("--group-size", type=int, default=defaults.group_size, help="G (default %(default)s)")
    parser.add_argument(
        "--residual-length", type=int, default=defaults.residual_length, help="R, a multiple of G (default %(default)s)"
    )
    parser.add_argument(
        "--per-channel-keys", action=argparse.BooleanOptionalAction, default=defaults.per_channel_keys,
        help="group keys per channel as KIVI does (--no-per-channel-keys: per token, the paper's ablation)",
    )  # fmt: skip
    parser.add_argument(
        "--format", choices=["text", "markdown", "json"], default="text",
        help="text (default); markdown for a PR; json, which kivi_compile.Report.from_dict reads back",
    )  # fmt: skip
    parser.add_argument(
        "--diff", action=argparse.BooleanOptionalAction, default=True,
        help="show the graph diff (default on; json always holds each graph's code before and after)",
    )  # fmt: skip
    parser.add_argument(
        "--color", choices=["auto", "always", "never"], default="auto",
        help="ANSI colour for text; auto: when stdout is a terminal and NO_COLOR is unset",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kivi-diff`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        try:
            config = KiviConfig(
                key_bits=args.key_bits, value_bits=args.value_bits, group_size=args.group_size,
                residual_length=args.residual_length, per_channel_keys=args.per_channel_keys,
            )  # fmt: skip
        except ValueError as error:
            raise CliError(str(error)) from None
        title, target, call_args, call_kwargs = _subject(args)
        report = explain(target, *call_args, config=config, **call_kwargs)
    except (CliError, ConfigMismatch) as error:
        print(f"kivi-diff: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(_render(report, title, args))
    return 0


def _subject(args: argparse.Namespace) -> tuple[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """What to explain: (a title, the fn or module, its args, its kwargs)."""
    if args.callable is None:
        if args.prompt_length < 1:
            raise CliError(f"--prompt-length {args.prompt_length}: must be at least 1")
        model = _tiny_model(args) if args.arch is not None else _local_model(args)
        torch.manual_seed(0)
        prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_length))
        layers = model.config.num_hidden_layers
        title = f"{args.arch or args.model}: {layers} layer(s), prompt of {args.prompt_length} tokens"
        return title, model, (prompt,), {"attention_mask": torch.ones_like(prompt)}
    target, call_args, call_kwargs = _from_factory(args.callable)
    return args.callable, target, call_args, call_kwargs


def _tiny_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    family = args.arch.lower().replace("-", "_")
    if family not in FAMILIES:
        raise CliError(f"unknown family {args.arch!r}; known: {', '.join(FAMILIES)}")
    if args.layers < 1:
        raise CliError(f"--layers {args.layers}: must be at least 1")
    settings = {"attn_implementation": "sdpa", **_COMMON, **FAMILIES[family], "num_hidden_layers": args.layers}
    if args.attn:
        settings["attn_implementation"] = args.attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **settings)).eval()


def _local_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(args.model):
        raise CliError(f"--model {args.model}: no such directory")
    extra = {"attn_implementation": args.attn} if args.attn else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as error:
        raise CliError(f"--model {args.model}: cannot load a causal LM: {_first_line(error)}") from None
    return model.eval()


def _from_factory(spec: str) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CliError(f"--callable {spec!r}: expected MODULE:FACTORY, e.g. mypkg.attention:make_example")
    if os.getcwd() not in sys.path:  # like `python -m`: modules in the working directory import
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a missing module, or one that fails while importing (syntax, its own imports)
        message = f"{type(error).__name__}: {_first_line(error)}"
        raise CliError(f"--callable {spec!r}: cannot import {module_name!r}: {message}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise CliError(f"--callable {spec!r}: module {module_name!r} has no callable {attribute!r}")
    made = factory()
    shaped = isinstance(made, tuple) and len(made) in (2, 3)
    if not (shaped and callable(made[0]) and isinstance(made[1], (tuple, list))):
        raise CliError(f"--callable {spec!r}: {attribute}() must return (fn_or_module, args[, kwargs])")
    kwargs = made[2] if len(made) == 3 else {}
    if not isinstance(kwargs, dict):
        raise CliError(f"--callable {spec!r}: the kwargs {attribute}() returns must be a dict")
    return made[0], tuple(made[1]), kwargs


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _render(report: Report, title: str, args: argparse.Namespace) -> str:
    if args.format == "json":
        return json.dumps(report.to_dict(), indent=2)
    if args.format == "markdown":
        return f"### kivi-diff: {title}\n\n{report.to_markdown(diff=args.diff)}"
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    return f"kivi-diff: {title}\n{report.to_text(diff=args.diff, color=color)}"


if __name__ == "__main__":
    sys.exit(main())
