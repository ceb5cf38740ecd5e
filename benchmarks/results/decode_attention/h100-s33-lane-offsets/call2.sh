# Session 32, call 2: every Gluon GPU test, then the kernel benchmark, on the working tree.
export PYTHONUNBUFFERED=1
git diff --stat HEAD
OUT=$OUT SKIP="profile generate_1 generate_256" TESTS="-m gpu tests/test_decode_attention.py" \
  TEST_FILTER="gluon" TEST_S=260 DECODE_S=170 bash benchmarks/gpu_session.sh
