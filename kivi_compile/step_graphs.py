"""Run a split decode step, replaying its body from a CUDA graph: one launch instead of hundreds.

At small batch a decode step waits on the host (Dynamo's guards, Python, hundreds of kernel
launches), not on the GPU. ``split_step`` separates the few nodes whose shapes follow the sequence
length; ``StepGraphs`` runs those as they are every step, copies their results and the step's new
inputs into the buffers a recording reads, and replays the recorded body.

Recording starts once steps run directly (after the first, which compiles and tunes) show the
GPU waiting on the host; a large batch keeps the GPU busy past its launches and is left
unrecorded (a recording would save nothing and hold a memory pool beside a cache that may fill
the GPU). A recording stays valid while the tensors it reads in place (the cache buffers the KIVI
ops append to, the model's weights) are the very same and the copied inputs keep its shapes; a
cache growth replaces the buffers. A step no recording fits runs the body directly (which also
warms up what runs once: kernel compiles, the attention's tuned plans, cuBLAS handles) and is
then recorded. Outputs are copied out of the recording's buffers, which the next replay overwrites.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kivi_compile.passes.step_split import StepSplit

log = logging.getLogger("kivi_compile")

# Recordings kept per graph: one per cache capacity seen lately. Older ones are dropped (their
# buffers were replaced by a growth); their memory returns to the shared pool.
MAX_RECORDINGS = 4
# A step whose GPU time exceeds its launch time by this factor is GPU-bound: it is not recorded.
# Recording starts after this many timed steps were not (one-time costs can hide a GPU-bound step).
GPU_BOUND = 1.5
HOST_BOUND_STEPS = 2
# Batch x KV heads above which no step is recorded, whatever the timing: Llama-2-7B at batch 512
# (16k) is GPU-bound (41.5 ms a step on an H100) and ran out of memory with recordings, whose pool
# competes with a cache that fills the GPU. 4096 is batch 128 of that model.
MAX_RECORDED_BATCH_HEADS = 4096


class _Recording:
    """A CUDA graph of the body and the input buffers it reads."""

    def __init__(
        self, body: Callable[..., Any], args: list[Any], in_place: frozenset[int], masks: set[int], pool
    ) -> None:
        self.held_positions = sorted(in_place)
        self.held = [args[i] for i in self.held_positions]
        copied = [i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor) and i not in in_place]
        self.inputs = list(args)
        for i in copied:
            self.inputs[i] = args[i].clone()
        self.copied = [i for i in copied if i not in masks]
        self.masks = [i for i in copied if i in masks]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = list(body(*self.inputs))

    def fits(self, args: list[Any], mask_width: int) -> bool:
        """``args`` (masks not padded yet) can be copied into this recording's buffers."""
        return (
            all(map(operator.is_, (args[i] for i in self.held_positions), self.held))
            and all(args[i].shape == self.inputs[i].shape for i in self.copied)
            and all(self.inputs[i].shape == (*args[i].shape[:-1], mask_width) for i in self.masks)
        )

    def replay(self, args: list[Any]) -> list[Any]:
        for i in self.copied:
            if args[i] is not self.inputs[i]:
                self.inputs[i].copy_(args[i])
        for i in self.masks:  # columns past this step's keys are never read
            self.inputs[i][..., : args[i].shape[-1]].copy_(args[i])
        self.graph.replay()
        return [out.clone() if isinstance(out, torch.Tensor) else out for out in self.outputs]


class StepGraphs:
    """Callable with the rewritten graph's signature: prologue, padded masks, then the body.

    ``prologue`` and ``body`` run ``split.prologue`` and ``split.body`` (each compiled, or as they are).

    Attributes:
        recordings_made: CUDA graphs recorded so far (a new one per cache capacity).
        not_recorded: why the body runs unrecorded ('' while recording is on).
    """

    def __init__(
        self, split: StepSplit, prologue: Callable[..., Any], body: Callable[..., Any], record: bool
    ) -> None:
        self.split = split
        self.prologue = prologue
        self.body = body
        self.not_recorded = "" if record else "not on CUDA"
        self.recordings_made = 0
        self._recordings: list[_Recording] = []  # most recent first
        self._pool = None
        self._warmed = False  # a step ran (compiling and tuning what runs once)
        self._host_bound_steps = 0  # timed steps that kept the GPU waiting on the host
        first_result = len(split.body_inputs)
        self._mask_positions = {first_result + i for i in split.masks}
        self._in_place = split.held_inputs | {
            i for i, example in enumerate(split.body_example_inputs[:first_result]) if _is_weight(example)
        }

    @property
    def _host_bound(self) -> bool:
        """Enough timed steps kept the GPU waiting on the host: record."""
        return self._host_bound_steps >= HOST_BOUND_STEPS

    def __call__(self, *args: Any) -> list[Any]:
        split = self.split
        results = self.prologue(*(args[i] for i in split.prologue_inputs))
        body_args = [args[i] for i in split.body_inputs] + list(results)
        outputs = self._run_body(body_args, split.mask_width(args), split.batch_heads(args))
        return [outputs[i] if source == "body" else results[i] for source, i in split.outputs]

    def _run_body(self, body_args: list[Any], mask_width: int, batch_heads: int) -> list[Any]:
        if self._host_bound:
            for recording in self._recordings:
                if recording.fits(body_args, mask_width):
                    return recording.replay(body_args)
        for i in self._mask_positions:
            mask = body_args[i]
            body_args[i] = mask.new_empty((*mask.shape[:-1], mask_width))
            body_args[i][..., : mask.shape[-1]].copy_(mask)
        if self.not_recorded or batch_heads > MAX_RECORDED_BATCH_HEADS:
            return list(self.body(*body_args))
        outputs = list(self.body(*body_args)) if self._host_bound else self._body_deciding(body_args)
        if self._host_bound:
            self._record(body_args)
        return outputs

    def _body_deciding(self, body_args: list[Any]) -> list[Any]:
        """Run the body; time it from the second step on (the first compiles and tunes). After
        ``HOST_BOUND_STEPS`` timed steps that kept the GPU waiting on the host, recording starts."""
        if not self._warmed:
            self._warmed = True
            return list(self.body(*body_args))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launched = time.perf_counter()
        outputs = list(self.body(*body_args))
        launch_ms = (time.perf_counter() - launched) * 1e3
        end.record()
        end.synchronize()
        gpu_ms = start.elapsed_time(end)
        if gpu_ms > GPU_BOUND * launch_ms:
            self.not_recorded = f"the step is GPU-bound ({gpu_ms:.1f} ms on the GPU, {launch_ms:.1f} ms to launch)"
            log.info("decode step not recorded in a CUDA graph: %s", self.not_recorded)
        else:
            self._host_bound_steps += 1
        return outputs

    def _record(self, body_args: list[Any]) -> None:
        try:
            recording = _Recording(self.body, body_args, self._in_place, self._mask_positions, self._pool)
        except Exception as error:  # noqa: BLE001  (whatever the capture met: run unrecorded from now on)
            self.not_recorded = f"recording failed: {type(error).__name__}: {error}"
            self._recordings.clear()
            log.warning("decode step not recorded in a CUDA graph, running it directly: %s", self.not_recorded)
            return
        self._pool = recording.graph.pool()
        self.recordings_made += 1
        self._recordings.insert(0, recording)
        del self._recordings[MAX_RECORDINGS:]


def _is_weight(example: Any) -> bool:
    """A module parameter or buffer: Dynamo marks them static; a recording reads them in place."""
    return isinstance(example, torch.nn.Parameter) or getattr(example, "_dynamo_static_input_type", None) is not None
