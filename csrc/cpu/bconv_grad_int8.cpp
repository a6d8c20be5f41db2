// Both gradients of a binary conv as exact integer products on AMX-INT8 (bconv_lif_bwd,
// grad_w / grad_x "int8"; plan_backward in cpu_algos.cpp says where "auto" takes them). First
// the weight gradient (any stride):
//
//   dL/dW_eff[co][ci][ky][kx] = sum over images b and output pixels (y, x) of
//                               dZ[b][co][y][x] * X[b][ci][y * stride + ky - p][x * stride + kx - p]
//
// X is 0/1, so the only rounding is dZ's. Each channel's dZ is written on a unit u = max|dZ| /
// 127 as three int8 limbs, dZ / u = l0 + l1 / 254 + l2 / 254^2 + e with |l| <= 127 and
// |e| <= 0.5 / 254^2 (dZ to about 24 bits of its channel's largest value: float32's own
// precision there). Every limb product is then an exact int32 sum (|sum| <= 127 * pixels < 2^31
// by the chunking below), and the three sums meet in double.
//
// The products are ATen's _int_mm (oneDNN's int8 matmul: AMX tiles where the CPU has them), one
// [3 Co, pixels] x [pixels, taps * Ci] product per chunk of output rows: the three limbs stacked
// along the rows, the 0/1 input unfolded once (as the bf16x3 form does; each operand is read
// once, and no product runs over padding).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "binslt/big_tensor.h"
#include "binslt/bconv_cpu.h"
#include "binslt/cpu_algos.h"
#include "binslt/float_key.h"

