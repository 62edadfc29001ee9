// Fused attention forward (out + LSE, optionally folded into running accumulators)
// and backward for Intel GPUs, in portable SYCL 2020.
//
// Compile-time switches:
//   RFA_CPU_TEST_BUILD=1    AdaptiveCpp on the CPU (tests): CPU tensors, one lane per
//                           sub-group, a process-wide in-order host queue, and a wait
//                           after each launch because CPU tensors carry no stream.
//   RFA_INTEL_EXTENSIONS=1  icpx for Intel GPUs: sycl::ext::oneapi::bfloat16 conversions.
//   RFA_SUB_GROUP_SIZE=N    lanes per sub-group: 1 (the CPU test build's default), 16 (the
//                           default otherwise: Intel GPUs) or 32 (NVIDIA, AdaptiveCpp's CUDA backend).
//   RFA_JOINT_MATRIX=1      (with RFA_INTEL_EXTENSIONS) the forward's float16/bfloat16
//                           scores on the XMX matrix engines through joint_matrix.
//                           Never compiled or run so far: no icpx, no Intel GPU here.
// The per-row math lives in lane_logic.hpp, shared with the 16-lane host emulation test.
//
// This header holds the kernels and their launches on a sycl::queue over raw pointers, with no PyTorch in
// it: flash_attn.sycl is the PyTorch glue (tensors in, launches out), and harness/harness.cpp runs the same
// kernels on their own (any SYCL device, no torch ABI) against a float64 reference.
#pragma once

#include "build_switches.h"

// Before lane_logic.hpp: its math is sycl:: only once SYCL_LANGUAGE_VERSION is defined, which AdaptiveCpp
// does in this header (icpx predefines it). Without it the kernels called std::exp, which AdaptiveCpp's
// CUDA device pass cannot lower ("Undefined external symbol expf").
#include <sycl/sycl.hpp>

#include "lane_logic.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>


namespace rfa {
namespace {

// Lanes per sub-group that the kernels' logic is written for (RFA_SUB_GROUP_SIZE, build_switches.h).
// AdaptiveCpp's OpenMP backend always has sub-groups of 1; PVC and BMG run 16-wide sub-groups,
// NVIDIA GPUs 32-wide warps.
constexpr int kSubGroupSize = RFA_SUB_GROUP_SIZE;
#if RFA_CPU_TEST_BUILD
#define RFA_REQUIRE_SUB_GROUP_SIZE(n)
#else
#define RFA_REQUIRE_SUB_GROUP_SIZE(n) [[sycl::reqd_sub_group_size(n)]]
#endif

// ---------------------------------------------------------------------------------
// Element storage and conversion to/from the float32 the kernels compute in.

#if RFA_INTEL_EXTENSIONS
using Bf16Storage = sycl::ext::oneapi::bfloat16;
inline float to_float(Bf16Storage x) { return static_cast<float>(x); }
inline Bf16Storage bf16_from_float(float x) { return Bf16Storage(x); }
#else
// bfloat16 as its 16 bits: the upper half of a float32.
struct Bf16Storage {
  uint16_t bits;
};
inline float to_float(Bf16Storage x) { return sycl::bit_cast<float>(static_cast<uint32_t>(x.bits) << 16); }
inline Bf16Storage bf16_from_float(float x) {
  const uint32_t u = sycl::bit_cast<uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN stays NaN
  const uint32_t round_to_nearest_even = 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>((u + round_to_nearest_even) >> 16)};
}
#endif
static_assert(sizeof(Bf16Storage) == 2, "bfloat16 storage must be 2 bytes (at::BFloat16 in the torch glue)");
static_assert(sizeof(sycl::half) == 2, "sycl::half must be 2 bytes (at::Half in the torch glue)");

inline float to_float(float x) { return x; }
inline float to_float(sycl::half x) { return static_cast<float>(x); }

template <class T>
inline T from_float(float x) {
  if constexpr (std::is_same_v<T, Bf16Storage>) {
    return bf16_from_float(x);
  } else {
    return static_cast<T>(x);
  }
}

// ---------------------------------------------------------------------------------
// The Lanes policy of lane_logic.hpp over a SYCL sub-group. The lane index comes from
// the local id (work-group size is a multiple of SG), which is also right on backends
// whose sub-group queries are degenerate.

template <int SG>
struct SubGroupLanes {
  static constexpr int size = SG;
  sycl::sub_group sub_group;
  int lane_index;

