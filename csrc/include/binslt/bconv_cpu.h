// What the translation units of the CPU binary conv share: the checked geometry, and the entry
// points of the backward parts (weight gradient, input gradient) that the backward op calls.
//
//   bconv_forward.cpp     bconv_lif, bconv_lif_infer: counts, epilogue, LIF
//   bconv_backward.cpp    bconv_lif_bwd: LIF/BN backward, then the two gradients below
//   bconv_weight_grad.cpp dL/dW: masked sums over the set bits of the packed input
//   bconv_input_grad.cpp  dL/dX: ternary add/subtract kernels, or the dense transposed conv
//   bconv_unfold.cpp      both on a small map: the conv as one [Co*Ho*Wo, Ci*H*W] matrix
//   cpu_algos.cpp         which path and algorithm each of them takes
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <tuple>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>

namespace binslt {
namespace cpu {

// Geometry of one conv call: B = T*N images H x W with Cw words per pixel, Co output channels,
// a KH x KW kernel, output Ho x Wo.
struct ConvShape {
  int64_t B, H, W, Cw, Co, KH, KW, Ho, Wo, T, N;
  int64_t stride, padding;
};

// The checks of the conv geometry for an input of B = T*N images H x W with Cw words per pixel
// (what x_packed has, or what the float input packs to); in.name names that input in messages.
struct InputDims {
  int64_t B, H, W, Cw;
  const char* name;
};
ConvShape check_conv_dims(const InputDims& in, const at::Tensor& w_mask, const at::Tensor& w_pos,
                          int64_t T, int64_t stride, int64_t padding, const char* op);

// The same for a packed input x_packed [T*N, H, W, Cw] int32.
ConvShape check_conv(const at::Tensor& x_packed, const at::Tensor& w_mask,
                     const at::Tensor& w_pos, int64_t T, int64_t stride, int64_t padding,
                     const char* op);

// A CPU tensor shaped like the output (residual, grad_spikes), as contiguous float32.
at::Tensor cpu_output_like(const at::Tensor& t, at::IntArrayRef shape, const char* op,
                           const char* name);

// [B, C, H, W] float (contiguous) -> [B, H + 2*margin_top, W + 2*margin_left, C] contiguous with
// zero margins.
at::Tensor channels_last_copy(const at::Tensor& x, int64_t margin_top, int64_t margin_left);

// The 0/1 input as rows [B*H*W, in_channels] float32 (channel-last: each packed word unpacks to
// 32 consecutive floats).
at::Tensor unpack_rows(const at::Tensor& x_packed, int64_t in_channels);

// dL/dW_eff [Co, Ci, kh, kw] from dZ [B, Co, Ho, Wo] (contiguous) and the packed input, one matrix
// product per tap over the pixel pairs it joins (bconv_weight_grad.cpp).
at::Tensor weight_grad_taps(const ConvShape& s, int64_t Ci, const at::Tensor& x_packed,
                            const at::Tensor& gz);

// The register-tile float transpose of the active ISA: src [R, C] -> dst [C, R].
using TransposeFn = void (*)(const float*, float*, int64_t, int64_t);
TransposeFn transpose_f32_fn();

// The forward conv as oneDNN's int8 convolution (bconv_onednn.cpp; inference): the spikes as
// u8 0/1 channel-last [B, C, H, W] (ChannelsLast), from packed words [B, H, W, Cw] (C = 32*Cw)
// or from float spikes [B, C, H, W] (*bad set for a value other than 0. / 1.); and the conv,
// whose call gives the integer counts as float32 [b, Co, Ho, Wo] ChannelsLast for b images.
at::Tensor spikes_u8_from_packed(const at::Tensor& x_packed);
at::Tensor spikes_u8_from_float(const float* x, int64_t B, int64_t C, int64_t H, int64_t W,
                                const at::TensorOptions& opts, bool* bad);
// oneDNN's weight quantisation of a {-1, 0, +1} weight: one scale (1) and zero point (0) for the
// whole tensor (a per-channel scale costs the prepacking a host read per output channel),
// allocated once and only read.
const at::Tensor& onednn_unit_scale();
const at::Tensor& onednn_zero_point();

class OnednnConv {
 public:
  // W = sign * mask from the planes (Ci input channels: 32*Cw for packed input), prepacked for
  // calls of chunk_images images. A weight of more than kPartWeightBytes is cut into input
  // channel parts, convolved one by one and their counts summed (integers: exact). `cached`:
  // look the planes up in (and add them to) the cache of recent prepacked weights, for callers
  // that meet one weight again (inference); the training forward, whose weight a search or
  // fine-tune step changes every call, prepacks each time (so that measuring its plan times the
  // prepacking too, and no stale weights are held).
  OnednnConv(const ConvShape& s, int64_t Ci, const uint32_t* mbits, const uint32_t* pbits,
             int64_t chunk_images, bool cached = true);
  at::Tensor operator()(const at::Tensor& x_u8) const;

