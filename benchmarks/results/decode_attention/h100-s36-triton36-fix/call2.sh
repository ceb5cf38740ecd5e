#!/bin/bash
# Session 36 call 2: the Gluon kernel with its key-scale permutation back in Triton 3.6's form (call 1: the landed
# kernel failed to compile there), plus the replay plans: Gluon/tail/recorded GPU tests, the kernel benchmark,
# then every Triton plan against float64 for as long as the call has left.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 230 python3 -P -m pytest -q -p no:cacheprovider -p no:logging -m gpu tests/test_decode_attention.py -k "gluon or tail or recorded" 2>&1 | tail -25 | tee $OUT/tests.log
timeout 130 python3 benchmarks/bench_decode_attention.py --out $OUT/decode_attention 2>&1 | tail -30 | tee $OUT/bench.log
timeout 200 python3 -P -m pytest -v -p no:cacheprovider -p no:logging -m gpu tests/test_decode_attention.py -k "every_plan" 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed" | tee $OUT/tests_every_plan.log
