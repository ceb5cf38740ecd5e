"""``benchmarks/profile_step_timeline.py`` on the CPU: every decode step stamped in order, the stand-ins undone."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch
from kivi_helpers import benchmark_script

from kivi_compile.runtime import KiviGraphRuntime
from kivi_compile.step_graphs import StepGraphs


def test_stamps_each_decode_step_through_the_split_step(monkeypatch):
    timeline_script = benchmark_script("profile_step_timeline", monkeypatch)
    model = timeline_script.build_model("tiny", "cpu", torch.float32)
    prompt = torch.randint(1, model.config.vocab_size, (2, 37))
    runtime_call, step_call, body_call = KiviGraphRuntime.__call__, StepGraphs.__call__, StepGraphs._run_body
    frozen = gc.get_freeze_count()

    with timeline_script.Method("kivi-k2v2", model, "eager") as method:
        compiled_forward = method.model.forward
        timeline = timeline_script.timed_generate(method, prompt, 9, "cpu")
        assert method.model.forward is compiled_forward

    steps = timeline.steps()
    assert len(steps) == 8  # 9 new tokens: the first comes from prefill
    unreached = ("recording found", "replay", "replayed")  # nothing replays on the CPU
    stamped = [p for p in timeline_script.POINTS if p not in unreached]
    for step in steps:
        assert [p for p in timeline_script.POINTS if p in step] == stamped
        assert [step[p] for p in stamped] == sorted(step[p] for p in stamped)
    spans = timeline_script.spans(steps)
    assert [(a, b) for a, b, _ in spans] == list(zip(stamped, stamped[1:]))
    assert all(ms >= 0 for _, _, ms in spans) and not timeline.replays
    assert KiviGraphRuntime.__call__ is runtime_call and StepGraphs.__call__ is step_call
    assert StepGraphs._run_body is body_call
    assert gc.get_freeze_count() == frozen


def test_a_guard_filter_reaches_every_compile_of_the_method(monkeypatch):
    """``torch.compile`` pops ``guard_filter_fn`` from its options: a second ``with`` must pass it again."""
    timeline_script = benchmark_script("profile_step_timeline", monkeypatch)
    filtered = []

    def keep_every_guard(guards):
        filtered.append(len(guards))
        return [True] * len(guards)

    monkeypatch.setitem(timeline_script.GUARD_FILTERS, "keep_every_guard_unsafe", keep_every_guard)
    model = timeline_script.build_model("tiny", "cpu", torch.float32)
    prompt = torch.randint(1, model.config.vocab_size, (1, 21))
    method = timeline_script.Method("kivi-k2v2", model, "eager", guard_filter="keep_every_guard_unsafe")
    for compiles in (1, 2):
        with method:
            method.generate(prompt, 3)
        assert len(filtered) == 2 * compiles  # prefill's graph and the decode step's
        assert min(filtered) > 0


def test_dynamo_flags_are_booleans_of_its_config(monkeypatch):
    timeline_script = benchmark_script("profile_step_timeline", monkeypatch)
    with torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=False):  # restored on the way out
        timeline_script.set_dynamo_flag("use_recursive_dict_tags_for_guards=1")
        assert torch._dynamo.config.use_recursive_dict_tags_for_guards is True
    for setting in ("no_such_flag=1", "cache_size_limit=1", "use_recursive_dict_tags_for_guards=yes"):
        with pytest.raises(SystemExit, match=r"expected NAME=0\|1"):
            timeline_script.set_dynamo_flag(setting)


def test_the_shape_guard_filter_drops_only_shape_guards(monkeypatch):
    timeline_script = benchmark_script("profile_step_timeline", monkeypatch)
    entries = [SimpleNamespace(guard_type=kind) for kind in ("TENSOR_MATCH", "SHAPE_ENV", "TYPE_MATCH", "SHAPE_ENV")]
    assert timeline_script.GUARD_FILTERS["skip_shape_guards_unsafe"](entries) == [True, False, True, False]
