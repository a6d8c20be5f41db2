// Input gradient of the CPU binary conv (bconv_lif_bwd): dL/dX, a transposed convolution of dZ
// with W_eff = alpha * sign(w) * M.
//
// Two forms: ATen's dense transposed convolution of the float W_eff, or, with AVX-512 and
// stride 1, the ternary kernels below, whose work follows the nonzero weights and which use no
// multiplies; plan_backward (cpu_algos.cpp) chooses.
//
// The ternary kernels:
// dX[ci][iy][ix] = sum_{ky,kx,co} W[co][ci][ky][kx] * dZ[co][iy+pad-ky][ix+pad-kx], W = +-alpha
// or 0. With dZ' = alpha * dZ in a zero-margined plane per channel, every nonzero weight is one
// add or subtract of a shifted dZ' row, 16 pixels per vector: half the weights are pruned, so
// this does half the float work of the dense transposed convolution and no multiplies. Work per
// image: for each block of 16 output channels (their dZ' planes, ~20 KB, stay in L1), each input
// channel adds its block's list of (+, -) plane offsets into 4 rows of dX at a time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "binslt/big_tensor.h"
#include "binslt/bconv_cpu.h"
#include "binslt/cpu_algos.h"
#include "binslt/lif.h"

namespace binslt {
namespace cpu {
namespace {

// The dZ' planes of the ternary kernels: MY zero margin rows, rows RS floats apart, plane
// floats per output channel (see gx_image_avx512).
struct GxGeom {
  int64_t MY, RS, plane;
};

struct TernaryLists {
  int64_t nblk;
  std::vector<int64_t> start;  // [(Ci * nblk + cb) * KW + kx + 1] into off
  std::vector<int32_t> npos;   // the first npos offsets of a list add, the rest subtract
  std::vector<int32_t> off;
};

constexpr int kGxCB = 16;  // output channels per block

// Lists per (ci, output-channel block, kx): offsets (co - c0) * plane + (pad - ky + MY) * RS into
// the block's dZ' planes for that kx (see gx_image_avx512).
TernaryLists ternary_lists(const ConvShape& s, int64_t Ci, const uint32_t* mask,
                           const uint32_t* pos, int64_t MY, int64_t RS, int64_t plane) {
  TernaryLists tl;
  tl.nblk = (s.Co + kGxCB - 1) / kGxCB;
  const int64_t per_ci = tl.nblk * s.KW;  // lists per input channel
  const int64_t nl = Ci * per_ci;
  tl.start.assign(nl + 1, 0);
  tl.npos.assign(nl, 0);
  // Count, then fill in parallel over input channels (this runs on every backward).
  std::vector<int64_t> cnt(nl, 0);
  at::parallel_for(0, Ci, 8, [&](int64_t a0, int64_t a1) {
    for (int64_t ci = a0; ci < a1; ++ci) {
      const int64_t w = ci >> 5;
      const uint32_t bit = 1u << (ci & 31);
      for (int64_t co = 0; co < s.Co; ++co)
        for (int64_t ky = 0; ky < s.KH; ++ky)
          for (int64_t kx = 0; kx < s.KW; ++kx) {
            const int64_t idx = ((co * s.KH + ky) * s.KW + kx) * s.Cw + w;
            if (mask[idx] & bit) ++cnt[ci * per_ci + (co / kGxCB) * s.KW + kx];
          }
    }
  });
  for (int64_t li = 0; li < nl; ++li) tl.start[li + 1] = tl.start[li] + cnt[li];
  tl.off.resize(tl.start[nl]);
  at::parallel_for(0, Ci, 8, [&](int64_t a0, int64_t a1) {
    std::vector<int64_t> pfill(per_ci), nfill(per_ci);
    for (int64_t ci = a0; ci < a1; ++ci) {
      const int64_t w = ci >> 5;
      const uint32_t bit = 1u << (ci & 31);
      // Positive weights first in each list: count them, then place both kinds.
      std::fill(pfill.begin(), pfill.end(), 0);
      for (int64_t co = 0; co < s.Co; ++co)
        for (int64_t ky = 0; ky < s.KH; ++ky)
          for (int64_t kx = 0; kx < s.KW; ++kx) {
            const int64_t idx = ((co * s.KH + ky) * s.KW + kx) * s.Cw + w;
            if ((mask[idx] & bit) && (pos[idx] & bit)) ++pfill[(co / kGxCB) * s.KW + kx];
          }
      for (int64_t l = 0; l < per_ci; ++l) {
        tl.npos[ci * per_ci + l] = static_cast<int32_t>(pfill[l]);
        nfill[l] = tl.start[ci * per_ci + l] + pfill[l];
        pfill[l] = tl.start[ci * per_ci + l];
      }
      for (int64_t co = 0; co < s.Co; ++co)
        for (int64_t ky = 0; ky < s.KH; ++ky)
          for (int64_t kx = 0; kx < s.KW; ++kx) {
            const int64_t idx = ((co * s.KH + ky) * s.KW + kx) * s.Cw + w;
            if (!(mask[idx] & bit)) continue;
            const int64_t l = (co / kGxCB) * s.KW + kx;
            const int32_t o =
                static_cast<int32_t>((co % kGxCB) * plane + (s.padding - ky + MY) * RS);
            tl.off[(pos[idx] & bit) ? pfill[l]++ : nfill[l]++] = o;
          }
    }
  });
  return tl;
}

// Combination form (the "four Russians" trick for ternary products): within an output-channel
// block, groups of kGxG = 4 channels; for each group and kx the 3^4 = 81 signed sums of its four
// dZ' planes are built once per image (code = sum_i d_i 3^i, d_i = 0 pruned, 1 plus, 2 minus),
// and an input channel then adds one combination per (group, ky): ~0.94 adds instead of ~2 at
// half the weights pruned. Lists per (ci, block, kx): offsets ((g * 81 + code) * plane +
// (pad - ky + MY) * RS) into the block's combination planes, all added (npos = count).
constexpr int kGxG = 4;
constexpr int kGxCombos = 81;  // 3^kGxG
constexpr int kGxGroups = kGxCB / kGxG;

TernaryLists combo_lists(const ConvShape& s, int64_t Ci, const uint32_t* mask,
                         const uint32_t* pos, int64_t MY, int64_t RS, int64_t plane) {
  TernaryLists tl;
  tl.nblk = (s.Co + kGxCB - 1) / kGxCB;
  const int64_t per_ci = tl.nblk * s.KW;
  const int64_t nl = Ci * per_ci;
  tl.start.assign(nl + 1, 0);
  tl.npos.assign(nl, 0);
  // code of (ci, group, ky, kx): the digits of the group's (up to) four channels
  auto code = [&](int64_t ci, int64_t cb, int64_t g, int64_t ky, int64_t kx) {
    const int64_t w = ci >> 5;
    const uint32_t bit = 1u << (ci & 31);
    int c = 0, p3 = 1;
    for (int i = 0; i < kGxG; ++i, p3 *= 3) {
      const int64_t co = cb * kGxCB + g * kGxG + i;
      if (co >= s.Co) break;
      const int64_t idx = ((co * s.KH + ky) * s.KW + kx) * s.Cw + w;
      if (mask[idx] & bit) c += ((pos[idx] & bit) ? 1 : 2) * p3;
    }
    return c;
  };
  std::vector<int64_t> cnt(nl, 0);
  at::parallel_for(0, Ci, 8, [&](int64_t a0, int64_t a1) {
    for (int64_t ci = a0; ci < a1; ++ci)
      for (int64_t cb = 0; cb < tl.nblk; ++cb)
        for (int64_t kx = 0; kx < s.KW; ++kx)
          for (int64_t g = 0; g < kGxGroups; ++g)
            for (int64_t ky = 0; ky < s.KH; ++ky)
              if (code(ci, cb, g, ky, kx) != 0) ++cnt[ci * per_ci + cb * s.KW + kx];
  });
  for (int64_t li = 0; li < nl; ++li) tl.start[li + 1] = tl.start[li] + cnt[li];
  tl.off.resize(tl.start[nl]);
  at::parallel_for(0, Ci, 8, [&](int64_t a0, int64_t a1) {
    for (int64_t ci = a0; ci < a1; ++ci)
      for (int64_t cb = 0; cb < tl.nblk; ++cb)
        for (int64_t kx = 0; kx < s.KW; ++kx) {
          const int64_t li = ci * per_ci + cb * s.KW + kx;
          int64_t f = tl.start[li];
          for (int64_t g = 0; g < kGxGroups; ++g)
            for (int64_t ky = 0; ky < s.KH; ++ky) {
              const int c = code(ci, cb, g, ky, kx);
              if (c == 0) continue;
              tl.off[f++] = static_cast<int32_t>((g * kGxCombos + c) * plane +
                                                 (s.padding - ky + MY) * RS);
            }
          tl.npos[li] = static_cast<int32_t>(f - tl.start[li]);
        }
  });
  return tl;
}

// The 81 combinations of each group of the block's dZ' planes (zbuf) into cbuf
// [kGxGroups][81][plane]; combination 0 stays the zero plane. Channels past Co only ever carry
// digit 0, so the combinations that read their (stale) planes are never referenced.
__attribute__((target("avx512f"))) static void build_combos(const float* zbuf, float* cbuf,
                                                            int64_t ngroups, int64_t plane) {
  for (int64_t g = 0; g < ngroups; ++g) {
    float* cg = cbuf + g * kGxCombos * plane;
    int64_t n = 1;  // combinations of the first i channels: codes [0, n)
    for (int i = 0; i < kGxG; ++i, n *= 3) {
      const float* pi = zbuf + (g * kGxG + i) * plane;
      for (int64_t c = 0; c < n; ++c) {
        const float* src = cg + c * plane;
        float* plus = cg + (c + n) * plane;
        float* minus = cg + (c + 2 * n) * plane;
        for (int64_t x = 0; x < plane; x += 16) {
          const __m512 a = _mm512_load_ps(src + x), b = _mm512_load_ps(pi + x);
          _mm512_store_ps(plus + x, _mm512_add_ps(a, b));
          _mm512_store_ps(minus + x, _mm512_sub_ps(a, b));
        }
      }
    }
  }
}

// RB rows of one 16-pixel column block: acc[r] (+/-)= zb[off + r*RS] (64-byte aligned loads).
template <int RB>
__attribute__((target("avx512f"), always_inline)) static inline void gx_rows(
    const float* zb, int64_t RS, const int32_t* off, int np, int nt, __mmask16 k, bool first,
    float* out, int64_t W) {
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r)
    acc[r] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(k, out + r * W);
  for (int j = 0; j < np; ++j) {
    const float* p = zb + off[j];
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_add_ps(acc[r], _mm512_load_ps(p + r * RS));
  }
  for (int j = np; j < nt; ++j) {
    const float* p = zb + off[j];
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_sub_ps(acc[r], _mm512_load_ps(p + r * RS));
  }
  for (int r = 0; r < RB; ++r) _mm512_mask_storeu_ps(out + r * W, k, acc[r]);
}

// One image: gxb [Ci][H][W] from gzb [Co][Ho][Wo]. For each block of 16 output channels and each
// kernel column kx, zbuf gets their dZ' = alpha * dZ planes shifted by kx (row y + MY holds
// dZ'[y][x + pad - kx], zero outside, rows RS floats apart), so that every load of a 16-pixel run
// is one aligned vector; the 16 planes (~20 KB) stay in L1 while all input channels use them.
// With cbuf (combination form, see combo_lists) the lists index the block's combination planes
// instead of zbuf.
__attribute__((target("avx512f"))) void gx_image_avx512(const ConvShape& s, int64_t Ci,
                                                        const TernaryLists& tl, const float* gzb,
                                                        const float* alpha, float* zbuf,
                                                        float* cbuf, const GxGeom& gg,
                                                        float* gxb) {
  const int64_t MY = gg.MY, RS = gg.RS, plane = gg.plane;
  const int64_t H = s.H, W = s.W, S = s.Ho * s.Wo;
  for (int64_t cb = 0; cb < tl.nblk; ++cb) {
    const int64_t c0 = cb * kGxCB, c1 = std::min(s.Co, c0 + kGxCB);
    for (int64_t kx = 0; kx < s.KW; ++kx) {
      const int64_t sh = s.padding - kx;
      for (int64_t co = c0; co < c1; ++co) {
        const float a = alpha[co];
        const float* src = gzb + co * S;
        float* dst = zbuf + (co - c0) * plane + MY * RS;
        // Row y: dst[x] = a * src[x + sh] for x + sh in [0, Wo), else 0.
        const int64_t xa = std::max<int64_t>(0, -sh), xb = std::min<int64_t>(RS, s.Wo - sh);
        for (int64_t y = 0; y < s.Ho; ++y) {
          float* d = dst + y * RS;
          const float* r = src + y * s.Wo + sh;
          for (int64_t x = 0; x < xa; ++x) d[x] = 0.0f;
          for (int64_t x = xa; x < xb; ++x) d[x] = r[x] * a;
          for (int64_t x = std::max(xa, xb); x < RS; ++x) d[x] = 0.0f;
        }
      }
      if (cbuf != nullptr) build_combos(zbuf, cbuf, (c1 - c0 + kGxG - 1) / kGxG, plane);
      const float* zb = cbuf != nullptr ? cbuf : zbuf;
      for (int64_t ci = 0; ci < Ci; ++ci) {
        const int64_t li = (ci * tl.nblk + cb) * s.KW + kx;
        const int32_t* off = tl.off.data() + tl.start[li];
        const int nt = static_cast<int>(tl.start[li + 1] - tl.start[li]);
        const int np = tl.npos[li];
        const bool first = cb == 0 && kx == 0;
        if (nt == 0 && !first) continue;
        float* gxc = gxb + ci * H * W;
        for (int64_t x0 = 0; x0 < W; x0 += 16) {
          const __mmask16 k = W - x0 >= 16 ? static_cast<__mmask16>(0xFFFF)
                                           : static_cast<__mmask16>((1u << (W - x0)) - 1u);
          int64_t y = 0;
          for (; y + 8 <= H; y += 8)
            gx_rows<8>(zb + y * RS + x0, RS, off, np, nt, k, first, gxc + y * W + x0, W);
          for (; y + 4 <= H; y += 4)
            gx_rows<4>(zb + y * RS + x0, RS, off, np, nt, k, first, gxc + y * W + x0, W);
          for (; y < H; ++y)
            gx_rows<1>(zb + y * RS + x0, RS, off, np, nt, k, first, gxc + y * W + x0, W);
        }
      }
    }
  }
}

// The dZ' plane geometry of the ternary kernels: MY margin rows above and below, rows of RS
// floats (whole aligned 16-float vectors), plane floats per channel.
GxGeom gx_geom(const ConvShape& s) {
  GxGeom g;
  g.MY = std::max<int64_t>(0, s.KH - 1 - s.padding);
  g.RS = (s.W + 15) / 16 * 16;
  g.plane = (s.Ho + 2 * g.MY) * g.RS;
  return g;
}

// Bytes of one thread's combination planes (gx_image_avx512 with cbuf).
int64_t combo_bytes(const ConvShape& s) {
  return kGxGroups * kGxCombos * gx_geom(s).plane * static_cast<int64_t>(sizeof(float));
}

void grad_x_ternary_avx512(const ConvShape& s, int64_t Ci, const float* gz,
                           const uint32_t* mask, const uint32_t* pos, const float* alpha,
                           bool combos, float* gx) {
  const GxGeom gg = gx_geom(s);
  const int64_t MY = gg.MY, RS = gg.RS, plane = gg.plane;
  const TernaryLists tl = combos ? combo_lists(s, Ci, mask, pos, MY, RS, plane)
                                 : ternary_lists(s, Ci, mask, pos, MY, RS, plane);
  at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
    // 64-byte aligned planes; the margin rows are zero and stay zero.
    at::Tensor zt = at::zeros({kGxCB * plane}, at::TensorOptions().dtype(at::kFloat));
    float* zbuf = zt.data_ptr<float>();
    at::Tensor ct;
    if (combos) ct = at::zeros({kGxGroups * kGxCombos * plane}, zt.options());
    float* cbuf = combos ? ct.data_ptr<float>() : nullptr;
    for (int64_t b = b0; b < b1; ++b)
      gx_image_avx512(s, Ci, tl, gz + b * s.Co * s.Ho * s.Wo, alpha, zbuf, cbuf, gg,
                      gx + b * Ci * s.H * s.W);
  });
}

}  // namespace

