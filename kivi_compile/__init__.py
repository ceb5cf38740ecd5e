"""kivi-compile: KIVI 2-bit KV-cache quantization as a torch.compile backend.

    model.forward = torch.compile(model.forward, backend="kivi")
    model.forward = torch.compile(model.forward, backend=kivi_compile.backend(KiviConfig(key_bits=4)))
"""

from __future__ import annotations

from kivi_compile import kernels  # noqa: F401  (registers the kivi:: ops)
from kivi_compile.cache import KiviCacheTensor
from kivi_compile.config import CacheSpec, Compiler, KiviConfig
from kivi_compile.dynamo_backend import KiviBackend, kivi_backend, register


def backend(config: KiviConfig | None = None, **overrides) -> KiviBackend:
    """A ``torch.compile`` backend with the given config (``KiviConfig`` fields as keywords also work)."""
    if config is None:
        config = KiviConfig(**overrides)
    elif overrides:
        raise TypeError("pass either a KiviConfig or keyword overrides, not both")
    return KiviBackend(config)


register()

__all__ = ["CacheSpec", "Compiler", "KiviBackend", "KiviCacheTensor", "KiviConfig", "backend", "kivi_backend"]
