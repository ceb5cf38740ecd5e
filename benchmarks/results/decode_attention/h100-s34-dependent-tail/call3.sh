# Session 34 call 3: the Triton tail launched as a programmatic dependent of the Gluon kernel (A/B, whole op),
# then every Gluon/tail GPU test on it.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 240 python3 -P scratch/s34/pdl_ab.py > $OUT/pdl_ab.log 2>&1; echo "== pdl ab exit $?"
grep -v "^\[" $OUT/pdl_ab.log | tail -22 | cut -c1-160
timeout 300 python3 -P -m pytest -q -p no:cacheprovider -p no:logging -m gpu tests/test_decode_attention.py \
  -k "gluon or tail" > $OUT/tests.log 2>&1; echo "== tests exit $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests.log | tail -8
