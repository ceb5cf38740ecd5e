# Session 27, call 1 on an H200 (no H100 was lent): tail A/B (HEAD vs D), then the decode kernel's GPU tests on D.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
git log --oneline -1
s=$SECONDS
(cd scratch/s27 && TILES=32:2:168,16:2:168,16:2:128 \
  SHAPES=512:32:32:340:2,512:32:32:311:2,512:32:32:400:2,512:32:32:340:2:mask,192:32:32:340:4,8:32:32:4096:2 \
  AB_JSON=$OUT/tail_ab.json timeout 250 python3 tail_ab.py head=ab/head D=ab/D D2=ab/D2 > "$OUT/tail_ab.log" 2>&1)
echo "== ab exit $? $((SECONDS-s))s"; grep -E "^\[|registers|skip" "$OUT/tail_ab.log" | cut -c1-170 | tail -n 80
tree=$(python3 scratch/s27/pick.py "$OUT/tail_ab.json" 2>>"$OUT/pick.log" || echo head); cat "$OUT/pick.log"; echo "== tree $tree"
[ "$tree" = head ] && tree=D2
cp scratch/s27/ab/$tree/decode_attention.py kernels/decode_attention.py
s=$SECONDS
timeout $((590 - SECONDS)) python3 -P -m pytest -q -p no:cacheprovider -m gpu -k "tail or padding_masks" tests/test_decode_attention.py > "$OUT/gpu_tests_$tree.log" 2>&1
echo "== pytest $tree exit $? $((SECONDS-s))s"; grep -E "FAILED|passed|failed|Error" "$OUT/gpu_tests_$tree.log" | tail -8 | cut -c1-300
git checkout kernels/decode_attention.py
