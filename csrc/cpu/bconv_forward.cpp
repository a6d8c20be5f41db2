// Fused binary convolution + epilogue + multi-step LIF, forward (binslt::bconv_lif and the
// inference form binslt::bconv_lif_infer).
//
// Exact ternary counts by AND + popcount over packed channel-last words (binslt/bconv_popcount.h)
// or by summing the weight columns of the input spikes (binslt/bconv_event.h), per output tile
// (image n, a block of output rows, all T), then the epilogue and the LIF over T while the tile is
// in cache. With training BatchNorm the statistics need every count first: pass 1 stores the
// counts and exact integer sums, pass 2 runs the epilogue + LIF from the stored counts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "binslt/bconv_cpu.h"
#include "binslt/bconv_event.h"
#include "binslt/bconv_popcount.h"
#include "binslt/checks.h"
#include "binslt/cpu_algos.h"
#include "binslt/epilogue_cpu.h"
#include "binslt/lif.h"
#include "binslt/pack_cpu.h"
#include "binslt/transpose_cpu.h"

namespace binslt {
namespace cpu {

ConvShape check_conv_dims(int64_t B, int64_t H, int64_t W, int64_t Cw, const char* xname,
                          const at::Tensor& w_mask, const at::Tensor& w_pos, int64_t T,
                          int64_t stride, int64_t padding, const char* op) {
  check_cpu_tensor(w_mask, op, "w_mask", 4, at::kInt, "[Co, kh, kw, Cw] int32 from pack_weight");
  check_cpu_tensor(w_pos, op, "w_pos", 4, at::kInt, "[Co, kh, kw, Cw] int32 from pack_weight");
  check_weight_planes(op, w_mask, w_pos, xname, Cw);
  check_stride_padding(op, stride, padding);
  check_timesteps(op, T, B);
  ConvShape s;
  s.B = B;
  s.H = H;
  s.W = W;
  s.Cw = Cw;
  s.Co = w_mask.size(0);
  s.KH = w_mask.size(1);
  s.KW = w_mask.size(2);
  s.T = T;
  s.N = s.B / T;
  s.stride = stride;
  s.padding = padding;
  const OutHW o = check_out_hw(op, s.H, s.W, s.KH, s.KW, stride, padding);
  s.Ho = o.Ho;
  s.Wo = o.Wo;
  return s;
}

ConvShape check_conv(const at::Tensor& x_packed, const at::Tensor& w_mask,
                     const at::Tensor& w_pos, int64_t T, int64_t stride, int64_t padding,
                     const char* op) {
  check_cpu_tensor(x_packed, op, "x_packed", 4, at::kInt,
                   "[T*N, H, W, Cw] int32 from pack_spikes");
  return check_conv_dims(x_packed.size(0), x_packed.size(1), x_packed.size(2), x_packed.size(3),
                         "x_packed", w_mask, w_pos, T, stride, padding, op);
}

at::Tensor cpu_output_like(const at::Tensor& t, at::IntArrayRef shape, const char* op,
                           const char* name) {
  check_on_cpu(t, op, name);
  return output_like(t, shape, op, name);
}

namespace {

using RowFn = void (*)(const RowGeom&, int32_t*);
using EventFn = void (*)(const EventGeom&, int16_t*);

EventFn event_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return &row_counts_event_avx512;
    case Isa::kAvx2: return &row_counts_event_avx2;
    default: return &row_counts_event_base;
  }
}

RowFn row_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return &row_counts_avx512;
    case Isa::kAvx2: return &row_counts_avx2;
    case Isa::kPopcnt: return &row_counts_popcnt;
    default: return &row_counts_scalar;
  }
}

// Weight planes repacked for the vector kernels: [KH][KW][Cw][co_pad16], and neg = mask & ~pos
// in the original layout for the scalar kernels.
struct PackedW {
  int64_t co_pad16 = 16;
  std::vector<uint32_t> pos_r, neg_r, neg;
};

PackedW repack(const ConvShape& s, const uint32_t* mask, const uint32_t* pos) {
  PackedW planes;
  planes.co_pad16 = (s.Co + 15) / 16 * 16;
  const int64_t per = s.KH * s.KW * s.Cw;
  planes.neg.resize(s.Co * per);
  planes.pos_r.assign(per * planes.co_pad16, 0u);
  planes.neg_r.assign(per * planes.co_pad16, 0u);
  for (int64_t o = 0; o < s.Co; ++o)
    for (int64_t k = 0; k < per; ++k) {
      const uint32_t m = mask[o * per + k], p = pos[o * per + k] & m;
      planes.neg[o * per + k] = m & ~p;
      planes.pos_r[k * planes.co_pad16 + o] = p;
      planes.neg_r[k * planes.co_pad16 + o] = m & ~p;
    }
  return planes;
}

// The ternary weight sign(w)*M as int8 [KH][32*Cw][KW][co_pad64] (output channels innermost, zero
// padding), the table of the event kernel (see bconv_event.h for why kx sits inside ci).
// One table row: dst[o] = sign * mask bit j of output channel o (mrow/prow: [Co] words).
static inline __attribute__((always_inline)) void table_row_body(const uint32_t* mrow,
                                                                 const uint32_t* prow, int j,
                                                                 int64_t Co, int64_t co_pad64,
                                                                 int8_t* dst) {
  for (int64_t o = 0; o < Co; ++o) {
    const int m = static_cast<int>((mrow[o] >> j) & 1u);
    const int sg = static_cast<int>((prow[o] >> j) & 1u);
    dst[o] = static_cast<int8_t>(m * (2 * sg - 1));
  }
  for (int64_t o = Co; o < co_pad64; ++o) dst[o] = 0;
}
static void table_row_base(const uint32_t* mrow, const uint32_t* prow, int j, int64_t Co,
                           int64_t co_pad64, int8_t* dst) {
  table_row_body(mrow, prow, j, Co, co_pad64, dst);
}
__attribute__((target("avx2"))) static void table_row_avx2(const uint32_t* mrow,
                                                           const uint32_t* prow, int j,
                                                           int64_t Co, int64_t co_pad64,
                                                           int8_t* dst) {
  table_row_body(mrow, prow, j, Co, co_pad64, dst);
}
__attribute__((target("avx512f,avx512bw"))) static void table_row_avx512(
    const uint32_t* mrow, const uint32_t* prow, int j, int64_t Co, int64_t co_pad64, int8_t* dst) {
  table_row_body(mrow, prow, j, Co, co_pad64, dst);
}

