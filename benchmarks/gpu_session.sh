#!/usr/bin/env bash
# One device call for a session's GPU figures, each step under its own time limit and logged under
# $OUT as it runs (a step cut short still leaves its log): the kernels' GPU tests at real sizes and
# the end-to-end CUDA test, the decode-attention benchmark, where a large decode step's GPU time goes
# (kivi at PROFILE_BATCHES, default 384), then generate throughput and memory.
#   OUT=/tmp/out bash benchmarks/gpu_session.sh [BATCHES ...]
# Each BATCHES, a comma-separated list of batch sizes (default: 1, then 256), is its own generate
# step of kivi K2V2 then fp16, so the comparison at the first comes back even if a later one is cut.
# TESTS overrides the pytest selection (words: files and -m; no quotes) and TEST_FILTER is its -k
# expression; TEST_S, DECODE_S, PROFILE_S and GENERATE_S are the steps' limits (seconds);
# SKIP names steps to leave out (e.g. SKIP="pytest decode_attention").
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/kivi-gpu}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run, keep the whole log, show its tail
    local name=$1 seconds=$2
    shift 2
    if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "=== $name: skipped"; return; fi
    echo "=== $name (limit ${seconds}s)"
    local start=$SECONDS
    timeout "$seconds" "$@" > "$out/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start))s"
    tail -n 40 "$out/$name.log"
}

# -P: the repository root stays off sys.path, so its kernels/ folder is not importable as `kernels`.
default_tests="-m gpu tests/test_gpu_end_to_end.py tests/test_decode_attention.py tests/test_append.py"
# shellcheck disable=SC2086  # TESTS is a word list
step pytest "${TEST_S:-300}" python3 -P -m pytest -q -p no:cacheprovider -p no:logging --durations=8 ${TESTS:-$default_tests} ${TEST_FILTER:+-k "$TEST_FILTER"}
step decode_attention "${DECODE_S:-150}" python3 benchmarks/bench_decode_attention.py --out "$out/decode_attention"
step profile "${PROFILE_S:-150}" bash -c "cd benchmarks && python3 profile_decode_step.py --methods kivi-k2v2 \
    --batches ${PROFILE_BATCHES:-384}"
[ $# -gt 0 ] || set -- 1 256
for batches in "$@"; do
    step "generate_${batches//,/_}" "${GENERATE_S:-420}" python3 benchmarks/bench_generate.py \
        --methods kivi-k2v2,fp16 --batches "$batches" --out "$out/generate_${batches//,/_}"
done
