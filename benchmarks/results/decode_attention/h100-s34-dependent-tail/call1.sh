# Next session's first call (~150 s + startup): how far ahead each program asks L2 for its blocks, on the kernel
# of dc7a4c1 (unmasked loads ahead, splits fitted to registers): PREFETCH_BLOCKS 2 (HEAD), 3, 4, 6, 0; and
# ahead16 (scratch/s33/ahead16_unmasked.diff): loads ahead at 16 rows too when there is no mask (CPU compile:
# 250/254 registers, no spill, 2-bit loop 900 -> 839; with a mask it spills 80-168 bytes). If ahead16 wins at
# B8 H32/2: GPU tests -k "match_float64 and 16-1" on it before landing.
# The loop lost 7% of its instructions in session 33 and the long sequences did not get faster (1.00x at T = 32k,
# 78% of copy): maybe the loads, not the issue, are what it waits on now.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
rm -rf /tmp/ab && mkdir -p /tmp/ab
cp -r kernels /tmp/ab/ahead16 && (cd /tmp/ab/ahead16 && patch -s -p2 < "$OLDPWD/scratch/s33/ahead16_unmasked.diff") && echo patched16
for p in 2 3 4 6 0; do
  cp -r kernels /tmp/ab/p$p && sed -i "s/^PREFETCH_BLOCKS = 2$/PREFETCH_BLOCKS = $p/" /tmp/ab/p$p/decode_attention_mma.py
  grep -c "^PREFETCH_BLOCKS = $p$" /tmp/ab/p$p/decode_attention_mma.py
done
timeout 300 python3 -P scratch/s32/gluon_ab2.py p2=/tmp/ab/p2@auto p3=/tmp/ab/p3@auto p4=/tmp/ab/p4@auto \
  p6=/tmp/ab/p6@auto p0=/tmp/ab/p0@auto ahead16=/tmp/ab/ahead16@auto > "$OUT/gluon_ab.log" 2>&1
echo "== gluon ab exit $?"; grep -v "^\[" "$OUT/gluon_ab.log" | grep -v "programs/SM\|_quantized_blocks_kernel" | tail -45 | cut -c1-170