  int lane() const { return lane_index; }
  float shuffle_xor(float x, int mask) const { return sycl::permute_group_by_xor(sub_group, x, mask); }
  float broadcast(float x, int src) const {
    if constexpr (SG == 1) {
      return x;
    } else {
      return sycl::select_from_group(sub_group, x, src);
    }
  }
};

// Strides (in elements) of a [B, S, H, D] tensor whose last dim is contiguous.
struct RowStrides {
  int64_t batch, seq, head;
  template <class T>
  const T* row(const T* base, int64_t b, int64_t s, int64_t h) const {
    return base + b * batch + s * seq + h * head;
  }
  template <class T>
  T* row(T* base, int64_t b, int64_t s, int64_t h) const {
    return base + b * batch + s * seq + h * head;
  }
};

// Strides of a [B, H, S] LSE-like tensor.
struct LseStrides {
  int64_t batch, head, seq;
  int64_t at(int64_t b, int64_t h, int64_t s) const { return b * batch + h * head + s * seq; }
};

struct Problem {
  int64_t batch, heads, heads_k, seqlen_q, seqlen_k;
  ScoreParams score;
};

// The query rows a work-group of the forward or the dq kernel owns: rows [row0, row0 + n_rows) of one
// (batch b, head h), whose K/V head is h_kv; work-groups are numbered row block first, then head, then batch.
struct QueryRows {
  int64_t b, h, h_kv, row0;
  int n_rows;
};

template <int ROWS>
inline QueryRows query_rows_of(int64_t group, int64_t row_blocks, const Problem& p) {
  const int64_t row0 = (group % row_blocks) * ROWS;
  const int64_t h = (group / row_blocks) % p.heads;
  return {group / row_blocks / p.heads, h, h / (p.heads / p.heads_k), row0,
          static_cast<int>(std::min<int64_t>(ROWS, p.seqlen_q - row0))};
}

// Copy `n_rows` rows of D elements (`row_stride` apart) into a float tile with rows
// D + 1 apart (the pad keeps lanes reading different rows off the same bank); rows
// n_rows..ROWS-1 are zero so that no lane ever reads stale local memory.
template <int D, int ROWS, class T>
inline void load_tile(const T* src, int64_t row_stride, int n_rows, float* tile, size_t local_id, size_t local_size) {
  for (size_t index = local_id; index < static_cast<size_t>(ROWS) * D; index += local_size) {
    const int r = static_cast<int>(index / D), d = static_cast<int>(index % D);
    tile[r * (D + 1) + d] = r < n_rows ? to_float(src[r * row_stride + d]) : 0.f;
  }
}

#if RFA_JOINT_MATRIX
namespace matrix = sycl::ext::oneapi::experimental::matrix;

// Scores S = Q K^T of a [ROWS x KEYS] tile on the XMX engines, for float16/bfloat16.
// Q and K are kept in local memory in their input dtype (K transposed, so that both
// operands load row-major), in 8x16x16 blocks: the half/bfloat16 shape that PVC and
// BMG support (M <= 8, N = 16, K = 16; DG2 would need N = 8). Products of half or
// bfloat16 numbers are exact in float32, so this matches the lanes' float dot products
// up to summation order.
template <class T, int D, int ROWS, int KEYS>
struct MatrixScoreTiles {
  static constexpr int kM = 8, kN = 16, kK = 16;
  static constexpr int kBlocks = (ROWS / kM) * (KEYS / kN);  // one sub-group each
  static_assert(ROWS % kM == 0 && KEYS % kN == 0 && D % kK == 0, "tiles must be whole matrix blocks");
  static constexpr bool kEnabled = !std::is_same_v<T, float>;

  sycl::local_accessor<T, 1> q;           // [ROWS][D]
  sycl::local_accessor<T, 1> k_t;         // [D][KEYS]
  sycl::local_accessor<float, 1> scores;  // [ROWS][KEYS]

