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
inline int64_t pool2_route(const uint32_t* r0, const uint32_t* r1, int64_t step, uint32_t bit) {
  return (r0[0] & bit) ? 0 : (r0[step] & bit) ? 1 : (r1[0] & bit) ? 2 : (r1[step] & bit) ? 3 : 0;
}

// One channel's spikes sp [T][sp_step] (rows of W spikes, the first the top of pooled row oq0)
// of image n, max-pooled over Q x Q windows (a max of {0, 1} spikes is their OR) for pooled rows
// [oq0, oq0 + rows), into the float output of [T, N, C, Hq, Wq] or, with ow, the pack_spikes
// words [T, N, Hq, Wq, Cw] (bit c % 32 of word c / 32, ORed in). Branch-free: spikes fire at
// ~0.2-0.5, so a branch on each pooled spike is mispredicted about as often as not. Shared by
// bn_lif_infer and bconv_lif_infer's tiles.
template <int Q>
inline void pool_store(const float* sp, int64_t sp_step, int64_t T, int64_t N, int64_t C,
                       int64_t W, int64_t Hq, int64_t Wq, int64_t Cw, int64_t n, int64_t c,
                       int64_t oq0, int64_t rows, float* of, uint32_t* ow) {
  const int shift = static_cast<int>(c & 31);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t oy = oq0 + r;
      const float* r0 = sp + t * sp_step + r * Q * W;
      const float* r1 = r0 + (Q - 1) * W;
      auto at = [&](int64_t ox) {
        return Q == 2 ? std::max(std::max(r0[2 * ox], r0[2 * ox + 1]),
                                 std::max(r1[2 * ox], r1[2 * ox + 1]))
                      : r0[ox];
      };
      if (ow != nullptr) {
        uint32_t* wrow = ow + ((t * N + n) * Hq + oy) * Wq * Cw + (c >> 5);
        for (int64_t ox = 0; ox < Wq; ++ox)
          wrow[ox * Cw] |= static_cast<uint32_t>(at(ox) != 0.0f) << shift;
      } else {
        float* frow = of + ((t * N + n) * C + c) * Hq * Wq + oy * Wq;
        for (int64_t ox = 0; ox < Wq; ++ox) frow[ox] = at(ox);
      }
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
