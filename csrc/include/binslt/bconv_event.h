// Event-driven row kernels of the binary convolution: exact ternary counts by summing, for every
// output pixel, the int8 weight columns of the input spikes in its receptive field.
//
//   count[ox][co] = sum_{ky,kx} sum_{ci spiking at (iy0+ky, ox*stride+kx)} W[ky][kx][ci][co]
//
// W is the ternary effective weight sign(w)*M as an int8 table [KH][Ci][KW][co_pad64] (output
// channels innermost, co_pad64 = Co rounded up to 64, zero-filled). The spikes of the padded
// input window are listed once per image tile (EventList), each as the byte offset
// (ci*KW + c)*co_pad64, c its window column. Output pixel ox of kernel row ky reads the window
// columns [ox*stride, ox*stride + KW), whose events are one contiguous run of the list, and the
// event in column c belongs to tap kx = c - ox*stride: its weight row is at
// table_ky + offset - ox*stride*co_pad64. So one loop covers a whole kernel row (KW taps) per
// pixel: a loop per tap ends after a few events and its exit branch is mispredicted about once
// per loop.
// Per output pixel the columns are added in int8 lanes (64 output channels per 512-bit vector),
// which is exact for up to 127 events; every 127 events the lanes are widened into the int16
// output row (the caller only takes this path where every count fits int16). The work follows
// the number of input spikes, where the bit-parallel kernels (bconv_popcount.h) do a fixed amount
// per input word: this wins at low firing rates, they win at high ones (the caller picks by the
// measured rate, cpu_algos.cpp).
//
// One body in GCC vector extensions, compiled three times with the target's own vector width:
// AVX-512BW (64 bytes), AVX2 (32) and the x86-64 baseline (16).
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace binslt {
namespace cpu {

// int8 vectors of VB bytes (the widest the target has: 64 AVX-512, 32 AVX2, 16 baseline); wider
// GCC vectors than the target's registers lower to very slow code.
template <int VB>
struct I8Vec {
  typedef int8_t v __attribute__((vector_size(VB)));
  typedef int8_t u __attribute__((vector_size(VB), aligned(1)));
};

// The spikes of rows [0, rows) of a padded image window: pixel p = r * Wp + c has its events at
// off[start[p] .. start[p+1]), each the byte offset ci * ci_stride + c * col_stride.
struct EventList {
  std::vector<int32_t> start, off;

  // img: [rows][Wp][Cw] packed words (bit j of word w is channel 32w + j). avx512: list the set
  // bits 16 at a time with VPCOMPRESSD; avx2: 8 at a time, a byte's offsets from a table (the
  // caller checked the CPU); otherwise one by one.
  void build(const uint32_t* img, int rows, int Wp, int Cw, int ci_stride, int col_stride,
             bool avx512, bool avx2 = false) {
    const int P = rows * Wp;
    start.resize(P + 1);
    const size_t cap = static_cast<size_t>(P) * Cw * 32 + 16;
    if (off.size() < cap) off.resize(cap);
    start[P] = avx512 ? list_avx512(img, P, Wp, Cw, ci_stride, col_stride)
               : avx2 ? list_avx2(img, P, Wp, Cw, ci_stride, col_stride)
                      : list_scalar(img, P, Wp, Cw, ci_stride, col_stride);
  }

 private:
  // byte_off[8 * v + i]: (position of the i-th set bit of byte v) * byte_ci_stride, 0 past its
  // popcount (list_avx2's table, rebuilt when the stride changes).
  std::vector<int32_t> byte_off;
  int byte_ci_stride = -1;

  // The list loop shared by the three builders: for every pixel p and every word w of it,
  // n = word(o, n, wbase, bits) appends the offsets of the set bits of bits, wbase being the
  // offset of the word's bit 0 (pixel column and 32 * w channels). A builder with a target
  // attribute passes its word function as a lambda with the same target, which GCC inlines here
  // once this loop is inlined into the builder.
  template <class Word>
  inline __attribute__((always_inline)) int list_words(const uint32_t* img, int P, int Wp, int Cw,
                                                       int ci_stride, int col_stride,
                                                       const Word& word) {
    int n = 0;
    int32_t* o = off.data();
    for (int p = 0; p < P; ++p) {
      start[p] = n;
      const uint32_t* wp = img + static_cast<size_t>(p) * Cw;
      const int base = (p % Wp) * col_stride;
      for (int w = 0; w < Cw; ++w) {
        n = word(o, n, base + 32 * w * ci_stride, wp[w]);
      }
    }
    return n;
  }

  // Each nonzero byte of a word stores 8 offsets (its table row plus the byte's base) and
  // advances by its popcount: no loop-carried bit-clearing chain per event. The stores run up to
  // 7 entries past the last event, inside off's 16-entry slack.
  __attribute__((target("avx2,popcnt"))) int list_avx2(const uint32_t* img, int P, int Wp, int Cw,
                                                       int ci_stride, int col_stride) {
    if (byte_ci_stride != ci_stride) {
      byte_off.assign(256 * 8, 0);
      for (int v = 0; v < 256; ++v)
        for (int j = 0, i = 0; j < 8; ++j)
          if ((v >> j) & 1) byte_off[8 * v + i++] = j * ci_stride;
      byte_ci_stride = ci_stride;
    }
    const int32_t* tab = byte_off.data();
    return list_words(img, P, Wp, Cw, ci_stride, col_stride,
                      [tab, ci_stride](int32_t* o, int n, int wbase, uint32_t bits)
                          __attribute__((target("avx2,popcnt"))) {
                            if (bits == 0) return n;
                            for (int b = 0; b < 4; ++b) {
                              const uint32_t v = (bits >> (8 * b)) & 255u;
                              if (v == 0) continue;
                              const __m256i row =
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tab + 8 * v));
                              const __m256i add = _mm256_set1_epi32(wbase + 8 * b * ci_stride);
                              _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + n),
                                                  _mm256_add_epi32(row, add));
                              n += __builtin_popcount(v);
                            }
                            return n;
                          });
  }

  int list_scalar(const uint32_t* img, int P, int Wp, int Cw, int ci_stride, int col_stride) {
    return list_words(img, P, Wp, Cw, ci_stride, col_stride,
                      [ci_stride](int32_t* o, int n, int wbase, uint32_t bits) {
                        while (bits) {
                          o[n++] = wbase + __builtin_ctz(bits) * ci_stride;
                          bits &= bits - 1;
                        }
                        return n;
                      });
  }

  __attribute__((target("avx512f"))) int list_avx512(const uint32_t* img, int P, int Wp, int Cw,
                                                     int ci_stride, int col_stride) {
    const __m512i lane = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(ci_stride));
    return list_words(img, P, Wp, Cw, ci_stride, col_stride,
                      [lane, ci_stride](int32_t* o, int n, int wbase, uint32_t bits)
                          __attribute__((target("avx512f"))) {
                            if (bits == 0) return n;
                            for (int h = 0; h < 2; ++h) {
                              const __mmask16 m = static_cast<__mmask16>(bits >> (16 * h));
                              if (m == 0) continue;
                              const __m512i v = _mm512_add_epi32(
                                  lane, _mm512_set1_epi32(wbase + 16 * h * ci_stride));
                              _mm512_storeu_si512(o + n, _mm512_maskz_compress_epi32(m, v));
                              n += __builtin_popcount(static_cast<unsigned>(m));
                            }
                            return n;
                          });
  }
};

