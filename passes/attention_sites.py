"""Find attention sites fed by a KV-cache append in a Dynamo FX graph.

A site is ``scaled_dot_product_attention(q, repeat(cat([past_k, k])), repeat(cat([past_v, v])))``
where each ``cat`` is on the sequence axis and is also a graph output (the cache store Dynamo
writes back into ``DynamicLayer``), and ``repeat`` is optional GQA expansion (``repeat_kv``:
unsqueeze/expand/reshape, or ``repeat_interleave`` on the head axis). ``past`` is either a
``KiviCacheTensor`` placeholder (a decode step) or a dense tensor, possibly empty (a prefill).

Matching never raises on an unfamiliar graph: each SDPA call yields a ``SiteMatch`` or the reason it
is not one. Shapes and dtypes are read from the nodes' fake values.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Node

from kivi_compile.cache import SUPPORTED_DTYPES, KiviCacheTensor

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def fake_value(node: object):
    """The fake tensor / SymInt a node carries (Dynamo: ``example_value``; AOT/Inductor: ``val``)."""
    if not isinstance(node, Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def source_location(node: Node) -> str:
    """The innermost user-code frame of a node, ``file:line in fn``, or '' if unknown."""
    trace = node.meta.get("stack_trace") or ""
    frames = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    return frames[-1] if frames else ""


def output_node(graph: torch.fx.Graph) -> Node:
    return next(node for node in reversed(graph.nodes) if node.op == "output")


def graph_outputs(output: Node) -> list:
    """The values a Dynamo graph returns (its output node holds one tuple)."""
    values = output.args[0]
    return list(values) if isinstance(values, (list, tuple)) else [values]


def module_path(node: Node) -> str:
    """Qualified name of the innermost ``nn.Module`` a node was traced in, or '' for functions."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    return path.removeprefix("L['self'].").removeprefix("L['self']")


@dataclass(frozen=True)
class KVAppend:
    """``cat([past, new], dim=seq)``: one side (keys or values) of the cache update."""

    cat: Node
    past: Node
    new: Node
    repeats: int  # GQA: query heads per KV head as expanded before attention

    @property
    def is_decode(self) -> bool:
        return isinstance(fake_value(self.past), KiviCacheTensor)


@dataclass(frozen=True)
class SiteMatch:
    attention: Node
    query: Node
    key: KVAppend
    value: KVAppend
    attn_mask: Node | None
    scale: float | None
    is_causal: bool


@dataclass(frozen=True)
class SiteMiss:
    attention: Node
    reason: str


def sdpa_arguments(node: Node) -> dict[str, object]:
    """SDPA call arguments by name, defaults filled in."""
    named = dict(_SDPA_DEFAULTS)
    named.update(zip(_SDPA_PARAMS, node.args))
    named.update(node.kwargs)
    return named


def _is_full_index(index: object) -> bool:
    return index is Ellipsis or index == slice(None, None, None)


def _strip_repeat_kv(node: Node) -> tuple[Node, int]:
    """Undo GQA expansion: returns (source of the K/V, repeats); (node, 1) if none is found."""
    out_shape = tuple(fake_value(node).shape)
    # repeat_interleave(x, r, dim=1)
    if node.target in (torch.repeat_interleave, "repeat_interleave") and len(node.args) >= 2:
        source, repeats = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if isinstance(source, Node) and isinstance(repeats, int) and dim == 1:
            return source, repeats
    # x[:, :, None].expand(b, h, r, t, d).reshape(b, h * r, t, d)
    if node.target in ("reshape", "view", torch.reshape) and isinstance(node.args[0], Node):
        expanded = node.args[0]
        if expanded.target == "expand" and isinstance(expanded.args[0], Node):
            unsqueezed = expanded.args[0]
            source = _unsqueezed_at_2(unsqueezed)
            if source is not None:
                src_shape = tuple(fake_value(source).shape)
                exp_shape = tuple(fake_value(expanded).shape)
                if (
                    len(src_shape) == 4
                    and exp_shape[:2] == src_shape[:2]
                    and exp_shape[3:] == src_shape[2:]
                    and out_shape == (src_shape[0], src_shape[1] * exp_shape[2], *src_shape[2:])
                ):
                    return source, exp_shape[2]
    return node, 1


