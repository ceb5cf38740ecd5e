#!/bin/bash
# Session 38 call A: append A/B (HEAD's kernel vs the working tree's); GPU tests of the append, the Inductor end to
# end and quantize arithmetic; the batch-1 timeline, default guards vs skip_guard_eval_unsafe, one compile.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 100 python3 scratch/s38/append_ab.py 2>&1 | tail -16 | tee $OUT/append_ab.log
timeout 180 python3 -P -m pytest -v -p no:cacheprovider -p no:logging -m gpu tests/test_append.py tests/test_quantize_arithmetic.py tests/test_gpu_end_to_end.py 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error|assert" | tee $OUT/tests.log | tail -5
timeout 230 python3 scratch/s38/gpu_timeline_ab.py 2>&1 | tail -22 | tee $OUT/timeline_ab.log
