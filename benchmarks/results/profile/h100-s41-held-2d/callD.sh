#!/bin/bash
# Session 41 call D: the guards again, reverse order: 1b7c1ec first, then held 2-D buffers.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
python3 -m pip install -q --no-deps --no-build-isolation -e scratch/s41/base >/dev/null 2>&1
timeout 150 bash -c "cd scratch/s41/base/benchmarks && python3 profile_guards.py --shape llama-2-7b --device cuda --rounds 5 --repeats 50" 2>&1 | tail -3 | tee $OUT/guards_base.log
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 150 bash -c "cd benchmarks && python3 profile_guards.py --shape llama-2-7b --device cuda --rounds 5 --repeats 50" 2>&1 | tail -3 | tee $OUT/guards.log
