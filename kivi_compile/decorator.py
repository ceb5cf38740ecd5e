"""One-line ways in: ``@kivi_compile.kivi()`` for custom code, ``kivi_compile.compile`` for HF models.

Both compile with a ``KiviBackend(config)`` and leave it on the compiled object as
``kivi_backend``, so ``obj.kivi_backend.results`` (or ``Report.from_backend(obj.kivi_backend)``)
shows what the pass did.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from kivi_compile.config import KiviConfig
from kivi_compile.dynamo_backend import KiviBackend

T = TypeVar("T")

BACKEND_ATTRIBUTE = "kivi_backend"


def kivi(config: KiviConfig | Callable[..., Any] | None = None, /, **torch_compile_kwargs: Any) -> Callable[[T], T]:
    """Decorate an ``nn.Module`` subclass, an ``nn.Module`` instance or a function with KIVI.

    - a subclass: every instance compiles its call (``nn.Module.compile``) when constructed; the
      instances share one backend, ``cls.kivi_backend``, so same-shaped layers share graphs;
    - an instance: compiled in place (``module.compile``) and returned, with ``module.kivi_backend``;
    - a function: ``torch.compile(fn)``, with ``fn.kivi_backend`` on the result.

    ``@kivi()`` and ``@kivi`` use the default ``KiviConfig``; ``torch_compile_kwargs`` (``dynamic``,
    ``fullgraph``, ...) go to ``torch.compile``.
    """
    if config is None or isinstance(config, KiviConfig):
        return functools.partial(_decorate, backend=KiviBackend(config), torch_compile_kwargs=torch_compile_kwargs)
    if torch_compile_kwargs or not callable(config):
        got = type(config).__name__
        raise TypeError(f"kivi(config, **torch_compile_kwargs): config must be a KiviConfig, got {got}")
    return _decorate(config, KiviBackend(), {})  # bare @kivi


def compile(model: T, config: KiviConfig | None = None, **torch_compile_kwargs: Any) -> T:  # noqa: A001
    """Compile ``model.forward`` with KIVI and return the model, so ``model.generate`` quantizes its cache.

    This is ``model.forward = torch.compile(model.forward, backend=kivi_compile.backend(config))``;
    ``model.kivi_backend`` is that backend. ``torch_compile_kwargs`` go to ``torch.compile``.
    """
    if not callable(getattr(model, "forward", None)):
        raise TypeError(f"kivi_compile.compile expects a model with a forward method, got {type(model).__name__}")
    _check_no_backend(torch_compile_kwargs)
    backend = KiviBackend(config)
    model.forward = torch.compile(model.forward, backend=backend, **torch_compile_kwargs)
    setattr(model, BACKEND_ATTRIBUTE, backend)
    return model


def _check_no_backend(torch_compile_kwargs: dict[str, Any]) -> None:
    if "backend" in torch_compile_kwargs:
        raise TypeError("the backend is KIVI's; configure it with a KiviConfig instead of backend=")


def _decorate(target: T, backend: KiviBackend, torch_compile_kwargs: dict[str, Any]) -> T:
    _check_no_backend(torch_compile_kwargs)
    if isinstance(target, type):
        if not issubclass(target, torch.nn.Module):
            raise TypeError(f"@kivi decorates nn.Module subclasses, not the plain class {target.__name__}")
        return _decorate_class(target, backend, torch_compile_kwargs)
    if isinstance(target, torch.nn.Module):
        target.compile(backend=backend, **torch_compile_kwargs)
        setattr(target, BACKEND_ATTRIBUTE, backend)
        return target
    if callable(target):
        compiled = torch.compile(target, backend=backend, **torch_compile_kwargs)
        setattr(compiled, BACKEND_ATTRIBUTE, backend)
        return compiled
    raise TypeError(f"@kivi decorates an nn.Module subclass or instance or a function, got {type(target).__name__}")


def _decorate_class(
    cls: type[torch.nn.Module], backend: KiviBackend, torch_compile_kwargs: dict[str, Any]
) -> type[torch.nn.Module]:
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.compile(backend=backend, **torch_compile_kwargs)

    cls.__init__ = __init__
    setattr(cls, BACKEND_ATTRIBUTE, backend)
    return cls
