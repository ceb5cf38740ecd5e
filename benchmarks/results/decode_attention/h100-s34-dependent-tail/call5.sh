# Session 34 call 5: the tail started early inside a CUDA graph (new GPU test), then generate at batch 128
# (Gluon path + dependent tail + CUDA-graph decode steps in a Llama-2-7B-shaped model) against fp16.
export PYTHONUNBUFFERED=1
OUT=$OUT SKIP="decode_attention profile" TESTS="-m gpu tests/test_decode_attention.py" TEST_FILTER="started_early" \
  TEST_S=100 GENERATE_S=320 bash benchmarks/gpu_session.sh 128 2>&1 | grep -v "^\[" | cut -c1-220 | tail -45