  static MatrixScoreTiles make(sycl::handler& cgh) {
    // float inputs keep the lanes' dot products: a one-element placeholder each.
    return {sycl::local_accessor<T, 1>(kEnabled ? ROWS * D : 1, cgh),
            sycl::local_accessor<T, 1>(kEnabled ? D * KEYS : 1, cgh),
            sycl::local_accessor<float, 1>(kEnabled ? ROWS * KEYS : 1, cgh)};
  }

  void store_q(const T* src, int64_t row_stride, int n_rows, size_t local_id, size_t local_size) const {
    for (size_t index = local_id; index < static_cast<size_t>(ROWS) * D; index += local_size) {
      const int r = static_cast<int>(index / D), d = static_cast<int>(index % D);
      q[index] = r < n_rows ? src[r * row_stride + d] : from_float<T>(0.f);
    }
  }

  void store_k(const T* src, int64_t row_stride, int n_keys, size_t local_id, size_t local_size) const {
    for (size_t index = local_id; index < static_cast<size_t>(KEYS) * D; index += local_size) {
      const int j = static_cast<int>(index / D), d = static_cast<int>(index % D);
      k_t[d * KEYS + j] = j < n_keys ? src[j * row_stride + d] : from_float<T>(0.f);
    }
  }

  void compute_block(sycl::sub_group sg, int block) const {
    const int m0 = (block / (KEYS / kN)) * kM, n0 = (block % (KEYS / kN)) * kN;
    const auto q_ptr = q.template get_multi_ptr<sycl::access::decorated::no>();
    const auto k_ptr = k_t.template get_multi_ptr<sycl::access::decorated::no>();
    matrix::joint_matrix<sycl::sub_group, float, matrix::use::accumulator, kM, kN> c;
    matrix::joint_matrix_fill(sg, c, 0.f);
    for (int k0 = 0; k0 < D; k0 += kK) {
      matrix::joint_matrix<sycl::sub_group, T, matrix::use::a, kM, kK, matrix::layout::row_major> a;
      matrix::joint_matrix<sycl::sub_group, T, matrix::use::b, kK, kN, matrix::layout::row_major> b;
      matrix::joint_matrix_load(sg, a, q_ptr + m0 * D + k0, D);
      matrix::joint_matrix_load(sg, b, k_ptr + k0 * KEYS + n0, KEYS);
      matrix::joint_matrix_mad(sg, c, a, b, c);
    }
    matrix::joint_matrix_store(sg, c, scores.template get_multi_ptr<sycl::access::decorated::no>() + m0 * KEYS + n0,
                               KEYS, matrix::layout::row_major);
  }
};
#endif

// ---------------------------------------------------------------------------------
// Forward: a work-group owns kRows query rows of one (batch, head), one lane group per
// row, and streams the visible key tiles of the matching K/V head through local memory.

template <class T>
struct ForwardArgs {
  const T *q, *k, *v;
  T* out;           // written when !fold
  float* out_acc;   // read and written when fold
  float* lse;       // the block's lse, or the running lse when fold
  RowStrides q_strides, k_strides, v_strides, out_strides;
  LseStrides lse_strides;
  Problem problem;
  int64_t row_blocks;
  bool fold;
};

template <class T, int D, int SG>
struct ForwardKernel {
  static constexpr int kRows = 16;
  static constexpr int kKeys = 32;
  static constexpr int kStride = D + 1;

  ForwardArgs<T> args;
  sycl::local_accessor<float, 1> q_tile, k_tile, v_tile;
#if RFA_JOINT_MATRIX
  using MatrixTiles = MatrixScoreTiles<T, D, kRows, kKeys>;
  MatrixTiles matrix_tiles;
#endif

