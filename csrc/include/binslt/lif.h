// Shared host/device maths of the fused layer: the LIF step, the surrogates, the BN epilogue and
// bit-packing index helpers. Compiled by the CPU build (and tested there against the reference
// through the CPU kernels) and by nvcc for the CUDA kernels, so both use the same arithmetic.
//
// Float operation order follows SpikingJelly 2.0.0's LIFNode (step mode 'm') so that float32
// spikes agree bit for bit with it and with binslt.reference.lif_multistep.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define BINSLT_HD __host__ __device__ __forceinline__
#define BINSLT_HD_ALWAYS_INLINE __host__ __device__ __forceinline__
#else
#define BINSLT_HD inline
// For the dispatchers whose callers' loops must see through them (with_surrogate).
#define BINSLT_HD_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace binslt {

// The surrogate derivatives g'(x) of the spike, SpikingJelly's surrogate.ATan, .Sigmoid, .Rect and
// .PiecewiseQuadratic (the ids of binslt.ops.schemas.SURROGATES).
enum Surrogate : int { kATan = 0, kSigmoid = 1, kRect = 2, kPiecewiseQuadratic = 3 };
constexpr int kNumSurrogates = 4;

struct NeuronParams {
  float tau;
  float v_threshold;
  float v_reset;      // hard-reset value (0 when soft)
  bool decay_input;
  bool soft_reset;    // v_reset is None
  bool detach_reset;
  int surrogate;      // Surrogate
  float surrogate_alpha;
  // Rect / PiecewiseQuadratic constants, each rounded once to float32 from the double alpha, as
  // SpikingJelly's torch expressions round their Python-float scalars against a float32 tensor:
  float surrogate_alpha_sq;  // alpha**2
  float surrogate_bound;     // the window's half-width: 0.5 / alpha (Rect), 1 / alpha (PQ)
  // tau a power of two: 1 / tau is exact, so x * inv_tau is the float x / tau rounds to (both
  // round the same real number once) and the kernels multiply instead of dividing.
  bool tau_pow2;
  float inv_tau;
};

// Whether 1 / tau is a float exactly (tau = 2^k with 2^-k a normal float), and that value.
inline bool exact_reciprocal(float tau, float* inv) {
  int e = 0;
  if (!(std::isfinite(tau) && tau > 0.0f) || std::frexp(tau, &e) != 0.5f) return false;
  *inv = std::ldexp(1.0f, 1 - e);  // tau = 2^(e - 1)
  return std::isnormal(*inv);
}

// NeuronParams::surrogate_bound (0 for the surrogates without a window).
inline float surrogate_bound_of(int64_t surrogate, double alpha) {
  if (surrogate == kRect) return static_cast<float>(0.5 / alpha);
  if (surrogate == kPiecewiseQuadratic) return static_cast<float>(1.0 / alpha);
  return 0.0f;
}

// The neuron settings from an op's scalar arguments (host side, after the caller's checks;
// shared by the CPU and the CUDA entry points). has_reset = false is a soft reset.
inline NeuronParams neuron_params(double tau, bool decay_input, double v_threshold,
                                  bool has_reset, double v_reset, bool detach_reset,
                                  int64_t surrogate, double surrogate_alpha) {
  NeuronParams p;
  p.tau = static_cast<float>(tau);
  p.v_threshold = static_cast<float>(v_threshold);
  p.soft_reset = !has_reset;
  p.v_reset = has_reset ? static_cast<float>(v_reset) : 0.0f;
  p.decay_input = decay_input;
  p.detach_reset = detach_reset;
  p.surrogate = static_cast<int>(surrogate);
  p.surrogate_alpha = static_cast<float>(surrogate_alpha);
  p.surrogate_alpha_sq = static_cast<float>(surrogate_alpha * surrogate_alpha);
  p.surrogate_bound = surrogate_bound_of(surrogate, surrogate_alpha);
  p.inv_tau = 0.0f;
  p.tau_pow2 = exact_reciprocal(p.tau, &p.inv_tau);
  return p;
}

// H[t] from V[t-1] and the input current X[t].
BINSLT_HD float lif_charge(float v, float x, const NeuronParams& p) {
  const float vr = p.soft_reset ? 0.0f : p.v_reset;
  if (p.tau_pow2)
    return p.decay_input ? v + (x - (v - vr)) * p.inv_tau : v - (v - vr) * p.inv_tau + x;
  return p.decay_input ? v + (x - (v - vr)) / p.tau : v - (v - vr) / p.tau + x;
}

BINSLT_HD float lif_fire(float h, const NeuronParams& p) {
  return (h - p.v_threshold >= 0.0f) ? 1.0f : 0.0f;
}

// V[t] from H[t] and S[t].
BINSLT_HD float lif_reset(float h, float s, const NeuronParams& p) {
  return p.soft_reset ? h - s * p.v_threshold : s * p.v_reset + (1.0f - s) * h;
}

