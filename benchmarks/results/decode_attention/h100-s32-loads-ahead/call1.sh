# Session 32, call 1: the Gluon kernel alone, HEAD against codes dequantized in place (bottom) and that plus the
# next block's loads one iteration ahead (ahead, at 10 and 9 programs/SM for the narrow index); then the Gluon GPU tests.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
rm -rf /tmp/ab && mkdir -p /tmp/ab && for v in head bottom ahead; do cp -r kernels /tmp/ab/$v; done
for f in $(git ls-files kernels); do git show HEAD:$f > /tmp/ab/head/${f#kernels/}; done
cp scratch/s32/mma_bottom.py /tmp/ab/bottom/decode_attention_mma.py
git diff --stat HEAD -- kernels; diff -q /tmp/ab/head/decode_attention_mma.py kernels/decode_attention_mma.py
timeout 330 python3 -P scratch/s32/gluon_ab.py head=/tmp/ab/head@12 bottom=/tmp/ab/bottom@12 ahead10=/tmp/ab/ahead@10 ahead9=/tmp/ab/ahead@9 > "$OUT/gluon_ab.log" 2>&1
echo "== gluon ab exit $?"; tail -45 "$OUT/gluon_ab.log" | cut -c1-170
timeout 170 python3 -m pytest -q -m gpu -k "gluon" tests/test_decode_attention.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "== tests exit $?"; tail -4 "$OUT/gpu_tests.log"
