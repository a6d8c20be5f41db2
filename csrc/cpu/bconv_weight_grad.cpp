// Weight gradient of the CPU binary conv (bconv_lif_bwd):
//
//   dL/dW_eff[co][ci][ky][kx] = sum over output positions of dZ * x
//
// x is binary, so this is a sum of dZ channel vectors over the set bits of the packed input: no
// multiplies. The sums are held in registers (gather_sum) and added into the gradient row once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "binslt/aligned_vector.h"
#include "binslt/big_tensor.h"
#include "binslt/bconv_cpu.h"
#include "binslt/cpu_algos.h"
#include "binslt/transpose_cpu.h"

namespace binslt {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Weight gradient: g[0:n] += sum_s gzb[offs[s] : offs[s] + n], the sum held in registers
// ---------------------------------------------------------------------------------------------

static inline __attribute__((always_inline)) void gather_sum_body(const float* gzb,
                                                                  const int32_t* offs, int m,
                                                                  float* g, int n) {
  constexpr int kW = 64;
  int c = 0;
  for (; c + kW <= n; c += kW) {
    float acc[kW] = {};
    for (int s = 0; s < m; ++s) {
      const float* src = gzb + offs[s] + c;
      for (int j = 0; j < kW; ++j) acc[j] += src[j];
    }
    for (int j = 0; j < kW; ++j) g[c + j] += acc[j];
  }
  if (c < n) {
    const int rem = n - c;
    float acc[kW] = {};
    for (int s = 0; s < m; ++s) {
      const float* src = gzb + offs[s] + c;
      for (int j = 0; j < rem; ++j) acc[j] += src[j];
    }
    for (int j = 0; j < rem; ++j) g[c + j] += acc[j];
  }
}
static void gather_sum_base(const float* gzb, const int32_t* offs, int m, float* g, int n) {
  gather_sum_body(gzb, offs, m, g, n);
}
// Channels [c, c + NV * VB / 4) of gather_sum in NV float vectors of VB bytes (the target's
// own width: 32 AVX2, 64 AVX-512), held in registers over the offsets.
template <int VB, int NV>
static inline __attribute__((always_inline)) void gather_block(const float* gzb,
                                                               const int32_t* offs, int m,
                                                               float* g, int c) {
  typedef float V __attribute__((vector_size(VB)));
  typedef float U __attribute__((vector_size(VB), aligned(4)));
  constexpr int kL = VB / 4;
  V a[NV];
  for (int j = 0; j < NV; ++j) a[j] = V{};
  for (int e = 0; e < m; ++e) {
    const float* src = gzb + offs[e] + c;
    for (int j = 0; j < NV; ++j) a[j] += *reinterpret_cast<const U*>(src + kL * j);
  }
  for (int j = 0; j < NV; ++j) {
    U* o = reinterpret_cast<U*>(g + c + kL * j);
    *o = *o + a[j];
  }
}

__attribute__((target("avx2"))) static void gather_sum_avx2(const float* gzb,
                                                            const int32_t* offs, int m, float* g,
                                                            int n) {
  // Explicit vectors: the generic body's 64-float accumulator array is not kept in registers.
  int c = 0;
  for (; c + 64 <= n; c += 64) gather_block<32, 8>(gzb, offs, m, g, c);
  for (; c + 8 <= n; c += 8) gather_block<32, 1>(gzb, offs, m, g, c);
  for (; c < n; ++c) {
    float a = 0.0f;
    for (int e = 0; e < m; ++e) a += gzb[offs[e] + c];
    g[c] += a;
  }
}
__attribute__((target("avx512f"))) static void gather_sum_avx512(const float* gzb,
                                                                 const int32_t* offs, int m,
                                                                 float* g, int n) {
  int c = 0;
  // 128 channels per pass over the offsets: 8 accumulators
  for (; c + 128 <= n; c += 128) gather_block<64, 8>(gzb, offs, m, g, c);
  for (; c + 64 <= n; c += 64) gather_block<64, 4>(gzb, offs, m, g, c);
  for (; c < n; c += 16) {
    const __mmask16 k = n - c >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (n - c)) - 1u);
    __m512 a = _mm512_setzero_ps();
    for (int e = 0; e < m; ++e) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(k, gzb + offs[e] + c));
    _mm512_mask_storeu_ps(g + c, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, g + c), a));
  }
}