namespace binslt {
namespace cpu {
namespace {

constexpr float kLimbBase = 254.0f;
// Buffers of one chunk of images (dZ limbs and the padded input bytes).
constexpr int64_t kChunkBytes = int64_t{16} << 20;
// The weight gradient's chunk (limbs and unfolded input) grows to three times its product's int32
// output where that is larger, up to this: with more than one chunk, each adds its [3 Co, taps Ci]
// output into a [Co, taps Ci] double accumulator, a pass that outweighed the product where the
// output outgrew the chunk (ResNet-19's 512->512 8x8 layer, N=32, T=4: a 27 MiB output; its
// backward 130-136 ms in 16 MiB chunks, 105-108 ms as one chunk of 48 MiB, the training run's
// peak memory unchanged; 2-core Xeon with AMX).
constexpr int64_t kGradWChunkMaxBytes = int64_t{64} << 20;
// The input gradient's chunk (dZ's limbs and the conv's float sums) lives beside dZ and the whole
// input gradient, at the step's memory peak (VGG-11's first spike layer, 64->64 32x32, N=32,
// T=4): half the size, peak RSS of two steps 177-190 -> 162-169 MiB, the same step time within
// noise (2-core Xeon with AMX).
constexpr int64_t kInputGradChunkBytes = int64_t{8} << 20;

// (v + 1.5 * 2^23) - 1.5 * 2^23: v rounded to an integer, ties to even, for |v| < 2^22
// (branch-free and vectorisable; the build has no -ffast-math to reassociate it).
static inline __attribute__((always_inline)) float round_int(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

constexpr uint32_t kInfKey = KeyOf<float>::kInf;

// The largest |dZ| of channel rows g + b * img_stride, b < nb (n values each); *bad set for a
// value that is not finite (one integer max of abs_key, float_key.h).
static inline __attribute__((always_inline)) float channel_max_body(const float* g,
                                                                    int64_t img_stride,
                                                                    int64_t nb, int64_t n,
                                                                    bool* bad) {
  uint32_t top = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const float* r = g + b * img_stride;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t k = abs_key(r[i]);
      top = k > top ? k : top;
    }
  }
  *bad = top >= kInfKey;
  return float_of_key(top);
}

// r[px * C + c] *= alpha[c] over S pixels of C channels, in place; returns the largest
// abs_key of the values (>= kInfKey: one is not finite).
static inline __attribute__((always_inline)) uint32_t scale_max_body(float* r,
                                                                     const float* alpha,
                                                                     int64_t S, int64_t C) {
  uint32_t top = 0;
  for (int64_t px = 0; px < S; ++px, r += C)
    for (int64_t c = 0; c < C; ++c) {
      const float v = r[c] * alpha[c];
      r[c] = v;
      const uint32_t k = abs_key(v);
      top = k > top ? k : top;
    }
  return top;
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) uint32_t scale_max_avx512(
    float* r, const float* alpha, int64_t S, int64_t C) {
  return scale_max_body(r, alpha, S, C);
}
uint32_t scale_max_base(float* r, const float* alpha, int64_t S, int64_t C) {
  return scale_max_body(r, alpha, S, C);
}

// The three limbs of n values v * inv, into l0, l1, l2 (vectorisable: one flat run), each
// limb plus kBias: int8 limbs (kBias 0) or u8 limbs biased by +128.
template <typename L, int kBias>
static inline __attribute__((always_inline)) void limbs_body(const float* v, int64_t n,
                                                             float inv, L* l0, L* l1, L* l2) {
  for (int64_t i = 0; i < n; ++i) {
    const float q = v[i] * inv;
    const float a = round_int(q);
    const float r = (q - a) * kLimbBase;
    const float c = round_int(r);
    const float e = round_int((r - c) * kLimbBase);
    l0[i] = static_cast<L>(static_cast<int32_t>(a) + kBias);
    l1[i] = static_cast<L>(static_cast<int32_t>(c) + kBias);
    l2[i] = static_cast<L>(static_cast<int32_t>(e) + kBias);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) float channel_max_avx512(
    const float* g, int64_t img_stride, int64_t nb, int64_t n, bool* bad) {
  return channel_max_body(g, img_stride, nb, n, bad);
}
float channel_max_base(const float* g, int64_t img_stride, int64_t nb, int64_t n, bool* bad) {
  return channel_max_body(g, img_stride, nb, n, bad);
}
template <typename L, int kBias>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void limbs_avx512(const float* v, int64_t n,
                                                                       float inv, L* l0, L* l1,
                                                                       L* l2) {
  limbs_body<L, kBias>(v, n, inv, l0, l1, l2);
}
template <typename L, int kBias>
void limbs_base(const float* v, int64_t n, float inv, L* l0, L* l1, L* l2) {
  limbs_body<L, kBias>(v, n, inv, l0, l1, l2);
}

// Three limb sums recombined in double, (a + b / 254 + c / 254^2) * u: the int32 sums of the
// weight gradient's products, the float sums of the input gradient's convs (recombine_body).
template <typename T>
static inline __attribute__((always_inline)) double limb_value(T a, T b, T c, double u) {
  constexpr double k1 = 1.0 / kLimbBase, k2 = 1.0 / (double{kLimbBase} * kLimbBase);
  return (static_cast<double>(a) + static_cast<double>(b) * k1 + static_cast<double>(c) * k2) *
         u;
}

// A row of the weight gradient's limb sums recombined: into floats (limb_row) or added to a
// double accumulator (limb_acc).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void limb_row_avx512(
    const int32_t* q0, const int32_t* q1, const int32_t* q2, int64_t n, double u, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(limb_value(q0[k], q1[k], q2[k], u));
}
void limb_row_base(const int32_t* q0, const int32_t* q1, const int32_t* q2, int64_t n, double u,
                   float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(limb_value(q0[k], q1[k], q2[k], u));
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) void limb_acc_avx512(
    const int32_t* q0, const int32_t* q1, const int32_t* q2, int64_t n, double u, double* acc) {
  for (int64_t k = 0; k < n; ++k) acc[k] += limb_value(q0[k], q1[k], q2[k], u);
}
void limb_acc_base(const int32_t* q0, const int32_t* q1, const int32_t* q2, int64_t n, double u,
                   double* acc) {
  for (int64_t k = 0; k < n; ++k) acc[k] += limb_value(q0[k], q1[k], q2[k], u);
}

// unfold_output_rows_bits' row (b, oy) as int8: per tap, the input pixel's channel words as
// 64-bit masks, each expanded to 64 bytes of 0/1 (a masked store for the last Ci % 64).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void unfold_row_int8_avx512(
    const ConvShape& s, int64_t Ci, const uint32_t* x_packed, int64_t b, int64_t oy,
    int8_t* d) {
  const __m512i one = _mm512_set1_epi8(1);
  const int64_t r = Ci & 63;
  const __mmask64 tail = (__mmask64{1} << r) - 1;  // r < 64
  for (int64_t ox = 0; ox < s.Wo; ++ox)
    for (int64_t ky = 0; ky < s.KH; ++ky) {
      const int64_t iy = oy * s.stride - s.padding + ky;
      for (int64_t kx = 0; kx < s.KW; ++kx, d += Ci) {
        const int64_t ix = ox * s.stride - s.padding + kx;
        const bool inside = iy >= 0 && iy < s.H && ix >= 0 && ix < s.W;
        const uint32_t* w = inside ? x_packed + ((b * s.H + iy) * s.W + ix) * s.Cw : x_packed;
        int64_t c = 0;
        for (; c + 64 <= Ci; c += 64) {
          const uint64_t m =
              inside ? (uint64_t{w[c >> 5]} | (uint64_t{w[(c >> 5) + 1]} << 32)) : 0;
          _mm512_storeu_si512(d + c, _mm512_maskz_mov_epi8(m, one));
        }
        if (r != 0) {
          uint64_t m = 0;
          if (inside) {
            m = w[c >> 5];
            if (r > 32) m |= uint64_t{w[(c >> 5) + 1]} << 32;
          }
          _mm512_mask_storeu_epi8(d + c, tail, _mm512_maskz_mov_epi8(m & tail, one));
        }
      }
    }
}

}  // namespace

UnfoldRowInt8 unfold_row_int8_fn() {
  return isa_supported(Isa::kAvx512) ? &unfold_row_int8_avx512 : nullptr;
}

float channel_abs_max(const float* g, int64_t img_stride, int64_t nb, int64_t n, bool* bad) {
  static const bool avx512 = isa_supported(Isa::kAvx512);
  return avx512 ? channel_max_avx512(g, img_stride, nb, n, bad)
                : channel_max_base(g, img_stride, nb, n, bad);
}

int64_t int8_grad_w_max_pixels() { return (int64_t{1} << 31) / 128; }

