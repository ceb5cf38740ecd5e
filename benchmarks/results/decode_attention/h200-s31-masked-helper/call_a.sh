# Session 31, call A: the masked-helper kernel (M) against HEAD, the Triton tail alone per tile and the whole op,
# alternating in one process; then the decode kernel's mask and tail-tile GPU tests on M.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
git log --oneline -1
s=$SECONDS
(cd scratch/s31 && TILES=16:2:168,32:2:168 ROUNDS=3 \
  SHAPES=512:32:32:340:2:mask,512:32:32:340:2,192:32:32:340:4:mask,8:32:8:4096:2:mask,8:32:2:4096:2:mask \
  AB_JSON=$OUT/tail_ab.json timeout 260 python3 tail_ab.py head=ab/head M=ab/M > "$OUT/tail_ab.log" 2>&1)
echo "== ab exit $? $((SECONDS-s))s"; grep -E "^\[|registers|skip|Error" "$OUT/tail_ab.log" | cut -c1-170 | tail -n 60
cp scratch/s31/ab/M/decode_attention.py kernels/decode_attention.py
s=$SECONDS
timeout $((585 - SECONDS)) python3 -P -m pytest -q -p no:cacheprovider -p no:logging --durations=3 -m gpu tests/test_decode_attention.py -k "padding_masks or every_tail_tile" > "$OUT/gpu_tests_M.log" 2>&1
echo "== pytest M exit $? $((SECONDS-s))s"; grep -E "FAILED|passed|failed|Error" "$OUT/gpu_tests_M.log" | tail -8 | cut -c1-300
git checkout kernels/decode_attention.py
