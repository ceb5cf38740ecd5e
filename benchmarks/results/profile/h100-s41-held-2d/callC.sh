#!/bin/bash
# Session 41 call C: batch-1 KIVI step A/B repeated in the reverse order: 1b7c1ec first, then held 2-D buffers.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
python3 -m pip install -q --no-deps --no-build-isolation -e scratch/s41/base >/dev/null 2>&1
timeout 110 python3 scratch/s41/base/benchmarks/bench_generate.py --methods kivi-k2v2 --batches 1 --out $OUT/generate_base 2>&1 | tail -3 | tee $OUT/generate_base.log
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 110 python3 benchmarks/bench_generate.py --methods kivi-k2v2 --batches 1 --out $OUT/generate 2>&1 | tail -3 | tee $OUT/generate.log
