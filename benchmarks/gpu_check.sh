#!/usr/bin/env bash
# One device call: install the package offline, then run the given pytest selection under the GPU
# machine's torch (GPU-marked tests included) and save the log under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout "${PYTEST_TIMEOUT:-480}" python3 -m pytest -q -p no:logging -p no:benchmark --durations=15 "$@" 2>&1 | tee "${OUT:-/tmp}/pytest.log" | tail -45
