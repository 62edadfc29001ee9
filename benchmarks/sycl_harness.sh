#!/usr/bin/env bash
# Build and run benchmarks/sycl_harness.cpp (the SYCL kernels on their own, against a float64 reference).
#   benchmarks/sycl_harness.sh                 # this machine's CPU, AdaptiveCpp's OpenMP backend
#   ACPP=/path/to/acpp ACPP_TARGETS=... benchmarks/sycl_harness.sh --time 4096    # another AdaptiveCpp target
# (NVIDIA GPUs: benchmarks/sycl_cuda_bundle.sh builds a bundle with 32-lane sub-groups to carry there.)
# ACPP defaults to the CPU toolchain of ../shared/toolchains/build-adaptivecpp.sh; extra arguments go to
# the harness (--seed N, --time SEQLEN).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
acpp=${ACPP:-$(bash "$root/../shared/toolchains/build-adaptivecpp.sh" | tail -1)/bin/acpp}
targets=${ACPP_TARGETS:-omp.accelerated}
defines=()
[ "$targets" = "omp.accelerated" ] && defines+=(-DRFA_CPU_TEST_BUILD=1)  # one lane per sub-group on the CPU
out=${HARNESS_OUT:-${XDG_CACHE_HOME:-$HOME/.cache}/ring_flash_attn/sycl_harness-$targets}
mkdir -p "$(dirname "$out")"
"$acpp" -O2 -std=c++20 --acpp-targets="$targets" "${defines[@]}" -I"$root/csrc/sycl" \
    "$root/benchmarks/sycl_harness.cpp" -o "$out"
exec "$out" "$@"