at::Tensor event_table(const ConvShape& s, const uint32_t* mask, const uint32_t* pos,
                       int64_t co_pad64) {
  const Isa isa = active_isa();
  auto row = isa == Isa::kAvx512 ? &table_row_avx512
             : isa == Isa::kAvx2 ? &table_row_avx2
                                 : &table_row_base;
  const int64_t Ci = 32 * s.Cw, K = s.KH * s.KW;
  // The planes as [K][Cw][Co], so that a table row reads its Co words contiguously.
  std::vector<uint32_t> mask_t(K * s.Cw * s.Co), pos_t(K * s.Cw * s.Co);
  for (int64_t o = 0; o < s.Co; ++o)
    for (int64_t kq = 0; kq < K * s.Cw; ++kq) {
      mask_t[kq * s.Co + o] = mask[o * K * s.Cw + kq];
      pos_t[kq * s.Co + o] = pos[o * K * s.Cw + kq];
    }
  at::Tensor weight_table = at::empty({K * Ci * co_pad64}, at::TensorOptions().dtype(at::kChar));
  int8_t* w = weight_table.data_ptr<int8_t>();
  // Every byte written once, branch-free (this runs on every forward): row (ky, ci, kx).
  at::parallel_for(0, s.KH * Ci * s.KW, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ky = r / (Ci * s.KW), ci = (r / s.KW) % Ci, kx = r % s.KW;
      const int64_t kq = (ky * s.KW + kx) * s.Cw + (ci >> 5);
      const int j = static_cast<int>(ci & 31);
      row(mask_t.data() + kq * s.Co, pos_t.data() + kq * s.Co, j, s.Co, co_pad64, w + r * co_pad64);
    }
  });
  return weight_table;
}

template <typename ST>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void transpose_store_avx512(
    const ST* tile, int64_t stride, int64_t Wo, int64_t Co, int16_t* dst, int64_t S) {
  transpose_store_body(tile, stride, Wo, Co, dst, S);
}
template <typename ST>
__attribute__((target("avx2"))) void transpose_store_avx2(const ST* tile, int64_t stride,
                                                          int64_t Wo, int64_t Co, int16_t* dst,
                                                          int64_t S) {
  transpose_store_body(tile, stride, Wo, Co, dst, S);
}

// One output row of counts: tile [Wo][ostride] (channel-last) -> dst [c][ox] (c stride S), and
// with sums != nullptr the exact per-channel sums of the counts and of their squares.
template <typename ST, typename CT>
inline void store_counts(Isa isa, const ST* tile, int64_t ostride, int64_t Wo, int64_t Co,
                         CT* dst, int64_t S, int64_t* sums) {
  if constexpr (std::is_same_v<CT, int16_t>) {
    if (isa == Isa::kAvx512)
      transpose_store_avx512(tile, ostride, Wo, Co, dst, S);
    else if (isa == Isa::kAvx2)
      transpose_store_avx2(tile, ostride, Wo, Co, dst, S);
    else
      transpose_store_body(tile, ostride, Wo, Co, dst, S);
  } else {
    for (int64_t ox = 0; ox < Wo; ++ox)
      for (int64_t c = 0; c < Co; ++c) dst[c * S + ox] = static_cast<CT>(tile[ox * ostride + c]);
  }
  if (sums == nullptr) return;
  for (int64_t ox = 0; ox < Wo; ++ox) {
    const ST* src = tile + ox * ostride;
    for (int64_t c = 0; c < Co; ++c) {
      const int64_t v = src[c];
      sums[2 * c] += v;
      sums[2 * c + 1] += v * v;
    }
  }
}

// lif_forward_row over integer counts (z = count * a), compiled for the wider vector units too.
// The LIF float arithmetic is the same on every path: -ffp-contract=off (setup.py) keeps the
// compiler from fusing it into FMAs, so the spikes do not depend on the CPU.
template <typename CT>
static inline __attribute__((always_inline)) void lif_counts_body(
    int T, int L, const CT* cr, int64_t count_step_stride, float a, const ChannelAffine& aff,
    const float* res, int64_t step_stride, const NeuronParams& p, float* out) {
  auto zat = [cr, a, count_step_stride](int t, int i) {
    return static_cast<float>(cr[t * count_step_stride + i]) * a;
  };
  lif_forward_row(T, L, zat, aff, res, step_stride, p, out);
}
template <typename CT>
__attribute__((target("avx512f"))) void lif_counts_avx512(int T, int L, const CT* cr,
                                                          int64_t count_step_stride, float a,
                                                          const ChannelAffine& aff,
                                                          const float* res, int64_t step_stride,
                                                          const NeuronParams& p, float* out) {
  lif_counts_body(T, L, cr, count_step_stride, a, aff, res, step_stride, p, out);
}
template <typename CT>
__attribute__((target("avx2"))) void lif_counts_avx2(int T, int L, const CT* cr,
                                                     int64_t count_step_stride, float a,
                                                     const ChannelAffine& aff,
                                                     const float* res, int64_t step_stride,
                                                     const NeuronParams& p, float* out) {
  lif_counts_body(T, L, cr, count_step_stride, a, aff, res, step_stride, p, out);
}
template <typename CT>
void lif_counts(Isa isa, int T, int L, const CT* cr, int64_t count_step_stride, float a,
                const ChannelAffine& aff, const float* res, int64_t step_stride,
                const NeuronParams& p, float* out) {
  if (isa == Isa::kAvx512)
    lif_counts_avx512(T, L, cr, count_step_stride, a, aff, res, step_stride, p, out);
  else if (isa == Isa::kAvx2)
    lif_counts_avx2(T, L, cr, count_step_stride, a, aff, res, step_stride, p, out);
  else
    lif_counts_body(T, L, cr, count_step_stride, a, aff, res, step_stride, p, out);
}

// The input: packed and padded words (xpad, [T*N, Hp, Wp, Cw]), or float spikes xf
// [T*N, C, H, W] (inference only; xpad undefined), which each tile packs itself, into a
// per-thread padded image, for the input rows it reads (non-binary values set *bad).
struct FloatInput {
  bool on = false;  // x may be null for an empty input
  const float* x = nullptr;
  int64_t C = 0;
  std::atomic<bool>* bad = nullptr;
};

