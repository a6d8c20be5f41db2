// CPU-side epilogue + multi-step LIF over rows of neurons, shared by bconv_lif and bn_lif.
//
// A "row" is L neurons that are contiguous in memory inside each timestep: of one channel, or the
// whole maps of consecutive channels where the maps are short (row_block_channels, LaneAffine);
// the T timesteps of the row are `step_stride` elements apart ([T, N, C, S] layout:
// step_stride = N*C*S). The float arithmetic is binslt/lif.h's (SpikingJelly's order), the
// epilogue is the reference's:
//   eval : Y = z * scale + shift
//   train: Y = ((z - mean) * invstd) * scale + shift
//   X = Y + residual
// These functions are compiled for the baseline target only (no FMA contraction), so that float32
// results are the same on every machine and agree with the reference.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "binslt/lif.h"

namespace binslt {
namespace cpu {

// Longest row processed at once (stack buffers).
constexpr int kRowChunk = 256;

struct ChannelAffine {
  float mean;    // batch mean (train) or unused
  float invstd;  // 1/sqrt(var + eps) (train) or unused
  float scale;
  float shift;
  bool train;

  inline float apply(float z) const {
    if (train) {
      const float y = (z - mean) * invstd;
      return y * scale + shift;
    }
    return z * scale + shift;
  }
  // d Y / d z without the batch-statistics terms (train: xhat is returned through *xhat).
  inline float normalized(float z) const { return train ? (z - mean) * invstd : z; }
  // The row functions below ask for lane i's epilogue: one channel's is the same for every lane.
  inline float apply(float z, int) const { return apply(z); }
  inline float normalized(float z, int) const { return normalized(z); }
};

// Channels per row of the LIF backward where a channel's map of S pixels is short: S of at most
// kRowChunk / 2 would leave most of a row's lanes idle (a 4x4 map: 16 of 256), each row paying
// the stage's fixed costs (its sums' lanes zeroed and added, a second pass per channel), and the
// maps of consecutive channels lie side by side in [T, N, C, Ho, Wo].
inline int64_t lanes_per_row(int64_t S) { return S > 0 && 2 * S <= kRowChunk ? kRowChunk / S : 1; }

// The same for the forward's LIF rows, which cost little besides their elements: a lane's
// epilogue is read from its LaneTable arrays at every step (three to five loads more per
// element), which pays on maps of at most 16 pixels only (one training forward's LIF rows, 2-core
// EPYC with AVX-512, per channel / per lane: 512 channels of 2x2 1.23 / 0.11 ms, of 3x3 1.10 /
// 0.54, of 4x4 0.77 / 0.87, 256 of 4x4 0.57 / 0.41, 256 of 8x8 0.79 / 1.86).
inline int64_t forward_lanes_per_row(int64_t S) { return S <= 16 ? lanes_per_row(S) : 1; }

// Channels per row for a loop that runs its blocks of channels in parallel: lanes (one of the
// two above) or fewer, where Co channels would otherwise make under four blocks per thread.
inline int64_t row_block_channels(int64_t lanes, int64_t Co) {
  const int64_t per_thread = Co / (4 * static_cast<int64_t>(at::get_num_threads()));
  return std::max<int64_t>(1, std::min<int64_t>(lanes, per_thread));
}

// The epilogue of a row whose lanes belong to several channels (lane i: the values at [i]), with
// ChannelAffine's arithmetic: lane i of a LaneAffine gives what its channel's ChannelAffine gives.
struct LaneAffine {
  const float* __restrict mean;
  const float* __restrict invstd;
  const float* __restrict scale;
  const float* __restrict shift;
  bool train;

  inline float apply(float z, int i) const {
    if (train) {
      const float y = (z - mean[i]) * invstd[i];
      return y * scale[i] + shift[i];
    }
    return z * scale[i] + shift[i];
  }
  inline float normalized(float z, int i) const { return train ? (z - mean[i]) * invstd[i] : z; }
};

// Every channel's epilogue copied per lane, for rows of several channels' maps or tiles of S
// pixels: lane c * S + j holds channel c's values, so the lanes of channels [c0, c1) are the slice
// from c0 * S (empty for Co = 0).
struct LaneTable {
  std::vector<float> a, mean, invstd, scale, shift;
  int64_t S = 0;
  bool train = false;

