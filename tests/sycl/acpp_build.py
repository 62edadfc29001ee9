"""Build the CPU flavour of the SYCL kernels with AdaptiveCpp, once per source hash.

The kernels in csrc/sycl are compiled with ``-DRFA_CPU_TEST_BUILD=1`` for
AdaptiveCpp's OpenMP backend and registered for CPU tensors, so the tests run the
real kernels through the same Python path (the ``sycl`` backend) as on XPU.

AdaptiveCpp comes from ``$RFA_ACPP_PREFIX`` or ``<repo>/../shared/toolchains/build-adaptivecpp.sh``
(which builds it once, ~3 min, and prints its prefix). A missing toolchain fails
the tests under CI (``CI=true``) and skips them with the reason elsewhere; a
compile error always fails them.

An interrupted build (a killed test run) leaves ``torch.utils.cpp_extension``'s
``lock`` file in the build directory, and every later ``load`` would wait on it
forever. Builds therefore run under an OS file lock (``build.flock``, released by
the kernel when its holder dies): whoever holds it knows any ``lock`` file is
stale, removes it, and builds; a concurrent run waits for the live build only.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SOURCES = REPO / "csrc" / "sycl"
ACPP_SCRIPT = REPO.parent / "shared" / "toolchains" / "build-adaptivecpp.sh"
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ring_flash_attn"
# -O0: this build checks the kernels' arithmetic, not their speed. It compiles in about 35 s on CI's 2 cores
# (-O2: about 115 s, a fifth of the suite's time budget), and the tests' small blocks still run in under a second.
CFLAGS = ["--acpp-targets=omp.accelerated", "-O0", "-DRFA_CPU_TEST_BUILD=1"]
LDFLAGS = ["--acpp-targets=omp.accelerated"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_toolchain(reason: str):
    """Fail under CI (a CI run must exercise the kernels), skip with the reason elsewhere."""
    if _in_ci():
        pytest.fail(f"SYCL CPU test build (required under CI): {reason}", pytrace=False)
    pytest.skip(f"SYCL CPU test build: {reason}")


def acpp_prefix() -> Path:
    prefix = os.environ.get("RFA_ACPP_PREFIX")
    if not prefix:
        if not ACPP_SCRIPT.exists():
            missing_toolchain(f"no $RFA_ACPP_PREFIX and no {ACPP_SCRIPT}")
        result = subprocess.run(["bash", str(ACPP_SCRIPT)], capture_output=True, text=True)
        if result.returncode != 0:
            missing_toolchain(f"{ACPP_SCRIPT} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        prefix = result.stdout.strip().splitlines()[-1]
    acpp = Path(prefix) / "bin" / "acpp"
    if not acpp.exists():
        missing_toolchain(f"no AdaptiveCpp compiler at {acpp}")
    if shutil.which("ninja") is None:
        missing_toolchain("no ninja on PATH (torch.utils.cpp_extension builds with it): "
                          "apt-get install ninja-build, or pip install ninja")
    return Path(prefix)


def _source_hash(prefix: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    digest.update(str(prefix).encode())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:16]


def build_exclusively(build_dir: Path, build):
    """``build()`` (a cpp_extension ``load`` into ``build_dir``) while holding ``build_dir/build.flock``; a
    ``lock`` file left by an interrupted build is removed first (see the module docstring)."""
    with open(build_dir / "build.flock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # released when this process ends, however it ends
        stale = build_dir / "lock"
        if stale.exists():
            print(f"\nSYCL CPU test build: removing {stale}, left by an interrupted build")
            stale.unlink()
        return build()


def build_cpu_extension():
    """Compile (or load the cached) CPU test build; returns the loaded module."""
    from torch.utils.cpp_extension import load

    prefix = acpp_prefix()
    build_dir = CACHE_ROOT / f"sycl-{_source_hash(prefix)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # cpp_extension sends *.sycl to icpx; acpp compiles the same file as a .cpp.
    kernel_source = build_dir / "flash_attn_sycl.cpp"
    if not kernel_source.exists():
        shutil.copyfile(SOURCES / "flash_attn.sycl", kernel_source)
    saved = {name: os.environ.get(name) for name in ("CXX", "MAX_JOBS")}
    os.environ["CXX"] = str(prefix / "bin" / "acpp")
    os.environ["MAX_JOBS"] = "2"
    started = time.perf_counter()
    try:
        module = build_exclusively(build_dir, lambda: load(
            name="ring_flash_attn_sycl_cpu_test", sources=[str(SOURCES / "ops.cpp"), str(kernel_source)],
            extra_cflags=CFLAGS + [f"-I{SOURCES}"], extra_ldflags=LDFLAGS, build_directory=str(build_dir),
            verbose=False))
    except Exception as error:  # the toolchain is there, so this is a bug in the sources: always a failure
        pytest.fail(f"compiling {SOURCES} with {prefix}/bin/acpp failed: {error}", pytrace=False)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    print(f"\nSYCL CPU test build ready in {time.perf_counter() - started:.1f} s ({build_dir})")
    return module
