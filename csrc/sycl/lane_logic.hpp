// Per-row attention math written once for every "lane group".
//
// A lane group is a set of `Lanes::size` lanes that run the same code in lock step
// and exchange registers (a SYCL sub-group on the device; 16 lanes on PVC/BMG, 1 on
// AdaptiveCpp's OpenMP backend). Everything here is plain C++ over a `Lanes` policy:
//
//   static constexpr int size;             // lanes in the group
//   int lane() const;                      // this lane's index, 0 <= lane < size
//   float shuffle_xor(float, int) const;   // value held by lane ^ mask
//   float broadcast(float, int) const;     // value held by lane src
//
// so that the kernels (csrc/sycl/flash_attn.sycl, sub-group lanes) and the host
// emulation in tests/sycl/lane_emulation.cpp (16 threads as lanes) run the same
// functions. The CPU build of the kernels only ever has one lane; the emulation is
// what checks the cross-lane logic at the Intel sub-group size.
//
// Work split inside a lane group, for one query row (forward, dQ) or one key row
// (dK/dV): to compute scores the lanes split the keys (or query rows) of a tile,
// each lane doing whole dot products; to accumulate outputs the lanes split the
// head dimension (lane owns dims lane, lane + size, ...), and each probability is
// broadcast from the lane that computed it.
#pragma once

#include <cstdint>
#include <limits>

#if defined(SYCL_LANGUAGE_VERSION)
#include <sycl/sycl.hpp>
namespace rfa::math {
using sycl::exp;
using sycl::fmax;
using sycl::log;
using sycl::tanh;
}  // namespace rfa::math
#else
#include <cmath>
namespace rfa::math {
using std::exp;
using std::fmax;
using std::log;
using std::tanh;
}  // namespace rfa::math
#endif

namespace rfa {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Keys visible to a query row: lo <= (q_offset + i) - (k_offset + j) <= hi, a bound
// being absent when unbounded (ring_flash_attn/kernels/mask.py, Band).
struct Band {
  int64_t offset = 0;  // q_offset - k_offset
  int64_t lo = 0, hi = 0;
  bool has_lo = false, has_hi = false;

  bool visible(int64_t row, int64_t key) const {
    const int64_t d = offset + row - key;
    return (!has_lo || d >= lo) && (!has_hi || d <= hi);
  }

  // [begin, end) of the keys that any row in [row_begin, row_end) may see, within [0, seqlen_k).
  void key_range(int64_t row_begin, int64_t row_end, int64_t seqlen_k, int64_t& begin, int64_t& end) const {
    begin = has_hi ? offset + row_begin - hi : 0;
    end = has_lo ? offset + row_end - lo : seqlen_k;  // last key is offset + (row_end - 1) - lo
    clamp(seqlen_k, begin, end);
  }

  // [begin, end) of the rows that may see any key in [key_begin, key_end), within [0, seqlen_q).
  void row_range(int64_t key_begin, int64_t key_end, int64_t seqlen_q, int64_t& begin, int64_t& end) const {
    begin = has_lo ? key_begin - offset + lo : 0;
    end = has_hi ? key_end - offset + hi : seqlen_q;  // last row is (key_end - 1) - offset + hi
    clamp(seqlen_q, begin, end);
  }

