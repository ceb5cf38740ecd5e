#!/bin/bash
# Session 36 call 1: the landed Gluon kernel (not GPU-tested in s35) plus the uncommitted replay plans:
# Gluon, tail and recorded-launch GPU tests, the kernel benchmark, the replay-plan A/B, every plan vs float64.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 230 python3 -P -m pytest -q -p no:cacheprovider -p no:logging -m gpu tests/test_decode_attention.py -k "gluon or tail or recorded" 2>&1 | tail -15 | tee $OUT/tests.log
timeout 130 python3 benchmarks/bench_decode_attention.py --out $OUT/decode_attention 2>&1 | tail -30 | tee $OUT/bench.log
SHAPES=0,1,2,3,4,6 timeout 110 python3 scratch/s36/replay_plan_ab.py 2>&1 | tail -100 | tee $OUT/replay_plan_ab.log
timeout 100 python3 -P -m pytest -q -p no:cacheprovider -p no:logging -m gpu tests/test_decode_attention.py -k "every_plan" 2>&1 | tail -8 | tee $OUT/tests_every_plan.log
