#!/bin/bash
# Session 37 call 3: the 11 decode GPU tests call 2's limit cut, then the batch-1 decode step's timeline.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 120 python3 -P -m pytest -v -p no:cacheprovider -p no:logging -m gpu $(cat benchmarks/results/profile/h100-s37-batch1-timeline/not_run_ids.txt) 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed" | tee $OUT/tests.log | tail -3
timeout 400 python3 benchmarks/profile_step_timeline.py --batch 1 2>&1 | tail -20 | tee $OUT/timeline.log
