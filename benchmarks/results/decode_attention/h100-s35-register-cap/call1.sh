#!/bin/bash
# Session 35 call 1: Gluon kernel alone, head vs key words by prmt (prmt), without loads ahead (na), capped at
# 128 registers (16 programs/SM) and 96 (20/SM); then masked (bool) at three shapes.
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
S=scratch/s35
ROUNDS=3 timeout 380 python3 $S/gluon_ab.py head=$S/head@auto prmt=$S/prmt@auto na=$S/prmt_na@auto na128=$S/prmt_na128@auto na96=$S/prmt_na96@auto 2>&1 | grep -v Warning | tee $OUT/call1.log
MASKED=1 SHAPES=4,1,2 ROUNDS=3 timeout 170 python3 $S/gluon_ab.py head=$S/head@auto prmt=$S/prmt@auto na=$S/prmt_na@auto na128=$S/prmt_na128@auto 2>&1 | grep -v Warning | tee $OUT/call1_masked.log
