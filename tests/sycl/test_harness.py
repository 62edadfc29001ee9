"""The standalone SYCL harness (benchmarks/sycl_harness.cpp: the kernels with no PyTorch, against its own
float64 host reference) builds with AdaptiveCpp and passes on the CPU, so the GPU run of issue 18 starts
from a harness known to be right. Built at -O0, as the CPU test build (compile time, not speed, matters
here), and cached by the hash of its sources."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from .acpp_build import CACHE_ROOT, REPO, SOURCES, acpp_prefix

HARNESS = REPO / "benchmarks" / "sycl_harness.cpp"
FLAGS = ["-O0", "-std=c++20", "--acpp-targets=omp.accelerated", "-DRFA_CPU_TEST_BUILD=1", f"-I{SOURCES}"]
# 3 dtypes x 2 head dims x 7 mask cases x 7 quantities (forward out/lse, forward-accumulate out/lse, dq/dk/dv)
CHECKS = 3 * 2 * 7 * 7


def _build() -> Path:
    prefix = acpp_prefix()
    digest = hashlib.sha256()
    for path in [HARNESS, *sorted(p for p in SOURCES.iterdir() if p.is_file())]:
        digest.update(path.read_bytes())
    digest.update(" ".join(FLAGS).encode() + str(prefix).encode())
    binary = CACHE_ROOT / f"sycl_harness-{digest.hexdigest()[:16]}"
    if not binary.exists():
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        partial = binary.with_name(f"{binary.name}.partial{os.getpid()}")
        result = subprocess.run([str(prefix / "bin" / "acpp"), *FLAGS, str(HARNESS), "-o", str(partial)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"compiling {HARNESS} failed:\n{result.stderr[-4000:]}"
        partial.replace(binary)
    return binary


def test_standalone_harness_passes_on_the_cpu():
    seed = int.from_bytes(os.urandom(4), "little")
    result = subprocess.run([str(_build()), "--seed", str(seed)], capture_output=True, text=True, timeout=600)
    lines = result.stdout.splitlines()
    failed = [line for line in lines if "FAIL" in line]
    assert result.returncode == 0, "\n".join([f"seed {seed}", *failed, result.stderr[-2000:]])
    assert sum(line.rstrip().endswith("OK") for line in lines) == CHECKS, result.stdout[-3000:]
    assert lines[-1] == "all cases within tolerance: 0 failure(s)"
