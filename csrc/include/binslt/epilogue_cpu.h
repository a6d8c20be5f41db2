// CPU-side epilogue + multi-step LIF over rows of neurons, shared by bconv_lif and bn_lif.
//
// A "row" is L neurons of one channel that are contiguous in memory inside each timestep; the
// T timesteps of the row are `step_stride` elements apart ([T, N, C, S] layout:
// step_stride = N*C*S). The float arithmetic is binslt/lif.h's (SpikingJelly's order), the
// epilogue is the reference's:
//   eval : Y = z * scale + shift
//   train: Y = ((z - mean) * invstd) * scale + shift
//   X = Y + residual
// These functions are compiled for the baseline target only (no FMA contraction), so that float32
// results are the same on every machine and agree with the reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

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
};

inline float invstd_of(float var, double eps) {
  return 1.0f / std::sqrt(var + static_cast<float>(eps));
}

// Forward: spikes for L (<= kRowChunk) neurons over T steps. zat(t, i) gives the raw current z.
// The parameters are copied to locals so that the compiler can hoist the mode branches and
// vectorize the element loops (stores through the output pointers could alias them otherwise).
template <class ZAt>
inline __attribute__((always_inline)) void lif_forward_row(int T, int L, const ZAt& zat,
                                                           const ChannelAffine& aff_in,
                            const float* res, int64_t step_stride, const NeuronParams& p_in,
                            float* spikes) {
  const ChannelAffine aff = aff_in;
  const NeuronParams p = p_in;
  float v[kRowChunk];
  float x[kRowChunk];
  const float v0 = p.soft_reset ? 0.0f : p.v_reset;
  for (int i = 0; i < L; ++i) v[i] = v0;
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < L; ++i) x[i] = aff.apply(zat(t, i));
    if (res != nullptr) {
      const float* r = res + t * step_stride;
      for (int i = 0; i < L; ++i) x[i] = x[i] + r[i];
    }
    float* s_out = spikes + t * step_stride;
    for (int i = 0; i < L; ++i) {
      const float h = lif_charge(v[i], x[i], p);
      const float s = lif_fire(h, p);
      v[i] = lif_reset(h, s, p);
      s_out[i] = s;
    }
  }
}

// Backward: recomputes H (exactly as the forward), then BPTT. Writes dL/dX into gcur (same layout
// as spikes) and accumulates, per lane i < L, sum(g) into acc_g[i] and sum(g * xhat) (train) or
// sum(g * z) (eval) into acc_gx[i] (double lanes: vectorizable without reassociation).
// hbuf must hold T * kRowChunk floats.
// The row's BPTT buffers: dL/dspikes gs in (gs_step floats between its time steps, -1:
// step_stride like gcur and res), dL/dX gcur out, the scratch hbuf and the per-lane sums.
struct BpttRow {
  const float* gs;
  float* gcur;
  float* hbuf;
  double* acc_g;
  double* acc_gx;
  int64_t gs_step;
};
template <class ZAt>
inline __attribute__((always_inline)) void lif_backward_row(int T, int L, const ZAt& zat,
                                                            const ChannelAffine& aff_in,
                                                            const float* res, int64_t step_stride,
                                                            const NeuronParams& p_in,
                                                            const BpttRow& io) {
  const float* gs = io.gs;
  float* gcur = io.gcur;
  float* hbuf = io.hbuf;
  double* acc_g = io.acc_g;
  double* acc_gx = io.acc_gx;
  const int64_t gstep = io.gs_step < 0 ? step_stride : io.gs_step;
  const ChannelAffine aff = aff_in;
  const NeuronParams p = p_in;
  float v[kRowChunk];
  float gv[kRowChunk];
  const float v0 = p.soft_reset ? 0.0f : p.v_reset;
  for (int i = 0; i < L; ++i) v[i] = v0;
  for (int t = 0; t < T; ++t) {
    float* h = hbuf + t * kRowChunk;
    for (int i = 0; i < L; ++i) h[i] = aff.apply(zat(t, i));
    if (res != nullptr) {
      const float* r = res + t * step_stride;
      for (int i = 0; i < L; ++i) h[i] = h[i] + r[i];
    }
    for (int i = 0; i < L; ++i) {
      const float hi = lif_charge(v[i], h[i], p);
      h[i] = hi;
      v[i] = lif_reset(hi, lif_fire(hi, p), p);
    }
  }
  for (int i = 0; i < L; ++i) gv[i] = 0.0f;
  // The surrogate is a compile-time constant in each copy of the step loop (one NeuronParams
  // per surrogate, constant-propagated into lif_backward_step), so that the loops without an
  // expf call vectorize; the float arithmetic is the same either way.
  auto step = [&](const NeuronParams& q, int t) {
    const float* __restrict g = gs + t * gstep;
    float* __restrict gc = gcur + t * step_stride;
    const float* __restrict h = hbuf + t * kRowChunk;
    for (int i = 0; i < L; ++i) {
      float carry;
      const float gh = lif_backward_step(g[i], gv[i], h[i], q, &carry);
      gv[i] = carry;
      gc[i] = lif_input_grad(gh, q);
    }
  };
  NeuronParams q_atan = p, q_sig = p, q_rect = p, q_pq = p;
  q_atan.surrogate = kATan;
  q_sig.surrogate = kSigmoid;
  q_rect.surrogate = kRect;
  q_pq.surrogate = kPiecewiseQuadratic;
  for (int t = T - 1; t >= 0; --t) {
    switch (p.surrogate) {
      case kSigmoid: step(q_sig, t); break;
      case kRect: step(q_rect, t); break;
      case kPiecewiseQuadratic: step(q_pq, t); break;
      default: step(q_atan, t); break;
    }
    const float* gc = gcur + t * step_stride;
    for (int i = 0; i < L; ++i) {
      const double gx = gc[i];
      acc_g[i] += gx;
      acc_gx[i] += gx * static_cast<double>(aff.normalized(zat(t, i)));
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
