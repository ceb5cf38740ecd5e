"""Where the decode-attention kernel's time goes, under Nsight Compute: one launch of every plan.

``run`` builds a KIVI cache of random data, tunes (outside the profiled range), times each plan
with ``do_bench``, then launches each plan once, through the op's own launch path with that plan
as the only one, between ``cudaProfilerStart``/``Stop`` so that ``ncu --profile-from-start off``
profiles exactly those launches:

    ncu --clock-control none --profile-from-start off --kernel-name regex:_decode_attention_kernel \\
        --set full --import-source no -o decode python benchmarks/profile_decode_kernel.py run
    ncu --import decode.ncu-rep --print-details all > decode.txt
    ncu --import decode.ncu-rep --page source --csv --print-source sass > decode-sass.csv
    python benchmarks/profile_decode_kernel.py opcodes decode-sass.csv

``opcodes`` reads the SASS page and prints, for each profiled launch, the instructions its hottest
loop executes per warp and per pass, by opcode, with the warp-stall samples they drew: which work
the issue slots go to (unpacking, register moves, shared-memory staging, tensor-core math).

``loads`` reads the same page (collected with ``--import-source yes``, which keeps the per-instruction
memory counters) and prints, for each launch, its global memory instructions grouped by opcode and
by how often they ran (a loop's instructions run together): the L2 sectors they requested, the share
of those beyond what their bytes need (``excessive``: a warp touching more sectors than its data
fills), and the stall samples they drew. Which loads waste the load path's bandwidth.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from unittest import mock

from tabulate import tabulate


def run(args: argparse.Namespace) -> None:
    # Imported here so that ``opcodes`` runs on any machine, without torch or a GPU.
    import torch

    import kivi_compile.kernels.decode_attention as decode
    from kivi_compile.cache import KiviCacheTensor
    from kivi_compile.config import KiviConfig

    if not torch.cuda.is_available():
        raise SystemExit("profile_decode_kernel.py run: needs a CUDA GPU (ncu profiles GPU kernels)")
    config = KiviConfig(key_bits=args.bits, value_bits=args.bits, group_size=args.group_size, residual_length=128)
    q = torch.randn(args.batch, args.heads, 1, args.head_dim, device="cuda", dtype=torch.float16)
    dense = torch.randn(args.batch, args.kv_heads, args.tokens, args.head_dim, device="cuda", dtype=torch.float16)
    key = KiviCacheTensor.from_dense(dense, config.key_spec()).kv
    value = KiviCacheTensor.from_dense(torch.randn_like(dense), config.value_spec()).kv
    del dense
    out = torch.empty_like(q)

    def launch() -> None:
        decode.decode_attention_triton(q, key, value, None, None, False, args.bits, args.bits, args.group_size, out)

    launch()  # tunes
    for tuned in decode._TUNED_PLANS.values():
        print(f"tuned: launched {tuned.launched}, replayed {tuned.replayed}", flush=True)
    plans = decode._candidate_plans()

    def launch_only(plan: decode._Plan) -> None:
        """The op's own launch path, with ``plan`` as the only plan: nothing to time or cross-check."""
        decode._TUNED_PLANS.clear()
        with mock.patch.object(decode, "_candidate_plans", lambda: [plan]):
            launch()

    for plan in plans:
        launch_only(plan)  # leaves ``plan`` tuned for these inputs
        print(f"plan {plan}: {decode.median_ms(launch):.3f} ms", flush=True)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for plan in plans:
        launch_only(plan)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def _kernels(path: str) -> list[list[dict[str, str]]]:
    """The rows of each kernel section of ``ncu --page source --csv`` output."""
    sections: list[list[str]] = []
    with open(path, newline="") as file:
        for line in file:
            if line.startswith('"Kernel Name"'):
                sections.append([])
            elif sections and line.strip():
                sections[-1].append(line)
    return [list(csv.DictReader(lines)) for lines in sections]


def _count(row: dict[str, str], column: str) -> int:
    return int(row[column].replace(",", "") or 0)


def opcodes(args: argparse.Namespace) -> None:
    for index, rows in enumerate(_kernels(args.sass_csv)):
        # The hottest loop: the execution count that accounts for the most instructions (every
        # instruction of a loop body runs once per warp and pass).
        weight = Counter()
        for row in rows:
            weight[_count(row, "Instructions Executed")] += _count(row, "Instructions Executed")
        passes = weight.most_common(1)[0][0]
        loop = [row for row in rows if _count(row, "Instructions Executed") == passes]
        executed, stalls = Counter(), Counter()
        for row in loop:
            words = row["Source"].split()
            opcode = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
            executed[opcode] += 1
            stalls[opcode] += _count(row, "Warp Stall Sampling (All Samples)")
        total = sum(_count(row, "Instructions Executed") for row in rows)
        samples = sum(_count(row, "Warp Stall Sampling (All Samples)") for row in rows)
        print(f"launch {index + 1}: {total:,} warp instructions; hottest loop {len(loop)} per warp and pass, "
              f"{passes * len(loop) / total:.0%} of all")  # fmt: skip
        table = [(opcode, count, f"{stalls[opcode] / samples:.1%}") for opcode, count in executed.most_common(args.top)]
        print(tabulate(table, headers=["opcode", "per warp and pass", "stall samples"], tablefmt="github"))


def loads(args: argparse.Namespace) -> None:
    for index, rows in enumerate(_kernels(args.sass_csv)):
        sectors, excessive, count, samples = Counter(), Counter(), Counter(), Counter()
        for row in rows:
            if not _count(row, "L2 Theoretical Sectors Global"):
                continue
            words = row["Source"].split()
            group = (words[1] if words[0].startswith("@") else words[0], _count(row, "Instructions Executed"))
            sectors[group] += _count(row, "L2 Theoretical Sectors Global")
            excessive[group] += _count(row, "L2 Theoretical Sectors Global Excessive")
            count[group] += 1
            samples[group] += _count(row, "Warp Stall Sampling (All Samples)")
        total, wasted = sum(sectors.values()), sum(excessive.values())
        print(f"launch {index + 1}: {total:,} global sectors requested, {wasted / total:.0%} excessive")
        table = [(opcode, runs, count[(opcode, runs)], f"{sectors[(opcode, runs)]:,}",
                  f"{excessive[(opcode, runs)] / sectors[(opcode, runs)]:.0%}",
                  f"{excessive[(opcode, runs)] / max(wasted, 1):.0%}", samples[(opcode, runs)])
                 for opcode, runs in sorted(sectors, key=lambda group: -excessive[group])]  # fmt: skip
        print(tabulate(table, headers=["opcode", "runs", "instructions", "sectors", "excessive", "of all excess",
                                       "stall samples"], tablefmt="github"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser("run", help="launch every plan once inside the profiled range")
    launch.add_argument("--batch", type=int, default=8)
    launch.add_argument("--heads", type=int, default=32)
    launch.add_argument("--kv-heads", type=int, default=32)
    launch.add_argument("--head-dim", type=int, default=128)
    launch.add_argument("--tokens", type=int, default=32768)
    launch.add_argument("--bits", type=int, default=2)
    launch.add_argument("--group-size", type=int, default=32)
    summary = commands.add_parser("opcodes", help="instructions of each launch's hottest loop, by opcode")
    summary.add_argument("sass_csv")
    summary.add_argument("--top", type=int, default=16)
    sectors = commands.add_parser("loads", help="global memory instructions of each launch: sectors, excess")
    sectors.add_argument("sass_csv")
    args = parser.parse_args()
    {"run": run, "opcodes": opcodes, "loads": loads}[args.command](args)


if __name__ == "__main__":
    main()
