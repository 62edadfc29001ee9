// The SYCL attention kernels (csrc/sycl/flash_attn_kernels.hpp) on their own: no PyTorch, any SYCL device.
//
// For each dtype (float32, float16, bfloat16), head dim (64, 128) and mask case (causal with offsets,
// windows, GQA/MQA, soft-capping, rows that see no key), on fresh random inputs: the forward (out, LSE),
// the forward folded into running accumulators (forward-accumulate) and the backward (dQ, dK, dV from the
// global out/LSE), each against a float64 reference computed on the host, with the tolerances of
// tests/tolerances.py (relative Frobenius error; -inf LSE entries must match exactly). Then, with --time,
// the forward and backward of one larger block, timed on the device queue: ms and TFLOP/s (visible pairs
// only, 4 / 10 flops per pair and head dim for forward / backward, as FlashAttention counts).
//
// Build and run with AdaptiveCpp (benchmarks/sycl_harness.sh), e.g. on this machine's CPU:
//   acpp -O2 --acpp-targets=omp.accelerated -DRFA_CPU_TEST_BUILD=1 -Icsrc/sycl benchmarks/sycl_harness.cpp
// Exit status 0 iff every case is within tolerance.
#include "flash_attn_kernels.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace {

using rfa::Band;
using rfa::BackwardArgs;
using rfa::Bf16Storage;
using rfa::ForwardArgs;
using rfa::LseStrides;
using rfa::Problem;
using rfa::RowStrides;
using rfa::ScoreParams;

struct Case {
  const char* name;
  int64_t batch, heads, heads_k, seqlen_q, seqlen_k;
  bool causal;
  int64_t window_left, window_right, q_offset, k_offset;
  float softcap;
};

const Case kCases[] = {
    {"causal", 1, 4, 2, 40, 40, true, -1, -1, 0, 0, 0.f},
    {"causal-q-later", 2, 4, 1, 37, 70, true, -1, -1, 33, 0, 0.f},
    {"causal-empty-rows", 1, 2, 2, 40, 56, true, -1, -1, 0, 20, 0.f},  // rows 0..19 see no key
    {"window-both-sides", 1, 4, 2, 45, 60, false, 7, 5, 30, 0, 0.f},
    {"sliding-window", 1, 4, 4, 64, 64, true, 9, -1, 16, 0, 0.f},
    {"full-mqa-softcap", 1, 4, 1, 33, 47, false, -1, -1, 0, 0, 5.f},
    {"causal-window-softcap", 2, 2, 1, 50, 50, true, 13, -1, 0, 0, 3.f},
};

// Tolerances of tests/tolerances.py (relative Frobenius error against float64).
struct Tolerance {
  double forward, gradient;
};

template <class T>
Tolerance tolerance() {
  if constexpr (std::is_same_v<T, float>) return {1e-5, 2e-5};
  else if constexpr (std::is_same_v<T, sycl::half>) return {2e-3, 4e-3};
  else return {1.5e-2, 3e-2};
}

template <class T>
const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  else if constexpr (std::is_same_v<T, sycl::half>) return "float16";
  else return "bfloat16";
}

template <class T>
T to_storage(double x) { return rfa::from_float<T>(static_cast<float>(x)); }

template <class T>
double to_double(T x) { return static_cast<double>(rfa::to_float(x)); }

Band band_of(const Case& c) {  // as kernels/mask.py Band.from_kernel_args (and the torch glue)
  Band band;
  band.offset = c.q_offset - c.k_offset;
  band.has_lo = c.causal || c.window_right >= 0;
  band.lo = c.causal ? 0 : -c.window_right;
  band.has_hi = c.window_left >= 0;
  band.hi = c.window_left;
  return band;
}

bool visible(const Band& band, int64_t i, int64_t j) {
  const int64_t d = i - j + band.offset;
  return (!band.has_lo || d >= band.lo) && (!band.has_hi || d <= band.hi);
}