// The inference output: 2x2 (stride 2) OR-pooled spikes when pool == 2 (a max of {0,1} spikes
// is their OR; rows/columns past 2*(Ho/2), 2*(Wo/2) are dropped, as max_pool2d does), and with
// packed != nullptr the spikes as pack_spikes words [T, N, Hq, Wq, Cow] (each tile writes the
// whole words of its own pixels, so no two threads write one word).
struct InferOut {
  int64_t pool = 1;
  uint32_t* packed = nullptr;
  int64_t Hq = 0, Wq = 0, Cow = 0;
  // The residual as pack_spikes words [T, N, Ho, Wo, Cow] (spikes added as 0. / 1.), read by the
  // onednn route's packed output (the caller unpacks it to floats for every other path).
  const uint32_t* res_words = nullptr;
  bool direct() const { return pool == 1 && packed == nullptr; }
};

// One inference tile (image n, output rows [oy0, oy1), counts loc [T][Co][Lmax]) into the
// pooled and/or packed output: per channel, the LIF over T into sp [T][Lmax] (residual copied
// to rl, same layout), then the 2x2 OR and the store.
template <typename CT>
void infer_tile_out(Isa isa, const ConvShape& s, const InferOut& io, int64_t n, int64_t oy0,
                    int64_t oy1, int L, int64_t Lmax, const CT* loc, const float* alpha,
                    const ChannelAffine* aff, const float* res, const NeuronParams& p, float* sp,
                    float* rl, float* spikes) {
  const int64_t S = s.Ho * s.Wo, step_stride = s.N * s.Co * S;
  const int64_t q = io.pool, rows = (oy1 - oy0) / q, oq0 = oy0 / q;
  const int64_t group = io.packed != nullptr ? 32 : 1, cstride = s.T * Lmax;
  for (int64_t c0 = 0; c0 < s.Co; c0 += group) {
    const int64_t c1 = std::min(s.Co, c0 + group);
    for (int64_t c = c0; c < c1; ++c) {
      float* spc = sp + (c - c0) * cstride;
      const int64_t off = (n * s.Co + c) * S + oy0 * s.Wo;
      if (rl != nullptr)
        for (int64_t t = 0; t < s.T; ++t)
          std::memcpy(rl + t * Lmax, res + off + t * step_stride, L * sizeof(float));
      for (int i0 = 0; i0 < L; i0 += kRowChunk) {
        const int len = std::min(kRowChunk, L - i0);
        lif_counts(isa, static_cast<int>(s.T), len, loc + c * Lmax + i0, s.Co * Lmax, alpha[c],
                   aff[c], rl ? rl + i0 : nullptr, Lmax, p, spc + i0);
      }
    }
    if (io.packed == nullptr) {
      if (q == 2)
        pool_store<2>(sp, Lmax, s.T, s.N, s.Co, s.Wo, io.Hq, io.Wq, n, c0, oq0, rows, spikes);
      else
        pool_store<1>(sp, Lmax, s.T, s.N, s.Co, s.Wo, io.Hq, io.Wq, n, c0, oq0, rows, spikes);
    } else if (q == 2) {
      pool_pack<2>(sp, cstride, static_cast<int>(c1 - c0), Lmax, s.T, s.N, s.Wo, io.Hq, io.Wq,
                   io.Cow, n, c0 / 32, oq0, rows, io.packed);
    } else {
      pool_pack<1>(sp, cstride, static_cast<int>(c1 - c0), Lmax, s.T, s.N, s.Wo, io.Hq, io.Wq,
                   io.Cow, n, c0 / 32, oq0, rows, io.packed);
    }
  }
}

// Floats of infer_tile_out's spike buffer sp: a word's 32 channels with packed output, else one.
inline int64_t tile_sp_floats(const InferOut& io, int64_t T, int64_t Lmax) {
  return io.direct() ? 0 : (io.packed != nullptr ? 32 : 1) * T * Lmax;
}

// The eval epilogue and the LIF over T of one pixel's Co channels in channel-last order: counts
// zt[t] + off (Co floats a step), residual rt[t] + roff likewise (or rt null); per channel the
// float operations of lif_counts in the same order (so the same spikes), vectorised across
// channels. The spikes go out as pack_spikes bits, words[t * Cw + w] (sp: Cw*32 floats of
// scratch, zero past Co).
template <bool kRes>
__attribute__((target("avx512f"))) static void lif_pixel_words_t(
    int64_t T, int64_t Co, int64_t Cw, const float* const* zt, int64_t off,
    const float* __restrict alpha, const float* __restrict scale, const float* __restrict shift,
    const float* const* rt, int64_t roff, const NeuronParams& p_in, float* __restrict v,
    float* __restrict sp, uint32_t* words) {
  const NeuronParams p = p_in;
  const float v0 = p.soft_reset ? 0.0f : p.v_reset;
  for (int64_t c = 0; c < Co; ++c) v[c] = v0;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    const float* __restrict z = zt[t] + off;
    const float* __restrict r = kRes ? rt[t] + roff : nullptr;
    for (int64_t c = 0; c < Co; ++c) {
      float x = z[c] * alpha[c];
      x = x * scale[c] + shift[c];
      if (kRes) x = x + r[c];
      const float h = lif_charge(v[c], x, p);
      const float sk = lif_fire(h, p);
      v[c] = lif_reset(h, sk, p);
      sp[c] = sk;
    }
    for (int64_t w = 0; w < Cw; ++w) {
      const uint32_t lo = _mm512_cmp_ps_mask(_mm512_loadu_ps(sp + 32 * w), zero, _CMP_NEQ_OQ);
      const uint32_t hi =
          _mm512_cmp_ps_mask(_mm512_loadu_ps(sp + 32 * w + 16), zero, _CMP_NEQ_OQ);
      words[t * Cw + w] = lo | (hi << 16);
    }
  }
}
static void lif_pixel_words(int64_t T, int64_t Co, int64_t Cw, const float* const* zt,
                            int64_t off, const float* alpha, const float* scale,
                            const float* shift, const float* const* rt, int64_t roff,
                            const NeuronParams& p, float* v, float* sp, uint32_t* words) {
  if (rt != nullptr)
    lif_pixel_words_t<true>(T, Co, Cw, zt, off, alpha, scale, shift, rt, roff, p, v, sp, words);
  else
    lif_pixel_words_t<false>(T, Co, Cw, zt, off, alpha, scale, shift, rt, roff, p, v, sp,
                             words);
}

