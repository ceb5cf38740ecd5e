"""``kernels/launch.py`` on the CPU: what takes Triton's own path (the direct path itself is a GPU test in
test_decode_attention.py)."""

from __future__ import annotations

import pytest
import triton
import triton.language as tl
from triton import knobs

from kivi_compile.kernels import launch


class _StandIn:
    """A kernel that records ``kernel[grid](*args, **options)``."""

    def __init__(self) -> None:
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **options: self.launches.append((grid, args, options))


@triton.jit
def _copy_kernel(source, target):
    tl.store(target, tl.load(source))


def test_no_hook_is_none_or_an_empty_hook_chain():
    hooks = knobs.runtime.launch_enter_hook
    assert launch._no_hook(None)
    assert launch._no_hook(hooks) and not hooks.calls  # triton's default: an empty chain, never None

    def hook(metadata):
        return None

    hooks.add(hook)
    try:
        assert not launch._no_hook(hooks)
    finally:
        hooks.remove(hook)
    assert launch._no_hook(hooks)


def test_a_stand_in_kernel_is_launched_the_usual_way():
    kernel = _StandIn()
    launch.launch_kernel(kernel, (3, 2), 1, "x", BLOCK=16, num_warps=4)
    assert kernel.launches == [((3, 2), (1, "x"), {"BLOCK": 16, "num_warps": 4})]
    assert not launch._takes_direct_path(kernel)


@pytest.mark.parametrize("direct", [True, False])
def test_a_triton_kernel_takes_the_direct_path_only_when_checked_and_unhooked(direct, monkeypatch):
    monkeypatch.setattr(launch, "_DIRECT", direct)
    interpreted = not isinstance(_copy_kernel, triton.runtime.jit.JITFunction)  # TRITON_INTERPRET=1
    assert launch._takes_direct_path(_copy_kernel) == (direct and not interpreted)