// Relative Frobenius error; entries where the reference is -inf must be -inf too and are left out.
double rel_err(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t n = 0; n < got.size(); ++n) {
    if (std::isinf(want[n]) || std::isinf(got[n])) {
      if (got[n] != want[n]) return std::numeric_limits<double>::infinity();
      continue;
    }
    if (std::isnan(got[n])) return std::numeric_limits<double>::infinity();
    num += (got[n] - want[n]) * (got[n] - want[n]);
    den += want[n] * want[n];
  }
  return std::sqrt(num) / (den > 0 ? std::sqrt(den) : 1.0);
}

// Contiguous [B, S, H, D] and [B, H, S] index helpers.
struct Shape {
  int64_t b, s, h, d;
  int64_t at(int64_t bi, int64_t si, int64_t hi, int64_t di) const { return ((bi * s + si) * h + hi) * d + di; }
  RowStrides strides() const { return {s * h * d, h * d, d}; }
  size_t size() const { return static_cast<size_t>(b * s * h * d); }
};

struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

// Full attention in float64 on the host, on the inputs as the device sees them (rounded to T).
Reference reference(const Case& c, int64_t D, double scale, const std::vector<double>& q, const std::vector<double>& k,
                    const std::vector<double>& v, const std::vector<double>& dout) {
  const Shape qs{c.batch, c.seqlen_q, c.heads, D}, ks{c.batch, c.seqlen_k, c.heads_k, D};
  const Band band = band_of(c);
  const int64_t groups = c.heads / c.heads_k;
  Reference r{std::vector<double>(qs.size()), std::vector<double>(c.batch * c.heads * c.seqlen_q),
              std::vector<double>(qs.size()), std::vector<double>(ks.size()), std::vector<double>(ks.size())};
  std::vector<double> raw(c.seqlen_k), p(c.seqlen_k);
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t h = 0; h < c.heads; ++h) {
      const int64_t hk = h / groups;
      for (int64_t i = 0; i < c.seqlen_q; ++i) {
        double m = -INFINITY;
        for (int64_t j = 0; j < c.seqlen_k; ++j) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += q[qs.at(b, i, h, d)] * k[ks.at(b, j, hk, d)];
          s *= scale;
          raw[j] = s;
          if (c.softcap > 0) s = c.softcap * std::tanh(s / c.softcap);
          p[j] = visible(band, i, j) ? s : -INFINITY;
          m = std::max(m, p[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < c.seqlen_k; ++j) sum += std::isinf(p[j]) ? 0 : std::exp(p[j] - m);
        const double lse = sum > 0 ? m + std::log(sum) : -INFINITY;
        r.lse[(b * c.heads + h) * c.seqlen_q + i] = lse;
        for (int64_t j = 0; j < c.seqlen_k; ++j) p[j] = std::isinf(p[j]) ? 0 : std::exp(p[j] - lse);
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) {
          double o = 0;
          for (int64_t j = 0; j < c.seqlen_k; ++j) o += p[j] * v[ks.at(b, j, hk, d)];
          r.out[qs.at(b, i, h, d)] = o;
          delta += o * dout[qs.at(b, i, h, d)];
        }
        for (int64_t j = 0; j < c.seqlen_k; ++j) {
          if (p[j] == 0) continue;
          double dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += dout[qs.at(b, i, h, d)] * v[ks.at(b, j, hk, d)];
          double ds = p[j] * (dp - delta);
          if (c.softcap > 0) {
            const double t = std::tanh(raw[j] / c.softcap);
            ds *= 1 - t * t;
          }
          for (int64_t d = 0; d < D; ++d) {
            r.dq[qs.at(b, i, h, d)] += scale * ds * k[ks.at(b, j, hk, d)];
            r.dk[ks.at(b, j, hk, d)] += scale * ds * q[qs.at(b, i, h, d)];
            r.dv[ks.at(b, j, hk, d)] += p[j] * dout[qs.at(b, i, h, d)];
          }
        }
      }
    }
  return r;
}

