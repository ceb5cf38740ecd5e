"""Evaluate a graph's symbolic size (e.g. the number of new tokens) from the actual call arguments."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch

SizeReader = Callable[[Sequence[Any]], int]


def _symbol_sources(example_inputs: Sequence[Any]) -> dict[sympy.Symbol, tuple[int, int | None]]:
    """Where each free symbol can be read: (argument index, tensor dim or None for a SymInt arg)."""
    sources: dict[sympy.Symbol, tuple[int, int | None]] = {}
    for index, example in enumerate(example_inputs):
        if isinstance(example, torch.SymInt) and example.node.expr.is_Symbol:
            sources.setdefault(example.node.expr, (index, None))
        elif isinstance(example, torch.Tensor):
            for dim, size in enumerate(example.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    sources.setdefault(size.node.expr, (index, dim))
    return sources


def size_reader(size: int | torch.SymInt, example_inputs: Sequence[Any]) -> SizeReader | None:
    """A function of the call arguments that returns ``size``; None if it cannot be derived."""
    if isinstance(size, int):
        return lambda args: size
    expr = size.node.expr
    sources = _symbol_sources(example_inputs)
    if not expr.free_symbols <= sources.keys():
        return None
    bindings = {symbol: sources[symbol] for symbol in expr.free_symbols}

    def read(args: Sequence[Any]) -> int:
        values = {
            symbol: int(args[index] if dim is None else args[index].shape[dim])
            for symbol, (index, dim) in bindings.items()
        }
        return int(expr.xreplace(values))

    return read