  RFA_REQUIRE_SUB_GROUP_SIZE(SG) void operator()(sycl::nd_item<1> item) const {
    const Problem& p = args.problem;
    const size_t local_id = item.get_local_linear_id(), local_size = item.get_local_range(0);
    const auto [b, h, h_kv, row0, n_rows] = query_rows_of<kRows>(item.get_group_linear_id(), args.row_blocks, p);
    const int lane_group = static_cast<int>(local_id / SG);
    const SubGroupLanes<SG> lanes{item.get_sub_group(), static_cast<int>(local_id % SG)};
    float* q_local = &q_tile[0];
    float* k_local = &k_tile[0];
    float* v_local = &v_tile[0];

    const T* q_src = args.q_strides.row(args.q, b, row0, h);
#if RFA_JOINT_MATRIX
    if constexpr (MatrixTiles::kEnabled) {
      matrix_tiles.store_q(q_src, args.q_strides.seq, n_rows, local_id, local_size);
    } else
#endif
    {
      load_tile<D, kRows>(q_src, args.q_strides.seq, n_rows, q_local, local_id, local_size);
    }
    int64_t key_begin, key_end;
    p.score.band.key_range(row0, row0 + n_rows, p.seqlen_k, key_begin, key_end);

    const int64_t row = row0 + lane_group;
    const bool has_row = lane_group < n_rows;
    ForwardRow<D, SG> state;
    for (int64_t key0 = key_begin; key0 < key_end; key0 += kKeys) {
      const int n_keys = static_cast<int>(std::min<int64_t>(kKeys, key_end - key0));
      const T* k_src = args.k_strides.row(args.k, b, key0, h_kv);
      sycl::group_barrier(item.get_group());  // the previous tile is consumed (the q tile is stored)
      load_tile<D, kKeys>(args.v_strides.row(args.v, b, key0, h_kv), args.v_strides.seq, n_keys, v_local, local_id,
                          local_size);
#if RFA_JOINT_MATRIX
      if constexpr (MatrixTiles::kEnabled) {
        matrix_tiles.store_k(k_src, args.k_strides.seq, n_keys, local_id, local_size);
        sycl::group_barrier(item.get_group());
        if (lane_group < MatrixTiles::kBlocks) matrix_tiles.compute_block(item.get_sub_group(), lane_group);
        sycl::group_barrier(item.get_group());
        const float* scores = &matrix_tiles.scores[lane_group * kKeys];
        if (has_row)
          fold_key_tile<D, kKeys>(lanes, state, [=](int j) { return scores[j]; }, v_local, kStride, row, key0,
                                  n_keys, p.score);
        continue;
      }
#endif
      load_tile<D, kKeys>(k_src, args.k_strides.seq, n_keys, k_local, local_id, local_size);
      sycl::group_barrier(item.get_group());
      // Taken here, after the barrier: AdaptiveCpp's CPU backend computed wrong scores when this
      // per-work-item pointer into local memory was formed before the loop and captured after a barrier.
      const float* q_row = q_local + lane_group * kStride;
      if (has_row)
        fold_key_tile<D, kKeys>(lanes, state, [=](int j) { return dot<D>(q_row, k_local + j * kStride); }, v_local,
                                kStride, row, key0, n_keys, p.score);
    }
    if (!has_row) return;

    const int lane = lanes.lane();
    float* lse = args.lse + args.lse_strides.at(b, h, row);
    if (args.fold) {
      // Lane 0 alone touches the running lse, so no lane can read it after it is overwritten.
      const float lse_running = lanes.broadcast(lane == 0 ? *lse : 0.f, 0);
      const float lse_new = merge_row_into<D>(lanes, state, args.out_strides.row(args.out_acc, b, row, h), lse_running);
      if (lane == 0) *lse = lse_new;
      return;
    }
    const float inv_sum = state.running_sum > 0.f ? 1.f / state.running_sum : 0.f;  // no key: out = 0
    T* out = args.out_strides.row(args.out, b, row, h);
#pragma unroll
    for (int e = 0; e < D / SG; ++e) out[lane + SG * e] = from_float<T>(state.acc[e] * inv_sum);
    if (lane == 0) *lse = state.lse();
  }
};

// ---------------------------------------------------------------------------------
// Backward.

// delta = rowsum(dout * out) - dlse, [B, H, Sq] contiguous; one work-item per row.
template <class T, class OutT>
struct DeltaKernel {
  const T* dout;
  const OutT* out;
  const float* dlse;  // contiguous [B, H, Sq] or null
  float* delta;
  RowStrides dout_strides, out_strides;
  int64_t heads, seqlen_q, head_dim, rows;