// Cw pack_spikes words -> 32*Cw floats 0. / 1.
__attribute__((target("avx512f"))) static void words_to_floats(const uint32_t* w, int64_t Cw,
                                                                float* out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < Cw; ++i) {
    _mm512_storeu_ps(out + 32 * i, _mm512_maskz_mov_ps(static_cast<__mmask16>(w[i]), one));
    _mm512_storeu_ps(out + 32 * i + 16,
                     _mm512_maskz_mov_ps(static_cast<__mmask16>(w[i] >> 16), one));
  }
}

// infer_onednn's packed output: per tile (image n, output rows [oy0, oy1)), each pixel's spike
// bits straight from the channel-last counts (lif_pixel_words: no transpose), then the 2x2 OR
// of the words (pool 2) and their store; the chunk's residual is transposed channel-last first.
static void infer_onednn_packed(const ConvShape& s, const InferOut& io,
                                const std::vector<at::Tensor>& z, int64_t n0, int64_t n1,
                                int64_t R, int64_t row_blocks, const float* alpha,
                                const float* scale, const float* shift, const float* res,
                                const NeuronParams& p) {
  const int64_t S = s.Ho * s.Wo, Cw = io.Cow, q = io.pool;
  const int64_t nb = n1 - n0;
  std::vector<const float*> zt(s.T), rt(s.T, nullptr);
  for (int64_t t = 0; t < s.T; ++t) zt[t] = z[t].data_ptr<float>();
  // The residual of the chunk channel-last, [T][nb][S][Co], as the counts are.
  std::vector<float> rz(res != nullptr ? s.T * nb * S * s.Co : 0);
  if (res != nullptr) {
    const TransposeFn transpose = transpose_f32_fn();
    at::parallel_for(0, s.T * nb, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / nb, n = n0 + j % nb;
        transpose(res + (t * s.N + n) * s.Co * S, rz.data() + j * S * s.Co, s.Co, S);
      }
    });
    for (int64_t t = 0; t < s.T; ++t) rt[t] = rz.data() + t * nb * S * s.Co;
  }
  at::parallel_for(0, nb * row_blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> v(s.Co), sp(32 * Cw, 0.0f);
    std::vector<uint32_t> words(R * s.Wo * s.T * Cw);
    // a packed residual's pixel as floats [T][32*Cw], and its step pointers
    std::vector<float> rb(io.res_words != nullptr ? s.T * 32 * Cw : 0);
    std::vector<const float*> rbt(s.T);
    for (int64_t t = 0; t < s.T && io.res_words != nullptr; ++t) rbt[t] = rb.data() + t * 32 * Cw;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n = n0 + it / row_blocks, oy0 = (it % row_blocks) * R;
      const int64_t oy1 = std::min(s.Ho, oy0 + R);
      for (int64_t oy = oy0; oy < oy1; ++oy)
        for (int64_t ox = 0; ox < s.Wo; ++ox) {
          const int64_t pix = oy * s.Wo + ox, off = ((n - n0) * S + pix) * s.Co;
          const float* const* r = res != nullptr ? rt.data() : nullptr;
          int64_t roff = off;
          if (io.res_words != nullptr) {
            for (int64_t t = 0; t < s.T; ++t)
              words_to_floats(io.res_words + ((t * s.N + n) * S + pix) * Cw, Cw,
                              rb.data() + t * 32 * Cw);
            r = rbt.data();
            roff = 0;
          }
          lif_pixel_words(s.T, s.Co, Cw, zt.data(), off, alpha, scale, shift, r, roff, p,
                          v.data(), sp.data(), words.data() + ((oy - oy0) * s.Wo + ox) * s.T * Cw);
        }
      for (int64_t r = 0; r < (oy1 - oy0) / q; ++r)
        for (int64_t ox = 0; ox < io.Wq; ++ox)
          for (int64_t t = 0; t < s.T; ++t) {
            uint32_t* dst =
                io.packed + (((t * s.N + n) * io.Hq + oy0 / q + r) * io.Wq + ox) * Cw;
            const uint32_t* w0 = words.data() + ((q * r) * s.Wo + q * ox) * s.T * Cw + t * Cw;
            if (q == 1) {
              for (int64_t w = 0; w < Cw; ++w) dst[w] = w0[w];
            } else {
              const uint32_t* w1 = w0 + s.Wo * s.T * Cw;
              const int64_t px = s.T * Cw;  // the next pixel's words
              for (int64_t w = 0; w < Cw; ++w) dst[w] = w0[w] | w0[px + w] | w1[w] | w1[px + w];
            }
          }
    }
  });
}

