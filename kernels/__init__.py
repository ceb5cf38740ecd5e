"""KIVI kernels: PyTorch reference ops (the ground truth) and their ``torch.library`` registration.

Installed, this folder is ``kivi_compile.kernels``. From a checkout's root it is also importable as a
top-level ``kernels``, the name of the Hub's kernels package, which transformers (a dependency of it
from 5.25) imports. Imported under that name, it hands the name over to the installed package (when
there is one) and defines nothing itself: a second copy of the ``kivi::`` ops cannot be defined in one
process, and transformers needs the Hub package's names.
"""

import importlib.util
import os
import sys
from importlib.machinery import PathFinder


def _hand_over_to_the_installed_kernels_package() -> None:
    """Load the installed top-level ``kernels``, if any, in this module's place."""
    checkout_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != checkout_root]
    spec = PathFinder.find_spec(__name__, elsewhere)
    if spec is None or spec.loader is None:
        return
    installed = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = installed  # the import statement returns what sys.modules holds after this file
    spec.loader.exec_module(installed)


if __name__ == "kivi_compile.kernels":
    from . import ops
    from .cache_layout import QuantizedKV
    from .quantize import SUPPORTED_BITS

    __all__ = ["QuantizedKV", "SUPPORTED_BITS", "ops"]
else:
    _hand_over_to_the_installed_kernels_package()