// Where each input channel c0 <= ci < c1 of one image spiked (entries of ci from start[ci - c0]
// to start[ci - c0 + 1]): positions (py, px) and, for stride 1, the offset of the output pixel
// its last tap (KH-1, KW-1) feeds in the margined dZ image (>= 0).
struct SpikeLists {
  std::vector<int32_t> start, py, px, base;

  void build(const uint32_t* xb, const ConvShape& s, int64_t c0, int64_t c1, int64_t margin_top,
             int64_t margin_left, int64_t Wz) {
    const int64_t HW = s.H * s.W, n = c1 - c0;
    const int64_t w0 = c0 >> 5, w1 = (c1 + 31) >> 5;  // the words holding [c0, c1)
    // the bits of word w in [c0, c1)
    auto in_range = [&](int64_t w) {
      uint32_t m = ~0u;
      if (w == w0) m &= ~0u << (c0 & 31);
      if (w == (c1 - 1) >> 5 && (c1 & 31) != 0) m &= ~0u >> (32 - (c1 & 31));
      return m;
    };
    start.assign(n + 1, 0);
    for (int64_t pos = 0; pos < HW; ++pos)
      for (int64_t w = w0; w < w1; ++w) {
        uint32_t bits = xb[pos * s.Cw + w] & in_range(w);
        while (bits) {
          ++start[w * 32 + __builtin_ctz(bits) - c0 + 1];
          bits &= bits - 1;
        }
      }
    for (int64_t c = 0; c < n; ++c) start[c + 1] += start[c];
    py.resize(start[n]);
    px.resize(start[n]);
    base.resize(start[n]);
    std::vector<int32_t> fill(start.begin(), start.end() - 1);
    for (int64_t pos = 0; pos < HW; ++pos) {
      const int32_t iy = static_cast<int32_t>(pos / s.W), ix = static_cast<int32_t>(pos % s.W);
      for (int64_t w = w0; w < w1; ++w) {
        uint32_t bits = xb[pos * s.Cw + w] & in_range(w);
        while (bits) {
          const int64_t k = w * 32 + __builtin_ctz(bits) - c0;
          bits &= bits - 1;
          py[fill[k]] = iy;
          px[fill[k]] = ix;
          base[fill[k]++] = static_cast<int32_t>(
              ((iy + s.padding + margin_top - (s.KH - 1)) * Wz +
               (ix + s.padding + margin_left - (s.KW - 1))) *
              s.Co);
        }
      }
    }
  }
};

// Register-tile transposes for channels_last_copy.
__attribute__((target("avx512f"))) void transpose_f32_avx512(const float* src, float* dst,
                                                             int64_t R, int64_t C) {
  transpose_f32_body<16>(src, dst, R, C);
}
__attribute__((target("avx2"))) void transpose_f32_avx2(const float* src, float* dst, int64_t R,
                                                        int64_t C) {
  transpose_f32_body<8>(src, dst, R, C);
}
void transpose_f32_base(const float* src, float* dst, int64_t R, int64_t C) {
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) dst[j * R + i] = src[i * C + j];
}

}  // namespace

TransposeFn transpose_f32_fn() {
  const Isa isa = active_isa();
  return isa == Isa::kAvx512 ? &transpose_f32_avx512
         : isa == Isa::kAvx2 ? &transpose_f32_avx2
                             : &transpose_f32_base;
}