// W_eff = alpha[co] * (+1 | -1) * mask as a dense [Co, Ci, kh, kw] float tensor.
at::Tensor dense_weight(const ConvShape& s, int64_t Ci, const at::Tensor& w_mask,
                        const at::Tensor& w_pos, const float* alpha) {
  at::Tensor w = at::empty({s.Co, Ci, s.KH, s.KW}, w_mask.options().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  const uint32_t* m = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
  const uint32_t* q = reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>());
  // In the output's order ([Co][Ci][kh * kw]): input channel c of tap k is bit c % 32 of word
  // c / 32 of the planes' row (o, k). A word's 32 channels at a time, each entry picked from
  // {0, -a, +a} by its two bits (no branch on the random bits).
  at::parallel_for(0, s.Co, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Ci * s.KH * s.KW)),
                   [&](int64_t o0, int64_t o1) {
    const int64_t K = s.KH * s.KW;
    for (int64_t o = o0; o < o1; ++o) {
      const float vals[3] = {0.0f, -alpha[o], alpha[o]};
      const uint32_t* mo = m + o * K * s.Cw;
      const uint32_t* qo = q + o * K * s.Cw;
      float* dst = wp + o * Ci * K;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t word = 0; word < s.Cw; ++word) {
          const uint32_t mw = mo[k * s.Cw + word], pw = qo[k * s.Cw + word];
          const int64_t c0 = word * 32, n = std::min<int64_t>(32, Ci - c0);
          float* d = dst + c0 * K + k;
          for (int64_t j = 0; j < n; ++j)
            d[j * K] = vals[((mw >> j) & 1u) * (1u + ((pw >> j) & 1u))];
        }
    }
  });
  return w;
}

