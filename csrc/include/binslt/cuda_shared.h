// Host/device helpers of the CUDA kernels that the host compiler can build too, so that
// tests/test_cuda_shared.py checks them on the CPU (through a load_inline test extension) against
// binslt.reference: conv geometry, popcount and the ternary word dot, bit -> int8 byte expansion
// for the tensor-core path, the BN epilogue in the reference's float operation order, the BN
// backward per-element formula and the LIF recurrences over T (built on lif.h's step functions).
#pragma once

#include <cmath>
#include <cstdint>

#include "binslt/lif.h"

namespace binslt {


BINSLT_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// sum_c x_c * w_c over one packed word, w in {-1, 0, +1} given as (mask, pos) bit planes.
BINSLT_HD int ternary_dot(uint32_t x, uint32_t mask, uint32_t pos) {
  return 2 * popcount32(x & pos) - popcount32(x & mask);
}

// The low 4 bits of nib -> 4 bytes in {0, 1}: bit i -> byte i (little-endian). The multiply adds
// copies of nib shifted by 0, 7, 14 and 21 bits (they do not overlap, so no carries); copy i puts
// bit i at bit 8*i, and the mask keeps exactly those bits.
BINSLT_HD uint32_t nibble_to_bytes(uint32_t nib) {
  return ((nib & 0xFu) * 0x00204081u) & 0x01010101u;
}

// Bytes 4q..4q+3 of the int8 expansion of a spike word: byte i = bit (4q + i) in {0, 1}.
BINSLT_HD uint32_t spike_bytes(uint32_t word, int q) { return nibble_to_bytes(word >> (4 * q)); }

// Bytes 4q..4q+3 of the int8 expansion of a ternary weight word: +1 (0x01) where pos, -1 (0xFF)
// where mask and not pos, 0 elsewhere.
BINSLT_HD uint32_t ternary_bytes(uint32_t mask, uint32_t pos, int q) {
  const uint32_t m = nibble_to_bytes(mask >> (4 * q));
  const uint32_t p = nibble_to_bytes(pos >> (4 * q));
  return p | ((m & ~p) * 0xFFu);  // each byte of (m & ~p) is 0 or 1: no carries
}

// Pack up to 32 flags into one word: bit i = flag(c0 + i) for i < count.
template <class Flag>
BINSLT_HD uint32_t pack_word(Flag flag, int c0, int count) {
  uint32_t w = 0;
  for (int i = 0; i < count; ++i) {
    if (flag(c0 + i)) w |= 1u << i;
  }
  return w;
}

// Float mul/add rounded separately (never contracted into an FMA), so device results match
// PyTorch's separate elementwise ops, as the reference computes them.
BINSLT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

BINSLT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

BINSLT_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// Z = count * alpha[c] for the binary conv (counts are exact integers).
BINSLT_HD float count_to_z(int count, float alpha) { return mul_rn(static_cast<float>(count), alpha); }

// 1 / sqrt(var + eps) in float32, as rsqrt(var + eps) in the reference.
BINSLT_HD float bn_invstd(float var, float eps) { return 1.0f / sqrtf(var + eps); }

// Y = (Z - mean) * invstd * scale + shift (bn_train) or Z * scale + shift, in the reference's
// operation order: ((z - mean) * invstd) * scale + shift.
BINSLT_HD float epilogue_apply(float z, float scale, float shift, float mean, float invstd,
                               bool bn_train) {
  const float y = bn_train ? mul_rn(sub_rn(z, mean), invstd) : z;
  return add_rn(mul_rn(y, scale), shift);
}

// dL/dZ of training-mode BN for one element, from gy = dL/dY, xhat = (z - mean) * invstd and the
// per-channel means over the M = T*N*spatial elements: mean_gy = sum(gy)/M and
// mean_gy_xhat = sum(gy * xhat)/M. (Gradient through the batch mean and variance included.)
BINSLT_HD double bn_train_input_grad(double gy, double xhat, double scale, double invstd,
                                     double mean_gy, double mean_gy_xhat) {
  return scale * invstd * (gy - mean_gy - xhat * mean_gy_xhat);
}

// The LIF neuron over T steps for one neuron, from V[-1] = v_reset (0 for soft reset).
// x_at(t) -> X[t]; emit(t, H[t], S[t]).
template <class XAt, class Emit>
BINSLT_HD void lif_forward_sequence(int T, const NeuronParams& p, XAt x_at, Emit emit) {
  float v = p.soft_reset ? 0.0f : p.v_reset;
  for (int t = 0; t < T; ++t) {
    const float h = lif_charge(v, x_at(t), p);
    const float s = lif_fire(h, p);
    v = lif_reset(h, s, p);
    emit(t, h, s);
  }
}

// BPTT through the LIF neuron for one neuron, t = T-1 .. 0. gs_at(t) -> dL/dS[t], h_at(t) -> H[t]
// (recomputed by lif_forward_sequence); emit(t, dL/dX[t]). h_at(t) is read before emit(t, .),
// so H may be stored in the output buffer.
template <class GsAt, class HAt, class Emit>
BINSLT_HD void lif_backward_sequence(int T, const NeuronParams& p, GsAt gs_at, HAt h_at,
                                     Emit emit) {
  float gv = 0.0f;  // dL/dV[t], carried backwards
  for (int t = T - 1; t >= 0; --t) {
    const float gh = lif_backward_step(gs_at(t), gv, h_at(t), p, &gv);
    emit(t, lif_input_grad(gh, p));
  }
}

}  // namespace binslt
