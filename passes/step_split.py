"""Split a rewritten decode graph into the part that follows the sequence length and the rest.

Between two cache growths a decode step's graph keeps its shapes at every step, except where the
model builds its attention mask from the 2-D padding mask and the past length (Dynamo passes their
sizes as symbols). The KIVI ops read the token counts on the device, so everything else (the
projections, the appends and attentions over the cache buffers, the MLP) can be replayed from one
CUDA graph recorded per cache capacity. This pass cuts the graph in two:

- ``prologue``: the nodes that depend on a step-varying input (a SymInt, or a tensor whose shape
  has a symbol the cache buffers do not have), with the constant-shaped nodes they read; it runs
  every step;
- ``body``: the rest, with the prologue's results as extra inputs at the end. A result that only
  reaches ``kivi::decode_attention`` as its mask is a ``mask``: the runtime copies it into a buffer
  as wide as the cache's token capacity (the op ignores columns past the cache's tokens), so the
  body's shapes stay those of the cache buffers.

Anything else that changes shape with the step and reaches the body, or a KIVI op, leaves the graph
unsplit: ``split_step`` returns the reason instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sympy
import torch
from torch.fx import GraphModule, Node

from kivi_compile.cache_buffers import HeldBuffers, token_capacity
from kivi_compile.passes.attention_patterns import fake_value
from kivi_compile.passes.attention_sites import graph_outputs, output_node

_KIVI_OPS = (torch.ops.kivi.append_kv_.default, torch.ops.kivi.decode_attention.default)
_DECODE_ATTENTION = torch.ops.kivi.decode_attention.default
# kivi::decode_attention(q, 5 key buffers, 5 value buffers, attn_mask, scale, is_causal, key_bits, ...)
_KEY_CODES, _KEY_RESIDUAL, _MASK, _GROUP_SIZE = 1, 4, 11, 16
_CACHE_ARGS = {torch.ops.kivi.append_kv_.default: slice(0, 10), _DECODE_ATTENTION: slice(1, 11)}  # 2 x 5 buffers


@dataclass(frozen=True)
class StepSplit:
    """The two graphs and how call arguments and results flow between them.

    Attributes:
        prologue: takes ``prologue_inputs`` (graph input indices), returns its results.
        body: takes ``body_inputs`` (graph input indices), then the prologue's results.
        body_example_inputs: example inputs for compiling ``body``.
        held_inputs: positions among the body's inputs of the cache buffers the KIVI ops read and
            write in place, through views the body makes (a recorded graph must keep using those very
            tensors).
        masks: indices of the prologue results that are attention masks, padded to ``mask_width``.
        capacity_source: graph input indices of one key cache's held code units and residual rows,
            its group size and head dim: see ``cache_buffers.token_capacity``.
        outputs: where each graph output comes from: ``("body", i)`` or ``("prologue", i)``.
    """

    prologue: GraphModule
    body: GraphModule
    prologue_inputs: tuple[int, ...]
    body_inputs: tuple[int, ...]
    body_example_inputs: list[Any]
    held_inputs: frozenset[int]
    masks: tuple[int, ...]
    capacity_source: tuple[int, int, int, int]
    outputs: tuple[tuple[Literal["body", "prologue"], int], ...]

    @property
    def prologue_computes(self) -> bool:
        """The prologue has work (with a 2-D padding mask, the attention mask): worth compiling."""
        return any(node.op not in ("placeholder", "output") for node in self.prologue.graph.nodes)

    def mask_width(self, args: Sequence[Any]) -> int:
        """The tokens the cache buffers in ``args`` can hold: at least those of this step."""
        code_units, residual_rows, group_size, _ = self.capacity_source
        return token_capacity(args[code_units], args[residual_rows], group_size)

    def batch_heads(self, args: Sequence[Any]) -> int:
        """Batch x KV heads of the cache buffers in ``args``: how large the step is."""
        _, residual_rows, _, head_dim = self.capacity_source
        return args[residual_rows].shape[1] // head_dim


def _free_symbols(value: Any) -> set[sympy.Symbol]:
    if isinstance(value, torch.SymInt):
        return set(value.node.expr.free_symbols)
    if isinstance(value, (torch.Tensor, torch.Size, tuple)):
        sizes = value.shape if isinstance(value, torch.Tensor) else value
        return set().union(*(_free_symbols(size) for size in sizes))
    return set()


def _describe(node: Node) -> str:
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


def _only_mask_of(user: Node, value: Node) -> bool:
    """``value`` reaches ``user`` only as the mask of a ``kivi::decode_attention``."""
    return user.target is _DECODE_ATTENTION and user.args[_MASK] is value and user.args.count(value) == 1


def split_step(gm: GraphModule, example_inputs: Sequence[Any]) -> StepSplit | str:
    """Split a rewritten decode graph (see the module docstring), or say why it cannot be."""
    graph = gm.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    attentions = [node for node in graph.nodes if node.target is _DECODE_ATTENTION]
    if not attentions:
        return "the graph has no KIVI decode attention"
    held = {arg for node in graph.nodes if node.target in _KIVI_OPS for arg in node.args[_CACHE_ARGS[node.target]]}
    static_symbols = set().union(*(_free_symbols(fake_value(node)) for node in held))
    held_placeholders = _placeholders_under(held)

    def varies(node: Node) -> bool:  # a size, or a tensor whose shape follows the step
        value = fake_value(node)
        return not isinstance(value, torch.Tensor) or bool(_free_symbols(value) - static_symbols)

    step_side = [node for node in placeholders if _free_symbols(fake_value(node)) - static_symbols]
    # A node reading a varying value joins the step side. A constant-shaped tensor computed there
    # (e.g. positions from the past length) goes to the body as an input, copied in every step.
    on_step_side, varying = set(step_side), set(step_side)
    for node in graph.nodes:
        reads_varying = [arg for arg in node.all_input_nodes if arg in varying]
        if node.op in ("placeholder", "output") or not reads_varying:
            continue
        if node.target is _DECODE_ATTENTION and all(_only_mask_of(node, arg) for arg in reads_varying):
            continue
        if node.target in _KIVI_OPS or node.op not in ("call_function", "call_method"):
            return f"a size that changes every step reaches {_describe(node)}"
        on_step_side.add(node)
        step_side.append(node)
        if varies(node):
            varying.add(node)

    output = output_node(graph)
    outputs = graph_outputs(output)
    results: list[Node] = []  # what the body or the graph's output reads from the step side
    masks: list[int] = []
    for node in step_side:
        body_users = [user for user in node.users if user not in on_step_side and user is not output]
        if body_users and varies(node):
            if not all(_only_mask_of(user, node) for user in body_users):
                return f"{_describe(node)} changes with the sequence length and reaches {_describe(body_users[0])}"
            if not isinstance(fake_value(node), torch.Tensor) or _free_symbols(
                fake_value(node).shape[:-1]
            ) - static_symbols:
                return f"the attention mask {node.name} changes shape along more than its last dimension"
            masks.append(len(results))
        elif not body_users and node not in outputs:
            continue
        results.append(node)

    constants = _constant_ancestors(step_side, on_step_side)
    if any(node.target in _KIVI_OPS for node in constants):
        return "the attention mask is computed from the KIVI cache"
    if any(node.is_impure() for node in constants):
        return "the attention mask depends on a node with side effects, which the prologue would run again"
    # The key cache's views, made by one kernel_views node from its held buffers.
    (key_views,) = {attentions[0].args[_KEY_CODES].args[0], attentions[0].args[_KEY_RESIDUAL].args[0]}
    key_held = HeldBuffers(*key_views.args[: len(HeldBuffers._fields)])
    code_units, residual_rows = key_held.code_units, key_held.residual_rows
    group_size, head_dim = attentions[0].args[_GROUP_SIZE], fake_value(attentions[0].args[0]).shape[-1]
    mask_width = token_capacity(fake_value(code_units), fake_value(residual_rows), group_size)
    prologue, prologue_inputs = _prologue(graph, placeholders, on_step_side | constants, results)
    body, body_inputs, body_examples = _body(
        gm, example_inputs, outputs, results, masks, mask_width, on_step_side | constants
    )
    if any(placeholders[index] in on_step_side for index in body_inputs):
        return "a node the step's sizes reach stays in the graph (it has side effects)"
    index_of = {node: index for index, node in enumerate(placeholders)}
    position_of = {placeholders[index]: position for position, index in enumerate(body_inputs)}
    from_prologue = {node: results.index(node) for node in results if node in outputs}
    body_outputs = [value for value in outputs if value not in from_prologue]
    return StepSplit(
        prologue=prologue,
        body=body,
        prologue_inputs=prologue_inputs,
        body_inputs=body_inputs,
        body_example_inputs=body_examples,
        held_inputs=frozenset(position_of[node] for node in held_placeholders),
        masks=tuple(masks),
        capacity_source=(index_of[code_units], index_of[residual_rows], group_size, head_dim),
        outputs=tuple(
            ("prologue", from_prologue[value]) if value in from_prologue else ("body", body_outputs.index(value))
            for value in outputs
        ),
    )


def _placeholders_under(nodes: set[Node]) -> set[Node]:
    """The graph inputs ``nodes`` are computed from (the held buffers under the kernels' views)."""
    found, pending = set(), list(nodes)
    while pending:
        node = pending.pop()
        if node.op == "placeholder":
            found.add(node)
        else:
            pending.extend(node.all_input_nodes)
    return found


def _constant_ancestors(step_side: list[Node], on_step_side: set[Node]) -> set[Node]:
    """Nodes off the step side that the step side reads (e.g. ``arange(batch)``): the prologue
    computes them again."""
    found: set[Node] = set()
    pending = [arg for node in step_side for arg in node.all_input_nodes]
    while pending:
        node = pending.pop()
        if node in on_step_side or node in found or node.op == "placeholder":
            continue
        found.add(node)
        pending.extend(node.all_input_nodes)
    return found


def _prologue(
    graph: torch.fx.Graph, placeholders: list[Node], nodes: set[Node], results: list[Node]
) -> tuple[GraphModule, tuple[int, ...]]:
    prologue = torch.fx.Graph()
    env: dict[Node, Node] = {}
    reads = {arg for node in nodes for arg in node.all_input_nodes} | set(results)
    inputs = tuple(index for index, node in enumerate(placeholders) if node in reads)
    for index in inputs:
        env[placeholders[index]] = prologue.node_copy(placeholders[index])
    for node in graph.nodes:
        if node in nodes and node.op != "placeholder":
            env[node] = prologue.node_copy(node, env.__getitem__)
    prologue.output(tuple(env[node] for node in results))
    drop_unread_sizes(prologue)
    unread = {index for index in inputs if not env[placeholders[index]].users}
    for index in unread:
        prologue.erase_node(env[placeholders[index]])
    return GraphModule(torch.nn.Module(), prologue), tuple(index for index in inputs if index not in unread)


def drop_unread_sizes(graph: torch.fx.Graph) -> None:
    """Erase the size computations nothing reads (in a prologue: each cache's length + 1, computed for
    what the rewrite replaced). Only sizes go: FX counts a tensor method as pure, and an unread in-place
    one still acts."""
    sizes = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)
    for node in reversed(graph.nodes):
        unread_size = node.op == "call_function" and not node.users and isinstance(fake_value(node), sizes)
        if unread_size and not node.is_impure():
            graph.erase_node(node)


