# Session 27, call 2, the tree to land (one-row tail tile): generate kivi K2V2 at 512 and fp16 at 192, then the
# decode kernel's GPU tests of the tail with what time is left.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
git log --oneline -1; git diff --stat | tail -1
s=$SECONDS
KIVI_LOG=info timeout 210 python3 benchmarks/bench_generate.py --methods kivi-k2v2 --batches 512 --out "$OUT/generate_kivi_512" > "$OUT/generate_kivi_512.log" 2>&1
echo "== kivi 512 exit $? $((SECONDS-s))s"; grep -v -i warn "$OUT/generate_kivi_512.log" | tail -6 | cut -c1-600
s=$SECONDS
timeout 130 python3 benchmarks/bench_generate.py --methods fp16 --batches 192 --out "$OUT/generate_fp16_192" > "$OUT/generate_fp16_192.log" 2>&1
echo "== fp16 192 exit $? $((SECONDS-s))s"; grep -v -i warn "$OUT/generate_fp16_192.log" | tail -4 | cut -c1-400
s=$SECONDS
timeout $((560 - SECONDS)) python3 -P -m pytest -q -p no:cacheprovider -m gpu -k "tail or padding_masks" tests/test_decode_attention.py > "$OUT/gpu_tests.log" 2>&1
echo "== pytest exit $? $((SECONDS-s))s"; grep -E "FAILED|passed|failed|Error" "$OUT/gpu_tests.log" | tail -8 | cut -c1-300
