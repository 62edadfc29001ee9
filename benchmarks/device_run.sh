#!/usr/bin/env bash
# One device call: GPU tests, a cuDNN GQA probe, the step parts and the ring-step benchmark.
# Usage (on the device machine, from the repository root): bash benchmarks/device_run.sh [benchmark args...]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
python3 - <<'PY' 2>&1 | tee "$OUT/gqa_probe.txt"
import torch
q = torch.randn(1, 32, 256, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
for name, op in (("cudnn", lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, k, None, True, 0.0, False, False)),
                 ("flash", lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, k, 0.0, False, False))):
    try:
        op(); torch.cuda.synchronize(); print("GQA probe:", name, "accepts 32 query heads over 8 K/V heads")
    except Exception as e:
        print("GQA probe:", name, "rejects GQA:", str(e).splitlines()[0][:200])
PY
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -rs -p no:cacheprovider tests/gpu tests/test_triton_kernels.py -s 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|Error|FAIL|rel|^(sdpa|triton)" | tail -80
timeout ${PARTS_TIMEOUT:-90} python3 benchmarks/step_parts.py --out "$OUT/step_parts.json" 2>&1 | tail -20
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/ring_step.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/ring_step.log" | tail -40