// Inference with the counts from oneDNN's int8 convolution (OnednnConv; x_u8: the spikes as u8
// [T*N, Ci, H, W] ChannelsLast): a chunk of images at a time, its T convs (oneDNN's own threads)
// and then, in parallel over (image, row block) tiles, each tile's counts transposed from
// channel-last into the [T][Co][L] rows of the bit kernels' tiles, and the same epilogue, LIF,
// pool and store (infer_tile_out). The float counts are the integers exactly, so the spikes are
// those of the bit kernels bit for bit.
void infer_onednn(const ConvShape& s, const at::Tensor& x_u8, int64_t Ci,
                  const uint32_t* mbits, const uint32_t* pbits, const float* alpha,
                  const float* scale, const float* shift, const float* res,
                  const NeuronParams& p, const InferOut& io, float* spikes) {
  const int64_t S = s.Ho * s.Wo, step_stride = s.N * s.Co * S;
  const Isa isa = active_isa();
  const int64_t nthreads = at::get_num_threads();
  // Images per chunk: its T float count maps within ~8 MiB (cache-resident between the conv and
  // the LIF; oneDNN's large outputs otherwise cost more in page faults than in arithmetic).
  const int64_t per_image = s.T * S * s.Co * static_cast<int64_t>(sizeof(float));
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(s.N, (8 << 20) / per_image));
  const OnednnConv conv(s, Ci, mbits, pbits, nb);
  int64_t R = std::max<int64_t>(1, std::min<int64_t>(s.Ho, kRowChunk / s.Wo));
  while (R > 1 && nb * ((s.Ho + R - 1) / R) < 4 * nthreads) R = (R + 1) / 2;
  if (io.pool > 1) R = (R + io.pool - 1) / io.pool * io.pool;
  const int64_t row_blocks = (s.Ho + R - 1) / R, Lmax = R * s.Wo;
  std::vector<ChannelAffine> aff(s.Co);
  for (int64_t c = 0; c < s.Co; ++c) aff[c] = ChannelAffine{0.0f, 1.0f, scale[c], shift[c], false};
  const TransposeFn transpose = transpose_f32_fn();
  std::vector<at::Tensor> z(s.T);
  for (int64_t n0 = 0; n0 < s.N; n0 += nb) {
    const int64_t n1 = std::min(s.N, n0 + nb);
    for (int64_t t = 0; t < s.T; ++t) z[t] = conv(x_u8.narrow(0, t * s.N + n0, n1 - n0));
    if (io.packed != nullptr) {
      infer_onednn_packed(s, io, z, n0, n1, R, row_blocks, alpha, scale, shift, res, p);
      continue;
    }
    at::parallel_for(0, (n1 - n0) * row_blocks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> loc(s.T * s.Co * Lmax);
      std::vector<float> sp(tile_sp_floats(io, s.T, Lmax));
      std::vector<float> rl(io.direct() || res == nullptr ? 0 : s.T * Lmax);
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t n = n0 + it / row_blocks, oy0 = (it % row_blocks) * R;
        const int64_t oy1 = std::min(s.Ho, oy0 + R);
        const int L = static_cast<int>((oy1 - oy0) * s.Wo);
        // counts [T][Co][L] (this tile's channel stride is L)
        for (int64_t t = 0; t < s.T; ++t)
          transpose(z[t].data_ptr<float>() + ((n - n0) * S + oy0 * s.Wo) * s.Co,
                    loc.data() + t * s.Co * L, L, s.Co);
        if (io.direct()) {
          for (int64_t c = 0; c < s.Co; ++c)
            for (int i0c = 0; i0c < L; i0c += kRowChunk) {
              const int64_t off = (n * s.Co + c) * S + oy0 * s.Wo + i0c;
              lif_counts(isa, static_cast<int>(s.T), std::min(kRowChunk, L - i0c),
                         loc.data() + c * L + i0c, s.Co * L, alpha[c], aff[c],
                         res ? res + off : nullptr, step_stride, p, spikes + off);
            }
          continue;
        }
        infer_tile_out(isa, s, io, n, oy0, oy1, L, L, loc.data(), alpha, aff.data(), res, p,
                       sp.data(), rl.empty() ? nullptr : rl.data(), spikes);
      }
    });
  }
}