at::Tensor weight_grad_int8(const ConvShape& s, int64_t Ci, const at::Tensor& x_packed,
                            const at::Tensor& gz, const float* absmax) {
  const int64_t S = s.Ho * s.Wo, taps = s.KH * s.KW;
  const int64_t K = taps * Ci;  // columns of the unfolded input: (tap, ci)
  TORCH_CHECK(s.Wo <= int8_grad_w_max_pixels(), "binslt::bconv_lif_bwd: the 'int8' weight "
              "gradient takes output rows of at most ", int8_grad_w_max_pixels(), " pixels, got ",
              s.Wo, "; use cpu_algorithms(grad_w='auto')");
  // The product sums over output pixels, so any split of them works: chunks of output rows
  // (b, oy) with their limbs and unfolded input within chunk_bytes (or one row's), and
  // |sum| <= 127 * pixels < 2^31.
  const int64_t R = s.B * s.Ho;
  if (R == 0) return at::zeros({s.Co, Ci, s.KH, s.KW}, gz.options());  // no pixels: a sum of none
  const int64_t out_bytes = 3 * s.Co * K * static_cast<int64_t>(sizeof(int32_t));
  const int64_t chunk_bytes = std::max(kChunkBytes, std::min(3 * out_bytes, kGradWChunkMaxBytes));
  const int64_t rc_max = std::max<int64_t>(
      1, std::min({R, chunk_bytes / ((3 * s.Co + K) * s.Wo), int8_grad_w_max_pixels() / s.Wo}));
  const int64_t chunks = (R + rc_max - 1) / rc_max;
  const int64_t rc = (R + chunks - 1) / chunks;  // chunks of even size, none a small remainder
  const bool avx512 = isa_supported(Isa::kAvx512);
  const auto limbs = avx512 ? &limbs_avx512<int8_t, 0> : &limbs_base<int8_t, 0>;
  const auto limb_sums = avx512 ? &limb_row_avx512 : &limb_row_base;
  const auto add_limb_sums = avx512 ? &limb_acc_avx512 : &limb_acc_base;
  const float* g = gz.data_ptr<float>();
  const auto i8 = gz.options().dtype(at::kChar);
  const uint32_t* xs = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());

  at::Tensor out = at::empty({s.Co, Ci, s.KH, s.KW}, gz.options());
  float* o = out.data_ptr<float>();
  const bool one_chunk = rc >= R;
  std::vector<double> acc(one_chunk ? 0 : static_cast<size_t>(s.Co * K), 0.0);
  std::vector<double> unit(s.Co);
  std::vector<char> bad(s.Co);
  for (int64_t r0 = 0; r0 < R; r0 += rc) {
    const int64_t nr = std::min(rc, R - r0), M = nr * s.Wo;
    // [3 Co, M]: limb k of channel co in row k * Co + co; column i * Wo + ox is output pixel
    // (oy, ox) of image b, where r0 + i = b * Ho + oy. A chunk's rows of one image are one run
    // of each channel's map: a channel is split a run at a time, on its unit over the chunk
    // (over all of dZ where absmax gives it: the same bound on every chunk's rounding).
    at::Tensor A = empty_big({3 * s.Co, M}, i8);
    int8_t* ap = A.data_ptr<int8_t>();
    at::parallel_for(0, s.Co, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        auto runs = [&](auto&& fn) {  // fn(src, n, column) per image's run of rows
          for (int64_t i = 0; i < nr;) {
            const int64_t b = (r0 + i) / s.Ho, oy = (r0 + i) % s.Ho;
            const int64_t n = std::min(s.Ho - oy, nr - i);
            fn(g + (b * s.Co + c) * S + oy * s.Wo, n * s.Wo, i * s.Wo);
            i += n;
          }
        };
        float mx = 0.0f;
        bool nonfinite = false;
        if (absmax != nullptr) {
          mx = absmax[c];
        } else {
          runs([&](const float* src, int64_t n, int64_t) {
            bool nf = false;
            mx = std::max(mx, channel_abs_max(src, 0, 1, n, &nf));
            nonfinite |= nf;
          });
        }
        bad[c] = nonfinite;
        if (nonfinite) continue;
        const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
        unit[c] = mx > 0.0f ? 1.0 / static_cast<double>(inv) : 0.0;
        runs([&](const float* src, int64_t n, int64_t col) {
          limbs(src, n, inv, ap + c * M + col, ap + (s.Co + c) * M + col,
                ap + (2 * s.Co + c) * M + col);
        });
      }
    });
    for (const char v : bad)
      if (v != 0) return at::Tensor();
    at::Tensor X = empty_big({M, K}, i8);  // [M, taps * Ci]
    unfold_output_rows_bits(s, Ci, xs, r0, nr, X.data_ptr<int8_t>());  // 0/1 from the bits
    const at::Tensor r = at::_int_mm(A, X);  // [3 Co, taps * Ci]
    const int32_t* rp = r.data_ptr<int32_t>();
    at::parallel_for(0, s.Co, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> row(one_chunk ? K : 0);
      for (int64_t c = c0; c < c1; ++c) {
        const int32_t *q0 = rp + c * K, *q1 = rp + (s.Co + c) * K, *q2 = rp + (2 * s.Co + c) * K;
        if (!one_chunk) {
          add_limb_sums(q0, q1, q2, K, unit[c], acc.data() + c * K);
          continue;
        }
        limb_sums(q0, q1, q2, K, unit[c], row.data());
        float* oc = o + c * Ci * taps;  // [taps, Ci] -> [Ci, kh, kw]
        for (int64_t ci = 0; ci < Ci; ++ci)
          for (int64_t t = 0; t < taps; ++t) oc[ci * taps + t] = row[t * Ci + ci];
      }
    });
  }
  if (!one_chunk)
    at::parallel_for(0, s.Co, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t ci = 0; ci < Ci; ++ci)
          for (int64_t t = 0; t < taps; ++t)
            o[(c * Ci + ci) * taps + t] = static_cast<float>(acc[(c * taps + t) * Ci + ci]);
    });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The input gradient: dL/dX[b][ci][u][v] = sum of alpha[co] * W[co][ci][ky][kx] * dZ[b][co][y][x]
