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
#if RFA_CPU_TEST_BUILD && RFA_INTEL_EXTENSIONS
#error "RFA_INTEL_EXTENSIONS needs icpx; the CPU test build (AdaptiveCpp) has no sycl::ext::oneapi"
#endif
#if RFA_JOINT_MATRIX && !RFA_INTEL_EXTENSIONS
#error "RFA_JOINT_MATRIX needs RFA_INTEL_EXTENSIONS=1 (icpx, Intel GPUs)"
#endif