template <class T>
struct DeviceArray {
  sycl::queue& queue;
  T* data;
  size_t size;
  DeviceArray(sycl::queue& q, size_t n) : queue(q), data(sycl::malloc_device<T>(n > 0 ? n : 1, q)), size(n) {}
  ~DeviceArray() { sycl::free(data, queue); }
  DeviceArray(const DeviceArray&) = delete;
  void upload(const std::vector<T>& host) { queue.memcpy(data, host.data(), size * sizeof(T)).wait(); }
  std::vector<T> download() const {
    std::vector<T> host(size);
    queue.memcpy(host.data(), data, size * sizeof(T)).wait();
    return host;
  }
};

template <class T>
std::vector<double> as_double(const std::vector<T>& x) {
  std::vector<double> out(x.size());
  for (size_t n = 0; n < x.size(); ++n) out[n] = to_double(x[n]);
  return out;
}

int failures = 0;

void report(const char* dtype, int D, const char* name, const char* quantity, double error, double tol) {
  const bool ok = error <= tol;
  failures += !ok;
  std::printf("%-9s d%-4d %-22s %-26s %.3e  (tol %.1e)  %s\n", dtype, D, name, quantity, error, tol,
              ok ? "OK" : "FAIL");
}

template <class T, int D>
void check_case(sycl::queue& queue, const Case& c, std::mt19937_64& rng) {
  const Shape qs{c.batch, c.seqlen_q, c.heads, D}, ks{c.batch, c.seqlen_k, c.heads_k, D};
  const size_t lse_size = static_cast<size_t>(c.batch * c.heads * c.seqlen_q);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::normal_distribution<double> normal;
  auto draw = [&](size_t n) {  // in T, so the reference sees exactly the device's inputs
    std::vector<T> x(n);
    for (auto& e : x) e = to_storage<T>(normal(rng));
    return x;
  };
  const std::vector<T> q = draw(qs.size()), k = draw(ks.size()), v = draw(ks.size()), dout = draw(qs.size());
  const Reference ref = reference(c, D, scale, as_double(q), as_double(k), as_double(v), as_double(dout));
  const Tolerance tol = tolerance<T>();
  const char* dtype = dtype_name<T>();
  const Problem problem{c.batch, c.heads, c.heads_k, c.seqlen_q, c.seqlen_k,
                        ScoreParams{static_cast<float>(scale), c.softcap, band_of(c)}};
  const LseStrides lse_strides{c.heads * c.seqlen_q, c.seqlen_q, 1};

  DeviceArray<T> dq_(queue, qs.size()), dk_(queue, ks.size()), dv_(queue, ks.size()), q_(queue, qs.size()),
      k_(queue, ks.size()), v_(queue, ks.size()), dout_(queue, qs.size()), out_(queue, qs.size());
  DeviceArray<float> lse_(queue, lse_size), out_acc_(queue, qs.size()), lse_acc_(queue, lse_size),
      delta_(queue, lse_size);
  q_.upload(q), k_.upload(k), v_.upload(v), dout_.upload(dout);

  // forward
  rfa::submit_forward<T, D>(queue, ForwardArgs<T>{q_.data, k_.data, v_.data, out_.data, nullptr, lse_.data,
                                                  qs.strides(), ks.strides(), ks.strides(), qs.strides(), lse_strides,
                                                  problem, 0, false});
  queue.wait_and_throw();
  report(dtype, D, c.name, "forward out", rel_err(as_double(out_.download()), ref.out), tol.forward);
  report(dtype, D, c.name, "forward lse", rel_err(as_double(lse_.download()), ref.lse), tol.forward);

  // forward-accumulate: fold the block into accumulators holding it once already -> out unchanged,
  // lse + log 2 (the block counted twice), except rows that see nothing (0 and -inf stay)
  std::vector<float> out_host(qs.size()), lse_host(lse_size);
  for (size_t n = 0; n < qs.size(); ++n) out_host[n] = static_cast<float>(ref.out[n]);
  for (size_t n = 0; n < lse_size; ++n) lse_host[n] = static_cast<float>(ref.lse[n]);
  out_acc_.upload(out_host), lse_acc_.upload(lse_host);
  rfa::submit_forward<T, D>(queue, ForwardArgs<T>{q_.data, k_.data, v_.data, nullptr, out_acc_.data, lse_acc_.data,
                                                  qs.strides(), ks.strides(), ks.strides(), qs.strides(), lse_strides,
                                                  problem, 0, true});
  queue.wait_and_throw();
  std::vector<double> lse_twice(ref.lse);
  for (auto& x : lse_twice) x = std::isinf(x) ? x : x + std::log(2.0);
  report(dtype, D, c.name, "forward_accumulate out", rel_err(as_double(out_acc_.download()), ref.out), tol.forward);
  report(dtype, D, c.name, "forward_accumulate lse", rel_err(as_double(lse_acc_.download()), lse_twice), tol.forward);

  // backward from the global (here: the reference) out in float32, as the ring keeps it, and lse
  out_acc_.upload(out_host), lse_acc_.upload(lse_host);
  rfa::submit_backward<T, float, D>(
      queue, BackwardArgs<T>{dout_.data, q_.data, k_.data, v_.data, lse_acc_.data, nullptr, dq_.data, dk_.data,
                             dv_.data, qs.strides(), qs.strides(), ks.strides(), ks.strides(), qs.strides(),
                             ks.strides(), ks.strides(), lse_strides, problem, 0},
      out_acc_.data, qs.strides(), nullptr, delta_.data);
  queue.wait_and_throw();
  report(dtype, D, c.name, "backward dq", rel_err(as_double(dq_.download()), ref.dq), tol.gradient);
  report(dtype, D, c.name, "backward dk", rel_err(as_double(dk_.download()), ref.dk), tol.gradient);
  report(dtype, D, c.name, "backward dv", rel_err(as_double(dv_.download()), ref.dv), tol.gradient);
}

