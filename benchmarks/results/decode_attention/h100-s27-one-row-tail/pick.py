"""Which tree generate should run: the variant whose best tail tile at B512 T340 (no mask) beats HEAD's best by 5%."""
import json
import sys

rows = [r for r in json.load(open(sys.argv[1])) if r[0].startswith("B512 H32/32 T340") and "mask" not in r[0]
        and r[2].startswith("tail") and r[6] < 1e-2]
best = {name: min(r[4] for r in rows if r[3] == name) for name in {r[3] for r in rows}}
print(best, file=sys.stderr)
winner = min((name for name in best if name != "head"), key=best.get, default="head")
print(winner if best.get(winner, 1e9) < 0.95 * best.get("head", 0) else "head")
