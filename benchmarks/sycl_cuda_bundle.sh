#!/usr/bin/env bash
# Build benchmarks/sycl_harness.cpp for an NVIDIA GPU (ahead of time, sm_90 = H200/H100) through
# AdaptiveCpp's CUDA backend, on a machine without a GPU or a CUDA toolkit, and pack it with the runtime
# libraries it needs into build/sycl-cuda-bundle.tar.gz, to be unpacked and run on the GPU machine:
#   tar -xzf sycl-cuda-bundle.tar.gz && sycl-cuda-bundle/run.sh --seed 1     (or --time 4096)
# The GPU machine needs only an NVIDIA driver (its libcuda.so.1); no toolkit, no package registry.
#
# Idempotent; every piece is cached under ${XDG_CACHE_HOME:-~/.cache}:
#   1. Debian packages: clang-16 / LLVM-16 (clang 16 knows sm_90), LLVM 14's libomp, cmake, ninja.
#   2. A CUDA 11.8 toolkit layout made from PyPI wheels (pip download, no install):
#      nvidia-cuda-runtime-cu11 (headers, libcudart.so.11.0), nvidia-cuda-nvcc-cu11 (ptxas, libdevice,
#      crt headers) and, from nvidia-cuda-nvcc 13.0 (the first nvcc wheel that has it), `fatbinary`,
#      behind a wrapper that turns clang-16's --image= arguments into the --image3= form fatbinary 13
#      takes. A stub libcuda.so (SONAME libcuda.so.1) for linking only: the driver serves the real one.
#   3. AdaptiveCpp 49544a48 (the source of ../shared/toolchains) with its CUDA and OpenMP backends, in
#      its own prefix (the CPU-only build that CI uses is not touched), no generic/SSCP JIT (that would
#      make the CUDA backend need libLLVM at run time).
#   4. The harness, --acpp-targets=cuda:sm_90, with 32-lane sub-groups (-DRFA_SUB_GROUP_SIZE=32).
#   5. The bundle: the binary, AdaptiveCpp's runtime and backend plugins, libcudart, libomp, run.sh.
# Also writes build/compute-sanitizer.tar.gz (compute-sanitizer from the PyPI wheel) unless
# RFA_NO_SANITIZER=1. About 10 minutes on 2 cores the first time, plus about 1 GiB of packages.
#   usage: benchmarks/sycl_cuda_bundle.sh            (GPU_ARCH=sm_80 etc. to target another GPU)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}
version=49544a48
arch=${GPU_ARCH:-sm_90}
wheels=$cache/sycl-cuda-wheels
cuda=$cache/cuda-11.8-from-wheels
prefix=$cache/adaptivecpp-$version-cuda
build=$root/build
jobs=$(nproc)
log() { echo "== $*" >&2; }

# --- 1. Debian packages ---------------------------------------------------------------------------
# OpenMP from libomp-14-dev, which the CPU toolchain of the tests needs: Debian's libomp-16-dev conflicts
# with it (installing one removes the other), and clang-16 takes LLVM 14's omp.h and libomp.so.5 fine.
pkgs="clang-16 llvm-16-dev libclang-16-dev libomp-14-dev libboost-context-dev libboost-fiber-dev cmake ninja-build unzip patch patchelf python3-pip"
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  log "installing Debian packages: $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq $pkgs >&2
fi