 private:
  static void clamp(int64_t size, int64_t& begin, int64_t& end) {
    begin = begin < 0 ? 0 : (begin > size ? size : begin);
    end = end > size ? size : end;
    if (end < begin) end = begin;
  }
};

struct ScoreParams {
  float scale;
  float softcap;  // 0: no capping
  Band band;
};

// The score of a visible pair from its dot product; `tanh_of_score` keeps what the
// backward needs for the soft cap (d cap(s)/ds = 1 - tanh^2).
inline float capped_score(float dot_product, const ScoreParams& params, float& tanh_of_score) {
  const float s = dot_product * params.scale;
  if (params.softcap > 0.f) {
    tanh_of_score = math::tanh(s / params.softcap);
    return params.softcap * tanh_of_score;
  }
  tanh_of_score = 0.f;
  return s;
}

template <int D, class PtrA, class PtrB>
inline float dot(PtrA a, PtrB b) {
  // Four partial sums: independent FMA chains, and the same rounding on every backend.
  float partial[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int d = 0; d < D; d += 4) {
#pragma unroll
    for (int u = 0; u < 4; ++u) partial[u] += a[d + u] * b[d + u];
  }
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

// Butterfly reductions: after log2(size) exchanges every lane holds the result.
template <class Lanes>
inline float lanes_max(const Lanes& lanes, float x) {
#pragma unroll
  for (int mask = Lanes::size / 2; mask > 0; mask /= 2) x = math::fmax(x, lanes.shuffle_xor(x, mask));
  return x;
}

template <class Lanes>
inline float lanes_sum(const Lanes& lanes, float x) {
#pragma unroll
  for (int mask = Lanes::size / 2; mask > 0; mask /= 2) x += lanes.shuffle_xor(x, mask);
  return x;
}

inline float log_add_exp(float a, float b) {
  const float m = math::fmax(a, b);
  if (m == kNegInf) return kNegInf;
  return m + math::log(math::exp(a - m) + math::exp(b - m));
}

// ---------------------------------------------------------------------------------
// Forward: online softmax of one query row over key tiles.

template <int D, int SG>
struct ForwardRow {
  static_assert(D % SG == 0, "the head dimension must split evenly over the lanes");
  static constexpr int kDimsPerLane = D / SG;
  float running_max = kNegInf;  // max of the visible scores so far
  float running_sum = 0.f;      // sum of exp(score - running_max)
  float acc[kDimsPerLane] = {};  // sum of exp(score - running_max) * v, dims lane + SG * e

  float lse() const { return running_sum > 0.f ? running_max + math::log(running_sum) : kNegInf; }
};

// Fold keys [key0, key0 + n_keys) into `row`. `dot_of_key(j)` is q . k for key key0 + j
// (computed here from a tile, or read from scores a matrix engine produced); v rows
// are `stride` floats apart in v_tile.
template <int D, int BLOCK_N, class Lanes, class DotOfKey, class TilePtr>
inline void fold_key_tile(const Lanes& lanes, ForwardRow<D, Lanes::size>& row, const DotOfKey& dot_of_key,
                          TilePtr v_tile, int stride, int64_t row_index, int64_t key0, int n_keys,
                          const ScoreParams& params) {
  constexpr int SG = Lanes::size;
  constexpr int kKeysPerLane = BLOCK_N / SG;
  static_assert(BLOCK_N % SG == 0, "a key tile must split evenly over the lanes");
  const int lane = lanes.lane();

  float prob[kKeysPerLane];  // scores, then exp(score - new_max)
  float tile_max = kNegInf;
#pragma unroll
  for (int t = 0; t < kKeysPerLane; ++t) {
    const int j = t * SG + lane;
    float unused_tanh;
    prob[t] = (j < n_keys && params.band.visible(row_index, key0 + j))
                  ? capped_score(dot_of_key(j), params, unused_tanh)
                  : kNegInf;
    tile_max = math::fmax(tile_max, prob[t]);
  }
  const float new_max = math::fmax(row.running_max, lanes_max(lanes, tile_max));
  if (new_max == kNegInf) return;  // the same on every lane: no visible key yet

  // exp(-inf - finite) = 0: a row that saw nothing before drops its (zero) history.
  const float rescale = math::exp(row.running_max - new_max);
  float tile_sum = 0.f;
#pragma unroll
  for (int t = 0; t < kKeysPerLane; ++t) {
    prob[t] = math::exp(prob[t] - new_max);
    tile_sum += prob[t];
  }
  row.running_sum = row.running_sum * rescale + lanes_sum(lanes, tile_sum);
  row.running_max = new_max;
#pragma unroll
  for (int e = 0; e < ForwardRow<D, SG>::kDimsPerLane; ++e) row.acc[e] *= rescale;

#pragma unroll
  for (int t = 0; t < kKeysPerLane; ++t) {
    for (int src = 0; src < SG; ++src) {
      const int j = t * SG + src;
      if (j >= n_keys) break;  // n_keys is the same on every lane
      const float p = lanes.broadcast(prob[t], src);
#pragma unroll
      for (int e = 0; e < ForwardRow<D, SG>::kDimsPerLane; ++e) row.acc[e] += p * v_tile[j * stride + lane + SG * e];
    }
  }
}

// Fold a finished row into a running (out, lse) pair of float32 accumulators, exactly
// as ring_flash_attn/merge.py merge_into does. Returns the new running lse; each
// lane updates its own dims of `out_acc_row`.
template <int D, class Lanes, class AccPtr>
inline float merge_row_into(const Lanes& lanes, const ForwardRow<D, Lanes::size>& row, AccPtr out_acc_row,
                            float lse_acc) {
  constexpr int SG = Lanes::size;
  const float lse_block = row.lse();
  const float lse_new = log_add_exp(lse_acc, lse_block);
  if (lse_new == kNegInf) return lse_new;  // neither side has seen a key: stays 0 / -inf
  const float weight_acc = math::exp(lse_acc - lse_new);
  const float weight_block = row.running_sum > 0.f ? math::exp(lse_block - lse_new) / row.running_sum : 0.f;
  const int lane = lanes.lane();
#pragma unroll
  for (int e = 0; e < ForwardRow<D, SG>::kDimsPerLane; ++e) {
    const int d = lane + SG * e;
    out_acc_row[d] = weight_acc * out_acc_row[d] + weight_block * row.acc[e];
  }
  return lse_new;
}

// ---------------------------------------------------------------------------------
// Backward (flash-attention 2): with the GLOBAL lse and delta = rowsum(dout * out),
//   p = exp(s - lse), dp = dout . v, ds = p * (dp - delta) [* (1 - tanh^2) with a cap],
//   dq = scale * sum_j ds k_j,  dk = scale * sum_i ds q_i,  dv = sum_i p dout_i.

// p and ds of one pair (both 0 when the pair is masked or the row saw no key at all).
template <int D, class RowPtr, class KeyPtr>
inline void pair_gradient(RowPtr q_row, RowPtr dout_row, KeyPtr k_row, KeyPtr v_row, int64_t row_index,
                          int64_t key_index, float row_lse, float row_delta, const ScoreParams& params,
                          float& prob, float& dscore) {
  if (row_lse == kNegInf || !params.band.visible(row_index, key_index)) {
    prob = 0.f;
    dscore = 0.f;
    return;
  }
  float tanh_of_score;
  const float s = capped_score(dot<D>(q_row, k_row), params, tanh_of_score);
  prob = math::exp(s - row_lse);
  dscore = prob * (dot<D>(dout_row, v_row) - row_delta);
  if (params.softcap > 0.f) dscore *= 1.f - tanh_of_score * tanh_of_score;
}

template <int D, int SG>
struct RowGradient {
  static constexpr int kDimsPerLane = D / SG;
  float acc[kDimsPerLane] = {};  // dims lane + SG * e
};

// dq of one query row over keys [key0, key0 + n_keys); the caller multiplies by scale.
template <int D, int BLOCK_N, class Lanes, class RowPtr, class TilePtr>
inline void accumulate_dq_tile(const Lanes& lanes, RowGradient<D, Lanes::size>& dq, RowPtr q_row, RowPtr dout_row,
                               TilePtr k_tile, TilePtr v_tile, int stride, int64_t row_index, int64_t key0,
                               int n_keys, float row_lse, float row_delta, const ScoreParams& params) {
  constexpr int SG = Lanes::size;
  static_assert(BLOCK_N % SG == 0, "a key tile must split evenly over the lanes");
  constexpr int kKeysPerLane = BLOCK_N / SG;
  const int lane = lanes.lane();
  float dscore[kKeysPerLane];
#pragma unroll
  for (int t = 0; t < kKeysPerLane; ++t) {
    const int j = t * SG + lane;
    float unused_prob;
    dscore[t] = 0.f;
    if (j < n_keys)
      pair_gradient<D>(q_row, dout_row, k_tile + j * stride, v_tile + j * stride, row_index, key0 + j, row_lse,
                       row_delta, params, unused_prob, dscore[t]);
  }
#pragma unroll
  for (int t = 0; t < kKeysPerLane; ++t) {
    for (int src = 0; src < SG; ++src) {
      const int j = t * SG + src;
      if (j >= n_keys) break;
      const float ds = lanes.broadcast(dscore[t], src);
#pragma unroll
      for (int e = 0; e < RowGradient<D, SG>::kDimsPerLane; ++e) dq.acc[e] += ds * k_tile[j * stride + lane + SG * e];
    }
  }
}

template <int D, int SG>
struct KeyGradient {
  static constexpr int kDimsPerLane = D / SG;
  float dk[kDimsPerLane] = {};  // the caller multiplies by scale
  float dv[kDimsPerLane] = {};
};

// dk, dv of one key row over query rows [row0, row0 + n_rows) of one query head.
template <int D, int BLOCK_M, class Lanes, class KeyPtr, class TilePtr>
inline void accumulate_dkdv_tile(const Lanes& lanes, KeyGradient<D, Lanes::size>& grad, KeyPtr k_row, KeyPtr v_row,
                                 TilePtr q_tile, TilePtr dout_tile, int stride, TilePtr lse_tile, TilePtr delta_tile,
                                 int64_t key_index, int64_t row0, int n_rows, const ScoreParams& params) {
  constexpr int SG = Lanes::size;
  constexpr int kRowsPerLane = BLOCK_M / SG;
  static_assert(BLOCK_M % SG == 0, "a query tile must split evenly over the lanes");
  const int lane = lanes.lane();
  float prob[kRowsPerLane], dscore[kRowsPerLane];
#pragma unroll
  for (int t = 0; t < kRowsPerLane; ++t) {
    const int r = t * SG + lane;
    prob[t] = 0.f;
    dscore[t] = 0.f;
    if (r < n_rows)
      pair_gradient<D>(q_tile + r * stride, dout_tile + r * stride, k_row, v_row, row0 + r, key_index,
                       lse_tile[r], delta_tile[r], params, prob[t], dscore[t]);
  }
#pragma unroll
  for (int t = 0; t < kRowsPerLane; ++t) {
    for (int src = 0; src < SG; ++src) {
      const int r = t * SG + src;
      if (r >= n_rows) break;
      const float p = lanes.broadcast(prob[t], src);
      const float ds = lanes.broadcast(dscore[t], src);
#pragma unroll
      for (int e = 0; e < KeyGradient<D, SG>::kDimsPerLane; ++e) {
        const int d = lane + SG * e;
        grad.dv[e] += p * dout_tile[r * stride + d];
        grad.dk[e] += ds * q_tile[r * stride + d];
      }
    }
  }
}

}  // namespace rfa
