"""Rewrite matched attention sites into KIVI.

- Prefill (dense ``past``): attention stays full precision; the cache the graph returns is marked
  to be quantized by the runtime into a ``KiviCacheTensor`` as it leaves the graph.
- Decode (``KiviCacheTensor`` past): the cache placeholder is flattened into its five held buffers,
  from which the graph makes the kernels' views (``cache_buffers.py``); the two ``cat`` appends
  become one ``kivi::append_kv_`` (quantize-on-append, in place) and the SDPA call
  (with its GQA expansion) becomes ``kivi::decode_attention`` over quantized ++ residual. The
  runtime rebuilds the returned caches from the same buffers.

``rewrite_kv_attention`` returns the rewritten graph, the call plan the runtime follows, and one
``SiteRecord`` per attention site (rewritten or not, and why).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.fx import GraphModule, Node

from kivi_compile.cache import KiviCacheTensor
from kivi_compile.cache_buffers import HeldBuffers, kernel_views
from kivi_compile.config import CacheSpec, KiviConfig
from kivi_compile.kernels.cache_layout import QuantizedKV
from kivi_compile.padding import key_validity
from kivi_compile.passes.attention_sites import (
    KVAppend,
    SiteMatch,
    SiteMiss,
    fake_value,
    find_sites,
    module_path,
    graph_outputs,
    output_node,
    source_location,
)
from kivi_compile.passes.symbolic_sizes import SizeReader, size_reader


@dataclass(frozen=True)
class SiteRecord:
    """What the pass did with one attention site."""

    attention: str  # node name in the Dynamo graph
    module: str  # qualified name of the module it was traced in ('' for a plain function)
    location: str  # innermost user-code frame
    pattern: str  # which attention form matched (or was looked at)
    phase: Literal["prefill", "decode", "unknown"]
    rewritten: bool
    reason: str | None
    kv_source: str = ""  # the graph input the cache comes from ('' for a prefill's new cache)
    kv_heads: int | None = None
    query_heads: int | None = None
    head_dim: int | None = None


@dataclass(frozen=True)
class OutputSlot:
    """Where one of the original graph outputs comes from at run time."""

    kind: Literal["graph", "prefill", "decode"]
    index: int  # graph output index ("graph", "prefill") or call argument index ("decode")
    spec: CacheSpec | None = None
    visible_index: int | None = None  # "prefill": graph output holding the key positions' visibility


@dataclass
class CallPlan:
    """How the runtime maps call arguments to graph inputs and graph outputs to results."""

    new_tokens: dict[int, SizeReader] = field(default_factory=dict)  # decode cache arg -> new-token count
    outputs: list[OutputSlot] = field(default_factory=list)


@dataclass
class RewriteResult:
    code_before: str  # the Dynamo graph's Python code, before the rewrite
    graph_module: GraphModule
    example_inputs: list[Any]  # matching the rewritten graph's placeholders
    plan: CallPlan
    sites: list[SiteRecord]
    unflattened_caches: list[str]  # KiviCacheTensor placeholders left as subclass inputs
    step_graph: str = ""  # decode graphs: whether the step is split for CUDA-graph replay, or why not
    step_runner: Any = None  # the ``StepGraphs`` running a split step (its recordings are counted there)

    @property
    def rewritten(self) -> int:
        return sum(site.rewritten for site in self.sites)


def _record(site: SiteMatch | SiteMiss, phase, rewritten: bool, reason: str | None) -> SiteRecord:
    details = {}
    pattern = site.pattern if isinstance(site, SiteMiss) else site.call.pattern
    if isinstance(site, SiteMatch):
        q, k = fake_value(site.call.query), fake_value(site.key.new)
        details = dict(kv_heads=int(k.shape[1]), query_heads=int(q.shape[1]), head_dim=int(k.shape[-1]))
        if site.key.past.op == "placeholder":
            details["kv_source"] = str(site.key.past.target)
    node = site.attention
    return SiteRecord(
        node.name, module_path(node), source_location(node), pattern, phase, rewritten, reason, **details
    )


def _flatten_placeholder(graph: torch.fx.Graph, placeholder: Node) -> list[Node]:
    """New placeholders for the held buffers of a ``KiviCacheTensor`` placeholder, right after it, and
    the kernels' five buffers: four views, named for what they show (after the caches' earlier views),
    and the lengths."""
    cache = fake_value(placeholder)
    held, anchor = [], placeholder
    for name, value in zip(HeldBuffers._fields, cache.held):
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"{placeholder.name}_{name}")
        _set_value(anchor, value)
        held.append(anchor)
    first_operation = next(node for node in graph.nodes if node.op != "placeholder" and not _makes_views(node))
    with graph.inserting_before(first_operation):
        spec, heads, head_dim = cache.spec, int(cache.shape[1]), int(cache.shape[-1])
        views = graph.create_node(
            "call_function",
            kernel_views,
            (*held, heads, head_dim, spec.bits, spec.group_size, spec.per_channel),
            name=f"{placeholder.name}_views",
        )
        _set_value(views, cache.kv)
        nodes = []
        for index, (name, value) in enumerate(zip(QuantizedKV._fields[:4], cache.kv)):
            nodes.append(
                graph.create_node("call_function", operator.getitem, (views, index), name=f"{placeholder.name}_{name}")
            )
            _set_value(nodes[-1], value)
    return [*nodes, held[-1]]  # the lengths as they are held


def _makes_views(node: Node) -> bool:
    """Whether ``node`` is a cache's ``kernel_views`` or one of its results."""
    return node.target is kernel_views or (
        node.target is operator.getitem and getattr(node.args[0], "target", None) is kernel_views
    )


