# Session 34 call 2: ahead16 GPU tests; Nsight Compute of the op at B8 H32 T32k 2-bit (Gluon kernel + tail).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 150 python3 -P -m pytest -q -p no:cacheprovider -p no:logging -m gpu tests/test_decode_attention.py \
  -k "gluon and 16-1" > $OUT/tests16.log 2>&1; echo "== tests exit $?"; tail -5 $OUT/tests16.log
cd /tmp
for case in "2 8 32 32 32768"; do
  timeout 200 ncu --clock-control none --profile-from-start off \
    --kernel-name regex:"_quantized_blocks_kernel|_decode_attention_kernel" --set full --import-source yes \
    -o $OUT/op2 -f python3 -P $OLDPWD/scratch/s34/ncu_op.py $case > $OUT/ncu_run.log 2>&1
  echo "== ncu exit $?"; grep -v "^==PROF==" $OUT/ncu_run.log | tail -5
done
ncu --import $OUT/op2.ncu-rep --print-details all > $OUT/op2.txt 2>&1
ncu --import $OUT/op2.ncu-rep --page source --csv --print-source sass > $OUT/op2-sass.csv 2>&1
cd - >/dev/null
grep -E "^  [a-z_]|Duration|DRAM Throughput|Memory Throughput|L2 Hit Rate|L1/TEX Hit|Achieved Occupancy|Theoretical Occupancy|Registers Per|Issue Slots Busy|Warp Cycles Per Issued|Issued Warp|No Eligible|Active Warps Per|Eligible Warps|Stall|Block Limit Reg|Waves Per SM|Grid Size|Executed Ipc A" $OUT/op2.txt | head -80
python3 benchmarks/profile_decode_kernel.py opcodes $OUT/op2-sass.csv --top 22
python3 benchmarks/profile_decode_kernel.py loads $OUT/op2-sass.csv
ncu --import $OUT/op2.ncu-rep --page raw --csv > $OUT/op2-raw.csv 2>&1
python3 scratch/s34/raw_metrics.py $OUT/op2-raw.csv