  void operator()(sycl::id<1> id) const {
    const int64_t index = id[0];
    if (index >= rows) return;
    const int64_t i = index % seqlen_q, h = (index / seqlen_q) % heads, b = index / seqlen_q / heads;
    const T* dout_row = dout_strides.row(dout, b, i, h);
    const OutT* out_row = out_strides.row(out, b, i, h);
    float sum = 0.f;
    for (int64_t d = 0; d < head_dim; ++d) sum += to_float(dout_row[d]) * to_float(out_row[d]);
    delta[index] = sum - (dlse ? dlse[index] : 0.f);
  }
};

template <class T>
struct BackwardArgs {
  const T *dout, *q, *k, *v;
  const float *lse, *delta;  // lse: any strides; delta: contiguous [B, H, Sq]
  T *dq, *dk, *dv;           // contiguous
  RowStrides dout_strides, q_strides, k_strides, v_strides, dq_strides, dk_strides, dv_strides;
  LseStrides lse_strides;
  Problem problem;
  int64_t blocks;  // row blocks (dq) or key blocks (dk/dv)
};

// dq: a work-group owns kRows query rows of one (batch, head), like the forward.
template <class T, int D, int SG>
struct DqKernel {
  static constexpr int kRows = 16;
  static constexpr int kKeys = 32;
  static constexpr int kStride = D + 1;

  BackwardArgs<T> args;
  sycl::local_accessor<float, 1> q_tile, dout_tile, k_tile, v_tile;

  RFA_REQUIRE_SUB_GROUP_SIZE(SG) void operator()(sycl::nd_item<1> item) const {
    const Problem& p = args.problem;
    const size_t local_id = item.get_local_linear_id(), local_size = item.get_local_range(0);
    const auto [b, h, h_kv, row0, n_rows] = query_rows_of<kRows>(item.get_group_linear_id(), args.blocks, p);
    const int lane_group = static_cast<int>(local_id / SG);
    const SubGroupLanes<SG> lanes{item.get_sub_group(), static_cast<int>(local_id % SG)};
    float* q_local = &q_tile[0];
    float* dout_local = &dout_tile[0];
    float* k_local = &k_tile[0];
    float* v_local = &v_tile[0];

    load_tile<D, kRows>(args.q_strides.row(args.q, b, row0, h), args.q_strides.seq, n_rows, q_local, local_id,
                        local_size);
    load_tile<D, kRows>(args.dout_strides.row(args.dout, b, row0, h), args.dout_strides.seq, n_rows, dout_local,
                        local_id, local_size);
    int64_t key_begin, key_end;
    p.score.band.key_range(row0, row0 + n_rows, p.seqlen_k, key_begin, key_end);

    const int64_t row = row0 + lane_group;
    const bool has_row = lane_group < n_rows;
    const float row_lse = has_row ? args.lse[args.lse_strides.at(b, h, row)] : kNegInf;
    const float row_delta = has_row ? args.delta[(b * p.heads + h) * p.seqlen_q + row] : 0.f;
    RowGradient<D, SG> dq;
    for (int64_t key0 = key_begin; key0 < key_end; key0 += kKeys) {
      const int n_keys = static_cast<int>(std::min<int64_t>(kKeys, key_end - key0));
      sycl::group_barrier(item.get_group());
      load_tile<D, kKeys>(args.k_strides.row(args.k, b, key0, h_kv), args.k_strides.seq, n_keys, k_local, local_id,
                          local_size);
      load_tile<D, kKeys>(args.v_strides.row(args.v, b, key0, h_kv), args.v_strides.seq, n_keys, v_local, local_id,
                          local_size);
      sycl::group_barrier(item.get_group());
      if (has_row)
        accumulate_dq_tile<D, kKeys>(lanes, dq, q_local + lane_group * kStride, dout_local + lane_group * kStride,
                                     k_local, v_local, kStride, row, key0, n_keys, row_lse, row_delta, p.score);
    }
    if (!has_row) return;
    T* dq_row = args.dq_strides.row(args.dq, b, row, h);
#pragma unroll
    for (int e = 0; e < D / SG; ++e) dq_row[lanes.lane() + SG * e] = from_float<T>(dq.acc[e] * p.score.scale);
  }
};

// dk, dv: a work-group owns kKeys keys of one (batch, K/V head), one lane group per key,
// and walks every query head of its GQA group and the visible query tiles, so each
// gradient is complete when written (no atomics; deterministic).
template <class T, int D, int SG>
struct DkdvKernel {
  static constexpr int kKeys = 16;
  static constexpr int kRows = 32;
  static constexpr int kStride = D + 1;