  // The counts z[t] of steps t < T of images [n0, n0 + m) out of N a step (x_u8: [T * N, Ci, H,
  // W] ChannelsLast, step-major), each [m, Co, Ho, Wo] ChannelsLast: one call over all T * N
  // images where the chunk is the whole batch (m == N: the steps' rows are contiguous), else
  // one call a step. Fewer, larger calls: bconv_lif_infer forced to onednn at VGG-11's layers,
  // N=32, T=4, 2-core Xeon with AMX (ms, medians, a call a step / one call): 512 -> 512 4x4
  // 3.57 / 3.10, 256 -> 512 4x4 1.62 / 1.50, 256 -> 256 8x8 2.03 / 1.86, 128 -> 256 8x8
  // 1.34 / 1.27, the 2048 -> 256 linear 0.45 / 0.37 (the larger maps' chunks are smaller).
  void steps(const at::Tensor& x_u8, int64_t T, int64_t N, int64_t n0, int64_t m,
             std::vector<at::Tensor>& z) const;
  // The images of one call of `steps` for chunks of nb images: what the constructor's
  // chunk_images is given (the prepacking's input-size hint).
  static int64_t call_images(int64_t T, int64_t N, int64_t nb) { return nb == N ? T * N : nb; }

  // oneDNN's int8 conv slows down per multiply-add where the weight outgrows the core's L2: on a
  // 2-core Xeon with AMX (2 MiB L2), 512->512 3x3 (2.25 MiB of weights) at 4x4, 32 images:
  // 1.39 ms whole, 0.88 ms as two 256-channel parts summed; at 8x8 (16 images) 1.15 vs 1.05;
  // 512->256 (1.1 MiB) 0.37 whole vs 0.43 in parts.
  static constexpr int64_t kPartWeightBytes = 2 << 20;

  // Images per call out of `images`, each writing `floats_per_image` float counts: the call's
  // output within ~8 MiB (cache-resident between the conv and the pass that reads it; oneDNN's
  // large outputs otherwise cost more in page faults than in arithmetic), at least one image.
  static int64_t chunk_images(int64_t images, int64_t floats_per_image) {
    constexpr int64_t kChunkBytes = int64_t{8} << 20;
    const int64_t bytes = std::max<int64_t>(1, floats_per_image) * int64_t{sizeof(float)};
    return std::max<int64_t>(1, std::min<int64_t>(images, kChunkBytes / bytes));
  }