// infer (eval epilogue only, counts unused): each tile's counts live in a per-thread buffer
// [T][Co][R*Wo] and never reach memory (no 2-byte-per-neuron write and read back).
template <typename CT>
void forward_impl(const ConvShape& s, const at::Tensor& xpad, const FloatInput& xf,
                  const PackedW& planes, const uint32_t* pos_orig, const int8_t* weight_table,
                  int64_t co_pad64, const float* alpha, const float* scale, const float* shift,
                  const float* res, bool bn_train, double bn_eps, const NeuronParams& p,
                  bool infer, CT* counts, float* spikes, float* mean_out, float* var_out,
                  const InferOut& io = InferOut{}) {
  const int64_t Hp = s.H + 2 * s.padding, Wp = s.W + 2 * s.padding;
  const uint32_t* xp =
      xf.on ? nullptr : reinterpret_cast<const uint32_t*>(xpad.data_ptr<int32_t>());
  const int64_t S = s.Ho * s.Wo;
  const int64_t step_stride = s.N * s.Co * S;  // elements between timesteps
  const Isa isa = active_isa();
  const RowFn dense_row = row_fn(isa);
  const bool event = weight_table != nullptr;
  const EventFn event_row = event_fn(isa);
  const int64_t ostride = event ? co_pad64 : planes.co_pad16;  // row stride of the count tile

  // Tile: image n, R output rows, all T and all channels.
  const int64_t nthreads = at::get_num_threads();
  int64_t R = std::max<int64_t>(1, std::min<int64_t>(s.Ho, kRowChunk / s.Wo));
  while (R > 1 && s.N * ((s.Ho + R - 1) / R) < 4 * nthreads) R = (R + 1) / 2;
  // A pooled tile holds whole row pairs (the LIF below runs in chunks of kRowChunk neurons).
  if (io.pool > 1) R = (R + io.pool - 1) / io.pool * io.pool;
  const int64_t row_blocks = (s.Ho + R - 1) / R;

  std::vector<int64_t> sums(bn_train ? nthreads * s.Co * 2 : 0, 0);
  std::vector<ChannelAffine> aff(s.Co);
  for (int64_t c = 0; c < s.Co; ++c) aff[c] = ChannelAffine{0.0f, 1.0f, scale[c], shift[c], false};

  TORCH_INTERNAL_ASSERT(!(infer && bn_train), "bconv_lif: inference needs the eval epilogue");
  const int64_t Lmax = R * s.Wo;  // neurons per channel in a tile
  TORCH_INTERNAL_ASSERT(!(xf.on && !infer), "bconv_lif: float input is for inference only");
  const PackWordFn pack_fn = pack_word_fn();
  const int64_t plane = s.H * s.W;
  at::parallel_for(0, s.N * row_blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<CT> loc(infer ? s.T * s.Co * Lmax : 0);
    // Pooled / packed output: one channel's spikes (and residual) of the tile, [T][Lmax].
    std::vector<float> sp(tile_sp_floats(io, s.T, Lmax));
    std::vector<float> rl(io.direct() || res == nullptr ? 0 : s.T * Lmax);
    // Float input: this thread's padded packed image (margins stay zero; each tile writes the
    // interior rows it reads) and the packed rows before padding.
    std::vector<uint32_t> pimg(xf.on ? Hp * Wp * s.Cw : 0, 0u);
    std::vector<uint32_t> prow(xf.on ? std::min(s.H, (R - 1) * s.stride + s.KH) * s.W * s.Cw
                                    : 0);
    bool bad = false;
    std::vector<int32_t> tmp(event ? 0 : s.Wo * ostride);
    std::vector<int16_t> tmp16(event ? s.Wo * ostride : 0);
    EventList ev;
    std::vector<int8_t> acc8(event ? s.Wo * 256 : 0);
    std::vector<int> pending(event ? s.Wo : 0);
    EventGeom event_geom;
    event_geom.acc8 = acc8.data();
    event_geom.pending = pending.data();
    event_geom.weight_table = weight_table;
    event_geom.Wp = static_cast<int>(Wp);
    event_geom.Wo = static_cast<int>(s.Wo);
    event_geom.stride = static_cast<int>(s.stride);
    event_geom.KH = static_cast<int>(s.KH);
    event_geom.KW = static_cast<int>(s.KW);
    event_geom.Ci = static_cast<int>(32 * s.Cw);
    event_geom.co_pad64 = static_cast<int>(co_pad64);
    int64_t* my_sums = bn_train ? sums.data() + at::get_thread_num() * s.Co * 2 : nullptr;
    RowGeom g;
    g.Wp = static_cast<int>(Wp);
    g.Cw = static_cast<int>(s.Cw);
    g.Wo = static_cast<int>(s.Wo);
    g.stride = static_cast<int>(s.stride);
    g.KH = static_cast<int>(s.KH);
    g.KW = static_cast<int>(s.KW);
    g.Co = static_cast<int>(s.Co);
    g.co_pad16 = static_cast<int>(planes.co_pad16);
    g.wpos_r = planes.pos_r.data();
    g.wneg_r = planes.neg_r.data();
    g.wpos = pos_orig;
    g.wneg = planes.neg.data();
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n = it / row_blocks, oy0 = (it % row_blocks) * R;
      const int64_t oy1 = std::min(s.Ho, oy0 + R);
      for (int64_t t = 0; t < s.T; ++t) {
        const int64_t b = t * s.N + n;
        const int64_t r0 = oy0 * s.stride;  // padded input rows [r0, r1) feed this tile
        const int64_t r1 = (oy1 - 1) * s.stride + s.KH;
        if (xf.on) {
          // image rows [h0, h1) of every channel: one strided pack per word, then row copies
          // into the margined image
          const int64_t h0 = std::max<int64_t>(0, r0 - s.padding);
          const int64_t h1 = std::min<int64_t>(s.H, r1 - s.padding);
          if (h1 > h0) {
            const float* xb = xf.x + (b * xf.C) * plane + h0 * s.W;
            for (int64_t wd = 0; wd < s.Cw; ++wd)
              bad |= pack_fn(xb + 32 * wd * plane, std::min<int64_t>(32, xf.C - 32 * wd), plane,
                             (h1 - h0) * s.W, s.Cw, prow.data() + wd);
            for (int64_t h = h0; h < h1; ++h)
              std::memcpy(pimg.data() + ((h + s.padding) * Wp + s.padding) * s.Cw,
                          prow.data() + (h - h0) * s.W * s.Cw, s.W * s.Cw * sizeof(uint32_t));
          }
          g.img = pimg.data();
        } else {
          g.img = xp + b * Hp * Wp * s.Cw;
        }
        if (event) {
          ev.build(g.img + r0 * Wp * s.Cw, static_cast<int>(r1 - r0), static_cast<int>(Wp),
                   static_cast<int>(s.Cw), static_cast<int>(s.KW * co_pad64),
                   static_cast<int>(co_pad64), isa == Isa::kAvx512, isa == Isa::kAvx2);
          event_geom.start = ev.start.data();
          event_geom.off = ev.off.data();
        }
        for (int64_t oy = oy0; oy < oy1; ++oy) {
          if (event) {
            event_geom.iy0 = static_cast<int>(oy * s.stride - r0);
            event_row(event_geom, tmp16.data());
          } else {
            g.iy0 = static_cast<int>(oy * s.stride);
            dense_row(g, tmp.data());
          }
          CT* crow = infer ? loc.data() + t * s.Co * Lmax + (oy - oy0) * s.Wo
                           : counts + (b * s.Co) * S + oy * s.Wo;
          const int64_t channel_stride = infer ? Lmax : S;
          if (event)
            store_counts(isa, tmp16.data(), ostride, s.Wo, s.Co, crow, channel_stride, my_sums);
          else
            store_counts(isa, tmp.data(), ostride, s.Wo, s.Co, crow, channel_stride, my_sums);
        }
      }
      if (bn_train) continue;
      // Epilogue + LIF over T for this tile, while its counts are in cache.
      const int L = static_cast<int>((oy1 - oy0) * s.Wo);
      if (!infer || io.direct()) {
        // in chunks of kRowChunk neurons, the LIF row's buffer (a row wider than it is one tile)
        for (int64_t c = 0; c < s.Co; ++c)
          for (int i0 = 0; i0 < L; i0 += kRowChunk) {
            const int64_t off = (n * s.Co + c) * S + oy0 * s.Wo + i0;
            const CT* cr = infer ? loc.data() + c * Lmax + i0 : counts + off;
            lif_counts(isa, static_cast<int>(s.T), std::min(kRowChunk, L - i0), cr,
                       infer ? s.Co * Lmax : step_stride, alpha[c], aff[c],
                       res ? res + off : nullptr, step_stride, p, spikes + off);
          }
        continue;
      }
      infer_tile_out(isa, s, io, n, oy0, oy1, L, Lmax, loc.data(), alpha, aff.data(), res, p,
                     sp.data(), rl.empty() ? nullptr : rl.data(), spikes);
    }
    if (bad) xf.bad->store(true, std::memory_order_relaxed);
  });
  if (!bn_train) return;

  // Exact per-channel statistics of the integer counts, then Z = alpha * count.
  const int64_t M = s.T * s.N * S;
  for (int64_t c = 0; c < s.Co; ++c) {
    __int128 sm = 0, sq = 0;
    for (int64_t th = 0; th < nthreads; ++th) {
      sm += sums[(th * s.Co + c) * 2];
      sq += sums[(th * s.Co + c) * 2 + 1];
    }
    const double mc = static_cast<double>(sm) / static_cast<double>(M);
    const double vc = static_cast<double>(sq * M - sm * sm) / (static_cast<double>(M) * M);
    const double a = alpha[c];
    mean_out[c] = static_cast<float>(a * mc);
    var_out[c] = static_cast<float>(a * a * vc);
    aff[c] = ChannelAffine{mean_out[c], invstd_of(var_out[c], bn_eps), scale[c], shift[c], true};
  }
  if (M > 0) check_batch_stats("bconv_lif", mean_out, var_out, s.Co);
  const int64_t chunks = (S + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, s.N * s.Co * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t nc = it / chunks, s0 = (it % chunks) * kRowChunk;
      const int64_t c = nc % s.Co;
      const int L = static_cast<int>(std::min<int64_t>(kRowChunk, S - s0));
      const int64_t off = nc * S + s0;
      lif_counts(isa, static_cast<int>(s.T), L, counts + off, step_stride, alpha[c], aff[c],
                 res ? res + off : nullptr, step_stride, p, spikes + off);
    }
  });
}

}  // namespace