// over co and the taps (ky, kx) with u = y * stride + ky - p, v = x * stride + kx - p.
// Along one axis the input rows split into stride classes: the rows u with (u + p) % stride = r
// take kernel rows r, r + stride, ... (J of them) and dZ rows q - j, j < J, where q = (u + p - r)
// / stride; over a class that is a stride-1 correlation of dZ with the class's kernel rows,
// reversed. So each pair of classes (rows, columns) is the forward conv of dZ (zero-padded by
// the margins the classes reach) with the flipped, transposed sub-kernel (at stride 1: one class,
// the whole kernel), here oneDNN's u8 x s8 convolution (onednn::qconv2d_pointwise, as the
// inference forward): alpha[co] * dZ per image on a unit u = max / 127 as three limbs (u8 with
// zero point 128, the three as three batches of images), W in {-1, 0, +1}; its int32 sums are
// exact (|sum| <= 127 * Co * KH * KW < 2^24, also as the float32 it writes). A class of rows that
// no kernel row reaches (stride above the kernel) gets a zero gradient. On small maps at stride 1
// the same sums come from one int8 matrix product over the limbs unfolded around each input pixel
// (input_grad_int8_unfolded).
// ---------------------------------------------------------------------------------------------

namespace {

std::optional<c10::OperatorHandle> find_onednn(const char* name) {
  return c10::Dispatcher::singleton().findSchema({name, ""});
}

// One stride class of an axis (input size n_in, dZ size n_out, kernel K, stride st, padding p):
// input rows u0, u0 + st, ... (n of them) read kernel rows r + st * j and dZ rows q0 + i - j
// (j < J) for its i-th row.
struct AxisClass {
  int64_t r, J, u0, n, q0;
};

// The classes of one axis, and the zero margins before (*lo) and after (*hi) dZ that they read.
std::vector<AxisClass> axis_classes(int64_t n_in, int64_t n_out, int64_t K, int64_t st,
                                    int64_t p, int64_t* lo, int64_t* hi) {
  std::vector<AxisClass> v;
  *lo = *hi = 0;
  for (int64_t r = 0; r < st; ++r) {
    AxisClass c{};
    c.r = r;
    c.J = r < K ? (K - r + st - 1) / st : 0;
    c.u0 = ((r - p) % st + st) % st;
    c.n = c.u0 < n_in ? (n_in - 1 - c.u0) / st + 1 : 0;
    c.q0 = (c.u0 + p - r) / st;  // u0 + p - r is a multiple of st above -st: >= 0
    if (c.n > 0 && c.J > 0) {
      *lo = std::max(*lo, c.J - 1 - c.q0);
      *hi = std::max(*hi, c.q0 + c.n - n_out);
    }
    v.push_back(c);
  }
  return v;
}

// In place: the 64 x 64 bit matrix a (bit j of a[i] is entry (i, j)) transposed (bit j of a[i]
// becomes entry (j, i)), by swapping ever smaller off-diagonal blocks (Hacker's Delight, 7-3).
static inline void transpose_bits64(uint64_t a[64]) {
  uint64_t m = 0x00000000FFFFFFFFull;
  for (int j = 32; j != 0; j >>= 1, m ^= m << j)
    for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {
      const uint64_t t = ((a[k] >> j) ^ a[k | j]) & m;
      a[k | j] ^= t;
      a[k] ^= t << j;
    }
}

// n <= 64 bytes of ternary weights from bit masks: -1 where m and not q, +1 where m and q.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void ternary_bytes_avx512(uint64_t m,
                                                                              uint64_t q,
                                                                              int64_t n,
                                                                              int8_t* dst) {
  const __m512i v = _mm512_mask_mov_epi8(_mm512_maskz_mov_epi8(m, _mm512_set1_epi8(-1)), m & q,
                                         _mm512_set1_epi8(1));
  _mm512_mask_storeu_epi8(dst, n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1, v);
}
void ternary_bytes_base(uint64_t m, uint64_t q, int64_t n, int8_t* dst) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = static_cast<int8_t>(((m >> i) & 1u) ? (((q >> i) & 1u) ? 1 : -1) : 0);
}

