"""``KiviCacheTensor``: a KIVI-quantized K or V cache that looks like the dense ``[B, H, T, D]`` tensor.

It is a traceable wrapper subclass (``__tensor_flatten__``/``__tensor_unflatten__``): its logical
shape and dtype are the model's, so ``DynamicLayer`` stores it where the dense cache went and
``get_seq_length()`` stays right, while it holds only packed codes, scales/minima, the
full-precision residual and its lengths. Dynamo passes it to the next step's graph as a
placeholder; only the static ``CacheSpec`` is flatten metadata, so appends do not recompile.

Operations it does not fuse dequantize the cache first (correct, never garbage); operations that
would write into it raise. ``torch.cat([cache, new], dim=-2)`` appends in place (quantize-on-append)
and returns a new wrapper over the same buffers: the old wrapper must not be used afterwards.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only

from kivi_compile.cache_buffers import HeldBuffers, allocate_held, held_dynamic, units_for, views_of
from kivi_compile.config import CacheSpec
from kivi_compile.kernels.append import flush_count
from kivi_compile.kernels.cache_layout import RESIDUAL_START, QuantizedKV, lengths_tensor, read_lengths, residual_tokens_ref
from kivi_compile.padding import backfill_hidden_keys

aten = torch.ops.aten

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Capacity grows by 1/16 of itself (at least what is needed): amortized O(new tokens) per append
# while the cache never holds more than ~6% above its packed size. A small cache (small batches,
# where decode steps replay from CUDA graphs) doubles instead while that adds at most 4 MiB: each
# growth moves the buffers, after which the step is recorded again.
_GROWTH_DIVISOR = 16
_SMALL_GROWTH_BYTES = 4 * 2**20


class KiviCacheTensor(torch.Tensor):
    held: HeldBuffers  # the inner tensors (see cache_buffers.py), also set as attributes of their names
    spec: CacheSpec

    @staticmethod
    def __new__(cls, held: HeldBuffers, spec: CacheSpec, shape: tuple):
        """``shape``: the dense ``[B, H, T, D]`` cache's (``T`` an int or a SymInt)."""
        residual = held.residual_rows
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=residual.dtype, device=residual.device)

    def __init__(self, held: HeldBuffers, spec: CacheSpec, shape: tuple) -> None:
        self.held = held
        self.code_units, self.scale_units, self.min_units, self.residual_rows, self.lengths = held
        self.spec = spec
        self._kv: QuantizedKV | None = None

    @property
    def kv(self) -> QuantizedKV:
        """The five buffers as the kernels take them, 4-D (made once per cache object, when first read)."""
        if self._kv is None:
            self._kv = views_of(self.held, self.spec, self.shape[1], self.shape[-1])
        return self._kv

    @property
    def codes(self) -> torch.Tensor:
        return self.kv.codes

    @property
    def scales(self) -> torch.Tensor:
        return self.kv.scales

    @property
    def mins(self) -> torch.Tensor:
        return self.kv.mins

    @property
    def residual(self) -> torch.Tensor:
        return self.kv.residual

    def with_length(self, seq_len: int | torch.SymInt) -> KiviCacheTensor:
        """A cache of ``seq_len`` tokens over these buffers (after an append into them)."""
        return KiviCacheTensor(self.held, self.spec, self._shape_with(seq_len))

    def _shape_with(self, seq_len: int | torch.SymInt) -> tuple:
        return (*self.shape[:2], seq_len, self.shape[-1])

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        spec: CacheSpec,
        next_tokens: int = 1,
        visible: torch.Tensor | None = None,
    ) -> KiviCacheTensor:
        """Quantize a prompt's keys or values ``dense [B, H, T, D]`` per the prefill rule.

        Capacity is reserved for ``next_tokens`` more tokens, so the next append does not grow.
        ``visible [B, T]`` (bool) marks the positions attention can see; hidden ones (pads) are kept
        out of the key groups' ranges (see ``padding.py``).
        """
        _check_dense(dense, spec)
        if visible is not None and spec.per_channel:
            dense = backfill_hidden_keys(dense, visible)
        quant_tokens, residual_tokens = _required_capacity(spec, dense.shape[-2], next_tokens)
        batch, heads, _, head_dim = dense.shape
        held = allocate_held(
            (batch, heads, head_dim), dense.dtype, dense.device, spec, units_for(spec, quant_tokens), residual_tokens
        )
        cache = cls(held, spec, dense.shape)
        torch.ops.kivi.store_prefill_(
            *cache.kv, dense, spec.bits, spec.group_size, spec.residual_length, spec.per_channel
        )
        return cache

    # -- views of the state ------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """The dense ``[B, H, T, D]`` cache in the model dtype (quantized part dequantized)."""
        spec = self.spec
        return torch.ops.kivi.dequantize(
            *self.kv, spec.bits, spec.group_size, spec.per_channel, self.shape[-2]
        )

    def nbytes_held(self) -> int:
        """Bytes of device memory the cache holds (all buffers at their current capacity)."""
        return sum(t.numel() * t.element_size() for t in self.held)

    def reserved(self, new_tokens: int) -> KiviCacheTensor:
        """This cache with capacity for ``new_tokens`` more (itself when it already has room).

        Growing moves the tokens into larger buffers and frees this cache's (it is about to be
        appended to, after which it must not be used): every layer grows in the same step, and
        holding old and new buffers of all of them at once would double the cache's peak.
        """
        quant_tokens, residual_tokens = _required_capacity(self.spec, self.shape[-2], new_tokens)
        quant_capacity = self.code_units.shape[0] * self.spec.group_size
        if quant_tokens <= quant_capacity and residual_tokens <= self.residual_rows.shape[0]:
            return self
        grown = _grown(self, quant_tokens, residual_tokens)
        for moved in self.held.growing:
            moved.untyped_storage().resize_(0)
        return grown

    def appended(self, new: torch.Tensor) -> KiviCacheTensor:
        """Quantize-on-append ``new [B, H, n, D]``; returns the cache of ``T + n`` tokens."""
        _check_dense(new, self.spec, like=self)
        cache = self.reserved(new.shape[-2])
        spec = self.spec
        torch.ops.kivi.append_(*cache.kv, new, spec.bits, spec.group_size, spec.residual_length, spec.per_channel)
        return cache.with_length(self.shape[-2] + new.shape[-2])

    def batch_selected(self, rows: torch.Tensor) -> KiviCacheTensor:
        """The cache of batch rows ``rows`` (beam search reorders beams this way)."""
        _, heads, seq_len, head_dim = self.shape
        held = allocate_held(
            (len(rows), heads, head_dim), self.dtype, self.device, self.spec, self.code_units.shape[0],
            self.residual_rows.shape[0],
        )  # fmt: skip
        selected = KiviCacheTensor(held, self.spec, (len(rows), heads, seq_len, head_dim))
        for source, target in zip(self.kv[:4], selected.kv[:4]):
            torch.index_select(source, 0, rows.to(source.device), out=target)
        selected.lengths.copy_(self.lengths)
        return _dynamic(selected)

    def cropped(self, seq_len: int) -> KiviCacheTensor:
        """The first ``seq_len`` tokens (assisted decoding drops rejected candidates this way).

        Only residual tokens can be dropped: quantized groups are never split or requantized.
        """
        n_quant, _, start = read_lengths(self.kv)
        if seq_len < n_quant:
            raise NotImplementedError(
                f"cannot crop a KIVI {self.spec.role} cache to {seq_len} tokens: its first {n_quant} are "
                "already quantized in groups; only the full-precision residual can be dropped"
            )
        lengths = lengths_tensor(n_quant, seq_len - n_quant, start, self.lengths.device)
        # A view of this cache to autograd (it answers aten.slice): Dynamo fakeifies it by replaying
        # the crop on this cache's (dynamic) sizes, so it must not be marked itself.
        return KiviCacheTensor(self.held._replace(lengths=lengths), self.spec, self._shape_with(seq_len))

    def mark_dynamic(self) -> None:
        """Ask Dynamo to treat the token count as dynamic, so steps do not recompile (the unit buffers'
        units, which grow, are marked when allocated)."""
        torch._dynamo.maybe_mark_dynamic(self, 2)

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"KiviCacheTensor({self.spec.role}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"bits={self.spec.bits}, group_size={self.spec.group_size}, "
            f"residual_length={self.spec.residual_length})"
        )

    # -- tensor subclass protocol ------------------------------------------------------------
    def __tensor_flatten__(self) -> tuple[list[str], CacheSpec]:
        return list(HeldBuffers._fields), self.spec

    @staticmethod
    def __tensor_unflatten__(inner: dict, spec: CacheSpec, outer_size, outer_stride) -> KiviCacheTensor:
        return KiviCacheTensor(HeldBuffers(**inner), spec, tuple(outer_size))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.cat.default and _is_append(args, kwargs):
            past, new = args[0]
            if _is_fake(past.residual_rows):  # tracing: only the shape matters, buffers are reserved later
                return past.with_length(past.shape[-2] + new.shape[-2])
            return past.appended(new)
        if func in (aten.detach.default, aten.alias.default):
            (cache,) = args
            return cache.with_length(cache.shape[-2])
        if func is aten.index_select.default and args[1] == 0:  # beam search: reorder_cache
            cache, _, rows = args
            return cache.batch_selected(rows)
        if func is aten.slice.Tensor and _is_crop(args):  # assisted decoding: crop
            cache, end = args[0], args[3]
            seq_len = min(end if end >= 0 else cache.shape[-2] + end, cache.shape[-2])
            if _is_fake(cache.residual_rows):  # Dynamo replaying the crop (a view op) on its fake input
                return cache.with_length(seq_len)
            return cache.cropped(seq_len)
        if func is aten._to_copy.default and set(kwargs) <= {"device", "non_blocking"}:  # offload
            cache = args[0]
            moved = (t.to(kwargs.get("device"), non_blocking=kwargs.get("non_blocking", False)) for t in cache.held)
            return _dynamic(KiviCacheTensor(held_dynamic(HeldBuffers(*moved)), cache.spec, cache.shape))
        if func._schema.is_mutable:
            raise NotImplementedError(
                f"{func} would write into a KIVI-quantized cache; only torch.cat([cache, new], dim=-2) "
                "appends are supported (dequantize() gives a dense copy)"
            )
        args, kwargs = tree_map_only(KiviCacheTensor, KiviCacheTensor.dequantize, (args, kwargs))
        return func(*args, **kwargs)


