// Torch op registration for the SYCL attention kernels: argument checks, output
// allocation through PyTorch's allocator, and the pybind11 module with device info.
// Fake (meta) kernels and autograd are registered from Python
// (ring_flash_attn/kernels/sycl.py).
#include "build_switches.h"
#include "flash_attn.h"

#include <torch/extension.h>

#include <tuple>

namespace {

rfa::AttentionOptions options_of(double scale, bool causal, int64_t window_left, int64_t window_right,
                                 int64_t q_offset, int64_t k_offset, double softcap) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "window: expected values >= -1 (-1 = unbounded), got (", window_left, ", ", window_right, ")");
  TORCH_CHECK(softcap >= 0.0, "softcap: expected >= 0 (0 = none), got ", softcap);
  return {scale, causal, window_left, window_right, q_offset, k_offset, softcap};
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "q: expected [batch, seqlen_q, heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k: expected [batch, seqlen_k, heads_k, head_dim], got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), "k: expected batch ", q.size(0), " (q's), got ", k.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), "k: expected head_dim ", q.size(3), " (q's), got ", k.size(3));
  TORCH_CHECK(rfa::is_supported_head_dim(q.size(3)), "head_dim: the SYCL kernels support ",
              rfa::supported_head_dims(), ", got ", q.size(3));
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "k: expected heads_k dividing heads (", q.size(2),
              "), got ", k.size(2));
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "q: expected float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "k, v: expected q's dtype ", dtype, ", got ",
              k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "k, v: expected q's device ", q.device(),
              ", got ", k.device(), " and ", v.device());
}

void check_lse_like(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(2) && t.size(2) == q.size(1), name,
              ": expected [batch, heads, seqlen_q] = [", q.size(0), ", ", q.size(2), ", ", q.size(1), "], got ",
              t.sizes());
  TORCH_CHECK(t.device() == q.device(), name, ": expected q's device ", q.device(), ", got ", t.device());
}

// The kernels take any batch/sequence/head strides but need each head_dim row contiguous.
at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                       bool causal, int64_t window_left, int64_t window_right, int64_t q_offset,
                                       int64_t k_offset, double softcap) {
  check_qkv(q, k, v);
  const auto options = options_of(scale, causal, window_left, window_right, q_offset, k_offset, softcap);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  rfa::launch_forward(rows_contiguous(q), rows_contiguous(k), rows_contiguous(v), options, out, lse, false);
  return {out, lse};
}

void fwd_accumulate(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out_acc,
                    const at::Tensor& lse_acc, double scale, bool causal, int64_t window_left, int64_t window_right,
                    int64_t q_offset, int64_t k_offset, double softcap) {
  check_qkv(q, k, v);
  const auto options = options_of(scale, causal, window_left, window_right, q_offset, k_offset, softcap);
  TORCH_CHECK(out_acc.scalar_type() == at::kFloat, "out_acc: expected float32, got ", out_acc.scalar_type());
  TORCH_CHECK(out_acc.sizes() == q.sizes(), "out_acc: expected q's shape ", q.sizes(), ", got ", out_acc.sizes());
  TORCH_CHECK(out_acc.device() == q.device(), "out_acc: expected q's device ", q.device(), ", got ",
              out_acc.device());
  TORCH_CHECK(out_acc.stride(3) == 1, "out_acc: expected contiguous head_dim rows (updated in place), got strides ",
              out_acc.strides());
  check_lse_like("lse_acc", lse_acc, q);
  rfa::launch_forward(rows_contiguous(q), rows_contiguous(k), rows_contiguous(v), options, out_acc, lse_acc, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                   const std::optional<at::Tensor>& dlse, double scale, bool causal,
                                                   int64_t window_left, int64_t window_right, int64_t q_offset,
                                                   int64_t k_offset, double softcap) {
  check_qkv(q, k, v);
  const auto options = options_of(scale, causal, window_left, window_right, q_offset, k_offset, softcap);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(), "dout: expected q's shape ",
              q.sizes(), " and dtype ", q.scalar_type(), ", got ", dout.sizes(), " ", dout.scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes(), "out: expected q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() || out.scalar_type() == at::kFloat,
              "out: expected q's dtype or float32, got ", out.scalar_type());
  TORCH_CHECK(dout.device() == q.device() && out.device() == q.device(), "dout, out: expected q's device ",
              q.device());
  check_lse_like("lse", lse, q);
  std::optional<at::Tensor> dlse_contiguous;
  if (dlse) {
    check_lse_like("dlse", *dlse, q);
    dlse_contiguous = dlse->contiguous();
  }
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  rfa::launch_backward(rows_contiguous(dout), rows_contiguous(q), rows_contiguous(k), rows_contiguous(v),
                       rows_contiguous(out), lse, dlse_contiguous, options, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(ring_flash_attn_sycl, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal, int window_left, int window_right, "
      "int q_offset, int k_offset, float softcap) -> (Tensor out, Tensor lse)");
  m.def(
      "fwd_accumulate(Tensor q, Tensor k, Tensor v, Tensor(a!) out_acc, Tensor(b!) lse_acc, float scale, "
      "bool causal, int window_left, int window_right, int q_offset, int k_offset, float softcap) -> ()");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, float scale, "
      "bool causal, int window_left, int window_right, int q_offset, int k_offset, float softcap) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

// The real build runs on Intel GPUs; the AdaptiveCpp test build serves CPU tensors.
#if RFA_CPU_TEST_BUILD
TORCH_LIBRARY_IMPL(ring_flash_attn_sycl, CPU, m) {
#else
TORCH_LIBRARY_IMPL(ring_flash_attn_sycl, XPU, m) {
#endif
  m.impl("fwd", &fwd);
  m.impl("fwd_accumulate", &fwd_accumulate);
  m.impl("bwd", &bwd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("is_available", &rfa::device_available, "True if a device this build runs on is present.");
  m.def(
      "device_info",
      []() {
        pybind11::dict info;
        info["build"] = RFA_CPU_TEST_BUILD ? "cpu-test" : "xpu";
        info["device_type"] = RFA_CPU_TEST_BUILD ? "cpu" : "xpu";
        info["device"] = rfa::device_available() ? rfa::device_name() : std::string();
        info["sub_group_size"] = rfa::sub_group_size();
        info["head_dims"] = pybind11::make_tuple(64, 128);
        info["intel_extensions"] = static_cast<bool>(RFA_INTEL_EXTENSIONS);
        info["joint_matrix"] = static_cast<bool>(RFA_JOINT_MATRIX);
        return info;
      },
      "What this build of the kernels is for and runs on.");
}