// The flipped, transposed ternary sub-kernel of a class pair, Wt[ci][co][jy][jx] =
// W[co][ci][ry + st * (Jy - 1 - jy)][rx + st * (Jx - 1 - jx)] as s8 in ChannelsLast ([Ci, Jy, Jx,
// Co] in memory), from the planes [Co, KH, KW, Cw] (at stride 1 the whole kernel, flipped). Per
// tap, 64 x 64 blocks of (co, ci) bits are transposed as bit matrices, and each ci's 64 output
// channels are then written as one run of bytes.
at::Tensor transposed_int8_weight(const ConvShape& s, int64_t Ci, const uint32_t* mbits,
                                  const uint32_t* pbits, const AxisClass& cy,
                                  const AxisClass& cx) {
  const int64_t Jy = cy.J, Jx = cx.J, st = s.stride, Cw = s.Cw;
  at::Tensor w = at::empty({Ci, Jy, Jx, s.Co}, at::TensorOptions().dtype(at::kChar));
  int8_t* wp = w.data_ptr<int8_t>();
  const auto bytes = isa_supported(Isa::kAvx512) ? &ternary_bytes_avx512 : &ternary_bytes_base;
  const int64_t co_blocks = (s.Co + 63) / 64, ci_blocks = (Ci + 63) / 64;
  at::parallel_for(0, co_blocks * Jy * Jx, 1, [&](int64_t i0, int64_t i1) {
    uint64_t mt[64], qt[64];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t cb = i / (Jy * Jx), jy = i / Jx % Jy, jx = i % Jx;
      const int64_t ky = cy.r + st * (Jy - 1 - jy), kx = cx.r + st * (Jx - 1 - jx);
      const int64_t c0 = cb * 64, nco = std::min<int64_t>(64, s.Co - c0);
      for (int64_t kb = 0; kb < ci_blocks; ++kb) {
        const int64_t w0 = kb * 2;  // the block's first 32-bit word
        for (int64_t r = 0; r < 64; ++r) {
          mt[r] = qt[r] = 0;
          if (r >= nco) continue;
          const int64_t row = (((c0 + r) * s.KH + ky) * s.KW + kx) * Cw + w0;
          mt[r] = mbits[row];
          qt[r] = pbits[row];
          if (w0 + 1 < Cw) {
            mt[r] |= uint64_t{mbits[row + 1]} << 32;
            qt[r] |= uint64_t{pbits[row + 1]} << 32;
          }
        }
        transpose_bits64(mt);
        transpose_bits64(qt);
        const int64_t nci = std::min<int64_t>(64, Ci - kb * 64);
        for (int64_t j = 0; j < nci; ++j)
          bytes(mt[j], qt[j], nco, wp + (((kb * 64 + j) * Jy + jy) * Jx + jx) * s.Co + c0);
      }
    }
  });
  return w.permute({0, 3, 1, 2});
}

// out[i] = (a[i] + b[i] / 254 + c[i] / 254^2) * u, the three limbs' sums recombined.
static inline __attribute__((always_inline)) void recombine_body(const float* a, const float* b,
                                                                 const float* c, int64_t n,
                                                                 double u, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(limb_value(a[i], b[i], c[i], u));
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) void recombine_avx512(
    const float* a, const float* b, const float* c, int64_t n, double u, float* out) {
  recombine_body(a, b, c, n, u, out);
}
void recombine_base(const float* a, const float* b, const float* c, int64_t n, double u,
                    float* out) {
  recombine_body(a, b, c, n, u, out);
}

// One image's dZ [Co, S] as alpha * dZ channel-last into cl [S, Co], and its limbs' scale
// (the input gradient's unit is per image): *inv = 127 / max |alpha * dZ| (0 where all are 0)
// and *unit = 1 / *inv; false where a value is not finite.
bool image_limb_scale(const float* g, const float* alpha, int64_t Co, int64_t S, float* cl,
                      float* inv, double* unit) {
  static const bool avx512 = isa_supported(Isa::kAvx512);
  static const TransposeFn transpose = transpose_f32_fn();
  transpose(g, cl, Co, S);  // [S, Co]
  const uint32_t top = avx512 ? scale_max_avx512(cl, alpha, S, Co)
                              : scale_max_base(cl, alpha, S, Co);  // alpha * dZ
  if (top >= kInfKey) return false;
  const float mx = float_of_key(top);
  *inv = mx > 0.0f ? 127.0f / mx : 0.0f;
  *unit = mx > 0.0f ? 1.0 / static_cast<double>(*inv) : 0.0;
  return true;
}

// The rest of dZ from image b0 as the float conv, into gx (written over dZ): where alpha * dZ
// overflowed (dZ itself is finite) after earlier chunks were written over dZ, the float form
// that a split form gives way to takes the images still holding dZ.
at::Tensor dense_rest(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                      const at::Tensor& w_mask, const at::Tensor& w_pos, const float* alpha,
                      const at::Tensor& gx, int64_t b0) {
  ConvShape rest = s;
  rest.B = rest.N = s.B - b0;
  rest.T = 1;
  const at::Tensor tail =
      input_grad_dense(rest, Ci, gz.narrow(0, b0, s.B - b0), w_mask, w_pos, alpha);
  gx.view({s.B, Ci, s.H, s.W}).narrow(0, b0, s.B - b0).copy_(tail.view({-1, Ci, s.H, s.W}));
  return gx;
}