def _set_value(node: Node, value: Any) -> None:
    node.meta["example_value"] = node.meta["val"] = value


def _erase_unused(graph: torch.fx.Graph, candidates: list[Node]) -> None:
    """Erase the candidates that nothing uses any more, users before producers."""
    pending = set(candidates)
    for node in reversed(list(graph.nodes)):
        if node in pending and not node.users:
            graph.erase_node(node)


def _rewrite_decode(graph: torch.fx.Graph, site: SiteMatch, states: dict[str, list[Node]]) -> None:
    key_spec: CacheSpec = fake_value(site.key.past).spec
    value_spec: CacheSpec = fake_value(site.value.past).spec
    call = site.call
    attention = call.anchor
    with graph.inserting_before(attention):
        append = graph.call_function(
            torch.ops.kivi.append_kv_.default,
            (
                *states[site.key.past.name],
                *states[site.value.past.name],
                site.key.new,
                site.value.new,
                key_spec.bits,
                value_spec.bits,
                key_spec.group_size,
                key_spec.residual_length,
                key_spec.per_channel,
            ),
        )
        append.meta["stack_trace"] = attention.meta.get("stack_trace")
        fused = graph.call_function(
            torch.ops.kivi.decode_attention.default,
            (
                call.query,
                *states[site.key.past.name],
                *states[site.value.past.name],
                call.attn_mask,
                call.scale,
                call.is_causal,
                key_spec.bits,
                value_spec.bits,
                key_spec.group_size,
                key_spec.per_channel,
            ),
        )
    fused.meta.update(attention.meta)
    attention.replace_all_uses_with(fused)
    graph.erase_node(attention)
    _erase_unused(graph, [*call.interior, *site.key.expansion, *site.value.expansion])


_SIZE_QUERIES = ("numel", "size", "dim", "stride")


def _is_dead_size_query(node: Node) -> bool:
    """``cache.numel()`` and the like that Dynamo folded into guards, leaving the node unused."""
    return node.op == "call_method" and node.target in _SIZE_QUERIES and not node.users