// One image src [C, H, W] (contiguous) channel-last with zero margins into dst [H + 2*mt,
// W + 2*ml, C], through tmp (H * W * C floats): channels_last_copy's body for an image, and the
// event weight gradient's image at a time.
static void image_channels_last(const float* src, int64_t C, int64_t H, int64_t W, int64_t mt,
                                int64_t ml, TransposeFn fn, float* tmp, float* dst) {
  const int64_t Hz = H + 2 * mt, Wz = W + 2 * ml;
  fn(src, tmp, C, H * W);
  std::fill(dst, dst + mt * Wz * C, 0.0f);
  std::fill(dst + (mt + H) * Wz * C, dst + Hz * Wz * C, 0.0f);
  for (int64_t y = 0; y < H; ++y) {
    float* row = dst + (mt + y) * Wz * C;
    std::fill(row, row + ml * C, 0.0f);
    std::memcpy(row + ml * C, tmp + y * W * C, W * C * sizeof(float));
    std::fill(row + (ml + W) * C, row + Wz * C, 0.0f);
  }
}

// dL/dW_eff[co][ci][ky][kx] = sum over output positions of dZ * x (x binary: no multiplies).
// For each (input channel, tap) sum the dZ channel vectors of the output pixels its spikes feed,
// in registers, and add the sum into the gradient row once.
// The sums read dZ channel-last with zero margins, [Hz = Ho + 2*margin_top, Wz = Wo +
// 2*margin_left, Co] per image: with stride 1 every (spike, tap) then lands inside it, so a tap
// only shifts the base pointer of one offset list per channel (no per-tap bounds checks); other
// strides check each position. With cl, gz is that layout for every image (channels_last_copy,
// which the margined input gradient reads too); otherwise gz is dZ itself, and the per-image
// schedule below turns each image channel-last into a buffer of its own just before its sums, so
// no copy of the whole dZ exists beside it (the block schedule makes the copy).
// Two schedules:
// * per image, where a copy of the gradient per thread fits L2 (per * 4 bytes <= 1 MiB): the
//   threads take images, each summing into its own copy of the gradient (the copies are added at
//   the end), with the image's spike lists built just before and its dZ in L2;
// * else (deep layers: many channels, small maps) blocks of images whose dZ fits half of L2
//   (kBlockBytes; one image where a single one is larger): in a block the input channels are
//   split among the threads (each owns its gradient rows and builds the block's spike lists of
//   its channels), and every (channel, tap) sums its spikes over the block's images in
//   registers. The
//   gathers then read dZ from L2 (over all images at once, MBs of dZ, they came from L3: 256->256
//   8x8 and 512->512 4x4 at N=32, T=4, rate 0.2 took 96 and 60 ms that way, 34 and 34 ms in
//   blocks on a 2-core AMD EPYC), and a gradient row is read and written once per block.
at::Tensor weight_grad(const ConvShape& s, int64_t Ci, const at::Tensor& x_packed,
                       const at::Tensor& gz, bool cl, int64_t margin_top, int64_t margin_left) {
  constexpr int64_t kBlockBytes = 256 << 10;
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  const float* dz = gz.data_ptr<float>();
  const Isa isa = active_isa();
  auto gather_sum = isa == Isa::kAvx512 ? &gather_sum_avx512
                    : isa == Isa::kAvx2   ? &gather_sum_avx2
                                          : &gather_sum_base;
  const int co = static_cast<int>(s.Co);
  const int64_t HW = s.H * s.W;
  const int64_t Hz = s.Ho + 2 * margin_top, Wz = s.Wo + 2 * margin_left;  // the margined dZ image
  const bool unit = s.stride == 1;
  const int64_t img = Hz * Wz * s.Co;  // floats per margined dZ image
  TORCH_CHECK(img < (int64_t{1} << 31), "binslt::bconv_lif_bwd: the event weight gradient takes "
              "dZ images of fewer than 2^31 values, got ", img);
  const int64_t bb = std::max<int64_t>(
      1, std::min<int64_t>({s.B, kBlockBytes / (img * static_cast<int64_t>(sizeof(float))),
                            ((int64_t{1} << 31) - 1) / img}));  // block offsets fit int32

  // Stride 1: tap (ky, kx) of a spike with base offset o reads dZ at o + tap_shift(ky, kx).
  auto tap_shift = [&](int64_t ky, int64_t kx) {
    return ((s.KH - 1 - ky) * Wz + (s.KW - 1 - kx)) * s.Co;
  };
  // Other strides: appends, for tap (ky, kx), the dZ offsets (from the block's first image, image
  // b's at (b - b0) * img) of the spikes of list k of image b (L) that land on an output pixel.
  auto strided_offsets = [&](const SpikeLists& L, int64_t b, int64_t b0, int64_t k, int64_t ky,
                             int64_t kx, std::vector<int32_t>& offs) {
    const int dy = static_cast<int>(s.padding - ky), dx = static_cast<int>(s.padding - kx);
    const int ho = static_cast<int>(s.Ho), wo = static_cast<int>(s.Wo);
    const int st = static_cast<int>(s.stride);
    for (int32_t e = L.start[k]; e < L.start[k + 1]; ++e) {
      const int oyn = L.py[e] + dy, oxn = L.px[e] + dx;
      if (oyn < 0 || oxn < 0 || oyn % st != 0 || oxn % st != 0) continue;
      const int oy = oyn / st, ox = oxn / st;
      if (oy >= ho || ox >= wo) continue;
      offs.push_back(static_cast<int32_t>((b - b0) * img +
                                          ((oy + margin_top) * Wz + (ox + margin_left)) * s.Co));
    }
  };

  at::Tensor g = at::zeros({Ci, s.KH, s.KW, s.Co}, gz.options());
  float* gp = g.data_ptr<float>();
  const int64_t per = Ci * s.KH * s.KW * s.Co;
  const int64_t nthreads = at::get_num_threads();
  if (per * static_cast<int64_t>(sizeof(float)) <= (1 << 20)) {
    // Adds channel ci's sums over one image (its lists L, its margined channel-last dZ dzi: the
    // copy's, or the thread's buffer) into G[ci] rows.
    auto accumulate = [&](const SpikeLists& L, const float* dzi, int64_t ci, float* Gci,
                          std::vector<int32_t>& offs) {
      const int32_t e0 = L.start[ci], e1 = L.start[ci + 1];
      if (e0 == e1) return;
      for (int64_t ky = 0; ky < s.KH; ++ky)
        for (int64_t kx = 0; kx < s.KW; ++kx) {
          float* gout = Gci + (ky * s.KW + kx) * s.Co;
          if (unit) {
            gather_sum(dzi + tap_shift(ky, kx), L.base.data() + e0, e1 - e0, gout, co);
            continue;
          }
          offs.clear();
          strided_offsets(L, 0, 0, ci, ky, kx, offs);
          if (!offs.empty())
            gather_sum(dzi, offs.data(), static_cast<int>(offs.size()), gout, co);
        }
    };
    line_vector<float> partial(static_cast<size_t>(nthreads - 1) * per, 0.0f);
    at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
      const int th = at::get_thread_num();
      float* G = th == 0 ? gp : partial.data() + (th - 1) * per;
      SpikeLists L;
      std::vector<int32_t> offs;
      // this thread's image of dZ, channel-last with zero margins (from dZ itself: !cl)
      const TransposeFn transpose = transpose_f32_fn();
      const int64_t HWo = s.Ho * s.Wo;
      line_vector<float> buf(cl ? 0 : img), tmp(cl ? 0 : HWo * s.Co);
      for (int64_t b = b0; b < b1; ++b) {
        if (!cl)
          image_channels_last(dz + b * s.Co * HWo, s.Co, s.Ho, s.Wo, margin_top, margin_left,
                              transpose, tmp.data(), buf.data());
        const float* dzi = cl ? dz + b * img : buf.data();
        L.build(xp + b * HW * s.Cw, s, 0, Ci, margin_top, margin_left, Wz);
        for (int64_t ci = 0; ci < Ci; ++ci)
          accumulate(L, dzi, ci, G + ci * s.KH * s.KW * s.Co, offs);
      }
    });
    if (nthreads > 1)
      at::parallel_for(0, per, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          float acc = gp[i];
          for (int64_t th = 1; th < nthreads; ++th) acc += partial[(th - 1) * per + i];
          gp[i] = acc;
        }
      });
    return g.permute({3, 0, 1, 2}).contiguous();  // [Co, Ci, kh, kw]
  }
  // The blocks read the whole copy (made here from dZ itself): on these small maps it is a few
  // MiB, and turning each block's images channel-last just before its sums (a parallel region
  // per block) measured no faster.
  const at::Tensor copy = cl ? at::Tensor() : channels_last_copy(gz, margin_top, margin_left);
  const float* dz_cl = cl ? dz : copy.data_ptr<float>();
  for (int64_t b0 = 0; b0 < s.B; b0 += bb) {
    const int64_t b1 = std::min(s.B, b0 + bb);
    const float* dzb = dz_cl + b0 * img;
    at::parallel_for(0, Ci, 1, [&](int64_t c0, int64_t c1) {
      // the block's spike lists of this thread's channels only (so they never take more memory
      // than one block's spikes)
      std::vector<SpikeLists> lists(b1 - b0);
      for (int64_t b = b0; b < b1; ++b)
        lists[b - b0].build(xp + b * HW * s.Cw, s, c0, c1, margin_top, margin_left, Wz);
      std::vector<int32_t> offs;
      for (int64_t ci = c0; ci < c1; ++ci) {
        const int64_t k = ci - c0;
        float* Gci = gp + ci * s.KH * s.KW * s.Co;
        if (unit) {
          offs.clear();
          for (int64_t b = b0; b < b1; ++b) {
            const SpikeLists& L = lists[b - b0];
            for (int32_t e = L.start[k]; e < L.start[k + 1]; ++e)
              offs.push_back(static_cast<int32_t>((b - b0) * img + L.base[e]));
          }
          if (offs.empty()) continue;
          for (int64_t ky = 0; ky < s.KH; ++ky)
            for (int64_t kx = 0; kx < s.KW; ++kx)
              gather_sum(dzb + tap_shift(ky, kx), offs.data(), static_cast<int>(offs.size()),
                         Gci + (ky * s.KW + kx) * s.Co, co);
          continue;
        }
        for (int64_t ky = 0; ky < s.KH; ++ky)
          for (int64_t kx = 0; kx < s.KW; ++kx) {
            offs.clear();
            for (int64_t b = b0; b < b1; ++b)
              strided_offsets(lists[b - b0], b, b0, k, ky, kx, offs);
            if (!offs.empty())
              gather_sum(dzb, offs.data(), static_cast<int>(offs.size()),
                         Gci + (ky * s.KW + kx) * s.Co, co);
          }
      }
    });
  }
  return g.permute({3, 0, 1, 2}).contiguous();  // [Co, Ci, kh, kw]
}

