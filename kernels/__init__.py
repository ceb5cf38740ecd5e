"""KIVI kernels: PyTorch reference ops (the ground truth) and their ``torch.library`` registration."""

from .cache_layout import QuantizedKV
from .quantize import SUPPORTED_BITS

# From the repository root this folder is also importable as a top-level ``kernels`` (transformers
# imports that name to look for the Hub's kernels package); only the installed name defines the
# ``kivi::`` ops, which a namespace may define once per process.
if __name__ == "kivi_compile.kernels":
    from . import ops

__all__ = ["QuantizedKV", "SUPPORTED_BITS", "ops"]