def _decode_miss(site: SiteMatch, readers: dict[str, SizeReader | None]) -> str | None:
    for side in (site.key, site.value):
        if side.past.op != "placeholder":
            return "the KIVI cache is computed inside the graph, not passed in"
        if readers[side.past.name] is None:
            return "the number of appended tokens cannot be derived from the graph inputs"
        if any(user is not side.cat and not _is_dead_size_query(user) for user in side.past.users):
            return "the KIVI cache is read by more than this append"
    key_spec, value_spec = fake_value(site.key.past).spec, fake_value(site.value.past).spec
    if key_spec.group_size != value_spec.group_size:
        return "key and value caches use different group sizes"
    if key_spec.residual_length != value_spec.residual_length:
        return "key and value caches use different residual lengths"
    return None


def _copy(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` with its own graph (Dynamo still reads the original's placeholders)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return GraphModule(gm, graph)


def rewrite_kv_attention(gm: GraphModule, example_inputs: Sequence[Any], config: KiviConfig) -> RewriteResult:
    """Rewrite every recognised attention site of a copy of a Dynamo graph; see the module docstring."""
    code_before = gm.code
    gm = _copy(gm)
    graph = gm.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    arg_index = {node: i for i, node in enumerate(placeholders)}
    output = output_node(graph)
    records: list[SiteRecord] = []
    prefill_specs: dict[Node, CacheSpec] = {}
    prefill_visibility: dict[Node, Node] = {}  # a prefill's key cat -> its positions' visibility
    visibility_of_mask: dict[Node, Node] = {}
    decode_cats: dict[Node, Node] = {}  # cat -> the cache placeholder it appends to
    plan = CallPlan()
    states: dict[str, list[Node]] = {}

    for site in find_sites(graph):
        if isinstance(site, SiteMiss):
            records.append(_record(site, "unknown", False, site.reason))
            continue
        config.check_head_dim(int(fake_value(site.key.new).shape[-1]))
        if not site.key.is_decode:
            prefill_specs[site.key.cat] = config.key_spec()
            prefill_specs[site.value.cat] = config.value_spec()
            mask = site.call.attn_mask
            if isinstance(mask, Node):
                if mask not in visibility_of_mask:
                    with graph.inserting_after(mask):
                        visibility_of_mask[mask] = graph.call_function(key_validity, (mask,))
                prefill_visibility[site.key.cat] = visibility_of_mask[mask]
            records.append(_record(site, "prefill", True, None))
            continue
        readers = {
            side.past.name: size_reader(fake_value(side.new).shape[-2], example_inputs)
            for side in (site.key, site.value)
        }
        reason = _decode_miss(site, readers)
        if reason is not None:
            records.append(_record(site, "decode", False, reason))
            continue
        for side in (site.key, site.value):
            states[side.past.name] = _flatten_placeholder(graph, side.past)
            plan.new_tokens[arg_index[side.past]] = readers[side.past.name]
            decode_cats[side.cat] = side.past
        _rewrite_decode(graph, site, states)
        records.append(_record(site, "decode", True, None))

    outputs = graph_outputs(output)  # read after the rewrites, which may have replaced outputs
    kept = [value for value in outputs if value not in decode_cats]
    visibility = list(dict.fromkeys(prefill_visibility.values()))  # extra outputs, after the originals
    position = 0  # among the kept outputs
    for value in outputs:
        if value in decode_cats:
            plan.outputs.append(OutputSlot("decode", arg_index[decode_cats[value]]))
            continue
        visible = prefill_visibility.get(value)
        visible_index = None if visible is None else len(kept) + visibility.index(visible)
        kind = "prefill" if value in prefill_specs else "graph"
        plan.outputs.append(OutputSlot(kind, position, prefill_specs.get(value), visible_index))
        position += 1
    output.args = (tuple(kept + visibility),)
    for cat, past in decode_cats.items():
        graph.erase_node(cat)
        for query in list(past.users):
            graph.erase_node(query)
        graph.erase_node(past)

    flat_inputs: list[Any] = []
    for index, example in enumerate(example_inputs):
        flat_inputs.extend(example.held if index in plan.new_tokens else (example,))
    unflattened = [
        node.name for node in graph.nodes if node.op == "placeholder" and isinstance(fake_value(node), KiviCacheTensor)
    ]
    graph.lint()
    gm.recompile()
    return RewriteResult(code_before, gm, flat_inputs, plan, records, unflattened)