// [B, C, H, W] float (contiguous) -> [B, H + 2*margin_top, W + 2*margin_left, C] contiguous with
// zero margins, by 16x16 register-tile transposes (ATen's permute().contiguous() is several times
// slower for this layout change).
at::Tensor channels_last_copy(const at::Tensor& x, int64_t margin_top, int64_t margin_left) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hz = H + 2 * margin_top, Wz = W + 2 * margin_left;
  at::Tensor out = empty_big({B, Hz, Wz, C}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const auto fn = transpose_f32_fn();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(margin_top + margin_left > 0 ? H * W * C : 0);
    for (int64_t b = b0; b < b1; ++b) {
      float* ob = dst + b * Hz * Wz * C;
      if (margin_top + margin_left == 0)
        fn(src + b * C * H * W, ob, C, H * W);
      else
        image_channels_last(src + b * C * H * W, C, H, W, margin_top, margin_left, fn,
                            tmp.data(), ob);
    }
  });
  return out;
}

// The 0/1 input as rows [B*H*W, in_channels] float32 (channel-last: each packed word unpacks to
// 32 consecutive floats), the right-hand side of a pointwise conv's weight-gradient product.
at::Tensor unpack_rows(const at::Tensor& x_packed, int64_t in_channels) {
  const int64_t P = x_packed.size(0) * x_packed.size(1) * x_packed.size(2);
  const int64_t Cw = x_packed.size(3);
  at::Tensor out = empty_big({P, in_channels}, x_packed.options().dtype(at::kFloat));
  const uint32_t* pp = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, P, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, in_channels)),
                   [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint32_t* src = pp + p * Cw;
      float* dst = op + p * in_channels;
      for (int64_t c = 0; c < in_channels; ++c)
        dst[c] = static_cast<float>((src[c >> 5] >> (c & 31)) & 1u);
    }
  });
  return out;
}

