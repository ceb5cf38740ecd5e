"""Tensor parallelism on CPU: 2 gloo processes, each with half the heads, generate the same tokens as 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "tp_generate.py"
pytest.importorskip("accelerate")  # transformers needs it to load with a tp_plan


def run(args: list[str], cwd: Path) -> None:
    """Runs the example; a crash shows its output and, from faulthandler, every thread's Python stack."""
    environment = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    result = subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-1500:]}\nstderr:\n{result.stderr[-4000:]}"


def test_two_gloo_ranks_generate_what_one_process_generates(tmp_path):
    run([sys.executable, str(EXAMPLE), "--save-tiny", str(tmp_path / "tiny")], tmp_path)
    common = ["--model", str(tmp_path / "tiny"), "--compiler", "eager", "--new-tokens", "80"]
    run([sys.executable, str(EXAMPLE), *common, "--out", "one.json"], tmp_path)
    run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         str(EXAMPLE), *common, "--out", "two.json"],
        tmp_path,
    )  # fmt: skip
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2
    assert two["tokens"] == one["tokens"]
    for rank in two["ranks"]:  # every rank rewrote its attention, over its half of the heads
        assert rank["sites"] and all(rewritten for _, rewritten, _, _ in rank["sites"])
        assert {kv_heads for _, _, kv_heads, _ in rank["sites"]} == {2}
    assert {kv_heads for _, _, kv_heads, _ in one["ranks"][0]["sites"]} == {4}
    assert two["ranks"][0]["kv_bytes"] < one["ranks"][0]["kv_bytes"]
