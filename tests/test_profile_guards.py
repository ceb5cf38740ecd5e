"""``benchmarks/profile_guards.py`` on the CPU: the decode frame's guards, counted and timed, KIVI against dense."""

from __future__ import annotations

import pytest
from kivi_helpers import benchmark_script


@pytest.fixture
def profiler(monkeypatch):
    return benchmark_script("profile_guards", monkeypatch)


def test_kivi_caches_guard_their_buffers_beside_a_dense_baseline(profiler):
    rows = profiler.decode_frame_rows("kivi-k2v2", "tiny", "cpu", prompt_len=19, new_tokens=4, rounds=2, repeats=3)
    rows = {row["method"]: row for row in rows}
    dense, kivi = rows[profiler.BASELINE], rows["kivi-k2v2"]
    assert kivi["frames"] == 2  # prefill and decode: the decode frame is the last
    caches = 2 * 2  # keys and values of the tiny model's 2 layers
    # Each cache is a wrapper over five buffers where the dense cache is one tensor: five more tensor checks.
    assert kivi["counts"]["TENSOR_MATCH"] - dense["counts"]["TENSOR_MATCH"] == 5 * caches
    assert kivi["shape_relations"] > dense["shape_relations"] > 0
    # Buffers held 2-D with one symbolic size (cache_buffers.py) keep the relations Dynamo checks few:
    # 4 a cache with torch 2.13, where 4-D buffers whose rows grow cost 28.
    assert kivi["shape_relations"] - dense["shape_relations"] <= 6 * caches
    assert kivi["objects"] > dense["objects"] > 0
    for row in (dense, kivi):
        assert row["warm_us"] > 0 and row["cold_us"] > 0
    header, _, *lines = profiler.table(list(rows.values())).splitlines()
    assert header.split("|")[-2].strip() == "cold / baseline"
    ratios = {cells[1].strip(): float(cells[-2]) for cells in (line.split("|") for line in lines)}
    assert ratios == {profiler.BASELINE: 1.0, "kivi-k2v2": pytest.approx(kivi["cold_us"] / dense["cold_us"], abs=0.01)}
