"""Launch a Triton kernel without redoing ``JITFunction.run``'s per-call work.

A decode step launches one or two attention kernels and one append per layer, with 30 to 60
arguments each. On the H100 machine's host (thirteenth session, 2.1 GHz Xeon), one such launch
through ``JITFunction.run`` took 36 us, of which its compiled launcher took about 5: the rest goes
to building its cache key (``str`` of the options on every call), re-checking every global the kernel
read (the Gluon kernel's layout constants compare slowly) and launch metadata for the hooks.

:func:`launch_kernel` binds the arguments with the kernel's own binder, so the specialization it
looks up is the one Triton computes, and once Triton has compiled and launched that specialization,
calls its launcher directly: 25 us less host time per call of the op at T = 1k, 96 us at T = 4k (then
three launches) and 10 us per append on the H100 machine (fourteenth session, docs/results.md). Whatever
this module was not checked against takes Triton's path.

:func:`compiled_registers` tells how many registers a launch's kernel takes before it is launched (the
Gluon kernel's splits are fitted to them).
"""

from __future__ import annotations

from typing import Any

import triton
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

# The Triton releases whose JITFunction internals (``device_caches``' binder, the launcher's argument
# order) this module was checked against, on the GPU.
CHECKED_TRITON = ("3.6.",)
_DIRECT = triton.__version__.startswith(CHECKED_TRITON)

# 32-bit registers a multiprocessor gives its programs' lanes, sm_80 to sm_90 (how many programs fit at once).
REGISTERS_PER_MULTIPROCESSOR = 65536

# Per kernel (by id; the kernel is kept with its entries): (device, specialization, options) -> the
# compiled kernel Triton launched for them.
_COMPILED: dict[int, tuple[JITFunction, dict[tuple, Any]]] = {}


def launch_kernel(kernel: Any, grid: tuple[int, ...], *args: Any, **options: Any) -> None:
    """``kernel[grid](*args, **options)``; directly through the compiled launcher after the first launch
    of each specialization. The interpreter, a test's stand-in kernel, a launch hook (a profiler) or an
    unchecked Triton take Triton's own path."""
    if not _takes_direct_path(kernel):
        kernel[grid](*args, **options)
        return
    device = driver.active.get_current_device()
    binder = kernel.device_caches[device][-1]
    bound, specialization, _ = binder(*args, **options)
    key = (device, tuple(specialization), tuple(options.items()), knobs.runtime.debug,
           knobs.compilation.instrumentation_mode)  # fmt: skip
    entry = _COMPILED.get(id(kernel))
    if entry is None:  # not setdefault: its default (a tuple and a dict) would be built on every launch
        entry = _COMPILED[id(kernel)] = (kernel, {})
    compiled_by_key = entry[1]
    compiled = compiled_by_key.get(key)
    if compiled is None:
        compiled_by_key[key] = _finished(kernel[grid](*args, **options))
        return
    grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
    compiled.run(grid_x, grid_y, grid_z, driver.active.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *bound.values())  # fmt: skip


def _takes_direct_path(kernel: Any) -> bool:
    return (
        _DIRECT
        and isinstance(kernel, JITFunction)
        and not kernel.pre_run_hooks
        and _no_hook(knobs.runtime.launch_enter_hook)
        and _no_hook(knobs.runtime.launch_exit_hook)
    )


def _no_hook(hook: Any) -> bool:
    """Triton 3.6's launch hooks are ``HookChain`` objects, empty until a profiler adds to them."""
    return hook is None or not getattr(hook, "calls", True)


def _finished(compiled: Any) -> Any:
    """The compiled kernel a launch or a warmup returned, waited for where Triton compiles it asynchronously."""
    return compiled.result() if hasattr(compiled, "result") else compiled


def compiled_registers(kernel: Any, *args: Any, **options: Any) -> int:
    """Registers a lane of the kernel that ``kernel[grid](*args, **options)`` launches, compiled now if
    Triton has not yet (``warmup``: nothing runs). A tensor argument may be given as its dtype."""
    compiled = _finished(kernel.warmup(*args, grid=(1,), **options))
    compiled._init_handles()  # loading the binary onto the device is what reports its registers
    return compiled.n_regs