int64_t ternary_combo_bytes(const ConvShape& s) { return combo_bytes(s); }

at::Tensor input_grad_ternary(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                              const at::Tensor& w_mask, const at::Tensor& w_pos,
                              const float* alpha, bool combos) {
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
  const uint32_t* pos = reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>());
  at::Tensor gx = empty_big({s.T, s.N, Ci, s.H, s.W}, gz.options());
  grad_x_ternary_avx512(s, Ci, gz.data_ptr<float>(), mask, pos, alpha, combos,
                        gx.data_ptr<float>());
  return gx;
}

at::Tensor input_grad_dense(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                            const at::Tensor& w_mask, const at::Tensor& w_pos,
                            const float* alpha) {
  const at::Tensor w_eff = dense_weight(s, Ci, w_mask, w_pos, alpha);
  const int64_t oph = s.H - ((s.Ho - 1) * s.stride - 2 * s.padding + s.KH);
  const int64_t opw = s.W - ((s.Wo - 1) * s.stride - 2 * s.padding + s.KW);
  // NCHW in, NCHW out: as fast as oneDNN's channels-last path here (measured), and no copy of
  // the result back to the [T, N, Ci, H, W] layout.
  at::Tensor gx = at::conv_transpose2d(gz, w_eff, {}, {s.stride, s.stride},
                                       {s.padding, s.padding}, {oph, opw});
  return gx.contiguous().view({s.T, s.N, Ci, s.H, s.W});
}

at::Tensor input_grad_margined(const ConvShape& s, int64_t Ci, at::Tensor gz_cl,
                               const at::Tensor& w_mask, const at::Tensor& w_pos,
                               const float* alpha) {
  // [Ci, Co, kh, kw]: dX[ci] = sum_co W[co][ci] (rotated 180 degrees) * padded dZ[co]
  const at::Tensor w_flip =
      dense_weight(s, Ci, w_mask, w_pos, alpha).transpose(0, 1).flip({2, 3}).contiguous();
  at::Tensor gx = at::conv2d(gz_cl.permute({0, 3, 1, 2}), w_flip);  // channels-last in and out
  gz_cl.reset();
  TORCH_INTERNAL_ASSERT(gx.size(2) == s.H && gx.size(3) == s.W);
  if (!gx.is_contiguous(at::MemoryFormat::ChannelsLast))
    return gx.contiguous().view({s.T, s.N, Ci, s.H, s.W});
  return channels_first_copy(gx.permute({0, 2, 3, 1})).view({s.T, s.N, Ci, s.H, s.W});
}

}  // namespace cpu
}  // namespace binslt