// dL/dW_eff as one matrix product per tap over the pixel pairs that tap joins (the tap form of
// the dense weight gradient): with dZ and the 0/1 input channel-last, tap (ky, kx) is
// dZ[pixels]^T [Co, P'] x X[those pixels shifted by the tap] [P', Ci], P' the output pixels whose
// input pixel lies inside the map. Padding is never multiplied (ATen's convolution computes
// it too, and on small maps most taps of a 3x3 kernel meet it), and each product is one large
// GEMM. Costs a channel-last copy of dZ and of the input, and per tap a gather of both.
at::Tensor weight_grad_taps(const ConvShape& s, int64_t Ci, const at::Tensor& x_packed,
                            const at::Tensor& gz) {
  const at::Tensor xcl = unpack_rows(x_packed, Ci).view({s.B, s.H, s.W, Ci});
  const at::Tensor gzcl = channels_last_copy(gz, 0, 0);  // [B, Ho, Wo, Co]
  at::Tensor g = at::empty({s.KH, s.KW, s.Co, Ci}, gz.options());
  // Output rows/columns o in [o0, o1) whose input o * stride + k - padding is inside [0, n)
  auto range = [&](int64_t k, int64_t n, int64_t no) {
    const int64_t lo = s.padding - k, hi = n - 1 + s.padding - k;  // lo <= o * stride <= hi
    if (hi < 0) return std::pair<int64_t, int64_t>(0, 0);
    const int64_t o0 = lo <= 0 ? 0 : (lo + s.stride - 1) / s.stride;
    const int64_t o1 = std::min<int64_t>(no, hi / s.stride + 1);
    return std::pair<int64_t, int64_t>(o0, std::max(o0, o1));
  };
  for (int64_t ky = 0; ky < s.KH; ++ky) {
    const auto [y0, y1] = range(ky, s.H, s.Ho);
    for (int64_t kx = 0; kx < s.KW; ++kx) {
      const auto [x0, x1] = range(kx, s.W, s.Wo);
      at::Tensor out = g.select(0, ky).select(0, kx);
      if (y1 == y0 || x1 == x0) {
        out.zero_();
        continue;
      }
      const at::Tensor a = gzcl.slice(1, y0, y1).slice(2, x0, x1).reshape({-1, s.Co});
      const int64_t iy0 = y0 * s.stride + ky - s.padding, ix0 = x0 * s.stride + kx - s.padding;
      const at::Tensor b = xcl.slice(1, iy0, iy0 + (y1 - y0 - 1) * s.stride + 1, s.stride)
                               .slice(2, ix0, ix0 + (x1 - x0 - 1) * s.stride + 1, s.stride)
                               .reshape({-1, Ci});
      at::mm_out(out, a.t(), b);
    }
  }
  return g.permute({2, 3, 0, 1}).contiguous();  // [Co, Ci, kh, kw]
}

// [B, H, W, C] float (contiguous) -> [B, C, H, W] contiguous, by the same register-tile
// transposes (the inverse of channels_last_copy without margins).
at::Tensor channels_first_copy(const at::Tensor& x) {
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  at::Tensor out = empty_big({B, C, H, W}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const auto fn = transpose_f32_fn();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(src + b * H * W * C, dst + b * C * H * W, H * W, C);
  });
  return out;
}

}  // namespace cpu
}  // namespace binslt
