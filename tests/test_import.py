"""Importing from the repository root, where ``kernels/`` is also a top-level package to Python."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_probe_of_a_kernels_package_does_not_define_the_ops_twice():
    # `python -c` puts the working directory first on sys.path; transformers then imports our
    # kernels/ folder as the Hub's `kernels` package while looking for it.
    code = "import transformers.activations, kivi_compile, torch; print(torch.ops.kivi.append_.default)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kivi.append_.default" in result.stdout
