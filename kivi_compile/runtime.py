"""Run a rewritten graph: reserve cache capacity, flatten caches in, rebuild caches out.

Growth happens here, outside the compiled graph, so the graph only ever writes into buffers that
already have room; the returned caches are marked dynamic so the next step reuses the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kivi_compile.cache import KiviCacheTensor
from kivi_compile.passes import CallPlan


class KiviGraphRuntime:
    """Callable Dynamo invokes in place of the graph; ``compiled`` runs the rewritten graph."""

    def __init__(self, compiled: Callable[..., Any], plan: CallPlan) -> None:
        self.compiled = compiled
        self.plan = plan
        # The decode caches among the arguments, in order: a step visits these, not all its arguments (Llama-2-7B's
        # 32 layers: 64 of ~680; the loop took 0.30-0.33 ms a step on the CPU machine visiting all, 0.26 visiting 64).
        self._cache_args = sorted(plan.new_tokens.items())

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        grown: dict[int, tuple[KiviCacheTensor, int]] = {}
        flat: list[Any] = []
        after_previous = 0
        for index, read_new_tokens in self._cache_args:
            flat.extend(args[after_previous:index])
            after_previous = index + 1
            new_tokens = read_new_tokens(args)
            cache = args[index].reserved(new_tokens)
            grown[index] = (cache, args[index].shape[-2] + new_tokens)
            flat.extend(cache.held)
        flat.extend(args[after_previous:])
        outputs = list(self.compiled(*flat))  # Dynamo's convention; compile_fx's result follows it
        return tuple(self._result(slot, outputs, grown) for slot in self.plan.outputs)

    @staticmethod
    def _result(slot, outputs, grown) -> Any:
        if slot.kind == "graph":
            return outputs[slot.index]
        if slot.kind == "prefill":
            visible = None if slot.visible_index is None else outputs[slot.visible_index]
            dense, outputs[slot.index] = outputs[slot.index], None  # freed once quantized, layer by layer
            cache = KiviCacheTensor.from_dense(dense, slot.spec, visible=visible)
        else:
            buffers, seq_len = grown[slot.index]
            cache = buffers.with_length(seq_len)
        cache.mark_dynamic()
        return cache
