// Event-driven row kernels of the binary convolution: exact ternary counts by summing, for every
// output pixel, the int8 weight columns of the input spikes in its receptive field.
//
//   count[ox][co] = sum_{ky,kx} sum_{ci spiking at (iy0+ky, ox*stride+kx)} W[ky][kx][ci][co]
//
// W is the ternary effective weight sign(w)*M as an int8 table [KH*KW][Ci][CoB] (output channels
// innermost, CoB = Co rounded up to 64, zero-filled). The spikes of the padded input window are
// listed once per image as byte offsets ci*CoB into a tap's table (EventList). Per output pixel the
// columns are added in int8 lanes (64 output channels per 512-bit vector), which is exact for up to
// 127 events; every 127 events the lanes are widened into the int16 output row (the caller only
// takes this path where every count fits int16). At a 15 % firing rate a 128-channel 3x3 pixel
// sees ~170 events, against 36 AND+popcount word pairs per 16 channels for the bit-parallel
// kernels (bconv_popcount.h), so this wins at low rates and the bit-parallel kernels win at high
// rates (the caller picks by the measured rate).
//
// One body in GCC vector extensions, compiled three times with the target's own vector width:
// AVX-512BW (64 bytes), AVX2 (32) and the x86-64 baseline (16).
#pragma once

#include <immintrin.h>

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
// off[start[p] .. start[p+1]), each the byte offset ci * CoB of its weight row.
struct EventList {
  std::vector<int32_t> start, off;

  // img: [rows][Wp][Cw] packed words (bit j of word w is channel 32w + j). avx512: list the set
  // bits 16 at a time with VPCOMPRESSD (the caller checked the CPU) instead of one by one.
  void build(const uint32_t* img, int rows, int Wp, int Cw, int CoB, bool avx512) {
    const int P = rows * Wp;
    start.resize(P + 1);
    const size_t cap = static_cast<size_t>(P) * Cw * 32 + 16;
    if (off.size() < cap) off.resize(cap);
    start[P] = avx512 ? list_avx512(img, P, Cw, CoB) : list_scalar(img, P, Cw, CoB);
  }

 private:
  int list_scalar(const uint32_t* img, int P, int Cw, int CoB) {
    int n = 0;
    int32_t* o = off.data();
    for (int p = 0; p < P; ++p) {
      start[p] = n;
      const uint32_t* wp = img + static_cast<size_t>(p) * Cw;
      for (int w = 0; w < Cw; ++w) {
        uint32_t bits = wp[w];
        while (bits) {
          o[n++] = (32 * w + __builtin_ctz(bits)) * CoB;
          bits &= bits - 1;
        }
      }
    }
    return n;
  }

  __attribute__((target("avx512f"))) int list_avx512(const uint32_t* img, int P, int Cw,
                                                     int CoB) {
    const __m512i lane = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(CoB));
    int n = 0;
    int32_t* o = off.data();
    for (int p = 0; p < P; ++p) {
      start[p] = n;
      const uint32_t* wp = img + static_cast<size_t>(p) * Cw;
      for (int w = 0; w < Cw; ++w) {
        const uint32_t bits = wp[w];
        if (bits == 0) continue;
        for (int h = 0; h < 2; ++h) {
          const __mmask16 m = static_cast<__mmask16>(bits >> (16 * h));
          if (m == 0) continue;
          const __m512i v = _mm512_add_epi32(lane, _mm512_set1_epi32((32 * w + 16 * h) * CoB));
          _mm512_storeu_si512(o + n, _mm512_maskz_compress_epi32(m, v));
          n += __builtin_popcount(static_cast<unsigned>(m));
        }
      }
    }
    return n;
  }
};

struct EventGeom {
  const int32_t* start;  // EventList::start of the window
  const int32_t* off;    // EventList::off
  const int8_t* wt;      // [KH*KW][Ci][CoB]
  int Wp, Wo, stride, KH, KW, Ci, CoB;
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

// Output channels [cb, cb + VB*NB) of every pixel of the row; out is [Wo][CoB] int16.
// Tap-outer: one tap's weight rows (Ci x VB*NB bytes) stay in L1 while every pixel of the row
// adds its events; the int8 lanes of each pixel live in g.acc8 between taps and are widened into
// out before they could overflow (every 127 events) and at the end.
template <int VB, int NB>
static inline __attribute__((always_inline)) void event_block(const EventGeom& g, int cb,
                                                              int16_t* out) {
  using V = typename I8Vec<VB>::v;
  using U = typename I8Vec<VB>::u;
  constexpr int L = VB * NB;
  const size_t tap_stride = static_cast<size_t>(g.Ci) * g.CoB;
  int8_t* a8 = g.acc8;
  int* pend = g.pending;
  for (int ox = 0; ox < g.Wo; ++ox) {
    std::memset(out + static_cast<size_t>(ox) * g.CoB + cb, 0, L * sizeof(int16_t));
    std::memset(a8 + ox * L, 0, L);
    pend[ox] = 0;
  }
  for (int ky = 0; ky < g.KH; ++ky)
    for (int kx = 0; kx < g.KW; ++kx) {
      const int8_t* wb = g.wt + (ky * g.KW + kx) * tap_stride + cb;
      const int* st = g.start + (g.iy0 + ky) * g.Wp + kx;
      for (int ox = 0; ox < g.Wo; ++ox) {
        int e = st[ox * g.stride];
        const int e1 = st[ox * g.stride + 1];
        if (e == e1) continue;
        V acc[NB];
        U* ap = reinterpret_cast<U*>(a8 + ox * L);
        for (int j = 0; j < NB; ++j) acc[j] = ap[j];
        int pd = pend[ox];
        while (e < e1) {
          if (pd == 127) {
            int16_t* o = out + static_cast<size_t>(ox) * g.CoB + cb;
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
    int16_t* o = out + static_cast<size_t>(ox) * g.CoB + cb;
    U* ap = reinterpret_cast<U*>(a8 + ox * L);
    for (int j = 0; j < NB; ++j) {
      V acc = ap[j];
      flush_lanes<VB>(acc, o + VB * j);
    }
  }
}

// Channel blocks of up to 256 (CoB is a multiple of 64).
template <int VB>
static inline __attribute__((always_inline)) void event_row_body(const EventGeom& g,
                                                                 int16_t* out) {
  constexpr int kMax = 256 / VB;
  int cb = 0;
  for (; cb + 256 <= g.CoB; cb += 256) event_block<VB, kMax>(g, cb, out);
  const int rest = (g.CoB - cb) / VB;  // 64, 128 or 192 channels left
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