# --- 2. CUDA toolkit layout from PyPI wheels --------------------------------------------------------
wheel_specs=(nvidia-cuda-runtime-cu11==11.8.89 nvidia-cuda-nvcc-cu11==11.8.89 nvidia-cuda-nvcc==13.0.88)
wheel() {  # the cached wheel file of a pip requirement NAME==VERSION
  local name=${1%%==*} ver=${1#*==}
  ls "$wheels"/"${name//-/_}"-"$ver"-*.whl 2>/dev/null | head -1
}
mkdir -p "$wheels"
for spec in "${wheel_specs[@]}"; do
  if [ -z "$(wheel "$spec")" ]; then
    log "pip download $spec"
    python3 -m pip download --no-deps -q -d "$wheels" "$spec" >&2
  fi
done

if [ ! -e "$cuda/.complete" ]; then
  log "assembling a CUDA 11.8 toolkit layout in $cuda"
  rm -rf "$cuda"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  for spec in "${wheel_specs[@]}"; do unzip -q -o "$(wheel "$spec")" -d "$tmp"; done
  mkdir -p "$cuda/bin" "$cuda/include" "$cuda/lib64/stubs" "$cuda/nvvm"
  cp -r "$tmp/nvidia/cuda_runtime/include/." "$tmp/nvidia/cuda_nvcc/include/." "$cuda/include/"
  rm -f "$cuda/include/__init__.py"
  cp "$tmp/nvidia/cuda_runtime/lib/libcudart.so.11.0" "$cuda/lib64/"
  ln -s libcudart.so.11.0 "$cuda/lib64/libcudart.so"
  cp "$tmp/nvidia/cuda_nvcc/bin/ptxas" "$cuda/bin/"
  cp -r "$tmp/nvidia/cuda_nvcc/nvvm/libdevice" "$cuda/nvvm/"
  cp "$tmp/nvidia/cu13/bin/fatbinary" "$cuda/bin/fatbinary-cuda13"
  chmod +x "$cuda/bin/ptxas" "$cuda/bin/fatbinary-cuda13"
  rm -rf "$tmp"
  echo "CUDA Version 11.8.89" >"$cuda/version.txt"  # how CMake's FindCUDAToolkit knows it without nvcc
  # clang's CUDA wrapper header includes this cuRAND header (for its host-side redeclarations only);
  # nothing here uses cuRAND, whose wheel is large.
  echo "// placeholder for clang's __clang_cuda_runtime_wrapper.h: cuRAND is not used" \
    >"$cuda/include/curand_mtgp32_kernel.h"
  # For linking only (AdaptiveCpp's CUDA backend calls these driver functions); never shipped.
  cat >"$cuda/lib64/stubs/libcuda_stub.c" <<'EOF'
int cuModuleLoadDataEx(void) { return 999; }
int cuModuleGetFunction(void) { return 999; }
int cuLaunchKernel(void) { return 999; }
int cuModuleUnload(void) { return 999; }
EOF
  clang-16 -shared -fPIC -Wl,-soname,libcuda.so.1 "$cuda/lib64/stubs/libcuda_stub.c" -o "$cuda/lib64/stubs/libcuda.so"
  touch "$cuda/.complete"
fi

# Written on every run (not part of the one-time layout above), so that a change here takes effect.
cat >"$cuda/bin/fatbinary" <<'EOF'
#!/usr/bin/env bash
# clang-16 calls fatbinary with --image=profile=sm_NN,file=F (cubin) and --image=profile=compute_NN,file=F
# (PTX); the CUDA 13 fatbinary takes only --image3=kind=elf|ptx,sm=NN,file=F. Uncompressed images, as
# older fatbinary versions wrote them (the CUDA 11.8 runtime registers this fatbinary).
args=(--compress=false)
for a in "$@"; do
  case "$a" in
    --image=profile=sm_*) r=${a#--image=profile=sm_}; args+=("--image3=kind=elf,sm=${r%%,*},${r#*,}") ;;
    --image=profile=compute_*) r=${a#--image=profile=compute_}; args+=("--image3=kind=ptx,sm=${r%%,*},${r#*,}") ;;
    *) args+=("$a") ;;
  esac
done
exec "$(dirname "$0")/fatbinary-cuda13" "${args[@]}"
EOF
chmod +x "$cuda/bin/fatbinary"

# omp.h of LLVM 14 on its own, for clang-16 (LLVM 14's include directory also holds clang-14's builtin
# headers, which must not shadow clang-16's).
omp_include=$cache/openmp-14-for-clang-16/include
omp_lib=/usr/lib/llvm-14/lib
mkdir -p "$omp_include"
ln -sf /usr/lib/llvm-14/lib/clang/14.0.6/include/omp.h "$omp_include/omp.h"

