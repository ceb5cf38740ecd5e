"""``kivi-diff``: each subject kind, each format, and each bad input's exit status and message.

Most runs call ``main(argv)`` in-process (fast); two go through ``python -m kivi_compile.cli`` to
check the real process: exit status, stderr without a traceback, and ``KIVI_LOG``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from kivi_helpers import tiny_model

from kivi_compile import Report
from kivi_compile.cli import main
from kivi_compile.log import configure_from_env

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_text_report_with_table_summary_and_diff(capsys):
    code, out, err = run(capsys, "--arch", "llama", "--layers", "2", "--residual-length", "32")
    print(out[:3000])
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "kivi-diff: llama: 2 layer(s), prompt of 16 tokens"
    assert lines[1] == "KIVI K2V2 G=32 R=32: 2 graph(s), 4 attention site(s), 4 rewritten"
    rows = [line for line in lines if "self_attn" in line and "sdpa_attention.py" in line]
    assert len(rows) == 4 and all(" yes " in row and "GQA 2:1" in row for row in rows)
    assert "graph 1 (decode): 2 of 2 attention site(s) rewritten" in out
    assert "--- graph 1 (decode) before" in out and "= torch.ops.kivi.decode_attention.default(" in out
    assert "\033[" not in out  # --color auto, and captured output is not a terminal


def test_no_diff_and_forced_colour(capsys):
    code, out, _ = run(capsys, "--arch", "gpt2", "--layers", "1", "--no-diff", "--color", "always")
    assert code == 0
    assert "@@" not in out and "graph 0 (prefill) before" not in out
    assert "\033[32myes\033[0m" in out and "transformer.h.0.attn" in out

    code, out, _ = run(capsys, "--arch", "gpt2", "--layers", "1", "--color", "always")
    assert "\033[32m+    append_kv__default = torch.ops.kivi.append_kv_.default(" in out


def test_markdown_report(capsys):
    code, out, _ = run(capsys, "--arch", "gpt-neox", "--layers", "1", "--format", "markdown")
    assert code == 0
    assert out.startswith("### kivi-diff: gpt-neox: 1 layer(s), prompt of 16 tokens\n\n**KIVI K2V2 G=32 R=128:")
    (row,) = [line for line in out.splitlines() if line.startswith("|") and "decode" in line]
    assert [cell.strip() for cell in row.split("|")[1:4]] == ["1", "decode", "gpt_neox.layers.0.attention"]
    assert "\n```diff\n--- graph 0 (prefill) before" in out and out.rstrip().endswith("```")


def test_json_report_parses_round_trips_and_carries_the_config(capsys):
    code, out, _ = run(
        capsys, "--arch", "llama", "--layers", "1", "--format", "json", "--key-bits", "4", "--value-bits", "2",
        "--group-size", "16", "--residual-length", "32", "--no-per-channel-keys",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert Report.from_dict(data).to_dict() == data
    assert data["config"] == dict(
        key_bits=4, value_bits=2, group_size=16, residual_length=32, compiler="eager", per_channel_keys=False,
        cuda_graphs=True,
    )
    (decode,) = data["graphs"][1]["sites"]
    # 2 KV heads x 32: codes 64 x (4 + 2) / 8 = 48 bytes; keys 64 x 2 x 2 / 16 = 16; values 2 x 2 groups x 4 = 16.
    assert (decode["phase"], decode["rewritten"], decode["fp16_bytes_per_token"], decode["kivi_bytes_per_token"]) == (
        "decode", True, 256, 80,
    )  # fmt: skip
    # The settings reach the rewritten graph: the append gets both bits, G, R and key per_channel=False.
    assert "k_embed, value_states, 4, 2, 16, 32, False)" in data["graphs"][1]["code_after"]
    assert "(keys per token)" in Report.from_dict(data).headline()


def test_family_left_alone_shows_its_reason(capsys, caplog):
    code, out, _ = run(capsys, "--arch", "gemma2", "--layers", "1", "--no-diff")
    assert code == 0
    assert "0 rewritten" in out.splitlines()[1]
    assert "scores go through tanh between q·kᵀ and the softmax" in out
    warnings = [r.getMessage() for r in caplog.records if r.name == "kivi_compile" and r.levelno == logging.WARNING]
    # The site is in the prefill and the decode graph: one warning, not one per graph.
    assert len(warnings) == 1 and "left unrewritten: scores go through tanh" in warnings[0]


def test_local_checkpoint_is_loaded_offline(capsys, tmp_path):
    tiny_model("llama", num_hidden_layers=1).save_pretrained(tmp_path)
    code, out, _ = run(capsys, "--model", str(tmp_path), "--prompt-length", "5", "--no-diff")
    assert code == 0
    assert out.splitlines()[0] == f"kivi-diff: {tmp_path}: 1 layer(s), prompt of 5 tokens"
    assert "2 attention site(s), 2 rewritten" in out


def _user_module(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))


def test_callable_factory_from_the_working_directory(capsys, tmp_path, monkeypatch):
    _user_module(tmp_path, "kivi_cli_user_attention", """
        import torch
        import torch.nn.functional as F

        def step(q, k, v, past_k, past_v):
            keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True), keys, values

        def make():
            k, v = torch.randn(1, 1, 5, 32), torch.randn(1, 1, 5, 32)
            return step, (torch.randn(1, 4, 5, 32), k, v), {"past_k": k[:, :, :0], "past_v": v[:, :, :0]}
    """)  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the working directory
    code, out, _ = run(capsys, "--callable", "kivi_cli_user_attention:make", "--format", "json")
    assert code == 0
    (site,) = Report.from_dict(json.loads(out)).sites
    assert (site.phase, site.rewritten, site.head_sharing, site.module) == ("prefill", True, "MQA", "")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "bloom"], "unknown family 'bloom'; known: llama, mistral, qwen2, qwen3, phi3, gemma, gemma2,"),
        (["--arch", "llama", "--layers", "0"], "--layers 0: must be at least 1"),
        (["--model", "{tmp}/missing"], "--model {tmp}/missing: no such directory"),
        (["--model", "{tmp}"], "--model {tmp}: cannot load a causal LM: "),
        (["--callable", "no_such_module_for_kivi:make"], "cannot import 'no_such_module_for_kivi': ModuleNotFound"),
        (["--callable", "kivi_cli_broken:make"], "cannot import 'kivi_cli_broken': SyntaxError: invalid syntax"),
        (["--callable", "json:no_factory"], "module 'json' has no callable 'no_factory'"),
        (["--callable", "json"], "expected MODULE:FACTORY"),
        (["--callable", "kivi_cli_bad_factory:make"], "make() must return (fn_or_module, args[, kwargs])"),
        (["--arch", "llama", "--key-bits", "3"], "KiviConfig.key_bits=3: must be one of (2, 4, 8)"),
        (["--arch", "llama", "--residual-length", "100"], "residual_length=100: must be a multiple of group_size=32"),
        (["--arch", "llama", "--group-size", "64"], "KiviConfig.group_size=64 does not divide the head dim 32"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, monkeypatch, argv, message):
    _user_module(tmp_path, "kivi_cli_bad_factory", "def make():\n    return 'not a module'\n")
    _user_module(tmp_path, "kivi_cli_broken", "def make(:\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    code, out, err = run(capsys, *(arg.format(tmp=tmp_path) for arg in argv))
    print(err)
    assert (code, out) == (2, "")
    assert err.startswith("kivi-diff: error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err


@pytest.fixture
def kivi_logger():
    """The ``kivi_compile`` logger, restored after the test (``KIVI_LOG`` changes it process-wide)."""
    logger = logging.getLogger("kivi_compile")
    saved = logger.level, list(logger.handlers), logger.propagate
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def test_kivi_log_sets_the_level_with_one_stderr_handler(kivi_logger, monkeypatch, capsys):
    monkeypatch.setenv("KIVI_LOG", "INFO")
    configure_from_env()
    monkeypatch.setenv("KIVI_LOG", "debug")
    configure_from_env()  # reconfiguring replaces its handler
    assert kivi_logger.level == logging.DEBUG and not kivi_logger.propagate
    kivi_logger.debug("probe %d", 1)
    assert capsys.readouterr().err == "[kivi_compile] DEBUG: probe 1\n"

    monkeypatch.setenv("KIVI_LOG", "verbose")
    configure_from_env()
    assert kivi_logger.level == logging.WARNING
    assert capsys.readouterr().err == (
        "[kivi_compile] WARNING: KIVI_LOG='verbose': must be one of debug, info, warning, error; using 'warning'\n"
    )


def _cli_process(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kivi_compile.cli", *argv],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env}, cwd=REPO,
    )  # fmt: skip


def test_process_json_output_and_kivi_log_debug():
    done = _cli_process("--arch", "gpt2", "--layers", "1", "--format", "json", KIVI_LOG="debug")
    assert done.returncode == 0, done.stderr
    assert Report.from_dict(json.loads(done.stdout)).sites[1].phase == "decode"
    assert "[kivi_compile] DEBUG: rewrote prefill attention" in done.stderr
    assert "[kivi_compile] DEBUG: rewrote decode attention" in done.stderr


def test_process_error_is_one_line_without_traceback():
    done = _cli_process("--arch", "nope")
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith("kivi-diff: error: unknown family 'nope'") and done.stderr.count("\n") == 1


def test_console_script_is_installed():
    (installed,) = entry_points(group="console_scripts", name="kivi-diff")  # from pyproject's [project.scripts]
    assert installed.load() is main
