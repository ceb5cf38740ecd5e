"""The decode step split for CUDA graphs (``passes/step_split.py``, ``step_graphs.py``), on CPU.

Off CUDA the split step runs directly: the prologue, the masks padded to the cache's capacity, then
the body, exactly what a replay feeds its recording. It must give the logits of the unsplit graph.
(Recording and replay themselves are compared on the GPU in ``test_gpu_end_to_end.py``.)
"""

from __future__ import annotations

import dataclasses
import operator

import pytest
import torch
from kivi_helpers import compiled_greedy_output, greedy_output, tiny_model
from transformers import DynamicCache

import kivi_compile
from kivi_compile import KiviConfig
from kivi_compile.passes.step_split import drop_unread_sizes
from kivi_compile.transformers_names import cache_keyword

CONFIG = KiviConfig(group_size=32, residual_length=32, compiler="eager")


def _compiled(model, config):
    torch._dynamo.reset()
    backend = kivi_compile.backend(config)
    return torch.compile(model.forward, backend=backend), backend


def _split_runners(backend):
    return [result.step_runner for result in backend.results if result.step_runner is not None]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_split_generate_gives_the_unsplit_logits(family):
    """Left-padded batch, cache growths and key flushes: the split steps match the whole graph."""
    model = tiny_model(family)
    prompt = torch.randint(1, model.config.vocab_size, (3, 41))
    mask = torch.ones_like(prompt)
    mask[1, :6], mask[2, :29] = 0, 0
    outputs = {}
    for cuda_graphs in (True, False):
        config = dataclasses.replace(CONFIG, cuda_graphs=cuda_graphs)
        outputs[cuda_graphs], backend = compiled_greedy_output(model, prompt, 70, config, attention_mask=mask)
        runners = _split_runners(backend)
        assert len(runners) == (1 if cuda_graphs else 0)
        if cuda_graphs:
            (runner,) = runners
            split = runner.split
            # The prologue builds the mask from the 2-D padding mask and the past length; the body
            # takes it padded, and none of the step's sizes.
            assert split.masks and runner.not_recorded == "not on CUDA" and runner.recordings_made == 0
            decode = next(r for r in backend.results if r.step_runner is runner)
            assert decode.step_graph == "decode step split for CUDA graphs (run directly: not on CUDA)"
            body_inputs = [n for n in split.body.graph.nodes if n.op == "placeholder"]
            assert not any(isinstance(n.meta.get("example_value", n.meta.get("val")), torch.SymInt) for n in body_inputs)
            # Every step runs the prologue: it keeps only what its results need, and takes only what it reads.
            prologue_nodes = [n for n in split.prologue.graph.nodes if n.op != "output"]
            assert prologue_nodes and all(n.users for n in prologue_nodes)
            assert len(split.prologue_inputs) == sum(n.op == "placeholder" for n in prologue_nodes)
    errors = [(a - b).abs().max().item() for a, b in zip(outputs[True].logits, outputs[False].logits)]
    print(f"{family}: {len(errors)} steps, largest logit difference {max(errors):.2e}")
    assert torch.equal(outputs[True].sequences, outputs[False].sequences)
    assert max(errors) <= 1e-5


@pytest.mark.inductor
def test_inductor_prologue_builds_what_the_fx_prologue_builds():
    """With Inductor the prologue runs compiled (on an H100 host the FX module's op-by-op mask took
    0.5 ms a step); every step of a padded generate, across growths, it must return the FX module's
    results exactly (a boolean mask and integer positions)."""
    model = tiny_model("llama")
    prompt = torch.randint(1, model.config.vocab_size, (2, 37))
    mask = torch.ones_like(prompt)
    mask[1, :9] = 0
    config = dataclasses.replace(CONFIG, compiler="inductor")
    forward, backend = _compiled(model, config)
    model.forward, eager_forward = forward, model.forward
    compared = []
    try:
        greedy_output(model, prompt, 4, attention_mask=mask)
        (runner,) = _split_runners(backend)
        assert runner.prologue is not runner.split.prologue
        compiled_prologue = runner.prologue

        def checked(*inputs):
            results = compiled_prologue(*inputs)
            expected = runner.split.prologue(*inputs)
            compared.append(all(map(torch.equal, results, expected)) and len(results) == len(expected))
            return results

        runner.prologue = checked
        greedy_output(model, prompt, 60, attention_mask=mask)
    finally:
        model.forward = eager_forward
        torch._dynamo.reset()
    assert len(compared) == 59 and all(compared)
    assert backend.graphs_compiled == 2  # prefill, decode: one decode graph for every width


def test_positions_from_the_cache_length_are_copied_into_the_body():
    """Without ``position_ids`` the model derives the step's positions from the past length: a
    constant-shaped tensor computed in the prologue, handed to the body as an input."""
    model = tiny_model("llama")
    sequence = torch.randint(1, model.config.vocab_size, (2, 60))
    logits = {}
    for cuda_graphs in (True, False):
        forward, backend = _compiled(model, dataclasses.replace(CONFIG, cuda_graphs=cuda_graphs))
        cache = {cache_keyword(model.forward): DynamicCache(config=model.config)}
        with torch.no_grad():
            steps = [forward(sequence[:, :40], **cache).logits[:, -1]]
            steps += [forward(sequence[:, t : t + 1], **cache).logits[:, -1] for t in range(40, 60)]
        logits[cuda_graphs] = torch.stack(steps)
        if cuda_graphs:
            (runner,) = _split_runners(backend)
            copied = [i for i in range(len(runner.split.body_example_inputs)) if i >= len(runner.split.body_inputs)]
            assert len(copied) > len(runner.split.masks)  # the mask(s) and the positions
    print(f"largest logit difference {(logits[True] - logits[False]).abs().max().item():.2e}")
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-5)


def test_wider_mask_columns_are_not_read():
    """The op's contract for padded masks: columns past the cache's tokens change nothing."""
    model = tiny_model("llama")
    prompt = torch.randint(1, model.config.vocab_size, (2, 37))
    forward, _ = _compiled(model, CONFIG)
    cache = {cache_keyword(model.forward): DynamicCache(config=model.config)}
    with torch.no_grad():  # a real KIVI cache: prefill, then one decode step
        forward(prompt, **cache)
        forward(prompt[:, -1:], **cache)
    layer = cache[cache_keyword(model.forward)].layers[0]
    q = torch.randn(2, 4, 1, 32)
    narrow = torch.rand(2, 1, 1, layer.keys.shape[-2]) > 0.3
    narrow[..., 0] = True
    wide = torch.cat([narrow, torch.rand(2, 1, 1, 50) > 0.5], dim=-1)
    spec = CONFIG.key_spec()
    outs = [
        torch.ops.kivi.decode_attention(q, *layer.keys.kv, *layer.values.kv, mask, None, False, spec.bits,
                                        spec.bits, spec.group_size, True)  # fmt: skip
        for mask in (narrow, wide)
    ]
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_only_unread_sizes_leave_the_prologue():
    """An unread size goes; an unread in-place tensor method stays (it still writes its tensor)."""
    graph = torch.fx.Graph()
    length, mask = graph.placeholder("length"), graph.placeholder("mask")
    length.meta["val"], mask.meta["val"] = 7, torch.zeros(2, 3)
    next_length = graph.call_function(operator.add, (length, 1))
    next_length.meta["val"] = 8
    filled = graph.call_method("fill_", (mask, 1.0))
    filled.meta["val"] = mask.meta["val"]
    graph.output((mask,))
    drop_unread_sizes(graph)
    assert [node.name for node in graph.nodes] == ["length", "mask", "fill_", "output"]