 private:
  int64_t stride_, padding_;
  std::vector<int64_t> part_begin_;  // each part's first input channel (0 first)
  std::vector<at::Tensor> packed_;   // each part's prepacked weight
  at::Tensor call(const at::Tensor& x_u8, const at::Tensor& packed) const;
};

// binslt::bconv_affine_infer (bconv_onednn.cpp): (count * alpha) * scale + shift of x (float
// spikes [B, C, H, W] or packed words [B, H, W, Cw]) -> [B, Co, Ho, Wo] float32.
at::Tensor bconv_affine_infer_cpu(const at::Tensor& x_in, const at::Tensor& w_mask_in,
                                  const at::Tensor& w_pos_in, const at::Tensor& alpha_in,
                                  const at::Tensor& scale_in, const at::Tensor& shift_in,
                                  int64_t stride, int64_t padding);

// [B, H, W, C] float (contiguous) -> [B, C, H, W] contiguous.
at::Tensor channels_first_copy(const at::Tensor& x);

// packed [B, H, W, Cw] int32 -> [B, channels, H, W] float32 0/1 (binslt::unpack_spikes).
at::Tensor unpack_spikes_cpu(const at::Tensor& packed, int64_t channels);

// The same from raw words [B, P, Cw] (P = H * W pixels) into out [B, channels, P].
void unpack_words_to_planes(const uint32_t* words, int64_t B, int64_t P, int64_t Cw,
                            int64_t channels, float* out);

// dL/dW_eff [Co, Ci, kh, kw] from the packed input and dZ, which the sums read channel-last
// with zero margins: gz is either that copy (cl: [B, Ho + 2*margin_top, Wo + 2*margin_left, Co],
// from channels_last_copy) or dZ itself ([B, Co, Ho, Wo]), each image then turned channel-last
// into a buffer of its own just before its sums (the deep layers' block schedule makes the
// copy itself).
at::Tensor weight_grad(const ConvShape& s, int64_t Ci, const at::Tensor& x_packed,
                       const at::Tensor& gz, bool cl, int64_t margin_top, int64_t margin_left);

// One (output channel, tap) row of W_eff from its bit-plane words mw, qw (Cw words each):
// dst[c * stride] = +a, -a or 0 for c < Ci, branch-free (vectorisable).
inline void signed_weight_row(const uint32_t* mw, const uint32_t* qw, float a, int64_t Ci,
                              float* dst, int64_t stride) {
  for (int64_t c = 0; c < Ci; ++c) {
    const uint32_t mb = (mw[c >> 5] >> (c & 31)) & 1u, pb = (qw[c >> 5] >> (c & 31)) & 1u;
    dst[c * stride] = mb ? (pb ? a : -a) : 0.0f;
  }
}

// W_eff = alpha[co] * (+1 | -1) * mask, dense [Co, Ci, kh, kw] float32, from its bit planes.
at::Tensor dense_weight(const ConvShape& s, int64_t Ci, const at::Tensor& w_mask,
                        const at::Tensor& w_pos, const float* alpha);

// dL/dX [T, N, Ci, H, W] from dZ [B, Co, Ho, Wo] (contiguous float32) and the weight planes:
// ATen's transposed conv of W_eff ("dense"), or the ternary add/subtract kernels (AVX-512,
// stride 1; combos: over signed sums of four dZ rows), whose per-thread combination planes take
// ternary_combo_bytes.
at::Tensor input_grad_dense(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                            const at::Tensor& w_mask, const at::Tensor& w_pos, const float* alpha);
at::Tensor input_grad_ternary(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                              const at::Tensor& w_mask, const at::Tensor& w_pos,
                              const float* alpha, bool combos);
int64_t ternary_combo_bytes(const ConvShape& s);

// The dense dL/dX from dZ channel-last with zero margins (gz_cl: [B, Ho + 2*margin_top,
// Wo + 2*margin_left, Co], channels_last_copy's with margins KH-1-padding, KW-1-padding): a
// stride-1 transposed conv is the forward conv of the padded dZ with the flipped, transposed
// weight, and those margins are gz_cl's. gz_cl is released before the result is copied back to
// [T, N, Ci, H, W].
at::Tensor input_grad_margined(const ConvShape& s, int64_t Ci, at::Tensor gz_cl,
                               const at::Tensor& w_mask, const at::Tensor& w_pos,
                               const float* alpha);

// The eight 0/1 values of every byte, bit j at [byte][j]: a byte of packed channels becomes
// eight values in one copy.
template <typename T>
struct ByteBits {
  T v[256][8];
  ByteBits() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) v[b][j] = static_cast<T>((b >> j) & 1);
  }
};

// One output row (b, oy) of unfold_output_rows_bits as int8, [Wo, KH * KW * Ci], with
// AVX-512BW; nullptr where the CPU lacks it (bconv_grad_int8.cpp).
using UnfoldRowInt8 = void (*)(const ConvShape& s, int64_t Ci, const uint32_t* x_packed,
                               int64_t b, int64_t oy, int8_t* dst);
UnfoldRowInt8 unfold_row_int8_fn();