struct EventGeom {
  const int32_t* start;  // EventList::start of the window
  const int32_t* off;    // EventList::off
  const int8_t* weight_table;  // [KH][Ci][KW][co_pad64]
  int Wp, Wo, stride, KH, KW, Ci, co_pad64;
  int iy0;  // window row of tap ky = 0 for this output row
  int8_t* acc8;  // scratch: [Wo][256] int8 lanes
  int* pending;  // scratch: [Wo] events summed into acc8 since its last widening
};

// Adds the VB int8 lanes into VB int16 outputs and clears them.
template <int VB>
static inline __attribute__((always_inline)) void flush_lanes(typename I8Vec<VB>::v& acc,
                                                              int16_t* o) {
  for (int i = 0; i < VB; ++i) o[i] = static_cast<int16_t>(o[i] + acc[i]);
  acc = typename I8Vec<VB>::v{};
}

// Output channels [cb, cb + VB*NB) of every pixel of the row; out is [Wo][co_pad64] int16.
// Kernel-row-outer: one kernel row's weight rows (Ci x KW x co_pad64 bytes: mostly L1, the rest
// L2 for 128 -> 128 3x3) stay close while every pixel of the output row adds its events;
// the int8 lanes of each pixel live in g.acc8 between kernel rows and are widened into out
// before they could overflow (every 127 events) and at the end.
template <int VB, int NB>
static inline __attribute__((always_inline)) void event_block(const EventGeom& g, int cb,
                                                              int16_t* out) {
  using V = typename I8Vec<VB>::v;
  using U = typename I8Vec<VB>::u;
  constexpr int L = VB * NB;
  const size_t row_stride = static_cast<size_t>(g.Ci) * g.KW * g.co_pad64;  // one kernel row
  const ptrdiff_t ox_shift = static_cast<ptrdiff_t>(g.stride) * g.co_pad64;
  int8_t* a8 = g.acc8;
  int* pend = g.pending;
  for (int ox = 0; ox < g.Wo; ++ox) {
    std::memset(out + static_cast<size_t>(ox) * g.co_pad64 + cb, 0, L * sizeof(int16_t));
    std::memset(a8 + ox * L, 0, L);
    pend[ox] = 0;
  }
  for (int ky = 0; ky < g.KH; ++ky) {
    const int8_t* wky = g.weight_table + ky * row_stride + cb;
    const int* st = g.start + (g.iy0 + ky) * g.Wp;
    for (int ox = 0; ox < g.Wo; ++ox) {
      int e = st[ox * g.stride];
      const int e1 = st[ox * g.stride + g.KW];
      if (e == e1) continue;
      // event (ci, c) -> tap c - ox*stride: shift the base (integer math; wb itself may lie
      // before the table, wb + off never does)
      const int8_t* wb = reinterpret_cast<const int8_t*>(reinterpret_cast<uintptr_t>(wky) -
                                                         static_cast<uintptr_t>(ox * ox_shift));
      V acc[NB];
      U* ap = reinterpret_cast<U*>(a8 + ox * L);
      for (int j = 0; j < NB; ++j) acc[j] = ap[j];
      int pd = pend[ox];
      while (e < e1) {
        if (pd == 127) {
          int16_t* o = out + static_cast<size_t>(ox) * g.co_pad64 + cb;
          for (int j = 0; j < NB; ++j) flush_lanes<VB>(acc[j], o + VB * j);
          pd = 0;
        }
        const int stop = e + (e1 - e < 127 - pd ? e1 - e : 127 - pd);
        pd += stop - e;
        for (; e < stop; ++e) {
          const int8_t* w = wb + g.off[e];
          for (int j = 0; j < NB; ++j) acc[j] += *reinterpret_cast<const U*>(w + VB * j);
        }
      }
      for (int j = 0; j < NB; ++j) ap[j] = acc[j];
      pend[ox] = pd;
    }
  }
  for (int ox = 0; ox < g.Wo; ++ox) {
    int16_t* o = out + static_cast<size_t>(ox) * g.co_pad64 + cb;
    U* ap = reinterpret_cast<U*>(a8 + ox * L);
    for (int j = 0; j < NB; ++j) {
      V acc = ap[j];
      flush_lanes<VB>(acc, o + VB * j);
    }
  }
}