# --- 3. AdaptiveCpp with the CUDA backend -----------------------------------------------------------
acpp_works() {  # a kernel for $arch compiles and links (no GPU here to run it); the CPU backend runs one
  [ -x "$prefix/bin/acpp" ] || return 1
  local t rc=0; t=$(mktemp -d)
  printf '#include <sycl/sycl.hpp>\nint main(){sycl::queue q;int*p=sycl::malloc_shared<int>(1,q);q.single_task([=]{*p=42;}).wait();int r=*p;sycl::free(p,q);return r==42?0:1;}\n' >"$t/t.cpp"
  "$prefix/bin/acpp" -O1 --acpp-targets="cuda:$arch" "$t/t.cpp" -o "$t/gpu" >/dev/null 2>&1 || rc=1
  "$prefix/bin/acpp" -O1 --acpp-targets=omp.accelerated "$t/t.cpp" -o "$t/cpu" >/dev/null 2>&1 && "$t/cpu" || rc=1
  rm -rf "$t"; return $rc
}
if ! acpp_works; then
  log "building AdaptiveCpp $version with the CUDA backend into $prefix"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  tar -xzf "$root/../shared/toolchains/adaptivecpp-$version.tar.gz" -C "$work"
  cmake -S "$work/AdaptiveCpp-$version" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$prefix" -DLLVM_DIR=/usr/lib/llvm-16/cmake \
    -DCMAKE_C_COMPILER=clang-16 -DCMAKE_CXX_COMPILER=clang++-16 \
    -DCLANG_EXECUTABLE_PATH=/usr/bin/clang++-16 \
    -DCUDAToolkit_ROOT="$cuda" -DWITH_CUDA_BACKEND=ON -DWITH_ROCM_BACKEND=OFF \
    -DWITH_OPENCL_BACKEND=OFF -DWITH_LEVEL_ZERO_BACKEND=OFF \
    -DWITH_SSCP_COMPILER=OFF -DWITH_STDPAR_COMPILER=OFF -DWITH_ACCELERATED_CPU=ON \
    -DDEFAULT_TARGETS="cuda:$arch" \
    -DOpenMP_CXX_FLAGS="-fopenmp -I$omp_include" -DOpenMP_CXX_LIB_NAMES=omp \
    -DOpenMP_C_FLAGS="-fopenmp -I$omp_include" -DOpenMP_C_LIB_NAMES=omp \
    -DOpenMP_omp_LIBRARY="$omp_lib/libomp.so" \
    -DOMP_CXX_FLAGS="-I/usr/include -fopenmp -I$omp_include -D_ENABLE_EXTENDED_ALIGNED_STORAGE" \
    -DOMP_LINK_LINE="-L/usr/lib/x86_64-linux-gnu -lboost_context -lboost_fiber -Wl,-rpath=/usr/lib/x86_64-linux-gnu -fopenmp -L$omp_lib" \
    >&2
  nice -n 10 ninja -C "$work/build" -j"$jobs" install >&2
  rm -rf "$work"
  acpp_works || { echo "AdaptiveCpp built but a test kernel for cuda:$arch did not compile" >&2; exit 1; }
fi
# The one source change AdaptiveCpp needs here (header only, so applied to the installed copy):
# benchmarks/adaptivecpp-cuda-dynamic-shared.patch says why.
launch_header=$prefix/include/AdaptiveCpp/hipSYCL/glue/generic/hiplike/clang.hpp
if ! grep -q "ring_flash_attn build patch" "$launch_header"; then
  log "patching $launch_header (dynamic shared memory above 48 KiB)"
  patch -s -p1 -d "$prefix/include/AdaptiveCpp" <"$root/benchmarks/adaptivecpp-cuda-dynamic-shared.patch"
fi

# --- 4. The harness: NVIDIA (32-lane sub-groups), and the CPU build of the same source ---------------
out=$build/sycl-cuda
mkdir -p "$out"
flags=(-O2 -std=c++20 -I"$root/csrc/sycl" -Wno-unknown-cuda-version -Wl,-rpath,'$ORIGIN/../lib')
log "compiling the harness for cuda:$arch (about 1 minute)"
nice -n 10 "$prefix/bin/acpp" "${flags[@]}" --acpp-targets="cuda:$arch" -DRFA_SUB_GROUP_SIZE=32 \
  -Wno-unknown-attributes "$root/benchmarks/sycl_harness.cpp" -o "$out/sycl_harness"
# The same harness on the CPU (OpenMP backend, one lane): run.sh --cpu checks on any machine that the
# bundle's runtime loads and computes, before the GPU is blamed.
log "compiling the harness for the CPU (about 2 minutes)"
nice -n 10 "$prefix/bin/acpp" "${flags[@]}" --acpp-targets=omp.accelerated -DRFA_CPU_TEST_BUILD=1 \
  "$root/benchmarks/sycl_harness.cpp" -o "$out/sycl_harness_cpu"