def _dynamic(cache: KiviCacheTensor) -> KiviCacheTensor:
    cache.mark_dynamic()
    return cache


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _is_crop(args) -> bool:
    """``cache[..., :end, :]``: a slice of the token axis from 0 with step 1."""
    dim, start, step = args[1] if len(args) > 1 else 0, args[2] if len(args) > 2 else None, args[4] if len(args) > 4 else 1
    return dim in (2, -2) and start in (None, 0) and step == 1 and len(args) > 3 and isinstance(args[3], int)


def _is_append(args, kwargs) -> bool:
    tensors = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    return (
        len(tensors) == 2
        and isinstance(tensors[0], KiviCacheTensor)
        and not isinstance(tensors[1], KiviCacheTensor)
        and dim in (2, -2)
    )


def _check_dense(dense: torch.Tensor, spec: CacheSpec, like: KiviCacheTensor | None = None) -> None:
    if dense.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"KIVI caches hold float16, bfloat16 or float32 {spec.role}, got {dense.dtype}")
    if dense.dim() != 4:
        raise ValueError(f"KIVI {spec.role} must be [batch, heads, tokens, head_dim], got shape {tuple(dense.shape)}")
    head_dim = dense.shape[-1]
    if not spec.per_channel and head_dim % spec.group_size:
        raise ValueError(
            f"group_size={spec.group_size} does not divide the head dim {head_dim}: "
            "values are quantized in groups of group_size channels of one token"
        )
    if like is not None and (dense.shape[:2] != like.shape[:2] or head_dim != like.shape[-1]):
        raise ValueError(
            f"cannot append {spec.role} of shape {tuple(dense.shape)} to a cache of shape {tuple(like.shape)}"
        )