// The split forms' unfolded input: output rows r0 .. r0 + nr - 1 (row r = b * Ho + oy) as
// [nr * Wo, KH * KW * Ci] 0/1 values (column (ky * KW + kx) * Ci + ci), read from the packed
// input itself (x_packed [B, H, W, Cw] words, channel ci bit ci % 32 of word ci / 32; no
// unpacked copy of the whole input): tap (ky, kx) of output pixel (oy, ox) is input pixel
// (oy * stride - padding + ky, ox * stride - padding + kx), zeros outside the image.
// Where T is int8 and the CPU has AVX-512BW, each output row is unfold_row_int8_fn()'s (a 64-bit
// mask of channels expands to 64 bytes in one instruction).
template <typename T>
void unfold_output_rows_bits(const ConvShape& s, int64_t Ci, const uint32_t* x_packed,
                             int64_t r0, int64_t nr, T* dst) {
  static const ByteBits<T> bits;
  const int64_t K = s.KH * s.KW * Ci;
  if constexpr (std::is_same_v<T, int8_t>) {
    static const UnfoldRowInt8 row = unfold_row_int8_fn();
    if (row != nullptr) {
      at::parallel_for(0, nr, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
          row(s, Ci, x_packed, (r0 + i) / s.Ho, (r0 + i) % s.Ho, dst + i * s.Wo * K);
      });
      return;
    }
  }
  at::parallel_for(0, nr, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = (r0 + i) / s.Ho, oy = (r0 + i) % s.Ho;
      for (int64_t ox = 0; ox < s.Wo; ++ox) {
        T* d = dst + (i * s.Wo + ox) * K;
        for (int64_t ky = 0; ky < s.KH; ++ky) {
          const int64_t iy = oy * s.stride - s.padding + ky;
          for (int64_t kx = 0; kx < s.KW; ++kx, d += Ci) {
            const int64_t ix = ox * s.stride - s.padding + kx;
            if (iy < 0 || iy >= s.H || ix < 0 || ix >= s.W) {
              std::memset(d, 0, static_cast<size_t>(Ci) * sizeof(T));
              continue;
            }
            const uint32_t* w = x_packed + ((b * s.H + iy) * s.W + ix) * s.Cw;
            for (int64_t c = 0; c < Ci; c += 8) {
              const uint32_t byte = (w[c >> 5] >> (c & 31)) & 0xFFu;
              std::memcpy(d + c, bits.v[byte],
                          static_cast<size_t>(std::min<int64_t>(8, Ci - c)) * sizeof(T));
            }
          }
        }
      }
    }
  });
}

// The weight gradient as exact integer matrix products (bconv_grad_int8.cpp): dZ [B, Co, Ho, Wo]
// (contiguous float32) split into three int8 limbs per value on a per-channel scale, one
// int8 x int8 -> int32 product (ATen's _int_mm: AMX-INT8 through oneDNN) per chunk of output
// rows against the 0/1 input unfolded once, the limbs recombined in double. Returns an undefined
// tensor where dZ holds a value that is not finite (the caller then takes a float form, which
// carries it through as ATen would).
// absmax (dZ finite): each channel's largest |dZ|, the limbs' scale, as the LIF/BN backward
// finds it in the pass that writes dZ (else found here, a chunk at a time).
at::Tensor weight_grad_int8(const ConvShape& s, int64_t Ci, const at::Tensor& x_packed,
                            const at::Tensor& gz, const float* absmax = nullptr);