// g'(x) at x = H - v_threshold for the surrogate S (SpikingJelly's backward formulas, in their
// float32 operation order):
//   ATan:    (alpha / 2) / (1 + (pi/2 alpha x)^2)
//   Sigmoid: (1 - s) s alpha,  s = 1 / (1 + exp(-alpha x))
//   Rect:    alpha where |x| < 0.5/alpha (strict), else 0
//   PiecewiseQuadratic: alpha - alpha^2 |x| where |x| <= 1/alpha (non-strict), else 0
// zero ? +0.0f : v. On the host a bit mask, not a branch: GCC does not if-convert a select whose
// arm holds float arithmetic (it might trap, -ftrapping-math), so a loop over
// `zero ? 0.0f : a * b + c` would not vectorize.
BINSLT_HD float zero_where(bool zero, float v) {
#if defined(__CUDA_ARCH__)
  return zero ? 0.0f : v;
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= zero ? 0u : ~0u;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

template <int S>
BINSLT_HD float surrogate_grad_of(float x, const NeuronParams& p) {
  const float alpha = p.surrogate_alpha;
  if (S == kATan) {
    const float z = x * (1.5707963267948966f * alpha);
    return (alpha * 0.5f) / (1.0f + z * z);
  } else if (S == kSigmoid) {
    const float s = 1.0f / (1.0f + expf(-alpha * x));
    return (1.0f - s) * s * alpha;
  } else if (S == kRect) {
    return fabsf(x) < p.surrogate_bound ? alpha : 0.0f;
  } else {
    const float ax = fabsf(x);
    return zero_where(ax > p.surrogate_bound, -p.surrogate_alpha_sq * ax + alpha);
  }
}

// Calls f(std::integral_constant<int, S>{}) for the surrogate id S == surrogate, so that f's body
// is compiled once per surrogate with S a compile-time constant (an unknown id runs ATan; the
// ops check the id first). Always inlined, so that a loop calling it keeps f's body in view
// (the BPTT row's step loops vectorize only then).
template <class F>
BINSLT_HD_ALWAYS_INLINE auto with_surrogate(int surrogate, F&& f) {
  switch (surrogate) {
    case kSigmoid: return f(std::integral_constant<int, kSigmoid>{});
    case kRect: return f(std::integral_constant<int, kRect>{});
    case kPiecewiseQuadratic: return f(std::integral_constant<int, kPiecewiseQuadratic>{});
    default: return f(std::integral_constant<int, kATan>{});
  }
}

// g'(x) for the surrogate p.surrogate (chosen at run time).
BINSLT_HD float surrogate_grad(float x, const NeuronParams& p) {
  return with_surrogate(p.surrogate,
                        [&](auto s) { return surrogate_grad_of<decltype(s)::value>(x, p); });
}

// One step of LIF BPTT. Given dL/dS[t] (gs), the carried dL/dV[t] (gv) and H[t], returns
// dL/dH[t]; writes the new carry dL/dV[t-1] = dL/dH[t] * dH[t]/dV[t-1] into *gv_prev.
// dH/dX = 1/tau (decay_input) or 1; dH[t]/dV[t-1] = 1 - 1/tau.
// S: the surrogate as a compile-time constant (kernels compiled once per surrogate), or -1 to
// take p.surrogate at run time.
template <int S = -1>
BINSLT_HD float lif_backward_step(float gs, float gv, float h, const NeuronParams& p,
                                  float* gv_prev) {
  const float x = h - p.v_threshold;
  const float sg = S < 0 ? surrogate_grad(x, p) : surrogate_grad_of<(S < 0 ? 0 : S)>(x, p);
  float dv_dh;  // dV[t]/dH[t] including the path through S[t] unless detached
  if (p.soft_reset) {
    dv_dh = p.detach_reset ? 1.0f : 1.0f - p.v_threshold * sg;
  } else {
    const float s = (h - p.v_threshold >= 0.0f) ? 1.0f : 0.0f;
    dv_dh = 1.0f - s;
    if (!p.detach_reset) dv_dh += (p.v_reset - h) * sg;
  }
  const float gh = gs * sg + gv * dv_dh;
  *gv_prev = gh * (1.0f - 1.0f / p.tau);
  return gh;
}

// dL/dX[t] from dL/dH[t].
BINSLT_HD float lif_input_grad(float gh, const NeuronParams& p) {
  if (!p.decay_input) return gh;
  return p.tau_pow2 ? gh * p.inv_tau : gh / p.tau;
}

// Packed channel-last words: channel c lives in word c / 32, bit c % 32.
BINSLT_HD int words_for(int channels) { return (channels + 31) / 32; }
BINSLT_HD int word_of(int c) { return c >> 5; }
BINSLT_HD uint32_t bit_of(int c) { return 1u << (c & 31); }

}  // namespace binslt