// input_grad_int8 at stride 1 as int8 matrix products: per chunk of images, A [3 nb SX, taps
// Co] holds each limb's dZ unfolded around every input pixel (column (jy, jx, co): the limb of
// dZ at pixel (y + jy - mt, x + jx - ml), 0 outside the map), B [taps Co, Ci] the flipped,
// transposed ternary weight (transposed_int8_weight's bytes), and _int_mm(A, B) gives each
// limb's exact int32 sums -- the same integers as the convolution's, so the same gradient.
at::Tensor input_grad_int8_unfolded(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                                    const at::Tensor& w_mask, const at::Tensor& w_pos,
                                    const float* alpha, bool over_gz) {
  int64_t mt, mb, ml, mr;  // at stride 1 one class per axis: the whole kernel, flipped
  const AxisClass cy = axis_classes(s.H, s.Ho, s.KH, 1, s.padding, &mt, &mb)[0];
  const AxisClass cx = axis_classes(s.W, s.Wo, s.KW, 1, s.padding, &ml, &mr)[0];
  const auto* wm = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
  const auto* wpos = reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>());
  const int64_t S = s.Ho * s.Wo, SX = s.H * s.W, taps = s.KH * s.KW, K = taps * s.Co;
  // [Ci, KH, KW, Co] bytes (the view is [Ci, Co, KH, KW]): B^T, row ci over (jy, jx, co)
  const at::Tensor Bt = transposed_int8_weight(s, Ci, wm, wpos, cy, cx).permute({0, 2, 3, 1})
                            .reshape({Ci, K});
  const at::Tensor B = Bt.t();
  const int64_t per_image = 3 * SX * (K + 4 * Ci);
  const int64_t nb_max = std::max<int64_t>(1, std::min(s.B, kInputGradChunkBytes / per_image));
  const bool avx512 = isa_supported(Isa::kAvx512);
  const auto limb_fn = avx512 ? &limbs_avx512<int8_t, 0> : &limbs_base<int8_t, 0>;
  const auto row_fn = avx512 ? &limb_row_avx512 : &limb_row_base;
  const TransposeFn transpose = transpose_f32_fn();
  const float* g = gz.data_ptr<float>();
  at::Tensor gx = over_gz ? gz.view({s.T, s.N, Ci, s.H, s.W})
                          : empty_big({s.T, s.N, Ci, s.H, s.W}, gz.options());
  float* gxp = gx.data_ptr<float>();
  std::vector<double> unit(s.B);
  for (int64_t b0 = 0; b0 < s.B; b0 += nb_max) {
    const int64_t nb = std::min(nb_max, s.B - b0);
    // row (k * nb + i) * SX + y * W + x: limb k of image b0 + i around input pixel (y, x)
    at::Tensor A = empty_big({3 * nb * SX, K}, gz.options().dtype(at::kChar));
    int8_t* ap = A.data_ptr<int8_t>();
    std::atomic<bool> any_bad{false};
    at::parallel_for(0, nb, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> cl(S * s.Co);
      std::vector<int8_t> lb(3 * S * s.Co);  // the image's limbs, [3, S, Co]
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = b0 + i;
        float inv;
        if (!image_limb_scale(g + b * s.Co * S, alpha, s.Co, S, cl.data(), &inv, &unit[b])) {
          any_bad.store(true, std::memory_order_relaxed);
          continue;
        }
        limb_fn(cl.data(), S * s.Co, inv, lb.data(), lb.data() + S * s.Co,
                lb.data() + 2 * S * s.Co);
        for (int k = 0; k < 3; ++k) {
          const int8_t* src = lb.data() + k * S * s.Co;
          int8_t* row = ap + (k * nb + i) * SX * K;
          for (int64_t y = 0; y < s.H; ++y)
            for (int64_t x = 0; x < s.W; ++x, row += K)
              for (int64_t jy = 0; jy < s.KH; ++jy) {
                const int64_t sy = y + jy - mt;
                for (int64_t jx = 0; jx < s.KW; ++jx) {
                  const int64_t sx = x + jx - ml;
                  int8_t* d = row + (jy * s.KW + jx) * s.Co;
                  if (sy >= 0 && sy < s.Ho && sx >= 0 && sx < s.Wo)
                    std::memcpy(d, src + (sy * s.Wo + sx) * s.Co, s.Co);
                  else
                    std::memset(d, 0, s.Co);
                }
              }
        }
      }
    });
    if (any_bad.load()) {
      if (!over_gz) return at::Tensor();
      return dense_rest(s, Ci, gz, w_mask, w_pos, alpha, gx, b0);
    }
    at::Tensor r = empty_big({3 * nb * SX, Ci}, gz.options().dtype(at::kInt));
    at::_int_mm_out(r, A, B);  // [3 nb SX, Ci]
    A.reset();
    const int32_t* rp = r.data_ptr<int32_t>();
    at::parallel_for(0, nb, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> cl(SX * Ci);
      for (int64_t i = i0; i < i1; ++i) {
        const int32_t* q0 = rp + i * SX * Ci;
        row_fn(q0, q0 + nb * SX * Ci, q0 + 2 * nb * SX * Ci, SX * Ci, unit[b0 + i], cl.data());
        transpose(cl.data(), gxp + (b0 + i) * SX * Ci, SX, Ci);  // [SX, Ci] -> [Ci, SX]
      }
    });
  }
  return gx;
}

}  // namespace

bool int8_grad_x_unfolds(const ConvShape& s) {
  return s.stride == 1 && s.H * s.W <= kInt8UnfoldedGradXMaxPixels;
}

