// Host-side entry points of the SYCL attention kernels (implemented in flash_attn.sycl).
// Callers (ops.cpp) validate shapes and dtypes; these only launch.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace rfa {

struct AttentionOptions {
  double scale;
  bool causal;
  int64_t window_left, window_right;  // -1: unbounded
  int64_t q_offset, k_offset;
  double softcap;  // 0: none
};

// Compiled head dims and lanes per sub-group (see flash_attn.sycl).
bool is_supported_head_dim(int64_t head_dim);
std::string supported_head_dims();
int sub_group_size();

// out [B,Sq,H,D] in q's dtype and lse [B,H,Sq] float32 are written; with `fold`, out/lse
// are running float32 accumulators that this block is merged into instead.
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& options,
                    const at::Tensor& out, const at::Tensor& lse, bool fold);

// dq/dk/dv (same shapes and dtypes as q/k/v) from the global out/lse; dlse is the
// gradient flowing into lse, if any.
void launch_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
                     const AttentionOptions& options, const at::Tensor& dq, const at::Tensor& dk,
                     const at::Tensor& dv);

std::string device_name();
bool device_available();

}  // namespace rfa