# --- 5. The bundle ------------------------------------------------------------------------------------
stage=$build/sycl-cuda-bundle
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/lib/hipSYCL"
cp "$out/sycl_harness" "$out/sycl_harness_cpu" "$stage/bin/"
cp "$prefix/lib/libacpp-rt.so" "$prefix/lib/libacpp-common.so" "$stage/lib/"
# libacpp-rt dlopens its backends from hipSYCL/ beside itself.
cp "$prefix/lib/hipSYCL/librt-backend-cuda.so" "$prefix/lib/hipSYCL/librt-backend-omp.so" "$stage/lib/hipSYCL/"
# Every other library they load, except glibc's own and the driver's libcuda.so.1 (never the stub).
# libstdc++ goes too: Debian 12's needs GLIBCXX_3.4.30, which an older system may lack.
for elf in "$stage"/bin/* "$stage"/lib/*.so "$stage"/lib/hipSYCL/*.so; do
  ldd "$elf" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
  case "$name" in
    libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*|libcuda.so.*) continue ;;
  esac
  [ -e "$stage/lib/$name" ] || [ -e "$stage/lib/hipSYCL/$name" ] || cp -L "$path" "$stage/lib/$name"
done
# Library paths inside the bundle only (the ones acpp recorded point into this machine's caches).
patchelf --set-rpath '$ORIGIN/../lib' "$stage"/bin/*
for lib in "$stage"/lib/*.so*; do patchelf --set-rpath '$ORIGIN' "$lib"; done
for lib in "$stage"/lib/hipSYCL/*.so; do patchelf --set-rpath '$ORIGIN/..' "$lib"; done
cat >"$stage/run.sh" <<'RUN'
#!/usr/bin/env bash
# The SYCL attention kernels' harness (benchmarks/sycl_harness.cpp of ring_flash_attn) for NVIDIA GPUs,
# built by benchmarks/sycl_cuda_bundle.sh (AdaptiveCpp, CUDA backend, 32-lane sub-groups).
#   run.sh [--seed N] [--time SEQLEN]          on the GPU (needs the NVIDIA driver's libcuda.so.1)
#   run.sh --cpu [--seed N]                    the same checks on the CPU (AdaptiveCpp's OpenMP backend)
# Exit status 0 iff every case is within tolerance. ACPP_DEBUG_LEVEL=3 shows what the runtime loads.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ACPP_APPDB_DIR=${ACPP_APPDB_DIR:-${TMPDIR:-/tmp}/acpp-appdb-$(id -u)}  # AdaptiveCpp's kernel cache
if [ "${1:-}" = "--cpu" ]; then
  shift
  exec "$here/bin/sycl_harness_cpu" "$@"
fi
exec "$here/bin/sycl_harness" "$@"  # takes the GPU (gpu_selector_v) or fails
RUN
chmod +x "$stage/run.sh"
cat >"$stage/BUILD-INFO.txt" <<INFO
Built by benchmarks/sycl_cuda_bundle.sh at $(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown) on $(date -u +%Y-%m-%dT%H:%MZ).
Harness: --acpp-targets=cuda:$arch (SASS for $arch and PTX, in a fatbinary), -DRFA_SUB_GROUP_SIZE=32, -O2.
AdaptiveCpp $version (clang $(clang-16 --version | head -1 | grep -o '[0-9][0-9.]*' | head -1)), CUDA 11.8.89 runtime/ptxas from PyPI wheels,
fatbinary from nvidia-cuda-nvcc 13.0.88. libcuda.so.1 is NOT included: the GPU machine's driver provides it.
sycl_harness_cpu: the same source for the CPU (omp.accelerated, one lane per sub-group).
INFO
tar -C "$build" -czf "$build/sycl-cuda-bundle.tar.gz" sycl-cuda-bundle
log "bundle contents:"
(cd "$stage" && find . -type f -printf '%10s  %p\n' | sort -k2) >&2
size=$(stat -c %s "$build/sycl-cuda-bundle.tar.gz")
log "$build/sycl-cuda-bundle.tar.gz: $size bytes ($((size / 1024 / 1024)) MiB compressed)"
[ "$size" -lt $((50 * 1024 * 1024)) ] || { echo "the bundle is over 50 MiB" >&2; exit 1; }

# --- 6. compute-sanitizer, a separate archive ------------------------------------------------------
if [ "${RFA_NO_SANITIZER:-0}" != 1 ]; then
  sanitizer_spec=nvidia-cuda-sanitizer-api==13.0.85  # CUDA 13, like the GPU machine's driver
  [ -n "$(wheel "$sanitizer_spec")" ] || python3 -m pip download --no-deps -q -d "$wheels" "$sanitizer_spec" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  unzip -q -o "$(wheel "$sanitizer_spec")" -d "$tmp"
  # The toolkit's layout: the binary and its libraries in one directory.
  mkdir -p "$tmp/compute-sanitizer"
  cp -n "$tmp"/nvidia/cu13/bin/compute-sanitizer "$tmp"/nvidia/cu13/bin/*.so "$tmp"/nvidia/cu13/lib/*.so \
    "$tmp/compute-sanitizer/"
  "$tmp/compute-sanitizer/compute-sanitizer" --version >&2
  tar -C "$tmp" -czf "$build/compute-sanitizer.tar.gz" compute-sanitizer
  rm -rf "$tmp"
  size=$(stat -c %s "$build/compute-sanitizer.tar.gz")
  log "$build/compute-sanitizer.tar.gz: $size bytes"
fi
echo "$build/sycl-cuda-bundle.tar.gz"