// Forward and backward of one causal block, timed on the queue (median of `reps` after a warm-up).
template <class T, int D>
void time_block(sycl::queue& queue, int64_t seqlen, int64_t heads, int64_t heads_k, int reps) {
  const Shape qs{1, seqlen, heads, D}, ks{1, seqlen, heads_k, D};
  const size_t lse_size = static_cast<size_t>(heads * seqlen);
  DeviceArray<T> q(queue, qs.size()), k(queue, ks.size()), v(queue, ks.size()), dout(queue, qs.size()),
      out(queue, qs.size()), dq(queue, qs.size()), dk(queue, ks.size()), dv(queue, ks.size());
  DeviceArray<float> lse(queue, lse_size), delta(queue, lse_size);
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  for (DeviceArray<T>* x : {&q, &k, &v, &dout}) {
    std::vector<T> host(x->size);
    for (auto& e : host) e = to_storage<T>(normal(rng));
    x->upload(host);
  }
  Case c{"timing", 1, heads, heads_k, seqlen, seqlen, true, -1, -1, 0, 0, 0.f};
  const Problem problem{1, heads, heads_k, seqlen, seqlen,
                        ScoreParams{static_cast<float>(1.0 / std::sqrt(double(D))), 0.f, band_of(c)}};
  const LseStrides lse_strides{heads * seqlen, seqlen, 1};
  auto forward = [&] {
    rfa::submit_forward<T, D>(queue, ForwardArgs<T>{q.data, k.data, v.data, out.data, nullptr, lse.data, qs.strides(),
                                                    ks.strides(), ks.strides(), qs.strides(), lse_strides, problem, 0,
                                                    false});
  };
  auto backward = [&] {
    rfa::submit_backward<T, T, D>(
        queue, BackwardArgs<T>{dout.data, q.data, k.data, v.data, lse.data, nullptr, dq.data, dk.data, dv.data,
                               qs.strides(), qs.strides(), ks.strides(), ks.strides(), qs.strides(), ks.strides(),
                               ks.strides(), lse_strides, problem, 0},
        out.data, qs.strides(), nullptr, delta.data);
  };
  auto median_ms = [&](auto&& fn) {
    fn();
    queue.wait_and_throw();
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      const auto start = std::chrono::steady_clock::now();
      fn();
      queue.wait_and_throw();
      times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
  };
  const double pairs = double(seqlen) * (seqlen + 1) / 2 * heads;  // causal: visible (query, key) pairs
  const double fwd = median_ms(forward), bwd = median_ms(backward);
  std::printf("time %-9s d%-4d seqlen %-6lld heads %lld/%lld causal  forward %.3f ms %.2f TFLOP/s  backward %.3f ms "
              "%.2f TFLOP/s\n", dtype_name<T>(), D, static_cast<long long>(seqlen), static_cast<long long>(heads),
              static_cast<long long>(heads_k), fwd, 4 * pairs * D / fwd / 1e9, bwd, 10 * pairs * D / bwd / 1e9);
}

