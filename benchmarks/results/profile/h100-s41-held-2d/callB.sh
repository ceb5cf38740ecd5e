#!/bin/bash
# Session 41 call B: the decode frame's guards with torch 2.11, held 2-D buffers then 1b7c1ec, same machine.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 200 bash -c "cd benchmarks && python3 profile_guards.py --shape llama-2-7b --device cuda --rounds 3 --repeats 50" 2>&1 | tail -6 | tee $OUT/guards.log
python3 -m pip install -q --no-deps --no-build-isolation -e scratch/s41/base >/dev/null 2>&1
timeout 200 bash -c "cd scratch/s41/base/benchmarks && python3 profile_guards.py --shape llama-2-7b --device cuda --rounds 3 --repeats 50" 2>&1 | tail -6 | tee $OUT/guards_base.log