// Channel blocks of up to 256 (co_pad64 is a multiple of 64).
template <int VB>
static inline __attribute__((always_inline)) void event_row_body(const EventGeom& g,
                                                                 int16_t* out) {
  constexpr int kMax = 256 / VB;
  int cb = 0;
  for (; cb + 256 <= g.co_pad64; cb += 256) event_block<VB, kMax>(g, cb, out);
  const int rest = (g.co_pad64 - cb) / VB;  // 64, 128 or 192 channels left
  if (rest == 0) return;
  if (rest == kMax * 3 / 4) event_block<VB, kMax * 3 / 4>(g, cb, out);
  else if (rest == kMax / 2) event_block<VB, kMax / 2>(g, cb, out);
  else event_block<VB, kMax / 4>(g, cb, out);
}

__attribute__((target("avx512f,avx512bw"))) static void row_counts_event_avx512(
    const EventGeom& g, int16_t* out) {
  event_row_body<64>(g, out);
}
__attribute__((target("avx2"))) static void row_counts_event_avx2(const EventGeom& g,
                                                                  int16_t* out) {
  event_row_body<32>(g, out);
}
static void row_counts_event_base(const EventGeom& g, int16_t* out) {
  event_row_body<16>(g, out);
}

}  // namespace cpu
}  // namespace binslt
