// Runs the lane logic of csrc/sycl/lane_logic.hpp with 16 emulated lanes (the Intel
// sub-group size), since the CPU build of the kernels only ever has one lane.
//
// Each lane is a thread; a shuffle writes the lane's value to a shared slot, waits for
// all lanes, reads the partner's slot and waits again, which is the lock-step exchange
// a sub-group does in hardware. One (batch, head) problem is read from a binary file
// and every row is computed like the kernels do (key tiles of 32, query tiles of 32);
// the results are written back for test_lane_emulation.py to check against the
// float64 reference.
//
// Input (little endian): int64 head_dim, seqlen_q, seqlen_k, band offset, has_lo, lo,
// has_hi, hi; float32 scale, softcap; then float32 arrays q [Sq,D], k [Sk,D], v [Sk,D],
// dout [Sq,D], lse [Sq] (global), delta [Sq], out_acc [Sq,D], lse_acc [Sq].
// Output: float32 out [Sq,D], lse [Sq], merged out_acc [Sq,D], merged lse_acc [Sq],
// dq [Sq,D], dk [Sk,D], dv [Sk,D].
#include "lane_logic.hpp"

#include <barrier>
#include <cstdio>
#include <fstream>
#include <thread>
#include <vector>

namespace {

constexpr int kLanes = 16;
constexpr int kTile = 32;

struct Exchange {
  float slots[kLanes];
  std::barrier<> sync{kLanes};
};

struct EmulatedLanes {
  static constexpr int size = kLanes;
  int lane_index;
  Exchange* exchange;

  int lane() const { return lane_index; }
  float shuffle_xor(float x, int mask) const { return read_after_publish(x, lane_index ^ mask); }
  float broadcast(float x, int src) const { return read_after_publish(x, src); }

 private:
  float read_after_publish(float x, int src) const {
    exchange->slots[lane_index] = x;
    exchange->sync.arrive_and_wait();
    const float value = exchange->slots[src];
    exchange->sync.arrive_and_wait();  // nobody overwrites a slot before everyone has read it
    return value;
  }
};

struct Problem {
  int64_t head_dim, seqlen_q, seqlen_k;
  rfa::ScoreParams params;
  std::vector<float> q, k, v, dout, lse, delta, out_acc, lse_acc;
};

struct Results {
  std::vector<float> out, lse, out_acc, lse_acc, dq, dk, dv;
};

template <int D>
void run_lane(const Problem& p, Results& r, const EmulatedLanes& lanes) {
  const int lane = lanes.lane();
  const float* q = p.q.data();
  const float* k = p.k.data();
  const float* v = p.v.data();
  for (int64_t i = 0; i < p.seqlen_q; ++i) {
    int64_t key_begin, key_end;
    p.params.band.key_range(i, i + 1, p.seqlen_k, key_begin, key_end);
    rfa::ForwardRow<D, kLanes> row;
    for (int64_t key0 = key_begin; key0 < key_end; key0 += kTile) {
      const int n_keys = static_cast<int>(std::min<int64_t>(kTile, key_end - key0));
      const auto dot_of_key = [&](int j) { return rfa::dot<D>(q + i * D, k + (key0 + j) * D); };
      rfa::fold_key_tile<D, kTile>(lanes, row, dot_of_key, v + key0 * D, D, i, key0, n_keys, p.params);
    }
    const float inv_sum = row.running_sum > 0.f ? 1.f / row.running_sum : 0.f;
    for (int e = 0; e < D / kLanes; ++e) r.out[i * D + lane + kLanes * e] = row.acc[e] * inv_sum;
    const float merged_lse = rfa::merge_row_into<D>(lanes, row, r.out_acc.data() + i * D, p.lse_acc[i]);
    if (lane == 0) {
      r.lse[i] = row.lse();
      r.lse_acc[i] = merged_lse;
    }

    rfa::RowGradient<D, kLanes> dq;
    for (int64_t key0 = key_begin; key0 < key_end; key0 += kTile) {
      const int n_keys = static_cast<int>(std::min<int64_t>(kTile, key_end - key0));
      rfa::accumulate_dq_tile<D, kTile>(lanes, dq, q + i * D, p.dout.data() + i * D, k + key0 * D, v + key0 * D, D,
                                        i, key0, n_keys, p.lse[i], p.delta[i], p.params);
    }
    for (int e = 0; e < D / kLanes; ++e) r.dq[i * D + lane + kLanes * e] = dq.acc[e] * p.params.scale;
  }
  for (int64_t j = 0; j < p.seqlen_k; ++j) {
    int64_t row_begin, row_end;
    p.params.band.row_range(j, j + 1, p.seqlen_q, row_begin, row_end);
    rfa::KeyGradient<D, kLanes> grad;
    for (int64_t row0 = row_begin; row0 < row_end; row0 += kTile) {
      const int n_rows = static_cast<int>(std::min<int64_t>(kTile, row_end - row0));
      rfa::accumulate_dkdv_tile<D, kTile>(lanes, grad, k + j * D, v + j * D, q + row0 * D, p.dout.data() + row0 * D,
                                          D, p.lse.data() + row0, p.delta.data() + row0, j, row0, n_rows, p.params);
    }
    for (int e = 0; e < D / kLanes; ++e) {
      r.dk[j * D + lane + kLanes * e] = grad.dk[e] * p.params.scale;
      r.dv[j * D + lane + kLanes * e] = grad.dv[e];
    }
  }
}

template <int D>
void run_all_lanes(const Problem& p, Results& r) {
  Exchange exchange;
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < kLanes; ++lane)
    lanes.emplace_back([&, lane] { run_lane<D>(p, r, EmulatedLanes{lane, &exchange}); });
  for (auto& t : lanes) t.join();
}

