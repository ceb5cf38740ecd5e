"""Picks from `ncu --page raw --csv`: per kernel, time, DRAM, L2 and the top warp-stall reasons."""
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
header, units, data = rows[0], rows[1], rows[2:]
want = ["gpu__time_duration.sum", "dram__bytes_read.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
        "lts__t_sector_hit_rate.pct", "sm__warps_active.avg.pct_of_peak_sustained_active",
        "smsp__issue_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
        "launch__grid_size", "smsp__warps_eligible.avg.per_cycle_active", "dram__bytes_read.sum.per_second",
        "lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum", "lts__t_sectors_srcunit_tex_op_read_lookup_miss.sum"]
for r in data:
    d = dict(zip(header, r))
    print("==", d.get("Kernel Name", "?")[:60])
    for w in want:
        if w in d:
            print(f"   {w:60s} {d[w]} {units[header.index(w)]}")
    stalls = [(h, d[h]) for h in header if h.startswith("smsp__pcsamp_warps_issue_stalled_") and not h.endswith("_not_issued")]
    vals = []
    for h, v in stalls:
        try: vals.append((float(v.replace(",", "")), h))
        except ValueError: pass
    total = sum(v for v, _ in vals) or 1
    for v, h in sorted(vals, reverse=True)[:10]:
        print(f"   stall {h.replace('smsp__pcsamp_warps_issue_stalled_', ''):40s} {v / total:6.1%}")