// The most output pixels one of its products sums (|sum| <= 127 * pixels < 2^31): a chunk holds
// at least one output row, so rows are at most this wide.
int64_t int8_grad_w_max_pixels();
// The largest |v| over rows g + b * img_stride, b < nb, of n floats each (one channel of dZ
// [B, Co, Ho, Wo]: img_stride Co * Ho * Wo); *bad set for a value that is not finite. The
// split forms' scale (int8 per channel, bf16x3 per tensor).
float channel_abs_max(const float* g, int64_t img_stride, int64_t nb, int64_t n, bool* bad);
// The input gradient [T, N, Ci, H, W] the same way (any stride and padding; a CPU with
// AMX-INT8): alpha * dZ per image in three limbs, their exact int32 products with the flipped,
// transposed {-1, 0, +1} weight, recombined in double. Two executions of the same integer sums
// (so the same gradient, bit for bit): oneDNN's u8 x s8 convolution of the limbs (at stride s,
// one per pair of stride classes of the rows and columns, with that pair's sub-kernel), or, at
// stride 1 on maps of at most kInt8UnfoldedGradXMaxPixels input pixels (int8_grad_x_unfolds),
// one int8 matrix product (ATen's _int_mm) per chunk of images over the limbs unfolded around
// every input pixel: oneDNN's convolution of a 4x4 map (6x6 padded) runs far below its speed on
// larger maps, the matrix product near _int_mm's rate. The 2-core Xeon with AMX, VGG-11's N=32
// T=4 search step (BINSLT_PLAN_MEASURE=all keys, grad_x alone, ms conv / unfolded / dense):
// 512->512 4x4 pooled 27.3 / 14.6 / 27.2, 256->512 4x4 9.6 / 9.3 / 13.3; at 8x8 the
// convolution leads (256->256 pooled 13.2 / 16.2). exec: kAuto follows int8_grad_x_unfolds;
// kConv / kUnfolded force one (kUnfolded needs stride 1; tests compare the two).
// Undefined where dZ holds a value that is not finite. over_gz (dZ finite, Ci = Co, the same
// map, dZ read by nothing after): each chunk of images' gradient is written over that chunk's
// dZ once its limbs are taken, and the result is gz's storage.
constexpr int64_t kInt8UnfoldedGradXMaxPixels = 16;
enum class Int8GradX : int8_t { kAuto, kConv, kUnfolded };
bool int8_grad_x_unfolds(const ConvShape& s);
at::Tensor input_grad_int8(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                           const at::Tensor& w_mask, const at::Tensor& w_pos,
                           const float* alpha, bool over_gz = false,
                           Int8GradX exec = Int8GradX::kAuto);
// input_grad_int8 as a Python function for the tests (binslt._C._int8_input_grad): dZ [B, Co,
// Ho, Wo] float32, the weight planes, alpha [Co], the input's size; None where dZ holds a value
// that is not finite.
std::optional<at::Tensor> int8_input_grad_for(const at::Tensor& gz, const at::Tensor& w_mask,
                                              const at::Tensor& w_pos, const at::Tensor& alpha,
                                              int64_t Ci, int64_t H, int64_t W, int64_t stride,
                                              int64_t padding, const std::string& exec);

// The split-precision forms (bconv_grad_bf16.cpp; any stride): dZ on one power-of-two scale in
// three parts exact in bf16, the products ATen float32 calls under oneDNN's bf16 precision (a
// bf16 matrix engine where the CPU has one): the weight gradient one matrix product per chunk
// of output rows over the unfolded input, the input gradient one transposed convolution; the
// parts' sums recombined in double.
// dL/dW_eff [Co, Ci, kh, kw] from dZ [B, Co, Ho, Wo] and the 0/1 input; dL/dX [T, N, Ci, H, W]
// from alpha * dZ and the {-1, 0, +1} weight. Undefined where dZ holds a value that is not
// finite (the caller then takes a float form).
at::Tensor weight_grad_bf16x3(const ConvShape& s, int64_t Ci, const at::Tensor& x_packed,
                              const at::Tensor& gz);
at::Tensor input_grad_bf16x3(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                             const at::Tensor& w_mask, const at::Tensor& w_pos,
                             const float* alpha);
// x (float32) as [3, *x.shape] parts exact in bf16 and e: x == (parts[0] + parts[1] + parts[2])
// * 2^e for every value of x above 2^(e - 100) in magnitude; ValueError for NaN or inf.
std::tuple<at::Tensor, int64_t> bf16_split(const at::Tensor& x);

// The unfold form (bconv_unfold.cpp): bytes of its matrix [Co*Ho*Wo, Ci*H*W] float32; dL/dW_eff
// from dZ [B, Co, Ho, Wo] and the unpacked input x [B, Ci, H, W]; dL/dX [T, N, Ci, H, W].
int64_t unfold_matrix_bytes(const ConvShape& s, int64_t Ci);
at::Tensor weight_grad_unfold(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                              const at::Tensor& x);
at::Tensor input_grad_unfold(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                             const at::Tensor& w_mask, const at::Tensor& w_pos,
                             const float* alpha);

}  // namespace cpu
}  // namespace binslt
