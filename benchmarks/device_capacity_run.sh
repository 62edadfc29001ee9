#!/usr/bin/env bash
# One device call for the memory work (issue 24): the GPU memory tests, then benchmarks/capacity.py.
# Usage (on the device machine, repository root): bash benchmarks/device_capacity_run.sh [capacity.py args...]
# TESTS: pytest targets (default tests/gpu/test_memory_gpu.py; "none" skips them).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cudnn', torch.backends.cudnn.version())"
free -g | head -2
if [ "${TESTS:-}" != none ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -rs -p no:cacheprovider ${TESTS:-tests/gpu/test_memory_gpu.py} 2>&1 \
    | tee "$OUT/gpu_memory_tests.log" | tail -15
fi
timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/capacity.py "$@" 2>&1 | tee "$OUT/capacity.log" | tail -45
