"""Shared fixtures: tiny random HF models and an independent fake-quant simulation of KIVI."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the interpreter; must precede `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kivi_helpers import seed_everything


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch, so graph counts are its own."""
    torch._dynamo.reset()
    seed_everything(0)
    yield
    torch._dynamo.reset()
