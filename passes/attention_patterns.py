"""Recognise attention computations in a Dynamo FX graph, whatever form the model wrote them in.

- ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``.
- ``eager``: ``matmul(softmax(matmul(q, k.transpose(-1, -2)) * s [+ mask], dim=-1) [.to(dtype)] [dropout], v)``,
  with the scale as ``* s``, ``/ s`` or absent, the softmax with or without a float32 upcast, and
  dropout with ``p=0`` or ``training=False``.

Each recogniser returns an ``AttentionCall`` (what attention the nodes compute, and the nodes that
only exist to compute it) or a reason string. Score transforms between ``q·kᵀ`` and the softmax
other than scaling and an additive mask (logit soft-capping, ALiBi, ...) are reasons, not matches.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Node

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

_MATMULS = (torch.matmul, operator.matmul, "matmul")
_SOFTMAXES = (F.softmax, torch.softmax, "softmax")
_CASTS = ("to", "type", "float", "half", "bfloat16")
_DROPOUTS = (F.dropout, torch.dropout)


@dataclass(frozen=True)
class AttentionCall:
    """``softmax(scale * q·kᵀ + mask) · v`` as found in the graph."""

    pattern: str  # "sdpa" or "eager"
    anchor: Node  # the node whose value is the attention output
    query: Node
    key: Node  # as fed to the attention (possibly GQA-expanded)
    value: Node
    attn_mask: Node | None
    scale: float | None  # None: 1 / sqrt(head_dim)
    is_causal: bool
    interior: tuple[Node, ...]  # nodes that only compute this attention (erased with it)


def fake_value(node: object):
    """The fake tensor / SymInt a node carries (Dynamo: ``example_value``; AOT/Inductor: ``val``)."""
    if not isinstance(node, Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def target_name(node: Node) -> str:
    """A readable name for what a node calls (``tanh``, ``cat``, a placeholder's name)."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _argument(node: Node, position: int, name: str, default: object = None) -> object:
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def is_sdpa(node: Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def sdpa_call(node: Node) -> AttentionCall | str:
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    if args["dropout_p"] != 0.0:
        return f"dropout_p={args['dropout_p']!r} (only 0.0, i.e. inference, is supported)"
    for name in ("scale", "is_causal", "enable_gqa"):
        if isinstance(args[name], Node):
            return f"{name} is computed in the graph, not a constant"
    return AttentionCall(
        "sdpa", node, args["query"], args["key"], args["value"], args["attn_mask"], args["scale"],
        bool(args["is_causal"]), interior=(),
    )  # fmt: skip


def _through(node: object, accept) -> object:
    """Step over a chain of nodes that ``accept`` (returning the first argument), e.g. casts."""
    while isinstance(node, Node) and accept(node):
        node = node.args[0]
    return node


def _is_inference_dropout(node: Node) -> bool:
    if node.target not in _DROPOUTS:
        return False
    return _argument(node, 1, "p", 0.5) == 0.0 or _argument(node, 2, "training", True) is False


def _is_cast(node: Node) -> bool:
    return node.op == "call_method" and node.target in _CASTS


def _is_last_dim(dim: object, rank: int) -> bool:
    return dim in (-1, rank - 1)


def eager_softmax(node: Node) -> Node | None:
    """If ``node`` is ``matmul(P, v)`` with P a softmax (through casts/dropout), that softmax node."""
    if node.op not in ("call_function", "call_method") or node.target not in _MATMULS or len(node.args) != 2:
        return None
    probs = _through(node.args[0], lambda n: _is_cast(n) or _is_inference_dropout(n))
    if isinstance(probs, Node) and probs.target in _SOFTMAXES:
        return probs
    return None


def eager_call(node: Node, softmax: Node) -> AttentionCall | str:
    """Match ``matmul(softmax(...), v)`` ending at ``node``."""
    scores = softmax.args[0]
    rank = fake_value(scores).dim() if isinstance(scores, Node) else 0
    if not _is_last_dim(_argument(softmax, 1, "dim"), rank):
        return "softmax is not over the last (key) axis"
    interior = [softmax, *_chain(node.args[0], softmax)]
    mask = None
    if isinstance(scores, Node) and scores.target in (operator.add, torch.add) and len(scores.args) == 2:
        interior.append(scores)
        scores, mask = _split_mask(scores)
    scale: float | None = 1.0
    if isinstance(scores, Node) and scores.target in (operator.mul, operator.truediv) and len(scores.args) == 2:
        product, factor = scores.args
        if isinstance(factor, Node) or not isinstance(product, Node):
            return "attention scores are scaled by a value computed in the graph"
        interior.append(scores)
        scale = float(factor) if scores.target is operator.mul else 1.0 / float(factor)
        scores = product
    if not (isinstance(scores, Node) and scores.target in _MATMULS and len(scores.args) == 2):
        found = target_name(scores) if isinstance(scores, Node) else repr(scores)
        return f"scores go through {found} between q·kᵀ and the softmax (e.g. logit soft-capping), not supported"
    query, key_t = scores.args
    if not (isinstance(key_t, Node) and key_t.target in ("transpose", torch.transpose) and _swaps_last_two(key_t)):
        return "the scores are not q·kᵀ with k transposed on its last two axes"
    interior += [scores, key_t]
    return AttentionCall(
        "eager", node, query, key_t.args[0], node.args[1], mask, scale, is_causal=False, interior=tuple(interior)
    )


def _chain(start: object, stop: Node) -> list[Node]:
    """The nodes from ``start`` back to (excluding) ``stop`` along first arguments."""
    nodes = []
    while isinstance(start, Node) and start is not stop:
        nodes.append(start)
        start = start.args[0]
    return nodes


def _split_mask(add: Node) -> tuple[object, Node | None]:
    """``scores + mask``: which operand holds the q·kᵀ product (the one with a matmul upstream)."""
    left, right = add.args
    if isinstance(left, Node) and left.target in (*_MATMULS, operator.mul, operator.truediv):
        return left, right
    return right, left


def _swaps_last_two(node: Node) -> bool:
    dims = {d % 4 if isinstance(d, int) else d for d in node.args[1:3]}
    return dims == {2, 3}


def find_attention(graph: torch.fx.Graph) -> list[AttentionCall | tuple[Node, str]]:
    """Every attention in the graph: a call, or (node, reason) where its form is not supported."""
    found: list[AttentionCall | tuple[Node, str]] = []
    for node in graph.nodes:
        if is_sdpa(node):
            call = sdpa_call(node)
        elif (softmax := eager_softmax(node)) is not None:
            call = eager_call(node, softmax)
        else:
            continue
        found.append(call if isinstance(call, AttentionCall) else (node, call))
    return found