at::Tensor input_grad_int8(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                           const at::Tensor& w_mask, const at::Tensor& w_pos,
                           const float* alpha, bool over_gz, Int8GradX exec) {
  TORCH_INTERNAL_ASSERT(!over_gz || (Ci == s.Co && s.H == s.Ho && s.W == s.Wo &&
                                     gz.is_contiguous()),
                        "input_grad_int8: the gradient over dZ needs one shape");
  TORCH_CHECK(onednn_int8_runs(), "binslt: the 'int8' input gradient needs PyTorch's oneDNN "
              "int8 convolution on a CPU with AMX-INT8 or AVX-512 VNNI; use "
              "cpu_algorithms(grad_x='auto')");
  TORCH_CHECK(exec != Int8GradX::kUnfolded || s.stride == 1,
              "binslt: the unfolded int8 input gradient runs at stride 1 only, got stride ",
              s.stride);
  if (exec == Int8GradX::kAuto ? int8_grad_x_unfolds(s) : exec == Int8GradX::kUnfolded)
    return input_grad_int8_unfolded(s, Ci, gz, w_mask, w_pos, alpha, over_gz);
  int64_t mt, mb, ml, mr;
  const std::vector<AxisClass> rows = axis_classes(s.H, s.Ho, s.KH, s.stride, s.padding, &mt, &mb);
  const std::vector<AxisClass> cols = axis_classes(s.W, s.Wo, s.KW, s.stride, s.padding, &ml, &mr);
  const int64_t Hq = s.Ho + mt + mb, Wq = s.Wo + ml + mr, S = s.Ho * s.Wo, SX = s.H * s.W;
  const auto* wm = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
  const auto* wpos = reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>());
  struct Part {  // a pair of classes with kernel taps: its sub-kernel's conv over the limbs
    const AxisClass* y;
    const AxisClass* x;
    int64_t Hz, Wz;  // its output map
    at::Tensor w;    // the sub-kernel, prepacked below
  };
  std::vector<Part> parts;
  bool gaps = false;  // input pixels no kernel tap reaches (a zero gradient)
  int64_t out_pixels = 0;
  for (const AxisClass& cy : rows)
    for (const AxisClass& cx : cols) {
      if (cy.n == 0 || cx.n == 0) continue;
      if (cy.J == 0 || cx.J == 0) {
        gaps = true;
        continue;
      }
      parts.push_back({&cy, &cx, Hq - cy.J + 1, Wq - cx.J + 1,
                       transposed_int8_weight(s, Ci, wm, wpos, cy, cx)});
      out_pixels += parts.back().Hz * parts.back().Wz;
    }
  const int64_t per_image = 3 * (s.Co * Hq * Wq + Ci * out_pixels * 4);
  const int64_t nb_max = std::max<int64_t>(1, std::min(s.B, kInputGradChunkBytes / per_image));
  const bool avx512 = isa_supported(Isa::kAvx512);
  const auto limb_fn = avx512 ? &limbs_avx512<uint8_t, 128> : &limbs_base<uint8_t, 128>;
  const auto comb_fn = avx512 ? &recombine_avx512 : &recombine_base;
  const TransposeFn transpose = transpose_f32_fn();
  const float* g = gz.data_ptr<float>();

  const at::Tensor& w_scale = onednn_unit_scale();
  const at::Tensor& w_zero = onednn_zero_point();
  const std::vector<int64_t> one{1, 1}, zero{0, 0};
  static const c10::OperatorHandle prepack = *find_onednn("onednn::qconv_prepack");
  static const c10::OperatorHandle conv = *find_onednn("onednn::qconv2d_pointwise");
  for (Part& pt : parts) {
    torch::jit::Stack pstack{pt.w, w_scale, 1.0, int64_t{128}, one, zero, one, int64_t{1},
                             std::vector<int64_t>{3 * nb_max, s.Co, Hq, Wq}};
    prepack.callBoxed(&pstack);
    pt.w = pstack[0].toTensor();
  }

  // Over dZ: a chunk's rows are written after its limbs are taken, and no chunk reads another's.
  at::Tensor gx = over_gz ? gz.view({s.T, s.N, Ci, s.H, s.W})
                          : empty_big({s.T, s.N, Ci, s.H, s.W}, gz.options());
  float* gxp = gx.data_ptr<float>();
  std::vector<double> unit(s.B);
  for (int64_t b0 = 0; b0 < s.B; b0 += nb_max) {
    const int64_t nb = std::min(nb_max, s.B - b0);
    // [3 nb, Co, Hq, Wq] ChannelsLast: limb k of image b at batch k * nb + b.
    at::Tensor A = empty_big({3 * nb, s.Co, Hq, Wq}, gz.options().dtype(at::kByte),
                             at::MemoryFormat::ChannelsLast);
    uint8_t* ap = A.data_ptr<uint8_t>();
    const int64_t img = Hq * Wq * s.Co;
    std::atomic<bool> any_bad{false};
    at::parallel_for(0, nb, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> cl(S * s.Co);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = b0 + i;
        float inv;
        if (!image_limb_scale(g + b * s.Co * S, alpha, s.Co, S, cl.data(), &inv, &unit[b])) {
          any_bad.store(true, std::memory_order_relaxed);
          continue;
        }
        // The limbs straight into the padded images' rows; the margins hold the zero point.
        uint8_t* d[3];
        for (int k = 0; k < 3; ++k) {
          d[k] = ap + (k * nb + i) * img;
          std::memset(d[k], 128, mt * Wq * s.Co);
          std::memset(d[k] + (mt + s.Ho) * Wq * s.Co, 128, mb * Wq * s.Co);
        }
        for (int64_t y = 0; y < s.Ho; ++y) {
          const int64_t row = (mt + y) * Wq * s.Co;
          for (int k = 0; k < 3; ++k) {
            std::memset(d[k] + row, 128, ml * s.Co);
            std::memset(d[k] + row + (ml + s.Wo) * s.Co, 128, mr * s.Co);
          }
          const int64_t in = row + ml * s.Co;
          limb_fn(cl.data() + y * s.Wo * s.Co, s.Wo * s.Co, inv, d[0] + in, d[1] + in, d[2] + in);
        }
      }
    });
    if (any_bad.load()) {
      if (!over_gz) return at::Tensor();
      return dense_rest(s, Ci, gz, w_mask, w_pos, alpha, gx, b0);
    }
    std::vector<at::Tensor> zs;  // per part: [3 nb, Ci, Hz, Wz] ChannelsLast
    for (const Part& pt : parts) {
      torch::jit::Stack stack{A, 1.0, int64_t{128}, pt.w, w_scale, w_zero, c10::IValue(),
                              one, zero, one, int64_t{1}, 1.0, int64_t{0},
                              c10::IValue(at::kFloat), std::string("none"),
                              c10::List<std::optional<at::Scalar>>(), c10::IValue()};
      conv.callBoxed(&stack);
      at::Tensor z = stack[0].toTensor();
      if (!z.is_contiguous(at::MemoryFormat::ChannelsLast))
        z = z.contiguous(at::MemoryFormat::ChannelsLast);
      zs.push_back(std::move(z));
    }
    at::parallel_for(0, nb, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> cl(SX * Ci);
      for (int64_t i = i0; i < i1; ++i) {
        if (gaps) std::fill(cl.begin(), cl.end(), 0.0f);
        const double u = unit[b0 + i];
        for (size_t k = 0; k < parts.size(); ++k) {
          const Part& pt = parts[k];
          const AxisClass &cy = *pt.y, &cx = *pt.x;
          const int64_t plane = pt.Hz * pt.Wz * Ci;  // one image of one limb
          const float* z0 = zs[k].data_ptr<float>() + i * plane;
          const float* z1 = z0 + nb * plane;
          const float* z2 = z1 + nb * plane;
          // class row a: input row u0 + stride * a, output row q0 + a - J + 1 + mt of the conv
          const int64_t ty0 = cy.q0 - cy.J + 1 + mt, tx0 = cx.q0 - cx.J + 1 + ml;
          for (int64_t a = 0; a < cy.n; ++a) {
            const int64_t zrow = ((ty0 + a) * pt.Wz + tx0) * Ci;
            float* out = cl.data() + ((cy.u0 + s.stride * a) * s.W + cx.u0) * Ci;
            if (s.stride == 1) {  // the class's columns are the row's, contiguous in both
              comb_fn(z0 + zrow, z1 + zrow, z2 + zrow, cx.n * Ci, u, out);
              continue;
            }
            for (int64_t c = 0; c < cx.n; ++c)
              comb_fn(z0 + zrow + c * Ci, z1 + zrow + c * Ci, z2 + zrow + c * Ci, Ci, u,
                      out + c * s.stride * Ci);
          }
        }
        transpose(cl.data(), gxp + (b0 + i) * SX * Ci, SX, Ci);  // [SX, Ci] -> [Ci, SX]
      }
    });
  }
  return gx;
}

