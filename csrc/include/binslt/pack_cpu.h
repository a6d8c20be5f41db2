// Spike packing shared by pack_spikes and the float-input inference conv: one word column of
// packed channel-last words from up to 32 float channel planes.
#pragma once

#include <algorithm>
#include <cstdint>

namespace binslt {
namespace cpu {

// words[i * Cw] for the n positions i of word wd, from its (up to) 32 channels: channel c's n
// values start at x + c * cstride. With cstride == n (a whole image) those planes are contiguous
// in x, so the reads stream through memory in order (row by row across all C planes would read
// C streams at once, much slower from DRAM). The position loop is innermost so
// that it vectorizes (compare + select + or per lane).
// Returns true when some element is neither 0 nor 1 (NaN included): spikes must be binary, and
// checking here costs nothing extra, unlike a separate pass in Python.
static inline __attribute__((always_inline)) bool pack_word_body(const float* x, int64_t nch,
                                                                 int64_t cstride, int64_t n,
                                                                 int64_t Cw, uint32_t* out) {
  constexpr int64_t kBlk = 1024;
  uint32_t word[kBlk];
  uint32_t bad = 0u;
  for (int64_t i0 = 0; i0 < n; i0 += kBlk) {
    const int64_t nb = std::min<int64_t>(kBlk, n - i0);
    for (int64_t j = 0; j < nb; ++j) word[j] = 0u;
    for (int64_t c = 0; c < nch; ++c) {
      const float* xr = x + c * cstride + i0;
      const uint32_t bit = 1u << c;
      for (int64_t j = 0; j < nb; ++j) {
        word[j] |= (xr[j] != 0.0f) ? bit : 0u;
        bad |= (xr[j] != 0.0f && xr[j] != 1.0f) ? 1u : 0u;
      }
    }
    for (int64_t j = 0; j < nb; ++j) out[(i0 + j) * Cw] = word[j];
  }
  return bad != 0u;
}
static bool pack_word_base(const float* x, int64_t nch, int64_t cstride, int64_t n, int64_t Cw,
                           uint32_t* out) {
  return pack_word_body(x, nch, cstride, n, Cw, out);
}
__attribute__((target("avx2"))) static bool pack_word_avx2(const float* x, int64_t nch,
                                                           int64_t cstride, int64_t n,
                                                           int64_t Cw, uint32_t* out) {
  return pack_word_body(x, nch, cstride, n, Cw, out);
}
__attribute__((target("avx512f,avx512bw"))) static bool pack_word_avx512(
    const float* x, int64_t nch, int64_t cstride, int64_t n, int64_t Cw, uint32_t* out) {
  return pack_word_body(x, nch, cstride, n, Cw, out);
}

using PackWordFn = bool (*)(const float*, int64_t, int64_t, int64_t, int64_t, uint32_t*);
inline PackWordFn pack_word_fn() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bw") ? &pack_word_avx512
         : __builtin_cpu_supports("avx2")   ? &pack_word_avx2
                                            : &pack_word_base;
}

// The training 2x2 max-pool's gradient route (torch's max_pool2d on {0, 1} spikes): which of a
// window's four positions (0, 1 / 2, 3 in row-major order) gets its gradient -- the first whose
// spike bit is set, or 0 when all four are 0. r0, r1: the window's top and bottom row words at
// its left column, `step` words per pixel; bit: the channel's bit in those words.
// Branch-free (random spikes mispredict a chain of branches): the four window bits in order as
// a 4-bit mask, the route its lowest set bit's index (ctz of mask | 16 is 4 for an empty window,
// & 3 makes that 0).
inline int64_t pool2_route(const uint32_t* r0, const uint32_t* r1, int64_t step, uint32_t bit) {
  const uint32_t m = static_cast<uint32_t>((r0[0] & bit) != 0) |
                     (static_cast<uint32_t>((r0[step] & bit) != 0) << 1) |
                     (static_cast<uint32_t>((r1[0] & bit) != 0) << 2) |
                     (static_cast<uint32_t>((r1[step] & bit) != 0) << 3);
  return __builtin_ctz(m | 16u) & 3;
}

// One channel's spikes sp [T][sp_step] (rows of W spikes, the first the top of pooled row oq0)
// of image n, max-pooled over Q x Q windows (a max of {0, 1} spikes is their OR) for pooled rows
// [oq0, oq0 + rows), into channel c of the float output [T, N, C, Hq, Wq]. Shared by
// bn_lif_infer and bconv_lif_infer's tiles.
template <int Q>
inline float pooled_at(const float* r0, const float* r1, int64_t ox) {
  return Q == 2 ? std::max(std::max(r0[2 * ox], r0[2 * ox + 1]),
                           std::max(r1[2 * ox], r1[2 * ox + 1]))
                : r0[ox];
}
// The rows a pooled store covers: T steps, N images of unpooled rows W wide, the pooled map
// Hq x Wq; image n, pooled rows [oq0, oq0 + rows).
struct PoolRows {
  int64_t T, N, W, Hq, Wq;
  int64_t n, oq0, rows;
};
template <int Q>
inline void pool_store(const PoolRows& g, const float* sp, int64_t sp_step, int64_t C, int64_t c,
                       float* of) {
  for (int64_t t = 0; t < g.T; ++t)
    for (int64_t r = 0; r < g.rows; ++r) {
      const float* r0 = sp + t * sp_step + r * Q * g.W;
      const float* r1 = r0 + (Q - 1) * g.W;
      float* frow = of + ((t * g.N + g.n) * C + c) * g.Hq * g.Wq + (g.oq0 + r) * g.Wq;
      for (int64_t ox = 0; ox < g.Wq; ++ox) frow[ox] = pooled_at<Q>(r0, r1, ox);
    }
}

// The same for the nch <= 32 channels of one pack_spikes word: channel k's spikes at
// sp + k * cstride, each [T][sp_step] as above, into word `word` of every pooled pixel of the
// words [T, N, Hq, Wq, Cw] (bit k; the whole word is written, so the output needs no zeroing).
// The bits of a run of pixels are gathered in registers, a channel at a time, then stored once:
// no read-modify-write of a word per spike.
template <int Q>
inline void pool_pack(const PoolRows& g, const float* sp, int64_t cstride, int nch,
                      int64_t sp_step, int64_t Cw, int64_t word, uint32_t* ow) {
  constexpr int64_t kRun = 64;
  const int64_t W = g.W, Wq = g.Wq;
  for (int64_t t = 0; t < g.T; ++t)
    for (int64_t r = 0; r < g.rows; ++r) {
      uint32_t* wrow = ow + ((t * g.N + g.n) * g.Hq + g.oq0 + r) * Wq * Cw + word;
      for (int64_t x0 = 0; x0 < Wq; x0 += kRun) {
        const int64_t len = std::min(kRun, Wq - x0);
        uint32_t bits[kRun] = {};
        for (int k = 0; k < nch; ++k) {
          const float* r0 = sp + k * cstride + t * sp_step + r * Q * W + Q * x0;
          const float* r1 = r0 + (Q - 1) * W;
          for (int64_t j = 0; j < len; ++j)
            bits[j] |= static_cast<uint32_t>(pooled_at<Q>(r0, r1, j) != 0.0f) << k;
        }
        for (int64_t j = 0; j < len; ++j) wrow[(x0 + j) * Cw] = bits[j];
      }
    }
}

// The error for non-binary spike input (pack_spikes and bconv_lif_infer).
constexpr const char* kNotBinaryMsg =
    "the input must be binary spikes (every element 0. or 1.), but it holds other values (or "
    "NaN). For real-valued input (e.g. images in the first layer) construct the layer with "
    "input='real'.";

}  // namespace cpu
}  // namespace binslt