def _body(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    outputs: list[Any],
    results: list[Node],
    masks: list[int],
    mask_width: int | torch.SymInt,
    prologue_nodes: set[Node],
) -> tuple[GraphModule, tuple[int, ...], list[Any]]:
    """The graph without the prologue's nodes (those it still reads stay), reading its results."""
    body = torch.fx.Graph()
    env: dict[Node, Node] = {}
    body.graph_copy(gm.graph, env)
    originals = [node for node in gm.graph.nodes if node.op == "placeholder"]
    first_op = next(node for node in body.nodes if node.op != "placeholder")
    examples: list[Any] = []
    for position, node in enumerate(results):
        with body.inserting_before(first_op):
            placeholder = body.placeholder(f"step_{node.name}")
        value = fake_value(node)
        if position in masks:  # a buffer as wide as the key cache's token capacity
            with value.fake_mode:
                value = torch.empty((*value.shape[:-1], mask_width), dtype=value.dtype, device=value.device)
        placeholder.meta["val"] = placeholder.meta["example_value"] = value
        examples.append(value)
        env[node].replace_all_uses_with(placeholder)
    body.output(tuple(env[value] if isinstance(value, Node) else value for value in outputs if value not in results))
    # Only the prologue's nodes may go: others without users may still act (an in-place collective).
    erased = set()
    for node in reversed(gm.graph.nodes):
        if node in prologue_nodes and not env[node].users:
            body.erase_node(env[node])
            erased.add(node)
    inputs = tuple(index for index, node in enumerate(originals) if node not in erased)
    body.lint()
    return GraphModule(gm, body), inputs, [*(example_inputs[i] for i in inputs), *examples]
