# Next session's first call (~200 s + startup): the Gluon kernel alone, HEAD (a0e5d5d's kernel) against
# scratch/s32/lane_offsets.diff (offsets as lane part + register part: immediates in every load; CPU compile
# 2-bit 801 -> 765 instrs/block, 200 -> 168 registers; 4-bit 913 -> 802, 240 -> 190), splits fitted to the
# registers (@auto) or 8/SM; then the Gluon GPU tests on the variant.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
rm -rf /tmp/ab && mkdir -p /tmp/ab && for v in head lane lane16; do cp -r kernels /tmp/ab/$v; done
(cd /tmp/ab/lane && patch -s -p2 < "$OLDPWD/scratch/s32/lane_offsets.diff") && echo patched
(cd /tmp/ab/lane16 && patch -s -p2 < "$OLDPWD/scratch/s32/lane_offsets.diff" && sed -i 's/^MOST_ROWS_LOADED_AHEAD = 8/MOST_ROWS_LOADED_AHEAD = 16/' decode_attention_mma.py) && echo patched16
timeout 330 python3 -P scratch/s32/gluon_ab2.py head=/tmp/ab/head@8 lane=/tmp/ab/lane@8 lane_auto=/tmp/ab/lane@auto lane16=/tmp/ab/lane16@auto > "$OUT/gluon_ab.log" 2>&1
echo "== gluon ab exit $?"; grep -v "^\[" "$OUT/gluon_ab.log" | tail -50 | cut -c1-170
rm -rf kernels.orig && cp -r kernels kernels.orig && patch -s -p1 < scratch/s32/lane_offsets.diff && echo "tree patched"
timeout 230 python3 -m pytest -q -m gpu -k "gluon" tests/test_decode_attention.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "== tests exit $?"; tail -4 "$OUT/gpu_tests.log"
