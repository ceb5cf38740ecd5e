# Session 32, call 3: the other decode, append and end-to-end GPU tests on the working tree.
export PYTHONUNBUFFERED=1
OUT=$OUT SKIP="decode_attention profile generate_1 generate_256" \
  TESTS="-m gpu tests/test_decode_attention.py tests/test_append.py tests/test_gpu_end_to_end.py" \
  TEST_FILTER="not gluon" TEST_S=${TEST_S:-330} bash benchmarks/gpu_session.sh