  BackwardArgs<T> args;
  sycl::local_accessor<float, 1> k_tile, v_tile, q_tile, dout_tile, lse_tile, delta_tile;

  RFA_REQUIRE_SUB_GROUP_SIZE(SG) void operator()(sycl::nd_item<1> item) const {
    const Problem& p = args.problem;
    const size_t local_id = item.get_local_linear_id(), local_size = item.get_local_range(0);
    const int64_t group = item.get_group_linear_id();
    const int64_t key_block0 = (group % args.blocks) * kKeys;
    const int64_t h_kv = (group / args.blocks) % p.heads_k, b = group / args.blocks / p.heads_k;
    const int64_t group_size = p.heads / p.heads_k;
    const int n_keys = static_cast<int>(std::min<int64_t>(kKeys, p.seqlen_k - key_block0));
    const int lane_group = static_cast<int>(local_id / SG);
    const SubGroupLanes<SG> lanes{item.get_sub_group(), static_cast<int>(local_id % SG)};
    float* k_local = &k_tile[0];
    float* v_local = &v_tile[0];
    float* q_local = &q_tile[0];
    float* dout_local = &dout_tile[0];
    float* lse_local = &lse_tile[0];
    float* delta_local = &delta_tile[0];

    load_tile<D, kKeys>(args.k_strides.row(args.k, b, key_block0, h_kv), args.k_strides.seq, n_keys, k_local,
                        local_id, local_size);
    load_tile<D, kKeys>(args.v_strides.row(args.v, b, key_block0, h_kv), args.v_strides.seq, n_keys, v_local,
                        local_id, local_size);
    int64_t row_begin, row_end;
    p.score.band.row_range(key_block0, key_block0 + n_keys, p.seqlen_q, row_begin, row_end);

    const int64_t key = key_block0 + lane_group;
    const bool has_key = lane_group < n_keys;
    KeyGradient<D, SG> grad;
    for (int64_t h = h_kv * group_size; h < (h_kv + 1) * group_size; ++h) {
      for (int64_t row0 = row_begin; row0 < row_end; row0 += kRows) {
        const int n_rows = static_cast<int>(std::min<int64_t>(kRows, row_end - row0));
        sycl::group_barrier(item.get_group());
        load_tile<D, kRows>(args.q_strides.row(args.q, b, row0, h), args.q_strides.seq, n_rows, q_local, local_id,
                            local_size);
        load_tile<D, kRows>(args.dout_strides.row(args.dout, b, row0, h), args.dout_strides.seq, n_rows,
                            dout_local, local_id, local_size);
        for (size_t r = local_id; r < static_cast<size_t>(kRows); r += local_size) {
          const bool valid = static_cast<int>(r) < n_rows;
          lse_local[r] = valid ? args.lse[args.lse_strides.at(b, h, row0 + r)] : kNegInf;
          delta_local[r] = valid ? args.delta[(b * p.heads + h) * p.seqlen_q + row0 + r] : 0.f;
        }
        sycl::group_barrier(item.get_group());
        if (has_key)
          accumulate_dkdv_tile<D, kRows>(lanes, grad, k_local + lane_group * kStride, v_local + lane_group * kStride,
                                         q_local, dout_local, kStride, lse_local, delta_local, key, row0, n_rows,
                                         p.score);
      }
    }
    if (!has_key) return;
    T* dk_row = args.dk_strides.row(args.dk, b, key, h_kv);
    T* dv_row = args.dv_strides.row(args.dv, b, key, h_kv);
#pragma unroll
    for (int e = 0; e < D / SG; ++e) {
      const int d = lanes.lane() + SG * e;
      dk_row[d] = from_float<T>(grad.dk[e] * p.score.scale);
      dv_row[d] = from_float<T>(grad.dv[e]);
    }
  }
};

// ---------------------------------------------------------------------------------
// Launches on a queue, over raw pointers (the torch glue and the standalone harness share them).

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out/lse of one block (args.fold false), or the block folded into the running float32 (out_acc, lse).
template <class T, int D>
void submit_forward(sycl::queue& queue, ForwardArgs<T> args) {
  using Kernel = ForwardKernel<T, D, kSubGroupSize>;
  const Problem& problem = args.problem;
  if (problem.batch * problem.heads * problem.seqlen_q == 0) return;
  args.row_blocks = ceil_div(problem.seqlen_q, Kernel::kRows);
  const size_t local = Kernel::kRows * kSubGroupSize;
  const size_t groups = problem.batch * problem.heads * args.row_blocks;
  queue.submit([&](sycl::handler& cgh) {
    Kernel kernel{args, sycl::local_accessor<float, 1>(Kernel::kRows * Kernel::kStride, cgh),
                  sycl::local_accessor<float, 1>(Kernel::kKeys * Kernel::kStride, cgh),
                  sycl::local_accessor<float, 1>(Kernel::kKeys * Kernel::kStride, cgh)
#if RFA_JOINT_MATRIX
                  , Kernel::MatrixTiles::make(cgh)
#endif
    };
    cgh.parallel_for(sycl::nd_range<1>(groups * local, local), kernel);
  });
}

// dq/dk/dv from the global out (any OutT: the ring keeps it in float32) and lse; `dlse` (contiguous
// [B, H, Sq]) may be null; `delta` is a float32 workspace of B * H * Sq (contiguous), written here.
template <class T, class OutT, int D>
void submit_backward(sycl::queue& queue, BackwardArgs<T> args, const OutT* out, RowStrides out_strides,
                     const float* dlse, float* delta) {
  const Problem& problem = args.problem;
  const int64_t rows = problem.batch * problem.heads * problem.seqlen_q;
  args.delta = delta;
  if (rows > 0) {
    DeltaKernel<T, OutT> delta_kernel{args.dout, out, dlse, delta, args.dout_strides, out_strides,
                                      problem.heads, problem.seqlen_q, D, rows};
    queue.parallel_for(sycl::range<1>(rows), delta_kernel);
    using Kernel = DqKernel<T, D, kSubGroupSize>;
    args.blocks = ceil_div(problem.seqlen_q, Kernel::kRows);
    const size_t local = Kernel::kRows * kSubGroupSize;
    const size_t groups = problem.batch * problem.heads * args.blocks;
    queue.submit([&](sycl::handler& cgh) {  // rows that see no key get dq = 0 here
      Kernel kernel{args, sycl::local_accessor<float, 1>(Kernel::kRows * Kernel::kStride, cgh),
                    sycl::local_accessor<float, 1>(Kernel::kRows * Kernel::kStride, cgh),
                    sycl::local_accessor<float, 1>(Kernel::kKeys * Kernel::kStride, cgh),
                    sycl::local_accessor<float, 1>(Kernel::kKeys * Kernel::kStride, cgh)};
      cgh.parallel_for(sycl::nd_range<1>(groups * local, local), kernel);
    });
  }
  if (problem.batch * problem.heads_k * problem.seqlen_k > 0) {
    using Kernel = DkdvKernel<T, D, kSubGroupSize>;
    args.blocks = ceil_div(problem.seqlen_k, Kernel::kKeys);
    const size_t local = Kernel::kKeys * kSubGroupSize;
    const size_t groups = problem.batch * problem.heads_k * args.blocks;
    queue.submit([&](sycl::handler& cgh) {
      Kernel kernel{args,
                    sycl::local_accessor<float, 1>(Kernel::kKeys * Kernel::kStride, cgh),
                    sycl::local_accessor<float, 1>(Kernel::kKeys * Kernel::kStride, cgh),
                    sycl::local_accessor<float, 1>(Kernel::kRows * Kernel::kStride, cgh),
                    sycl::local_accessor<float, 1>(Kernel::kRows * Kernel::kStride, cgh),
                    sycl::local_accessor<float, 1>(Kernel::kRows, cgh),
                    sycl::local_accessor<float, 1>(Kernel::kRows, cgh)};
      cgh.parallel_for(sycl::nd_range<1>(groups * local, local), kernel);
    });
  }
}

}  // namespace
}  // namespace rfa
