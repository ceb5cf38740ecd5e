"""The Triton kernels inside a compiled model, on CPU: the ops' CUDA implementations (Triton append
and fused attention, on Triton's interpreter) stand in for the CPU ones, and greedy generation
follows the KIVI simulation as the reference ops do. On a GPU, test_gpu_end_to_end.py covers this."""

from __future__ import annotations

import inspect
from collections import Counter

import pytest
import torch
from kivi_helpers import compiled_against_simulation, tiny_model

from kivi_compile import KiviConfig
from kivi_compile.kernels import append, decode_attention, ops

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU only: runs the kernels on the interpreter")


@pytest.fixture
def triton_calls(monkeypatch) -> Counter:
    """Route the CPU ops to their CUDA implementations; count the Triton kernel calls they make."""
    calls: Counter = Counter()

    def counted(name: str):
        kernel = getattr(ops, name)

        def call(*args):
            calls[name] += 1
            return kernel(*args)

        return call

    for name in ("launch_append_kv", "launch_decode_attention"):
        monkeypatch.setattr(ops, name, counted(name))
    with torch.library._scoped_library("kivi", "IMPL") as lib:
        lib.impl("append_kv_", ops.append_kv_cuda_, "CPU")
        lib.impl("decode_attention", ops.decode_attention_cuda, "CPU")
        yield calls


class SpecializationSpy:
    """Stands in for a Triton kernel and records, per launch, what Triton compiles a variant for:
    the constexprs, each pointer's 16-byte alignment, and each integer being 1 or a multiple of 16
    (except the kernel's ``do_not_specialize`` arguments)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.unspecialized = kernel.kwargs["do_not_specialize"] or ()  # the interpreter keeps the decorator's keywords
        self.names = list(inspect.signature(kernel.fn).parameters)
        self.variants: list[tuple] = []

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            hints = tuple(
                arg.data_ptr() % 16 == 0 if isinstance(arg, torch.Tensor)
                else (arg == 1, arg % 16 == 0) if isinstance(arg, int) and not isinstance(arg, bool) else None
                for name, arg in zip(self.names, args) if name not in self.unspecialized
            )  # fmt: skip
            self.variants.append((hints, tuple(sorted(constexprs.items()))))
            return self.kernel[grid](*args, **constexprs)

        return launch


@pytest.fixture
def kernel_variants(monkeypatch) -> dict[str, SpecializationSpy]:
    spies = {
        "decode": SpecializationSpy(decode_attention._decode_attention_kernel),
        "append": SpecializationSpy(append._append_kv_kernel),
    }
    monkeypatch.setattr(decode_attention, "_decode_attention_kernel", spies["decode"])
    monkeypatch.setattr(append, "_append_kv_kernel", spies["append"])
    return spies


@pytest.mark.parametrize(("family", "bits"), [("llama", 2), ("mistral", 4)])
def test_compiled_model_with_triton_kernels_follows_the_simulation(triton_calls, kernel_variants, family, bits):
    config = KiviConfig(key_bits=bits, value_bits=bits, group_size=32, residual_length=32, compiler="eager")
    model = tiny_model(family, dtype=torch.float16)
    prompt = torch.randint(1, model.config.vocab_size, (3, 45))
    # 24 steps pass a key flush (R = 32 after a 45-token prompt)
    result = compiled_against_simulation(model, prompt, config, new_tokens=24)
    error, steps = result.error, result.steps
    assert steps > 1 and error <= 5e-3, f"relative logit error {error:.2e} over {steps} steps"
    assert result.backend.graphs_compiled <= 4
    decode_steps = 24 - 1  # the first new token comes from the prefill, which attends densely
    layers = model.config.num_hidden_layers
    calls_per_kernel = {"launch_decode_attention": layers * decode_steps, "launch_append_kv": layers * decode_steps}
    assert triton_calls == calls_per_kernel
    # One compiled variant per kernel for the whole run: the mask grows past multiples of 16 tokens
    # and the cache grows, and a new variant would compile in the middle of generating on a GPU.
    assert {name: len(set(spy.variants)) for name, spy in kernel_variants.items()} == {"decode": 1, "append": 1}
