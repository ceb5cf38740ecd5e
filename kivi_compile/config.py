"""The KIVI configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kivi_compile.kernels.quantize import SUPPORTED_BITS


class Compiler(str, enum.Enum):
    """What runs the rewritten graph."""

    INDUCTOR = "inductor"
    EAGER = "eager"


@dataclass(frozen=True)
class CacheSpec:
    """Static description of one quantized cache tensor (keys or values)."""

    per_channel: bool  # keys: groups of G tokens per channel; values: groups of G channels per token
    bits: int
    group_size: int
    residual_length: int

    @property
    def role(self) -> str:
        return "keys" if self.per_channel else "values"


@dataclass(frozen=True)
class KiviConfig:
    """KIVI settings. Defaults are the paper's K2V2, G=32, R=128.

    Attributes:
        key_bits: bits per key code, one of 2, 4, 8.
        value_bits: bits per value code, one of 2, 4, 8.
        group_size: G, elements sharing one scale and minimum. Keys group G tokens of a channel,
            values G channels of a token, so G must divide the head dim and the residual length.
        residual_length: R, recent tokens kept in full precision; a multiple of G.
        compiler: ``"inductor"`` compiles the rewritten graph; ``"eager"`` runs it as is.
        per_channel_keys: KIVI groups keys per channel; False groups them per token like values
            (the paper's ablation, worse on outlier channels; for comparisons only).
        cuda_graphs: replay each decode step from a CUDA graph, recorded once per cache capacity,
            when the step is host-bound (on CUDA, batch x KV heads <= 4096; elsewhere the step runs
            the same split graphs directly). Small batches wait on the host, not the GPU; a replay
            is one launch.
    """

    key_bits: int = 2
    value_bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    compiler: Compiler = Compiler.INDUCTOR
    per_channel_keys: bool = True
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"KiviConfig.{name}={bits!r}: must be one of {SUPPORTED_BITS}")
        for name in ("per_channel_keys", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"KiviConfig.{name}={getattr(self, name)!r}: must be True or False")
        for name in ("group_size", "residual_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KiviConfig.{name}={value!r}: must be a positive integer")
        codes_per_byte = 8 // min(self.key_bits, self.value_bits)
        if self.group_size % codes_per_byte:
            raise ValueError(
                f"KiviConfig.group_size={self.group_size}: must be a multiple of {codes_per_byte} "
                f"so that {min(self.key_bits, self.value_bits)}-bit codes pack whole bytes per group"
            )
        if self.residual_length % self.group_size:
            raise ValueError(
                f"KiviConfig.residual_length={self.residual_length}: must be a multiple of "
                f"group_size={self.group_size} (keys are flushed in whole groups of tokens)"
            )
        try:
            object.__setattr__(self, "compiler", Compiler(self.compiler))
        except ValueError:
            choices = ", ".join(repr(c.value) for c in Compiler)
            raise ValueError(f"KiviConfig.compiler={self.compiler!r}: must be one of {choices}") from None

    def key_spec(self) -> CacheSpec:
        return CacheSpec(self.per_channel_keys, self.key_bits, self.group_size, self.residual_length)

    def value_spec(self) -> CacheSpec:
        return CacheSpec(False, self.value_bits, self.group_size, self.residual_length)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise if values cannot be grouped per token along ``head_dim`` channels."""
        if head_dim % self.group_size:
            raise ValueError(
                f"KiviConfig.group_size={self.group_size} does not divide the head dim {head_dim}: "
                "values are quantized in groups of group_size channels of one token"
            )
