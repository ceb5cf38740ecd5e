#!/bin/bash
# Session 41 call A: held 2-D buffers (the s40 patch, applied). GPU e2e tests; batch-1 fp16 vs KIVI, then KIVI on 1b7c1ec (same machine).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" | tee -a $OUT/gpu.txt
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 250 python3 -m pytest -q -s tests/test_gpu_end_to_end.py 2>&1 | grep -E "max|passed|failed|Error|error" | tee $OUT/e2e.log
timeout 160 python3 benchmarks/bench_generate.py --methods kivi-k2v2,fp16 --batches 1 --out $OUT/generate 2>&1 | tail -8 | tee $OUT/generate.log
python3 -m pip install -q --no-deps --no-build-isolation -e scratch/s41/base >/dev/null 2>&1
python3 -c "import kivi_compile, kivi_compile.passes; print(kivi_compile.__file__, kivi_compile.passes.__file__)" | tee $OUT/base_path.txt
timeout 100 python3 scratch/s41/base/benchmarks/bench_generate.py --methods kivi-k2v2 --batches 1 --out $OUT/generate_base 2>&1 | tail -6 | tee $OUT/generate_base.log
