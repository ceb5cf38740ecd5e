"""The KV cache's name in transformers' APIs: 5.24 renamed ``past_key_values`` to ``cache`` (forward,
``generate`` and their outputs). The old name warns, and goes from forward in 5.40; models written
before keep it. So each model and output is asked, not the installed version."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def cache_keyword(forward: Callable[..., Any]) -> str:
    """The keyword under which ``forward`` (a model's forward) takes the KV cache. ``generate`` passes its
    keywords on to forward, so it takes the cache under the same name (its own signature does not say:
    in 5.25 ``cache`` is one of its ``**kwargs``)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def returned_cache(output: object) -> Any:
    """The KV cache a model's or ``generate``'s output holds (None when it holds none)."""
    field = "cache" if "cache" in getattr(output, "__dataclass_fields__", {}) else "past_key_values"
    return getattr(output, field, None)
