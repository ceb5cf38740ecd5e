"""``torch.library`` registration of the KIVI ops, so the compiler sees one opaque node per op.

- ``kivi::store_prefill_``  fill an empty cache from a prompt's dense K or V (mutates the cache).
- ``kivi::append_``         lazy flush + append new tokens (mutates the cache).
- ``kivi::append_kv_``      ``append_`` of a layer's keys and values together (one Triton launch).
- ``kivi::decode_attention`` fused attention of new queries over quantized ++ residual K/V.
- ``kivi::dequantize``       the whole cache back to dense, for ops the cache type does not fuse.

Cache tensors are passed as the five fields of ``QuantizedKV`` (see ``cache_layout.py``). Every op
has a fake implementation so Dynamo, AOTAutograd and Inductor can trace around it. The default
kernel is the PyTorch reference; on CUDA, the appends and ``decode_attention`` run the Triton
kernels, and fall back to the reference (one warning per reason) for inputs those do not take.
The prompt is quantized once per layer by the reference on every device.

The ops are defined from written schemas on a ``torch.library.Library`` rather than with
``torch.library.custom_op``: the latter wraps every call in Python autograd and view-tracking
layers (130 µs a call against 8 µs on this project's CPU machine, ``benchmarks/bench_op_dispatch.py``),
and a decode step makes two calls per layer. The ops are for inference: no autograd formula.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .append import (
    append_kv_ref,
    append_ref,
    launch_append,
    launch_append_kv,
    store_prefill_ref,
    triton_append_unsupported,
)
from .cache_layout import QuantizedKV, dequantize_cache_ref
from .decode_attention import decode_attention_ref, launch_decode_attention, triton_decode_unsupported

logger = logging.getLogger("kivi_compile.kernels")
_reported_fallbacks: set[str] = set()

_LIB = torch.library.Library("kivi", "DEF")
_MUTATED_CACHE = "Tensor(a!) codes, Tensor(b!) scales, Tensor(c!) mins, Tensor(d!) residual, Tensor(e!) lengths"
_CACHE = "Tensor codes, Tensor scales, Tensor mins, Tensor residual, Tensor lengths"
_MUTATED_KEY_CACHE = _MUTATED_CACHE.replace("Tensor(", "Tensor(k").replace(") ", ") k_")
_MUTATED_VALUE_CACHE = _MUTATED_CACHE.replace("Tensor(", "Tensor(v").replace(") ", ") v_")
_KEY_CACHE, _VALUE_CACHE = (_CACHE.replace("Tensor ", f"Tensor {role}_") for role in "kv")
_LIB.define(f"store_prefill_({_MUTATED_CACHE}, Tensor dense, int bits, int group_size, int residual_length, "
            "bool per_channel) -> ()")  # fmt: skip
_LIB.define(f"append_({_MUTATED_CACHE}, Tensor new, int bits, int group_size, int residual_length, "
            "bool per_channel) -> ()")  # fmt: skip
_LIB.define(f"append_kv_({_MUTATED_KEY_CACHE}, {_MUTATED_VALUE_CACHE}, Tensor new_key, Tensor new_value, "
            "int key_bits, int value_bits, int group_size, int residual_length, "
            "bool key_per_channel) -> ()")  # fmt: skip
_LIB.define(f"decode_attention(Tensor q, {_KEY_CACHE}, {_VALUE_CACHE}, Tensor? attn_mask, float? scale, "
            "bool is_causal, int key_bits, int value_bits, int group_size, bool key_per_channel) -> Tensor")  # fmt: skip
_LIB.define(f"dequantize({_CACHE}, int bits, int group_size, bool per_channel, SymInt seq_len) -> Tensor")


def _register(name: str, reference, cuda=None, fake=None) -> None:
    """``reference`` for every device (CUDA too unless ``cuda`` is given) and a fake for tracing."""
    _LIB.impl(name, reference, "CompositeExplicitAutograd")
    if cuda is not None:
        _LIB.impl(name, cuda, "CUDA")
    torch.library.register_fake(f"kivi::{name}", fake or (lambda *args: None), lib=_LIB)


def _report_fallback(op: str, reason: str) -> None:
    message = f"kivi::{op} runs the PyTorch reference on CUDA: {reason}"
    if message not in _reported_fallbacks:
        _reported_fallbacks.add(message)
        logger.warning(message)


def store_prefill_(
    codes: Tensor,
    scales: Tensor,
    mins: Tensor,
    residual: Tensor,
    lengths: Tensor,
    dense: Tensor,
    bits: int,
    group_size: int,
    residual_length: int,
    per_channel: bool,
) -> None:
    kv = QuantizedKV(codes, scales, mins, residual, lengths)
    store_prefill_ref(kv, dense, bits, group_size, residual_length, per_channel)


def append_(
    codes: Tensor,
    scales: Tensor,
    mins: Tensor,
    residual: Tensor,
    lengths: Tensor,
    new: Tensor,
    bits: int,
    group_size: int,
    residual_length: int,
    per_channel: bool,
) -> None:
    kv = QuantizedKV(codes, scales, mins, residual, lengths)
    append_ref(kv, new, bits, group_size, residual_length, per_channel)


def append_cuda_(codes, scales, mins, residual, lengths, new, bits, group_size, residual_length, per_channel) -> None:
    kv = QuantizedKV(codes, scales, mins, residual, lengths)
    reason = triton_append_unsupported(kv, new, group_size)
    if reason is None:
        launch_append(kv, new, bits, group_size, residual_length, per_channel)
    else:
        _report_fallback("append_", reason)
        append_ref(kv, new, bits, group_size, residual_length, per_channel)


def append_kv_(
    k_codes: Tensor,
    k_scales: Tensor,
    k_mins: Tensor,
    k_residual: Tensor,
    k_lengths: Tensor,
    v_codes: Tensor,
    v_scales: Tensor,
    v_mins: Tensor,
    v_residual: Tensor,
    v_lengths: Tensor,
    new_key: Tensor,
    new_value: Tensor,
    key_bits: int,
    value_bits: int,
    group_size: int,
    residual_length: int,
    key_per_channel: bool,
) -> None:
    key = QuantizedKV(k_codes, k_scales, k_mins, k_residual, k_lengths)
    value = QuantizedKV(v_codes, v_scales, v_mins, v_residual, v_lengths)
    append_kv_ref(key, value, new_key, new_value, key_bits, value_bits, group_size, residual_length, key_per_channel)


def append_kv_cuda_(k_codes, k_scales, k_mins, k_residual, k_lengths, v_codes, v_scales, v_mins, v_residual,
                    v_lengths, new_key, new_value, key_bits, value_bits, group_size, residual_length,
                    key_per_channel) -> None:  # fmt: skip
    key = QuantizedKV(k_codes, k_scales, k_mins, k_residual, k_lengths)
    value = QuantizedKV(v_codes, v_scales, v_mins, v_residual, v_lengths)
    reason = triton_append_unsupported(key, new_key, group_size) or triton_append_unsupported(
        value, new_value, group_size
    )
    if reason is None:
        launch_append_kv(key, value, new_key, new_value, key_bits, value_bits, group_size, residual_length,
                         key_per_channel)  # fmt: skip
    else:
        _report_fallback("append_kv_", reason)
        append_kv_ref(key, value, new_key, new_value, key_bits, value_bits, group_size, residual_length,
                      key_per_channel)  # fmt: skip


def decode_attention(
    q: Tensor,
    k_codes: Tensor,
    k_scales: Tensor,
    k_mins: Tensor,
    k_residual: Tensor,
    k_lengths: Tensor,
    v_codes: Tensor,
    v_scales: Tensor,
    v_mins: Tensor,
    v_residual: Tensor,
    v_lengths: Tensor,
    attn_mask: Tensor | None,
    scale: float | None,
    is_causal: bool,
    key_bits: int,
    value_bits: int,
    group_size: int,
    key_per_channel: bool,
) -> Tensor:
    key = QuantizedKV(k_codes, k_scales, k_mins, k_residual, k_lengths)
    value = QuantizedKV(v_codes, v_scales, v_mins, v_residual, v_lengths)
    return decode_attention_ref(
        q, key, value, attn_mask, scale, is_causal, key_bits, value_bits, group_size, key_per_channel
    )


def decode_attention_cuda(q, k_codes, k_scales, k_mins, k_residual, k_lengths, v_codes, v_scales, v_mins, v_residual,
                          v_lengths, attn_mask, scale, is_causal, key_bits, value_bits, group_size,
                          key_per_channel) -> Tensor:  # fmt: skip
    key = QuantizedKV(k_codes, k_scales, k_mins, k_residual, k_lengths)
    value = QuantizedKV(v_codes, v_scales, v_mins, v_residual, v_lengths)
    reason = triton_decode_unsupported(q, key, value, group_size, key_per_channel)
    if reason is None:
        return launch_decode_attention(q, key, value, attn_mask, scale, is_causal, key_bits, value_bits, group_size)
    _report_fallback("decode_attention", reason)
    return decode_attention_ref(
        q, key, value, attn_mask, scale, is_causal, key_bits, value_bits, group_size, key_per_channel
    )


def decode_attention_fake(q, k_codes, k_scales, k_mins, k_residual, k_lengths, v_codes, v_scales, v_mins, v_residual,
                          v_lengths, attn_mask, scale, is_causal, key_bits, value_bits, group_size,
                          key_per_channel) -> Tensor:  # fmt: skip
    return q.new_empty((*q.shape[:-1], v_residual.shape[-1]))


def dequantize(
    codes: Tensor,
    scales: Tensor,
    mins: Tensor,
    residual: Tensor,
    lengths: Tensor,
    bits: int,
    group_size: int,
    per_channel: bool,
    seq_len: int,
) -> Tensor:
    dense = dequantize_cache_ref(QuantizedKV(codes, scales, mins, residual, lengths), bits, group_size, per_channel)
    if dense.shape[-2] != seq_len:
        raise RuntimeError(f"KIVI cache holds {dense.shape[-2]} tokens but its shape says {seq_len}")
    return dense.to(residual.dtype)


def dequantize_fake(codes, scales, mins, residual, lengths, bits, group_size, per_channel, seq_len) -> Tensor:
    return residual.new_empty((*residual.shape[:-2], seq_len, residual.shape[-1]))


_register("store_prefill_", store_prefill_)
_register("append_", append_, cuda=append_cuda_)
_register("append_kv_", append_kv_, cuda=append_kv_cuda_)
_register("decode_attention", decode_attention, cuda=decode_attention_cuda, fake=decode_attention_fake)
_register("dequantize", dequantize, fake=dequantize_fake)
