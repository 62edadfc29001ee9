#!/usr/bin/env bash
# One device call: the ring-step benchmark, the step parts, then the GPU tests.
# Usage (on the device machine, from the repository root): bash benchmarks/device_run.sh [benchmark args...]
# TESTS selects the pytest targets/options (default: all GPU tests and the Triton kernel tests, compiled).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
timeout ${PARTS_TIMEOUT:-90} python3 benchmarks/step_parts.py --out "$OUT/step_parts.json" 2>&1 | tee "$OUT/step_parts.log" | tail -30
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/ring_step.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/ring_step.log" | tail -25
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -rs -p no:cacheprovider -s ${TESTS:-tests/gpu tests/test_triton_kernels.py} 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error|^FAILED" | tail -30
