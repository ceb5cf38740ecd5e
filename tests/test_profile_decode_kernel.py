"""``benchmarks/profile_decode_kernel.py loads`` on a hand-written Nsight Compute source page."""

from __future__ import annotations

import argparse

from kivi_helpers import benchmark_script

COLUMNS = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
           "L2 Theoretical Sectors Global", "L2 Theoretical Sectors Global Excessive"]  # fmt: skip
ROWS = [  # a loop's two 8-byte loads (run 300 times), one 16-byte load outside it, an ALU op, a store
    ["0x10", "@!P1 LDG.E.64 R4, desc[UR4][R2.64]", "7", "300", "1,200", "900"],
    ["0x20", "LDG.E.64 R6, desc[UR4][R2.64+0x10]", "5", "300", "1,200", "900"],
    ["0x30", "LDG.E.128 R8, desc[UR4][R10.64]", "2", "100", "400", "0"],
    ["0x40", "FADD R1, R2, R3", "9", "300", "0", "0"],
    ["0x50", "STG.E desc[UR4][R6.64], R1", "1", "100", "200", "0"],
]


def test_loads_groups_global_accesses_by_opcode_and_runs(tmp_path, capsys, monkeypatch):
    module = benchmark_script("profile_decode_kernel", monkeypatch)
    page = tmp_path / "tail-sass.csv"
    lines = ['"Kernel Name","_decode_attention_kernel",'] + [",".join(f'"{cell}"' for cell in row)
                                                              for row in [COLUMNS, *ROWS]]  # fmt: skip
    page.write_text("\n".join(lines) + "\n")
    module.loads(argparse.Namespace(sass_csv=str(page)))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "launch 1: 3,000 global sectors requested, 60% excessive"
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in out[3:]]
    assert table == [
        ["LDG.E.64", "300", "2", "2,400", "75%", "100%", "12"],
        ["LDG.E.128", "100", "1", "400", "0%", "0%", "2"],
        ["STG.E", "100", "1", "200", "0%", "0%", "1"],
    ]
