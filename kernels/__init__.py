"""KIVI kernels: PyTorch reference ops (the ground truth) and their ``torch.library`` registration."""

from . import ops
from .cache_layout import QuantizedKV
from .quantize import SUPPORTED_BITS

__all__ = ["QuantizedKV", "SUPPORTED_BITS", "ops"]
