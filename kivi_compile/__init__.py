"""kivi-compile: KIVI 2-bit KV-cache quantization as a torch.compile backend.

    model.forward = torch.compile(model.forward, backend="kivi")
    model.forward = torch.compile(model.forward, backend=kivi_compile.backend(KiviConfig(key_bits=4)))
    model = kivi_compile.compile(model, KiviConfig(key_bits=4))      # the same, backend kept as model.kivi_backend
    print(kivi_compile.explain(model, input_ids).to_text())           # what the pass does, graph by graph

``KIVI_LOG=debug|info|warning|error`` sends the ``kivi_compile`` logger to stderr at that level.
"""

from __future__ import annotations

from kivi_compile import kernels  # noqa: F401  (registers the kivi:: ops)
from kivi_compile.cache import KiviCacheTensor
from kivi_compile.config import CacheSpec, Compiler, KiviConfig
from kivi_compile.decorator import compile, kivi
from kivi_compile.dynamo_backend import KiviBackend, kivi_backend, register
from kivi_compile.inspection import explain
from kivi_compile.log import configure_from_env
from kivi_compile.report import Report


def backend(config: KiviConfig | None = None, **overrides) -> KiviBackend:
    """A ``torch.compile`` backend with the given config (``KiviConfig`` fields as keywords also work)."""
    if config is None:
        config = KiviConfig(**overrides)
    elif overrides:
        raise TypeError("pass either a KiviConfig or keyword overrides, not both")
    return KiviBackend(config)


register()
configure_from_env()

__all__ = [
    "CacheSpec",
    "Compiler",
    "KiviBackend",
    "KiviCacheTensor",
    "KiviConfig",
    "Report",
    "backend",
    "compile",
    "explain",
    "kivi",
    "kivi_backend",
]
