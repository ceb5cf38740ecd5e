"""``explain``: capture a model or function on example inputs and report what KIVI does to it.

It runs on CPU with the backend in ``compiler="eager"`` mode (nothing is compiled, the rewritten
graphs run as PyTorch references), so it needs no GPU and starts in seconds. Dynamo state is reset
before (so every graph is captured afresh, whatever ran earlier) and after (so the user's module or
function is left as it was; other compiled code recompiles on its next call).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.eval_frame import innermost_fn
from torch._dynamo.exc import BackendCompilerFailed

from kivi_compile.config import Compiler, KiviConfig
from kivi_compile.dynamo_backend import KiviBackend
from kivi_compile.report import Report
from kivi_compile.transformers_names import cache_keyword, returned_cache

log = logging.getLogger("kivi_compile")

# Per-call position arguments that the decode step must derive from its cache, not reuse.
_PREFILL_ONLY_KWARGS = ("position_ids", "cache_position")


class ConfigMismatch(ValueError):
    """The KIVI settings do not fit the captured model (e.g. ``group_size`` does not divide the head dim)."""


def explain(fn_or_module: Callable[..., Any], *args: Any, config: KiviConfig | None = None, **kwargs: Any) -> Report:
    """Run ``fn_or_module(*args, **kwargs)`` through the KIVI backend and report each graph and site.

    A generate-style Hugging Face model (an ``nn.Module`` with ``.generate`` and ``.config``) is
    called as ``model(input_ids, **kwargs)`` for a prefill and then once more with the argmax token
    and the returned cache, so both prefill and decode sites show (under ``torch.no_grad``). Anything
    else is called once with the given inputs; pass a KIVI cache (e.g. from an earlier call) to see a
    decode step. A module is captured through its ``forward``; an already compiled module or
    function is captured through its original code.

    Args:
        fn_or_module: an ``nn.Module``, a function, or either one already compiled or decorated.
        *args, **kwargs: its inputs (``config`` is taken by ``explain``).
        config: the KIVI settings to report on (default ``KiviConfig()``); the compiler is always eager.

    Raises:
        ConfigMismatch: a ``ValueError``; the config does not fit the model (the backend refused it).
    """
    config = dataclasses.replace(config or KiviConfig(), compiler=Compiler.EAGER)
    backend = KiviBackend(config)
    torch._dynamo.reset()
    try:
        step = torch.compile(_original(fn_or_module), backend=backend)
        if _is_generate_style(fn_or_module):
            _prefill_and_decode(step, args, kwargs)
        else:
            step(*args, **kwargs)
    except BackendCompilerFailed as error:
        if isinstance(error.inner_exception, ValueError):  # the user can act on it: say it plainly
            raise ConfigMismatch(str(error.inner_exception)) from error
        raise
    finally:
        torch._dynamo.reset()
    return Report.from_backend(backend)


def _original(fn_or_module: Callable[..., Any]) -> Callable[..., Any]:
    """The uncompiled callable: a module's (original) ``forward``, a function without its compile wrapper."""
    module = getattr(fn_or_module, "_orig_mod", fn_or_module)  # torch.compile(module) -> OptimizedModule
    if isinstance(module, torch.nn.Module):
        return innermost_fn(module.forward)  # kivi_compile.compile replaces forward with a compiled one
    return innermost_fn(fn_or_module)


def _is_generate_style(fn_or_module: object) -> bool:
    module = getattr(fn_or_module, "_orig_mod", fn_or_module)
    has_generate = callable(getattr(module, "generate", None))
    return isinstance(module, torch.nn.Module) and has_generate and hasattr(module, "config")


@torch.no_grad()
def _prefill_and_decode(step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if len(args) > 1:
        raise TypeError("explain(model, input_ids, **kwargs): a generate-style model takes input_ids and keywords")
    kwargs = dict(kwargs)
    input_ids = args[0] if args else kwargs.pop("input_ids")
    out = step(input_ids, use_cache=True, **kwargs)
    cache = returned_cache(out)
    if cache is None:
        log.warning("explain: the model returned no KV cache, so no decode step was captured")
        return
    next_token = out.logits[:, -1:].argmax(-1)
    for name in _PREFILL_ONLY_KWARGS:
        kwargs.pop(name, None)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    kwargs[cache_keyword(step)] = cache
    step(next_token, use_cache=True, **kwargs)
