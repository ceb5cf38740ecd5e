"""Find attention sites fed by a KV-cache append in a Dynamo FX graph.

A site is an attention (``attention_patterns``: SDPA or eager) over ``repeat(cat([past_k, k]))``
and ``repeat(cat([past_v, v]))``, where each ``cat`` is on the sequence axis and is also a graph
output (the cache store Dynamo writes back into ``DynamicLayer``), and ``repeat`` is optional GQA
expansion (``repeat_kv``: unsqueeze/expand/reshape, or ``repeat_interleave`` on the head axis).
``past`` is either a ``KiviCacheTensor`` placeholder (a decode step) or a dense tensor, possibly
empty (a prefill).

Matching never raises on an unfamiliar graph: each attention yields a ``SiteMatch`` or the reason
it is not one. Shapes and dtypes are read from the nodes' fake values.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kivi_compile.cache import SUPPORTED_DTYPES, KiviCacheTensor
from kivi_compile.passes.attention_patterns import AttentionCall, fake_value, find_attention, target_name


def source_location(node: Node) -> str:
    """The innermost user-code frame of a node, ``file:line in fn``, or '' if unknown."""
    trace = node.meta.get("stack_trace") or ""
    frames = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    return frames[-1] if frames else ""


# Where Dynamo found the root module: ``L['self']`` for a traced method, ``L['args'][0]`` or
# ``L['fn']`` when the module came in as an argument; the path inside the model follows it.
_DYNAMO_SOURCE_PREFIX = re.compile(r"^L\[[^\]]*\](\[[^\]]*\])*\.?")


def module_path(node: Node) -> str:
    """Qualified name of the innermost ``nn.Module`` a node was traced in, or '' for functions."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    return _DYNAMO_SOURCE_PREFIX.sub("", path)


def output_node(graph: torch.fx.Graph) -> Node:
    return next(node for node in reversed(graph.nodes) if node.op == "output")


def graph_outputs(output: Node) -> list:
    """The values a Dynamo graph returns (its output node holds one tuple)."""
    values = output.args[0]
    return list(values) if isinstance(values, (list, tuple)) else [values]


@dataclass(frozen=True)
class KVAppend:
    """``cat([past, new], dim=seq)``: one side (keys or values) of the cache update."""

    cat: Node
    past: Node
    new: Node
    repeats: int  # GQA: query heads per KV head as expanded before attention
    expansion: tuple[Node, ...]  # the GQA expansion nodes between the cat and the attention

    @property
    def is_decode(self) -> bool:
        return isinstance(fake_value(self.past), KiviCacheTensor)


@dataclass(frozen=True)
class SiteMatch:
    call: AttentionCall
    key: KVAppend
    value: KVAppend

    @property
    def attention(self) -> Node:
        return self.call.anchor


@dataclass(frozen=True)
class SiteMiss:
    attention: Node
    pattern: str
    reason: str


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
            source = _unsqueezed_at_2(expanded.args[0])
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


def _path(source: Node, attention_input: Node) -> list[Node]:
    """The nodes from ``attention_input`` back to ``source`` along first arguments (both included)."""
    path, node = [], attention_input
    while node is not source:
        path.append(node)
        node = node.args[0]
    return [*path, source]


def _kv_append(node: Node, side: str, cache_outputs: set[Node], owned: set[Node]) -> KVAppend | str:
    source, repeats = _strip_repeat_kv(node)
    if source.target is not torch.cat:
        return f"{side} are not produced by a KV-cache torch.cat (found {target_name(source)})"
    tensors = source.args[0]
    dim = source.args[1] if len(source.args) > 1 else source.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return f"{side} cat joins {len(tensors)} tensors, expected [past, new]"
    past, new = tensors
    new_value = fake_value(new)
    if new_value is None or new_value.dim() != 4 or dim not in (2, -2):
        return f"{side} cat is not on the sequence axis of a [batch, heads, seq, head_dim] tensor"
    if source not in cache_outputs:
        return f"{side} cat is not returned from the graph (a sliding-window layer stores a slice of it), so it is not a cache update"
    if new_value.dtype not in SUPPORTED_DTYPES:
        return f"{side} dtype {new_value.dtype} is not float16/bfloat16/float32"
    path = _path(source, node)
    if isinstance(fake_value(past), KiviCacheTensor) and any(set(n.users) - set(path) - owned for n in path):
        return f"the appended {side} are also used outside this attention, which needs them dense"
    return KVAppend(cat=source, past=past, new=new, repeats=repeats, expansion=tuple(path[:-1]))


def _cross_attention(call: AttentionCall, key: KVAppend) -> bool:
    """New keys for other tokens than the queries (encoder states): cross-attention.

    In self-attention the new keys are projections of the same tokens as the queries, so their
    lengths are provably equal; Dynamo gives unrelated lengths different symbols. Queries and keys
    handed to the graph directly carry no such relation, so they are taken as self-attention.
    """
    if call.query.op == "placeholder" or key.new.op == "placeholder":
        return False
    return not statically_known_true(fake_value(call.query).shape[-2] == fake_value(key.new).shape[-2])


def match_site(call: AttentionCall, output: Node) -> SiteMatch | SiteMiss:
    """Match the KV-cache appends feeding one attention of a graph whose output node is ``output``."""
    cache_outputs = set(graph_outputs(output))
    owned = {call.anchor, *call.interior, output}
    sides = {}
    for side, node in (("keys", call.key), ("values", call.value)):
        found = _kv_append(node, side, cache_outputs, owned)
        if isinstance(found, str):
            return SiteMiss(call.anchor, call.pattern, found)
        sides[side] = found
    key, value = sides["keys"], sides["values"]
    if _cross_attention(call, key):
        reason = "keys come from inputs the query does not see (cross-attention); only self-attention caches are quantized"
        return SiteMiss(call.anchor, call.pattern, reason)
    if key.is_decode != value.is_decode:
        reason = "keys and values come from caches of different kinds (KIVI vs dense)"
        return SiteMiss(call.anchor, call.pattern, reason)
    q, k_new = fake_value(call.query), fake_value(key.new)
    if q.dim() != 4 or q.shape[-1] != k_new.shape[-1] or q.shape[1] % k_new.shape[1]:
        reason = f"query {tuple(q.shape)} does not fit keys {tuple(k_new.shape)} (heads, head_dim)"
        return SiteMiss(call.anchor, call.pattern, reason)
    return SiteMatch(call, key, value)


def find_sites(graph: torch.fx.Graph) -> list[SiteMatch | SiteMiss]:
    """Every attention in the graph, matched to its KV-cache appends or with the reason it was not."""
    output = output_node(graph)
    return [
        match_site(found, output) if isinstance(found, AttentionCall) else SiteMiss(found[0], "eager", found[1])
        for found in find_attention(graph)
    ]