def _unsqueezed_at_2(node: Node) -> Node | None:
    """The source of ``x[:, :, None]`` / ``x.unsqueeze(2)``, else None."""
    if node.target == operator.getitem and isinstance(node.args[0], Node):
        index = node.args[1]
        if (
            isinstance(index, tuple)
            and len(index) >= 3
            and index[2] is None
            and all(_is_full_index(i) for i in index[:2] + index[3:])
        ):
            return node.args[0]
    if node.target in ("unsqueeze", torch.unsqueeze) and node.args[1:] in ((2,), (-4,)):
        return node.args[0]
    return None


def _only_feeds(source: Node, attention_input: Node, allowed: set[Node]) -> bool:
    """True if every node from ``source`` down to ``attention_input`` is used only on that path."""
    path, node = [], attention_input
    while node is not source:
        path.append(node)
        node = node.args[0]
    path.append(source)
    inside = set(path) | allowed
    return all(set(n.users) <= inside for n in path)


def _kv_append(node: Node, side: str, cache_outputs: set[Node], attention: Node, output: Node) -> KVAppend | str:
    source, repeats = _strip_repeat_kv(node)
    if source.target is not torch.cat:
        return f"{side} are not produced by a KV-cache torch.cat (found {source.target})"
    tensors = source.args[0]
    dim = source.args[1] if len(source.args) > 1 else source.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return f"{side} cat joins {len(tensors)} tensors, expected [past, new]"
    past, new = tensors
    new_value = fake_value(new)
    if new_value is None or new_value.dim() != 4 or dim not in (2, -2):
        return f"{side} cat is not on the sequence axis of a [batch, heads, seq, head_dim] tensor"
    if source not in cache_outputs:
        return f"{side} cat is not returned from the graph, so it is not a cache update"
    if new_value.dtype not in SUPPORTED_DTYPES:
        return f"{side} dtype {new_value.dtype} is not float16/bfloat16/float32"
    if isinstance(fake_value(past), KiviCacheTensor) and not _only_feeds(source, node, {attention, output}):
        return f"the appended {side} are also used outside this attention, which needs them dense"
    return KVAppend(cat=source, past=past, new=new, repeats=repeats)


def match_site(node: Node, output: Node) -> SiteMatch | SiteMiss:
    """Match one SDPA call of a graph whose output node is ``output``."""
    cache_outputs = set(graph_outputs(output))
    args = sdpa_arguments(node)
    if args["dropout_p"] != 0.0:
        return SiteMiss(node, f"dropout_p={args['dropout_p']!r} (only 0.0, i.e. inference, is supported)")
    for name in ("scale", "is_causal", "enable_gqa"):
        if isinstance(args[name], Node):
            return SiteMiss(node, f"{name} is computed in the graph, not a constant")
    sides = {}
    for side in ("key", "value"):
        found = _kv_append(args[side], side + "s", cache_outputs, node, output)
        if isinstance(found, str):
            return SiteMiss(node, found)
        sides[side] = found
    key, value = sides["key"], sides["value"]
    if key.is_decode != value.is_decode:
        return SiteMiss(node, "keys and values come from caches of different kinds (KIVI vs dense)")
    q = fake_value(args["query"])
    k_new = fake_value(key.new)
    if q.dim() != 4 or q.shape[-1] != k_new.shape[-1] or q.shape[1] % k_new.shape[1]:
        return SiteMiss(node, f"query {tuple(q.shape)} does not fit keys {tuple(k_new.shape)} (heads, head_dim)")
    return SiteMatch(
        attention=node,
        query=args["query"],
        key=key,
        value=value,
        attn_mask=args["attn_mask"],
        scale=args["scale"],
        is_causal=bool(args["is_causal"]),
    )


def find_sites(graph: torch.fx.Graph) -> list[SiteMatch | SiteMiss]:
    """Every SDPA call in the graph, matched or with the reason it was not."""
    output = output_node(graph)
    return [
        match_site(node, output)
        for node in graph.nodes
        if node.op == "call_function" and node.target in SDPA_TARGETS
    ]
