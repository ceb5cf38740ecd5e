# Session 27, call 3: which tail tile the tuner keeps at generate's states; the decode kernel's GPU tests of the
# tail after the tuning-key fix.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
s=$SECONDS
timeout 50 python3 scratch/s27/tuner_probe.py > "$OUT/tuner_probe.log" 2>&1
echo "== probe exit $? $((SECONDS-s))s"; grep -v -i warn "$OUT/tuner_probe.log" | tail -12 | cut -c1-300
s=$SECONDS
timeout $((235 - SECONDS)) python3 -P -m pytest -q -p no:cacheprovider -m gpu -k "tail or padding_masks" tests/test_decode_attention.py > "$OUT/gpu_tests.log" 2>&1
echo "== pytest exit $? $((SECONDS-s))s"; grep -E "FAILED|passed|failed|Error" "$OUT/gpu_tests.log" | tail -8 | cut -c1-300
