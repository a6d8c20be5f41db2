// Row kernels of the binary convolution: exact ternary counts by AND + popcount.
//
// For one output row (image b, output row oy) and every output column and channel:
//   count[ox][co] = sum_{ky,kx,w} popc(x[iy][ix][w] & pos[co][ky][kx][w])
//                                 - popc(x[iy][ix][w] & neg[co][ky][kx][w])
// with neg = mask & ~pos. The input image is zero-padded beforehand (a padded spike is 0, so the
// padding needs no correction). Four implementations, chosen at runtime (never -march=native):
//   avx512: VPOPCNTDQ over 16 output channels per zmm, 4 pixels x 32 channels per register tile;
//   avx2  : nibble-lookup popcount (vpshufb) over 8 channels per ymm, byte accumulators widened
//           every 31 words;
//   popcnt: scalar 64-bit popcnt (two words combined), compiled with target("popcnt");
//   scalar: the same with the portable __builtin_popcountll.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace binslt {
namespace cpu {

// Geometry of one row call. Weights for the vector kernels are repacked as
// [kh][kw][Cw][co_pad16] (output channels innermost, co_pad16 = Co rounded up to 16).
struct RowGeom {
  const uint32_t* img;  // padded image: [Hp][Wp][Cw]
  int Wp, Cw, iy0, Wo, stride, KH, KW, Co, co_pad16;
  const uint32_t* wpos_r;  // [KH][KW][Cw][co_pad16]
  const uint32_t* wneg_r;  // [KH][KW][Cw][co_pad16]
  const uint32_t* wpos;    // [Co][KH][KW][Cw]
  const uint32_t* wneg;    // [Co][KH][KW][Cw]
};

// ---------------------------------------------------------------------------------------------
// Scalar (portable, and popcnt-targeted)
// ---------------------------------------------------------------------------------------------

static inline __attribute__((always_inline)) void row_counts_scalar_body(const RowGeom& g,
                                                                         int32_t* out) {
  const int pairs = g.Cw / 2, odd = g.Cw & 1;
  for (int ox = 0; ox < g.Wo; ++ox) {
    for (int co = 0; co < g.Co; ++co) {
      int acc = 0;
      for (int ky = 0; ky < g.KH; ++ky)
        for (int kx = 0; kx < g.KW; ++kx) {
          const uint32_t* xr = g.img + ((g.iy0 + ky) * g.Wp + ox * g.stride + kx) * g.Cw;
          const size_t wo = ((static_cast<size_t>(co) * g.KH + ky) * g.KW + kx) * g.Cw;
          const uint32_t* pr = g.wpos + wo;
          const uint32_t* nr = g.wneg + wo;
          for (int q = 0; q < pairs; ++q) {
            uint64_t x, p, n;
            std::memcpy(&x, xr + 2 * q, 8);
            std::memcpy(&p, pr + 2 * q, 8);
            std::memcpy(&n, nr + 2 * q, 8);
            acc += __builtin_popcountll(x & p) - __builtin_popcountll(x & n);
          }
          if (odd) {
            const int w = g.Cw - 1;
            acc += __builtin_popcount(xr[w] & pr[w]) - __builtin_popcount(xr[w] & nr[w]);
          }
        }
      out[ox * g.co_pad16 + co] = acc;
    }
  }
}

static void row_counts_scalar(const RowGeom& g, int32_t* out) { row_counts_scalar_body(g, out); }

__attribute__((target("popcnt"))) static void row_counts_popcnt(const RowGeom& g, int32_t* out) {
  row_counts_scalar_body(g, out);
}

// The rows one tap (ky, kx) of a register tile reads: the input words of its PB pixels
// (ox0 + j) and the repacked weight rows of its channels from co0.
template <int PB>
struct TapRows {
  const uint32_t* xr[PB];
  const uint32_t* pr;
  const uint32_t* nr;
  inline __attribute__((always_inline)) TapRows(const RowGeom& g, int ox0, int co0, int ky,
                                                int kx) {
    for (int j = 0; j < PB; ++j)
      xr[j] = g.img + ((g.iy0 + ky) * g.Wp + (ox0 + j) * g.stride + kx) * g.Cw;
    const size_t wo = (static_cast<size_t>(ky) * g.KW + kx) * g.Cw * g.co_pad16 + co0;
    pr = g.wpos_r + wo;
    nr = g.wneg_r + wo;
  }
};

// ---------------------------------------------------------------------------------------------
// AVX-512 VPOPCNTDQ
// ---------------------------------------------------------------------------------------------

#define BINSLT_T512 __attribute__((target("avx512f,avx512vpopcntdq")))

template <int PB, int CB>
BINSLT_T512 static inline void tile512(const RowGeom& g, int ox0, int co0, int32_t* out) {
  __m512i acc[PB][CB];
  for (int j = 0; j < PB; ++j)
    for (int c = 0; c < CB; ++c) acc[j][c] = _mm512_setzero_si512();
  for (int ky = 0; ky < g.KH; ++ky)
    for (int kx = 0; kx < g.KW; ++kx) {
      const TapRows<PB> tap(g, ox0, co0, ky, kx);
      for (int w = 0; w < g.Cw; ++w) {
        __m512i vp[CB], vn[CB];
        for (int c = 0; c < CB; ++c) {
          vp[c] = _mm512_loadu_si512(tap.pr + static_cast<size_t>(w) * g.co_pad16 + 16 * c);
          vn[c] = _mm512_loadu_si512(tap.nr + static_cast<size_t>(w) * g.co_pad16 + 16 * c);
        }
        for (int j = 0; j < PB; ++j) {
          const __m512i xv = _mm512_set1_epi32(static_cast<int>(tap.xr[j][w]));
          for (int c = 0; c < CB; ++c) {
            acc[j][c] = _mm512_add_epi32(
                acc[j][c], _mm512_popcnt_epi32(_mm512_and_si512(xv, vp[c])));
            acc[j][c] = _mm512_sub_epi32(
                acc[j][c], _mm512_popcnt_epi32(_mm512_and_si512(xv, vn[c])));
          }
        }
      }
    }
  for (int j = 0; j < PB; ++j)
    for (int c = 0; c < CB; ++c)
      _mm512_storeu_si512(out + (ox0 + j) * g.co_pad16 + co0 + 16 * c, acc[j][c]);
}

BINSLT_T512 static void row_counts_avx512(const RowGeom& g, int32_t* out) {
  constexpr int PB = 4, CB = 2;
  int co0 = 0;
  for (; co0 + 16 * CB <= g.co_pad16; co0 += 16 * CB) {
    int ox0 = 0;
    for (; ox0 + PB <= g.Wo; ox0 += PB) tile512<PB, CB>(g, ox0, co0, out);
    for (; ox0 < g.Wo; ++ox0) tile512<1, CB>(g, ox0, co0, out);
  }
  for (; co0 < g.co_pad16; co0 += 16) {
    int ox0 = 0;
    for (; ox0 + PB <= g.Wo; ox0 += PB) tile512<PB, 1>(g, ox0, co0, out);
    for (; ox0 < g.Wo; ++ox0) tile512<1, 1>(g, ox0, co0, out);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2: nibble-lookup popcount, byte accumulators
// ---------------------------------------------------------------------------------------------

#define BINSLT_T256 __attribute__((target("avx2")))

BINSLT_T256 static inline __m256i popc_bytes256(__m256i v, __m256i lut, __m256i low4) {
  const __m256i lo = _mm256_and_si256(v, low4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

// Widen byte counts (<= 248 each) into the int32 lane sums: pos - neg.
BINSLT_T256 static inline __m256i widen_counts(__m256i acc, __m256i bp, __m256i bn) {
  const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(bp, _mm256_set1_epi8(1)),
                                       _mm256_maddubs_epi16(bn, _mm256_set1_epi8(-1)));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
}

template <int PB, int CB>
BINSLT_T256 static inline void tile256(const RowGeom& g, int ox0, int co0, int32_t* out) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2,
                                       1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256i acc[PB][CB], ap[PB][CB], an[PB][CB];
  for (int j = 0; j < PB; ++j)
    for (int c = 0; c < CB; ++c)
      acc[j][c] = ap[j][c] = an[j][c] = _mm256_setzero_si256();
  int pending = 0;
  for (int ky = 0; ky < g.KH; ++ky)
    for (int kx = 0; kx < g.KW; ++kx) {
      const TapRows<PB> tap(g, ox0, co0, ky, kx);
      for (int w = 0; w < g.Cw; ++w) {
        const size_t wrow = static_cast<size_t>(w) * g.co_pad16;
        __m256i vp[CB], vn[CB];
        for (int c = 0; c < CB; ++c) {
          vp[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tap.pr + wrow + 8 * c));
          vn[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tap.nr + wrow + 8 * c));
        }
        for (int j = 0; j < PB; ++j) {
          const __m256i xv = _mm256_set1_epi32(static_cast<int>(tap.xr[j][w]));
          for (int c = 0; c < CB; ++c) {
            ap[j][c] = _mm256_add_epi8(ap[j][c],
                                       popc_bytes256(_mm256_and_si256(xv, vp[c]), lut, low4));
            an[j][c] = _mm256_add_epi8(an[j][c],
                                       popc_bytes256(_mm256_and_si256(xv, vn[c]), lut, low4));
          }
        }
        if (++pending == 31) {  // 31 * 8 = 248 fits an unsigned byte
          for (int j = 0; j < PB; ++j)
            for (int c = 0; c < CB; ++c) {
              acc[j][c] = widen_counts(acc[j][c], ap[j][c], an[j][c]);
              ap[j][c] = an[j][c] = _mm256_setzero_si256();
            }
          pending = 0;
        }
      }
    }
  for (int j = 0; j < PB; ++j)
    for (int c = 0; c < CB; ++c) acc[j][c] = widen_counts(acc[j][c], ap[j][c], an[j][c]);
  for (int j = 0; j < PB; ++j)
    for (int c = 0; c < CB; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (ox0 + j) * g.co_pad16 + co0 + 8 * c),
                          acc[j][c]);
}

BINSLT_T256 static void row_counts_avx2(const RowGeom& g, int32_t* out) {
  constexpr int PB = 2, CB = 2;
  for (int co0 = 0; co0 < g.co_pad16; co0 += 8 * CB) {  // co_pad16 is a multiple of 16
    int ox0 = 0;
    for (; ox0 + PB <= g.Wo; ox0 += PB) tile256<PB, CB>(g, ox0, co0, out);
    for (; ox0 < g.Wo; ++ox0) tile256<1, CB>(g, ox0, co0, out);
  }
}

}  // namespace cpu
}  // namespace binslt