def _required_capacity(spec: CacheSpec, seq_len: int, new_tokens: int) -> tuple[int, int]:
    """(quantized, residual) token capacity that an append of ``new_tokens`` to ``seq_len`` needs.

    The lazy flush leaves the schedule's quantized count for ``seq_len`` tokens, and at most ``R``
    (values) or ``R - 1`` (keys) residual tokens, to which the new ones are added.
    """
    return flush_count(seq_len, spec.residual_length, spec.per_channel), spec.residual_length + new_tokens


def allocate_buffers(like: torch.Tensor, spec: CacheSpec, quant_tokens: int, residual_tokens: int) -> QuantizedKV:
    """Zeroed buffers for ``quant_tokens`` quantized and ``residual_tokens`` residual tokens of ``like``'s
    ``[B, H, *, D]`` shape, as the kernels take them."""
    batch, heads, _, head_dim = like.shape
    held = allocate_held(
        (batch, heads, head_dim), like.dtype, like.device, spec, units_for(spec, quant_tokens), residual_tokens
    )
    return views_of(held, spec, heads, head_dim)


def _grown(cache: KiviCacheTensor, quant_tokens: int, residual_tokens: int) -> KiviCacheTensor:
    """``cache`` copied into buffers with room for the required tokens, growing geometrically."""
    spec, kv = cache.spec, cache.kv
    quant_capacity = cache.code_units.shape[0] * spec.group_size
    if quant_tokens > quant_capacity:
        bytes_per_token = sum(t.numel() * t.element_size() for t in cache.held.quantized) / quant_capacity
        doubling = min(quant_capacity, int(_SMALL_GROWTH_BYTES // bytes_per_token))
        quant_tokens = max(quant_tokens, quant_capacity + max(quant_capacity // _GROWTH_DIVISOR, doubling))
    else:
        quant_tokens = quant_capacity
    residual_tokens = max(residual_tokens, kv.residual.shape[-2])
    batch, heads, _, head_dim = cache.shape
    held = allocate_held(
        (batch, heads, head_dim), cache.dtype, cache.device, spec, units_for(spec, quant_tokens), residual_tokens
    )
    grown = KiviCacheTensor(held, spec, cache.shape)
    for old, new in zip(kv[:3], grown.kv[:3]):
        new[..., : old.shape[-2], :] = old
    grown.lengths.copy_(kv.lengths)
    if residual_tokens == kv.residual.shape[-2]:
        grown.residual.copy_(kv.residual)
    else:  # unroll the ring into the larger buffer
        ordered = residual_tokens_ref(kv)
        grown.residual[..., : ordered.shape[-2], :] = ordered
        grown.lengths[RESIDUAL_START] = 0
    return grown