  LaneTable(const float* alpha, const ChannelAffine* aff, int64_t Co, int64_t S_) : S(S_) {
    if (Co <= 0) return;
    const size_t n = static_cast<size_t>(Co * S);
    a.resize(n);
    mean.resize(n);
    invstd.resize(n);
    scale.resize(n);
    shift.resize(n);
    for (int64_t c = 0; c < Co; ++c)
      for (int64_t i = c * S; i < (c + 1) * S; ++i) {
        a[i] = alpha[c];
        mean[i] = aff[c].mean;
        invstd[i] = aff[c].invstd;
        scale[i] = aff[c].scale;
        shift[i] = aff[c].shift;
      }
    train = aff[0].train;
  }
  bool empty() const { return a.empty(); }
  const float* alpha(int64_t c0) const { return a.data() + c0 * S; }
  LaneAffine affine(int64_t c0) const {
    return LaneAffine{mean.data() + c0 * S, invstd.data() + c0 * S, scale.data() + c0 * S,
                      shift.data() + c0 * S, train};
  }
};

inline float invstd_of(float var, double eps) {
  return 1.0f / std::sqrt(var + static_cast<float>(eps));
}

// The forward pass of L (<= kRowChunk) neurons over T steps, shared by the forward and the
// backward's recomputation of H: X[t] (the epilogue of zat(t, i) plus the residual res, or null)
// into xbuf(t), then H, S and the reset V of each neuron; emit(t, i, h, s) takes H[t] and S[t]
// of neuron i. aff and p are the caller's local copies. The emitters index as (base + t * step)[i]:
// an int index t * step + i may wrap under the build's -fwrapv, and the loops then stay scalar.
template <class ZAt, class XBuf, class Emit, class Aff = ChannelAffine>
inline __attribute__((always_inline)) void lif_forward_pass(int T, int L, const ZAt& zat,
                                                            const Aff& aff,
                                                            const float* res, int64_t step_stride,
                                                            const NeuronParams& p,
                                                            const XBuf& xbuf, const Emit& emit) {
  float v[kRowChunk];
  const float v0 = p.soft_reset ? 0.0f : p.v_reset;
  for (int i = 0; i < L; ++i) v[i] = v0;
  for (int t = 0; t < T; ++t) {
    float* x = xbuf(t);
    for (int i = 0; i < L; ++i) x[i] = aff.apply(zat(t, i), i);
    if (res != nullptr) {
      const float* r = res + t * step_stride;
      for (int i = 0; i < L; ++i) x[i] = x[i] + r[i];
    }
    for (int i = 0; i < L; ++i) {
      const float h = lif_charge(v[i], x[i], p);
      const float s = lif_fire(h, p);
      v[i] = lif_reset(h, s, p);
      emit(t, i, h, s);
    }
  }
}

// Forward: spikes for L (<= kRowChunk) neurons over T steps. zat(t, i) gives the raw current z.
// The parameters are copied to locals so that the compiler can hoist the mode branches and
// vectorize the element loops (stores through the output pointers could alias them otherwise).
template <class ZAt, class Aff = ChannelAffine>
inline __attribute__((always_inline)) void lif_forward_row(int T, int L, const ZAt& zat,
                                                           const Aff& aff_in,
                            const float* res, int64_t step_stride, const NeuronParams& p_in,
                            float* spikes) {
  const Aff aff = aff_in;
  const NeuronParams p = p_in;
  float x[kRowChunk];
  float* xp = x;
  lif_forward_pass(
      T, L, zat, aff, res, step_stride, p, [xp](int) { return xp; },
      [spikes, step_stride](int t, int i, float, float s) { (spikes + t * step_stride)[i] = s; });
}

// Backward: recomputes H (exactly as the forward), then BPTT. Writes dL/dX into gcur (same layout
// as spikes) and accumulates, per lane i < L, sum(g) into acc_g[i] and sum(g * xhat) (train) or
// sum(g * z) (eval) into acc_gx[i] (double lanes: vectorizable without reassociation).
// hbuf must hold T * kRowChunk floats.
// The row's BPTT buffers: dL/dspikes gs in (gs_step floats between its time steps, -1:
// step_stride like gcur), dL/dX gcur out, the scratch hbuf and the per-lane sums; res_step: the
// residual's floats between time steps (-1: step_stride).
struct BpttRow {
  const float* gs;
  float* gcur;
  float* hbuf;
  double* acc_g;
  double* acc_gx;
  int64_t gs_step;
  int64_t res_step = -1;
};
template <class ZAt, class Aff = ChannelAffine>
inline __attribute__((always_inline)) void lif_backward_row(int T, int L, const ZAt& zat,
                                                            const Aff& aff_in,
                                                            const float* res, int64_t step_stride,
                                                            const NeuronParams& p_in,
                                                            const BpttRow& io) {
  const float* gs = io.gs;
  float* gcur = io.gcur;
  float* hbuf = io.hbuf;
  double* acc_g = io.acc_g;
  double* acc_gx = io.acc_gx;
  const int64_t gstep = io.gs_step < 0 ? step_stride : io.gs_step;
  const Aff aff = aff_in;
  const NeuronParams p = p_in;
  float gv[kRowChunk];
  lif_forward_pass(
      T, L, zat, aff, res, io.res_step < 0 ? step_stride : io.res_step, p,
      [hbuf](int t) { return hbuf + t * kRowChunk; },
      [hbuf](int t, int i, float h, float) { (hbuf + t * kRowChunk)[i] = h; });
  for (int i = 0; i < L; ++i) gv[i] = 0.0f;
  // The surrogate is a compile-time constant in each copy of the step loop (with_surrogate picks
  // the copy per step), so that the loops without an expf call vectorize; the float arithmetic
  // is the same either way. The step captures by value: with p captured by reference GCC keeps
  // divisions by p.tau inside the vector loop (the backward row about 10% slower).
  float* gvp = gv;
  auto step = [gs, gstep, gcur, step_stride, hbuf, L, gvp, p](auto sur, int t) {
    const float* __restrict g = gs + t * gstep;
    float* __restrict gc = gcur + t * step_stride;
    const float* __restrict h = hbuf + t * kRowChunk;
    for (int i = 0; i < L; ++i) {
      float carry;
      const float gh = lif_backward_step<decltype(sur)::value>(g[i], gvp[i], h[i], p, &carry);
      gvp[i] = carry;
      gc[i] = lif_input_grad(gh, p);
    }
  };
  for (int t = T - 1; t >= 0; --t) {
    with_surrogate(p.surrogate, [&](auto sur) { step(sur, t); });
    const float* gc = gcur + t * step_stride;
    for (int i = 0; i < L; ++i) {
      const double gx = gc[i];
      acc_g[i] += gx;
      acc_gx[i] += gx * static_cast<double>(aff.normalized(zat(t, i), i));
    }
  }
}

// Per-channel dL/dz from dL/dX (g): eval a*g; BN train k*(g - mean(g) - xhat*mean(g*xhat)),
// evaluated in double to avoid cancellation when mean(g) dominates.
struct ZGrad {
  double k, mg, mgx;
  float mean, invstd, scale;
  bool train;
  inline float operator()(float g, float z) const {
    if (!train) return g * scale;
    const double xhat = static_cast<double>((z - mean) * invstd);
    return static_cast<float>(k * ((static_cast<double>(g) - mg) - xhat * mgx));
  }
};

// ZGrad for a row whose lanes belong to several channels (lane i: its channel's values at [i]),
// with ZGrad's arithmetic.
struct LaneZGrad {
  const double* __restrict k;
  const double* __restrict mg;
  const double* __restrict mgx;
  const float* __restrict mean;
  const float* __restrict invstd;
  const float* __restrict scale;
  bool train;
  inline float operator()(float g, float z, int i) const {
    if (!train) return g * scale[i];
    const double xhat = static_cast<double>((z - mean[i]) * invstd[i]);
    return static_cast<float>(k[i] * ((static_cast<double>(g) - mg[i]) - xhat * mgx[i]));
  }
};

// sum_g = sum(g), sum_gx = sum(g * xhat) (train) / sum(g * z) (eval), m = elements per channel.
inline ZGrad make_zgrad(const ChannelAffine& aff, double sum_g, double sum_gx, double m) {
  ZGrad zg;
  zg.train = aff.train;
  zg.mean = aff.mean;
  zg.invstd = aff.invstd;
  zg.scale = aff.scale;
  zg.k = static_cast<double>(aff.scale) * aff.invstd;
  zg.mg = m > 0 ? sum_g / m : 0.0;
  zg.mgx = m > 0 ? sum_gx / m : 0.0;
  return zg;
}

}  // namespace cpu
}  // namespace binslt
