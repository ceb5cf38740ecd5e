#!/bin/bash
# Session 37 call 1 (run AFTER merging branch replay-splits into main's working tree): the replay plans'
# end-to-end GPU tests (errors printed), the recorded-launch tests, then generate at batch 1 with them.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 170 python3 -P -m pytest -v -s -p no:cacheprovider -p no:logging -m gpu tests/test_gpu_end_to_end.py -k replay 2>&1 | grep -E "PASS|FAIL|Error|error|assert|recordings|max logits" | head -40 | tee $OUT/e2e_replay.log
timeout 60 python3 -P -m pytest -q -p no:cacheprovider -p no:logging -m gpu tests/test_decode_attention.py -k recorded 2>&1 | tail -3 | tee $OUT/recorded.log
timeout 330 python3 benchmarks/bench_generate.py --methods fp16,kivi-k2v2 --batches 1 --out $OUT/generate 2>&1 | tail -25 | tee $OUT/generate.log