template <class T>
void check_dtype(sycl::queue& queue, std::mt19937_64& rng) {
  for (const Case& c : kCases) {
    check_case<T, 64>(queue, c, rng);
    check_case<T, 128>(queue, c, rng);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int64_t time_seqlen = 0;
  unsigned long long seed = std::random_device{}();
  for (int a = 1; a < argc; ++a) {
    if (!std::strcmp(argv[a], "--time") && a + 1 < argc) time_seqlen = std::atoll(argv[++a]);
    else if (!std::strcmp(argv[a], "--seed") && a + 1 < argc) seed = std::strtoull(argv[++a], nullptr, 10);
    else {
      std::fprintf(stderr, "usage: %s [--seed N] [--time SEQLEN]\n", argv[0]);
      return 2;
    }
  }
  // The CPU test build runs on the host; any other build needs its GPU (no silent fall-back to the host
  // device, which AdaptiveCpp always offers): gpu_selector_v throws when there is none.
  std::optional<sycl::queue> found;
  try {
#if RFA_CPU_TEST_BUILD
    found.emplace(sycl::cpu_selector_v, sycl::property::queue::in_order{});
#else
    found.emplace(sycl::gpu_selector_v, sycl::property::queue::in_order{});
#endif
  } catch (const sycl::exception& e) {
    std::fprintf(stderr, "no %s device: %s\n", RFA_CPU_TEST_BUILD ? "CPU" : "GPU", e.what());
    return 2;
  }
  sycl::queue& queue = *found;
  const auto device = queue.get_device();
  std::printf("device: %s; sub-group size the kernels are built for: %d; seed %llu\n",
              device.get_info<sycl::info::device::name>().c_str(), rfa::kSubGroupSize, seed);
  if (rfa::kSubGroupSize > 1) {  // the lanes' logic is only right at the sub-group size it was built for
    const auto sizes = device.get_info<sycl::info::device::sub_group_sizes>();
    if (std::find(sizes.begin(), sizes.end(), size_t(rfa::kSubGroupSize)) == sizes.end()) {
      std::fprintf(stderr, "the device does not run sub-groups of %d lanes (RFA_SUB_GROUP_SIZE)\n", rfa::kSubGroupSize);
      return 2;
    }
  }
  std::mt19937_64 rng(seed);
  check_dtype<float>(queue, rng);
  check_dtype<sycl::half>(queue, rng);
  check_dtype<Bf16Storage>(queue, rng);
  if (time_seqlen > 0) {
    time_block<Bf16Storage, 128>(queue, time_seqlen, 32, 8, 10);
    time_block<float, 128>(queue, time_seqlen, 32, 8, 10);
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "all cases within tolerance", failures);
  return failures ? 1 : 0;
}
