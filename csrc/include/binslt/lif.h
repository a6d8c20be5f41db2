// Shared host/device maths of the fused layer: the LIF step, the surrogates, the BN epilogue and
// bit-packing index helpers. Compiled by the CPU build (and tested there against the reference
// through the CPU kernels) and by nvcc for the CUDA kernels, so both use the same arithmetic.
//
// Float operation order follows SpikingJelly 2.0.0's LIFNode (step mode 'm') so that float32
// spikes agree bit for bit with it and with binslt.reference.lif_multistep.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define BINSLT_HD __host__ __device__ __forceinline__
#else
#define BINSLT_HD inline
#endif

namespace binslt {

enum Surrogate : int { kATan = 0, kSigmoid = 1 };

struct NeuronParams {
  float tau;
  float v_threshold;
  float v_reset;      // hard-reset value (0 when soft)
  bool decay_input;
  bool soft_reset;    // v_reset is None
  bool detach_reset;
  int surrogate;      // Surrogate
  float surrogate_alpha;
};

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
  return p;
}

// H[t] from V[t-1] and the input current X[t].
BINSLT_HD float lif_charge(float v, float x, const NeuronParams& p) {
  const float vr = p.soft_reset ? 0.0f : p.v_reset;
  return p.decay_input ? v + (x - (v - vr)) / p.tau : v - (v - vr) / p.tau + x;
}

BINSLT_HD float lif_fire(float h, const NeuronParams& p) {
  return (h - p.v_threshold >= 0.0f) ? 1.0f : 0.0f;
}

// V[t] from H[t] and S[t].
BINSLT_HD float lif_reset(float h, float s, const NeuronParams& p) {
  return p.soft_reset ? h - s * p.v_threshold : s * p.v_reset + (1.0f - s) * h;
}

// g'(x) at x = H - v_threshold (SpikingJelly's ATan / Sigmoid derivatives).
BINSLT_HD float surrogate_grad(float x, int surrogate, float alpha) {
  if (surrogate == kATan) {
    const float z = x * (1.5707963267948966f * alpha);
    return (alpha * 0.5f) / (1.0f + z * z);
  }
  const float s = 1.0f / (1.0f + expf(-alpha * x));
  return (1.0f - s) * s * alpha;
}

// One step of LIF BPTT. Given dL/dS[t] (gs), the carried dL/dV[t] (gv) and H[t], returns
// dL/dH[t]; writes the new carry dL/dV[t-1] = dL/dH[t] * dH[t]/dV[t-1] into *gv_prev.
// dH/dX = 1/tau (decay_input) or 1; dH[t]/dV[t-1] = 1 - 1/tau.
BINSLT_HD float lif_backward_step(float gs, float gv, float h, const NeuronParams& p,
                                  float* gv_prev) {
  const float sg = surrogate_grad(h - p.v_threshold, p.surrogate, p.surrogate_alpha);
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
  return p.decay_input ? gh / p.tau : gh;
}

// Packed channel-last words: channel c lives in word c / 32, bit c % 32.
BINSLT_HD int words_for(int channels) { return (channels + 31) / 32; }
BINSLT_HD int word_of(int c) { return c >> 5; }
BINSLT_HD uint32_t bit_of(int c) { return 1u << (c & 31); }

}  // namespace binslt
