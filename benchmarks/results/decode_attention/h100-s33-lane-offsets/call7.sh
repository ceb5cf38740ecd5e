# Session 33: the Gluon kernel's next-block loads at a clamped address (no masks) against HEAD, both with
# splits fitted to their registers; then the Gluon GPU tests and the kernel benchmark on the working tree.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
rm -rf /tmp/ab && mkdir -p /tmp/ab && cp -r scratch/s33/ab/head /tmp/ab/head && cp -r kernels /tmp/ab/clamp
timeout 170 python3 -P scratch/s32/gluon_ab2.py head=/tmp/ab/head@auto clamp=/tmp/ab/clamp@auto > "$OUT/gluon_ab.log" 2>&1
echo "== gluon ab exit $?"; grep -v "^\[" "$OUT/gluon_ab.log" | tail -30 | cut -c1-170
timeout 230 python3 -P -m pytest -q -p no:cacheprovider -m gpu -k gluon tests/test_decode_attention.py > "$OUT/gpu_tests_gluon.log" 2>&1
echo "== tests exit $?"; tail -3 "$OUT/gpu_tests_gluon.log"
timeout 120 python3 benchmarks/bench_decode_attention.py --out "$OUT/decode_attention" > "$OUT/decode_attention.log" 2>&1
echo "== bench exit $?"; grep -v "^(" "$OUT/decode_attention.log" | tail -26