std::optional<at::Tensor> int8_input_grad_for(const at::Tensor& gz, const at::Tensor& w_mask,
                                              const at::Tensor& w_pos, const at::Tensor& alpha,
                                              int64_t Ci, int64_t H, int64_t W, int64_t stride,
                                              int64_t padding, const std::string& exec) {
  const char* op = "_int8_input_grad";
  TORCH_CHECK_VALUE(exec == "auto" || exec == "conv" || exec == "unfolded", "binslt: ", op,
                    ": exec is 'auto', 'conv' or 'unfolded', got '", exec, "'");
  TORCH_CHECK_VALUE(Ci > 0 && H > 0 && W > 0 && gz.dim() == 4, "binslt: ", op,
                    ": Ci, H and W must be positive and gz [B, Co, Ho, Wo]");
  ConvShape s = check_conv_dims({gz.size(0), H, W, (Ci + 31) / 32, "gz"}, w_mask, w_pos, 1,
                                stride, padding, op);
  TORCH_CHECK_VALUE(gz.dim() == 4 && gz.size(1) == s.Co && gz.size(2) == s.Ho &&
                        gz.size(3) == s.Wo && gz.scalar_type() == at::kFloat,
                    "binslt: ", op, ": gz must be float32 [B, ", s.Co, ", ", s.Ho, ", ", s.Wo,
                    "], got ", gz.scalar_type(), " ", gz.sizes());
  TORCH_CHECK_VALUE(alpha.numel() == s.Co && alpha.scalar_type() == at::kFloat, "binslt: ", op,
                    ": alpha must be float32 [", s.Co, "]");
  const at::Tensor g = gz.contiguous();
  const at::Tensor a = alpha.contiguous();
  const Int8GradX e = exec == "conv"       ? Int8GradX::kConv
                      : exec == "unfolded" ? Int8GradX::kUnfolded
                                           : Int8GradX::kAuto;
  at::Tensor r = input_grad_int8(s, Ci, g, w_mask.contiguous(), w_pos.contiguous(),
                                 a.data_ptr<float>(), false, e);
  if (!r.defined()) return std::nullopt;
  return r.view({s.B, Ci, H, W});
}

}  // namespace cpu
}  // namespace binslt