template <class T>
T read_value(std::ifstream& in) {
  T value;
  in.read(reinterpret_cast<char*>(&value), sizeof(T));
  return value;
}

std::vector<float> read_floats(std::ifstream& in, int64_t n) {
  std::vector<float> values(n);
  in.read(reinterpret_cast<char*>(values.data()), n * sizeof(float));
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s INPUT OUTPUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  Problem p;
  p.head_dim = read_value<int64_t>(in);
  p.seqlen_q = read_value<int64_t>(in);
  p.seqlen_k = read_value<int64_t>(in);
  rfa::Band band;
  band.offset = read_value<int64_t>(in);
  band.has_lo = read_value<int64_t>(in) != 0;
  band.lo = read_value<int64_t>(in);
  band.has_hi = read_value<int64_t>(in) != 0;
  band.hi = read_value<int64_t>(in);
  const float scale = read_value<float>(in);
  const float softcap = read_value<float>(in);
  p.params = rfa::ScoreParams{scale, softcap, band};
  const int64_t d = p.head_dim, sq = p.seqlen_q, sk = p.seqlen_k;
  p.q = read_floats(in, sq * d);
  p.k = read_floats(in, sk * d);
  p.v = read_floats(in, sk * d);
  p.dout = read_floats(in, sq * d);
  p.lse = read_floats(in, sq);
  p.delta = read_floats(in, sq);
  p.out_acc = read_floats(in, sq * d);
  p.lse_acc = read_floats(in, sq);
  if (!in) {
    std::fprintf(stderr, "%s: input shorter than its header says\n", argv[1]);
    return 2;
  }

  Results r{std::vector<float>(sq * d), std::vector<float>(sq), p.out_acc, std::vector<float>(sq),
            std::vector<float>(sq * d), std::vector<float>(sk * d), std::vector<float>(sk * d)};
  if (d == 64) {
    run_all_lanes<64>(p, r);
  } else if (d == 128) {
    run_all_lanes<128>(p, r);
  } else {
    std::fprintf(stderr, "head_dim: expected 64 or 128, got %lld\n", static_cast<long long>(d));
    return 2;
  }

  std::ofstream out(argv[2], std::ios::binary);
  for (const auto* values : {&r.out, &r.lse, &r.out_acc, &r.lse_acc, &r.dq, &r.dk, &r.dv})
    out.write(reinterpret_cast<const char*>(values->data()), values->size() * sizeof(float));
  return out ? 0 : 1;
}
