// Both gradients of bconv_lif_bwd on a small feature map, in the "unfold" form: the whole conv as
// one matrix A [Co*P, Ci*Q] over the P = Ho*Wo output and Q = H*W input pixels,
//   Z[b] = A X[b],   A[(co, p), (ci, q)] = W_eff[co][ci][tap(p, q)]  (0 where no tap connects),
// so that dL/dX = dZ A (one GEMM) and dL/dW_eff[co][ci][t] = the sum of (dZ^T X)[(co, p), (ci, q)]
// over the pixel pairs (p, q) that tap t connects (one GEMM and a fold).
//
// Why: ATen's (oneDNN's) convolution of a 3x3 kernel over a 1x1 or 2x2 map computes every tap
// against zero padding: P * kh * kw products per (co, ci) where only the pairs inside the map
// count. The unfold form does P * Q, so 9x fewer at 1x1 (only the centre tap reaches the map) and
// 2.25x fewer at 2x2 (16 pixel pairs instead of 36) -- the deep layers of VGG-11 and of a ResNet
// on 32x32 input, which hold most of the weights. A 512->512 3x3 layer at 1x1, N=32, T=4 spent
// 65 ms in ATen's weight gradient; here it is one [512, 128] x [128, 512] product.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "binslt/bconv_cpu.h"

namespace binslt {
namespace cpu {

namespace {

// The pixel pairs of the map that a kernel tap connects: output pixel p reads input pixel q
// through tap t = ky * KW + kx, where ky = iy - oy * stride + padding (so a pair has at most one).
struct TapPair {
  int32_t t, p, q;
};

std::vector<TapPair> tap_pairs(const ConvShape& s) {
  std::vector<TapPair> pairs;
  for (int64_t oy = 0; oy < s.Ho; ++oy)
    for (int64_t ox = 0; ox < s.Wo; ++ox)
      for (int64_t ky = 0; ky < s.KH; ++ky)
        for (int64_t kx = 0; kx < s.KW; ++kx) {
          const int64_t iy = oy * s.stride - s.padding + ky, ix = ox * s.stride - s.padding + kx;
          if (iy < 0 || iy >= s.H || ix < 0 || ix >= s.W) continue;
          pairs.push_back({static_cast<int32_t>(ky * s.KW + kx),
                           static_cast<int32_t>(oy * s.Wo + ox),
                           static_cast<int32_t>(iy * s.W + ix)});
        }
  return pairs;
}

// Output channels per parallel chunk: about 16K matrix entries.
int64_t channel_grain(int64_t per_channel) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_channel));
}

}  // namespace

int64_t unfold_matrix_bytes(const ConvShape& s, int64_t Ci) {
  return s.Co * s.Ho * s.Wo * Ci * s.H * s.W * static_cast<int64_t>(sizeof(float));
}

// dL/dW_eff [Co, Ci, kh, kw] = fold(dZ^T X): gz [B, Co, Ho, Wo], x [B, Ci, H, W] 0/1 floats.
at::Tensor weight_grad_unfold(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                              const at::Tensor& x) {
  const int64_t P = s.Ho * s.Wo, Q = s.H * s.W, K = s.KH * s.KW;
  const std::vector<TapPair> pairs = tap_pairs(s);
  const at::Tensor g = at::mm(gz.reshape({s.B, s.Co * P}).t(), x.reshape({s.B, Ci * Q}));
  at::Tensor gw = at::zeros({s.Co, Ci, s.KH, s.KW}, gz.options());
  const float* gp = g.data_ptr<float>();
  float* wp = gw.data_ptr<float>();
  at::parallel_for(0, s.Co, channel_grain(P * Ci * Q), [&](int64_t o0, int64_t o1) {
    for (int64_t co = o0; co < o1; ++co)
      for (const TapPair& pr : pairs) {
        const float* src = gp + (co * P + pr.p) * Ci * Q + pr.q;
        float* dst = wp + co * Ci * K + pr.t;
        for (int64_t ci = 0; ci < Ci; ++ci) dst[ci * K] += src[ci * Q];
      }
  });
  return gw;
}

// dL/dX [T, N, Ci, H, W] = dZ A, A built from the weight's bit planes (w_mask, w_pos:
// [Co, kh, kw, Cw] int32) and alpha [Co].
at::Tensor input_grad_unfold(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                             const at::Tensor& w_mask, const at::Tensor& w_pos,
                             const float* alpha) {
  const int64_t P = s.Ho * s.Wo, Q = s.H * s.W, K = s.KH * s.KW;
  const std::vector<TapPair> pairs = tap_pairs(s);
  at::Tensor a = at::zeros({s.Co * P, Ci * Q}, gz.options());
  float* ap = a.data_ptr<float>();
  const uint32_t* m = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
  const uint32_t* q = reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>());
  std::vector<int64_t> used;  // the taps that reach the map (only the centre at 1x1)
  for (int64_t t = 0; t < K; ++t)
    if (std::any_of(pairs.begin(), pairs.end(), [t](const TapPair& pr) { return pr.t == t; }))
      used.push_back(t);
  at::parallel_for(0, s.Co, channel_grain(P * Ci * Q), [&](int64_t o0, int64_t o1) {
    std::vector<float> taps(static_cast<size_t>(K * Ci));  // W_eff[co][.][t] per used tap t
    for (int64_t co = o0; co < o1; ++co) {
      const float al = alpha[co];
      for (const int64_t t : used) {
        signed_weight_row(m + (co * K + t) * s.Cw, q + (co * K + t) * s.Cw, al, Ci,
                          taps.data() + t * Ci, 1);
      }
      for (const TapPair& pr : pairs) {
        const float* w = taps.data() + pr.t * Ci;
        float* dst = ap + (co * P + pr.p) * Ci * Q + pr.q;
        for (int64_t ci = 0; ci < Ci; ++ci) dst[ci * Q] = w[ci];
      }
    }
  });
  return at::mm(gz.reshape({s.B, s.Co * P}), a).view({s.T, s.N, Ci, s.H, s.W});
}

}  // namespace cpu
}  // namespace binslt
