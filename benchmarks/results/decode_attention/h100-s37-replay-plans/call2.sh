#!/bin/bash
# Session 37 call 2: the landed tree 7149f4c (replay plans + 573205d's host-decided key-word swap): every decode
# attention GPU test, then the kernel benchmark.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
git log --oneline -1 | tee $OUT/commit.txt
timeout 330 python3 -P -m pytest -v -p no:cacheprovider -p no:logging -m gpu tests/test_decode_attention.py 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed" | tee $OUT/tests.log | tail -8
timeout 200 python3 benchmarks/bench_decode_attention.py --out $OUT/decode_attention 2>&1 | tail -30 | tee $OUT/bench.log
