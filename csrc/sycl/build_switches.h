// The compile-time switches of the SYCL kernels (described in flash_attn_kernels.hpp), their defaults and
// the combinations that cannot work, for every source of the extension (kernels, torch glue, op registration).
#pragma once

#ifndef RFA_CPU_TEST_BUILD
#define RFA_CPU_TEST_BUILD 0
#endif
#ifndef RFA_INTEL_EXTENSIONS
#define RFA_INTEL_EXTENSIONS 0
#endif
#ifndef RFA_JOINT_MATRIX
#define RFA_JOINT_MATRIX 0
#endif
// Lanes per sub-group that the kernels are written for (kSubGroupSize): 1 on the CPU test build
// (AdaptiveCpp's OpenMP backend has no wider sub-groups), 16 otherwise (Intel PVC/BMG); 32 for NVIDIA
// warps through AdaptiveCpp's CUDA backend (benchmarks/sycl_cuda_bundle.sh).
#ifndef RFA_SUB_GROUP_SIZE
#if RFA_CPU_TEST_BUILD
#define RFA_SUB_GROUP_SIZE 1
#else
#define RFA_SUB_GROUP_SIZE 16
#endif
#endif
#if RFA_SUB_GROUP_SIZE != 1 && RFA_SUB_GROUP_SIZE != 16 && RFA_SUB_GROUP_SIZE != 32
#error "RFA_SUB_GROUP_SIZE must be 1, 16 or 32 (the kernels' tiles of 32 keys or rows split evenly over the lanes)"
#endif
#if RFA_CPU_TEST_BUILD && RFA_SUB_GROUP_SIZE != 1
#error "RFA_CPU_TEST_BUILD=1 needs RFA_SUB_GROUP_SIZE=1: AdaptiveCpp's OpenMP backend runs sub-groups of one lane"
#endif
#if RFA_JOINT_MATRIX && RFA_SUB_GROUP_SIZE != 16
#error "RFA_JOINT_MATRIX needs RFA_SUB_GROUP_SIZE=16 (the joint_matrix shapes of PVC/BMG)"
#endif
#if RFA_CPU_TEST_BUILD && RFA_INTEL_EXTENSIONS
#error "RFA_INTEL_EXTENSIONS needs icpx; the CPU test build (AdaptiveCpp) has no sycl::ext::oneapi"
#endif
#if RFA_JOINT_MATRIX && !RFA_INTEL_EXTENSIONS
#error "RFA_JOINT_MATRIX needs RFA_INTEL_EXTENSIONS=1 (icpx, Intel GPUs)"
#endif