// The checked per-channel vectors (contiguous float32), residual and neuron settings of both ops.
struct ForwardArgs {
  at::Tensor alpha, scale, shift;
  std::optional<at::Tensor> res;
  NeuronParams p;
};

static ForwardArgs check_forward_args(const char* op, const ConvShape& s,
                                      const at::Tensor& alpha, const at::Tensor& scale,
                                      const at::Tensor& shift,
                                      const std::optional<at::Tensor>& residual, double bn_eps,
                                      double tau, bool decay_input, double v_threshold,
                                      std::optional<double> v_reset) {
  ForwardArgs a;
  a.p = checked_neuron(op, tau, decay_input, v_threshold, v_reset);
  check_bn_eps(op, bn_eps);
  a.alpha = cpu_channel_vec(alpha, op, "alpha", s.Co);
  a.scale = cpu_channel_vec(scale, op, "scale", s.Co);
  a.shift = cpu_channel_vec(shift, op, "shift", s.Co);
  if (residual.has_value())
    a.res = cpu_output_like(*residual, {s.T, s.N, s.Co, s.Ho, s.Wo}, op, "residual");
  return a;
}

// The body of both ops. x: x_packed [T*N, H, W, Cw] int32, or with xf.on the float spikes
// (inference only); s and args were checked by the caller. w_mask, w_pos: [Co, kh, kw, Cw] int32
// -> spikes [T, N, Co, Ho, Wo] float32, counts [T, N, Co, Ho, Wo] int16/int32 (undefined when
// infer), mean, var [Co]
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_run(
    const ConvShape& s, const at::Tensor& x, const FloatInput& xf, const at::Tensor& w_mask_in,
    const at::Tensor& w_pos_in, const ForwardArgs& args, bool bn_train, double bn_eps,
    bool infer, int64_t pool = 1, bool packed_out = false,
    const uint32_t* res_words = nullptr) {
  const at::Tensor &alpha = args.alpha, &scale = args.scale, &shift = args.shift;
  const std::optional<at::Tensor>& res = args.res;
  const NeuronParams& p = args.p;
  const std::vector<int64_t> oshape{s.T, s.N, s.Co, s.Ho, s.Wo};

  const at::Tensor w_mask = w_mask_in.contiguous(), w_pos = w_pos_in.contiguous();
  const int64_t padding = s.padding;
  const uint32_t* mbits = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
  const uint32_t* pbits = reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>());
  const auto opts = x.options();
  InferOut io;
  io.pool = pool;
  io.Hq = s.Ho / pool;
  io.Wq = s.Wo / pool;
  io.Cow = words_for(static_cast<int>(s.Co));
  io.res_words = res_words;
  at::Tensor spikes;
  if (packed_out) {
    spikes = at::empty({s.T, s.N, io.Hq, io.Wq, io.Cow}, opts.dtype(at::kInt));
    io.packed = reinterpret_cast<uint32_t*>(spikes.data_ptr<int32_t>());
  } else {
    spikes = at::empty(pool == 1 ? oshape : std::vector<int64_t>{s.T, s.N, s.Co, io.Hq, io.Wq},
                       opts.dtype(at::kFloat));
  }
  float* spikes_f = packed_out ? nullptr : spikes.data_ptr<float>();
  const float* rp = res ? res->data_ptr<float>() : nullptr;
  const int64_t Ci = xf.on ? xf.C : 32 * s.Cw;
  if (infer && spikes.numel() > 0 && use_onednn_infer(s.Ho, s.Wo, Ci, s.Co)) {
    bool bad = false;
    const at::Tensor x_u8 = xf.on ? spikes_u8_from_float(xf.x, s.B, xf.C, s.H, s.W, opts, &bad)
                                  : spikes_u8_from_packed(x.contiguous());
    if (bad) {
      xf.bad->store(true, std::memory_order_relaxed);
      return {spikes, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    infer_onednn(s, x_u8, Ci, mbits, pbits, alpha.data_ptr<float>(), scale.data_ptr<float>(),
                 shift.data_ptr<float>(), rp, p, io, spikes_f);
    return {spikes, at::Tensor(), at::Tensor(), at::Tensor()};
  }
  at::Tensor xpad;
  if (!xf.on)
    xpad = padding > 0
               ? at::constant_pad_nd(x, {0, 0, padding, padding, padding, padding}, 0).contiguous()
               : x.contiguous();
  // The event kernel accumulates in int16: only where the counts are int16 too.
  const at::ScalarType count_type = counts_dtype(s.Cw, s.KH, s.KW);
  const bool event = s.Cw > 0 && count_type == at::kShort &&
                     (xf.on ? use_event_float(xf.x, s.B * xf.C * s.H * s.W)
                            : use_event_packed(x));
  const int64_t co_pad64 = (s.Co + 63) / 64 * 64;
  PackedW planes;
  std::vector<uint32_t> pos_masked;
  at::Tensor weight_table;
  if (event) {
    weight_table = event_table(s, mbits, pbits, co_pad64);
  } else {
    planes = repack(s, mbits, pbits);
    pos_masked.resize(w_pos.numel());
    for (size_t i = 0; i < pos_masked.size(); ++i) pos_masked[i] = mbits[i] & pbits[i];
  }
  const int8_t* weight_table_ptr = event ? weight_table.data_ptr<int8_t>() : nullptr;

  at::Tensor counts;
  if (!infer) counts = at::empty(oshape, opts.dtype(count_type));
  at::Tensor mean = at::zeros({s.Co}, opts.dtype(at::kFloat));
  at::Tensor var = at::zeros({s.Co}, opts.dtype(at::kFloat));
  if (count_type == at::kShort) {
    forward_impl<int16_t>(s, xpad, xf, planes, pos_masked.data(), weight_table_ptr, co_pad64,
                          alpha.data_ptr<float>(), scale.data_ptr<float>(),
                          shift.data_ptr<float>(), rp, bn_train, bn_eps, p, infer,
                          infer ? nullptr : counts.data_ptr<int16_t>(), spikes_f,
                          mean.data_ptr<float>(), var.data_ptr<float>(), io);
  } else {
    forward_impl<int32_t>(s, xpad, xf, planes, pos_masked.data(), weight_table_ptr, co_pad64,
                          alpha.data_ptr<float>(), scale.data_ptr<float>(),
                          shift.data_ptr<float>(), rp, bn_train, bn_eps, p, infer,
                          infer ? nullptr : counts.data_ptr<int32_t>(), spikes_f,
                          mean.data_ptr<float>(), var.data_ptr<float>(), io);
  }
  return {spikes, counts, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_cpu(
    const at::Tensor& x_packed, const at::Tensor& w_mask, const at::Tensor& w_pos,
    const at::Tensor& alpha, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& residual, int64_t T, int64_t stride, int64_t padding,
    bool bn_train, double bn_eps, double tau, bool decay_input, double v_threshold,
    std::optional<double> v_reset) {
  const char* op = "bconv_lif";
  const ConvShape s = check_conv(x_packed, w_mask, w_pos, T, stride, padding, op);
  const ForwardArgs args = check_forward_args(op, s, alpha, scale, shift, residual, bn_eps, tau,
                                              decay_input, v_threshold, v_reset);
  return bconv_lif_run(s, x_packed, FloatInput{}, w_mask, w_pos, args, bn_train, bn_eps, false);
}

// Inference (eval epilogue, no backward) straight from float spikes x [T, N, C, H, W]: each
// tile packs the input rows it reads (no packed copy of the input, no second pass over it); or
// from packed words x [T, N, H, W, Cw] int32 (a previous layer's packed_out). pool = 2 ORs
// 2x2 windows of the output spikes in the tile; packed_out returns pack_spikes words
// [T, N, Ho', Wo', ceil(Co/32)] int32 instead of float spikes.
at::Tensor bconv_lif_infer_cpu(const at::Tensor& x_in, const at::Tensor& w_mask,
                               const at::Tensor& w_pos, const at::Tensor& alpha,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const std::optional<at::Tensor>& residual, int64_t stride,
                               int64_t padding, double tau, bool decay_input, double v_threshold,
                               std::optional<double> v_reset, int64_t pool, bool packed_out) {
  const char* op = "bconv_lif_infer";
  check_on_cpu(x_in, op, "x");
  const bool packed_in = check_infer_input(op, x_in);
  const int64_t T = x_in.size(0), N = x_in.size(1);
  const int64_t H = packed_in ? x_in.size(2) : x_in.size(3);
  const int64_t W = packed_in ? x_in.size(3) : x_in.size(4);
  const int64_t C = packed_in ? 0 : x_in.size(2);
  const int64_t Cw = packed_in ? x_in.size(4) : words_for(static_cast<int>(C));
  const ConvShape s = check_conv_dims(T * N, H, W, Cw, "x", w_mask, w_pos, T, stride, padding,
                                      op);
  const double bn_eps = 1e-5;  // unused: the eval epilogue
  // A residual of spikes may come packed: pack_spikes words [T, N, Ho, Wo, ceil(Co/32)] int32,
  // read as such by the onednn route's packed output, unpacked to 0. / 1. floats for the rest.
  std::optional<at::Tensor> res = residual;
  at::Tensor res_words;
  if (residual.has_value() && residual->scalar_type() == at::kInt) {
    const int64_t Cow = words_for(static_cast<int>(s.Co));
    check_on_cpu(*residual, op, "residual");
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({T, N, s.Ho, s.Wo, Cow}), "binslt::",
                      op, ": a packed residual must be spike words [T, N, Ho, Wo, ceil(Co/32)] = ",
                      at::IntArrayRef({T, N, s.Ho, s.Wo, Cow}), ", got shape ",
                      shape_str(*residual));
    const int64_t Ci = packed_in ? 32 * Cw : C;
    if (packed_out && use_onednn_infer(s.Ho, s.Wo, Ci, s.Co)) {
      res_words = residual->contiguous();
      res = std::nullopt;
    } else {
      res = unpack_spikes_cpu(residual->reshape({T * N, s.Ho, s.Wo, Cow}), s.Co)
                .view({T, N, s.Co, s.Ho, s.Wo});
    }
  }
  const ForwardArgs args = check_forward_args(op, s, alpha, scale, shift, res, bn_eps, tau,
                                              decay_input, v_threshold, v_reset);
  check_pool(op, pool, s.Ho, s.Wo);
  const uint32_t* rw =
      res_words.defined() ? reinterpret_cast<const uint32_t*>(res_words.data_ptr<int32_t>())
                          : nullptr;
  if (packed_in) {
    const at::Tensor xp = x_in.reshape({T * N, H, W, Cw});
    return std::get<0>(bconv_lif_run(s, xp, FloatInput{}, w_mask, w_pos, args, false, bn_eps,
                                     true, pool, packed_out, rw));
  }
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  std::atomic<bool> bad{false};
  const FloatInput xf{true, x.data_ptr<float>(), C, &bad};
  at::Tensor spikes = std::get<0>(
      bconv_lif_run(s, x, xf, w_mask, w_pos, args, false, bn_eps, true, pool, packed_out, rw));
  TORCH_CHECK_VALUE(!bad.load(), "binslt::", op, ": ", kNotBinaryMsg);
  return spikes;
}

}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("bconv_lif", &binslt::cpu::bconv_lif_cpu);
  m.impl("bconv_lif_infer", &binslt::cpu::bconv_lif_infer_cpu);
}
