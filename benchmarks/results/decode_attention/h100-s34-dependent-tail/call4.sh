# Session 34 call 4: the other GPU tests (end-to-end with CUDA graphs, append, the Triton path) and the kernel benchmark.
export PYTHONUNBUFFERED=1
OUT=$OUT SKIP="profile generate_1 generate_256" TEST_FILTER="not gluon and not tail" TEST_S=250 DECODE_S=175 \
  bash benchmarks/gpu_session.sh 2>&1 | grep -v "^\[" | cut -c1-200 | tail -60
