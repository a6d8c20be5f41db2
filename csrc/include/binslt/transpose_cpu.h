// Channel-last count tiles -> channel-first int16/int32 rows, 16x16 blocks at a time.
//
// The row kernels produce one output row as [Wo][stride] (pixels x channels); the counts tensor
// is [.., Co, Ho, Wo]. A 16x16 block is transposed in registers (four rounds of interleaving rows
// i and i+8: the perfect-shuffle transpose), so that each channel's 16 pixels go out as one
// 32-byte store instead of 16 scattered 2-byte ones. One body in GCC vector extensions, compiled
// per target by the caller.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace binslt {
namespace cpu {

typedef int16_t v16i16 __attribute__((vector_size(32)));
typedef int16_t v16i16u __attribute__((vector_size(32), aligned(2)));
typedef int32_t v16i32u __attribute__((vector_size(64), aligned(4)));

// Any 16-lane GCC vector type (int16 or float rows).
template <typename V16>
static inline __attribute__((always_inline)) void transpose16x16(V16 r[16]) {
  for (int round = 0; round < 4; ++round) {
    V16 o[16];
    for (int i = 0; i < 8; ++i) {
      o[2 * i] = __builtin_shufflevector(r[i], r[i + 8], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21,
                                         6, 22, 7, 23);
      o[2 * i + 1] = __builtin_shufflevector(r[i], r[i + 8], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28,
                                             13, 29, 14, 30, 15, 31);
    }
    for (int i = 0; i < 16; ++i) r[i] = o[i];
  }
}

static inline __attribute__((always_inline)) v16i16 load16(const int16_t* p) {
  return *reinterpret_cast<const v16i16u*>(p);
}
static inline __attribute__((always_inline)) v16i16 load16(const int32_t* p) {
  // Counts that reach this path fit int16 (the caller only uses it for int16 outputs).
  return __builtin_convertvector(*reinterpret_cast<const v16i32u*>(p), v16i16);
}

// dst[c * S + ox] = tile[ox * stride + c] for c < Co, ox < Wo (ST: int16 or int32 tile).
template <typename ST>
static inline __attribute__((always_inline)) void transpose_store_body(const ST* tile,
                                                                       int64_t stride, int64_t Wo,
                                                                       int64_t Co, int16_t* dst,
                                                                       int64_t S) {
  int64_t c0 = 0;
  for (; c0 + 16 <= Co; c0 += 16) {
    int64_t ox0 = 0;
    for (; ox0 + 16 <= Wo; ox0 += 16) {
      v16i16 r[16];
      for (int i = 0; i < 16; ++i) r[i] = load16(tile + (ox0 + i) * stride + c0);
      transpose16x16(r);
      for (int i = 0; i < 16; ++i) *reinterpret_cast<v16i16u*>(dst + (c0 + i) * S + ox0) = r[i];
    }
    for (int64_t c = c0; c < c0 + 16; ++c)
      for (int64_t ox = ox0; ox < Wo; ++ox)
        dst[c * S + ox] = static_cast<int16_t>(tile[ox * stride + c]);
  }
  for (int64_t ox = 0; ox < Wo; ++ox)
    for (int64_t c = c0; c < Co; ++c) dst[c * S + ox] = static_cast<int16_t>(tile[ox * stride + c]);
}

typedef float v16f32 __attribute__((vector_size(64)));
typedef float v8f32 __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) void transpose8x8(v8f32 r[8]) {
  for (int round = 0; round < 3; ++round) {
    v8f32 o[8];
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = __builtin_shufflevector(r[i], r[i + 4], 0, 8, 1, 9, 2, 10, 3, 11);
      o[2 * i + 1] = __builtin_shufflevector(r[i], r[i + 4], 4, 12, 5, 13, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; ++i) r[i] = o[i];
  }
}

// dst[j * R + i] = src[i * C + j] for one [R][C] float matrix (i < R, j < C), in VxV register
// tiles: V = 16 where the target has 64-byte registers, 8 otherwise (wider GCC vectors than the
// registers compile to slow code).
template <int V>
static inline __attribute__((always_inline)) void transpose_f32_body(const float* src,
                                                                     float* dst, int64_t R,
                                                                     int64_t C) {
  // Loads and stores through memcpy: a template argument drops the aligned(4) attribute of the
  // unaligned vector typedefs (GCC), which would turn them into aligned moves.
  using Vec = typename std::conditional<V == 16, v16f32, v8f32>::type;
  int64_t i0 = 0;
  for (; i0 + V <= R; i0 += V) {
    int64_t j0 = 0;
    for (; j0 + V <= C; j0 += V) {
      Vec r[V];
      for (int i = 0; i < V; ++i) std::memcpy(&r[i], src + (i0 + i) * C + j0, sizeof(Vec));
      if constexpr (V == 16)
        transpose16x16(r);
      else
        transpose8x8(r);
      for (int j = 0; j < V; ++j) std::memcpy(dst + (j0 + j) * R + i0, &r[j], sizeof(Vec));
    }
    for (int64_t i = i0; i < i0 + V; ++i)
      for (int64_t j = j0; j < C; ++j) dst[j * R + i] = src[i * C + j];
  }
  for (int64_t i = i0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) dst[j * R + i] = src[i * C + j];
}

}  // namespace cpu
}  // namespace binslt
