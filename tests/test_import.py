"""Importing from the repository root, where ``kernels/`` is also a top-level package to Python."""

from __future__ import annotations

import os
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


def test_the_top_level_name_goes_to_an_installed_kernels_package(tmp_path):
    # transformers >= 5.25 depends on the Hub's `kernels` and imports names from it; from the repository
    # root our folder comes first on sys.path and must hand the name over. A stand-in plays the Hub package.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("SOURCE = 'installed'\n")
    code = "import kernels, kivi_compile.kernels as ours; print(kernels.SOURCE, ours.QuantizedKV.__name__)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["installed", "QuantizedKV"]
