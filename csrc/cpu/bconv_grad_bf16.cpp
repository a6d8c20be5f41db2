// Both gradients of a binary conv as split-precision products for a bf16 matrix engine
// (bconv_lif_bwd, grad_w / grad_x "bf16x3"; on a CPU with AMX-BF16 plan_backward in
// cpu_algos.cpp times them among the measured candidates).
//
// In each product one operand is exact in bf16: the 0/1 input X for the weight gradient, the
// {-1, 0, +1} weight sign(w) * M for the input gradient (alpha stays outside the product for the
// weight gradient; for the input gradient it scales dZ per output channel first, one float32
// rounding per value). The float32 operand, dZ, is scaled by one power of two 2^-e (e: the
// exponent of its largest magnitude, so the parts neither overflow nor reach the subnormals that
// matrix engines flush) and cut into three parts, each exact in bf16:
//
//   hi  = v with its significand cut to bf16's 8 bits (truncation: it cannot round up and
//         overflow), mid = (v - hi) cut the same way, lo = v - hi - mid
//
// (float32 has 24 significant bits: 3 x 8). v - hi and v - hi - mid are exact in float32, and lo
// keeps at most 8 significant bits, so hi + mid + lo == v (lo is cut too: that changes nothing
// for a normal v, and keeps every part a bf16 value where a tiny v is subnormal after scaling,
// |v| < 2^-126, whose last bits are then dropped). The parts then run through oneDNN with
// PyTorch's float32 precision setting for it at bf16 (what torch.backends.mkldnn.conv /
// .matmul.fp32_precision = "bf16" set; ATen passes it to oneDNN as the bf16 math mode in its
// forward and transposed convolutions and its matrix products, not in its convolution
// backward): on a CPU with a bf16 matrix engine (AMX-BF16) oneDNN converts both operands to
// bf16 -- exactly, they are bf16 values -- and accumulates in float32; elsewhere the same calls
// are float32 products. The weight gradient is one [3 Co, pixels] x [pixels, taps * Ci] matrix
// product per chunk of output rows (ATen's mm; the parts stacked along the rows, the chunk's 0/1
// input unfolded from the packed bits: each operand is converted once, and no product runs over
// padding), the input
// gradient one transposed convolution (ATen's conv_transpose2d; the parts stacked along the
// images). The three float32
// sums meet in double (lo + mid first), are scaled back by 2^e and rounded once to float32: the
// result differs from the dense float32 forms by summation order only.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "binslt/big_tensor.h"
#include "binslt/bconv_cpu.h"
#include "binslt/cpu_algos.h"

namespace binslt {
namespace cpu {
namespace {

// The buffers of one chunk stay below this many bytes (or one item's: an image, an output row).
// They live beside dZ and dL/dX, at the training step's memory peak in the first layers: 24 MiB
// chunks (and a float copy of the whole input) put VGG-11's peak 95 MiB above the float forms'
// (N=32, T=4), 6 MiB ones leave GEMMs of hundreds of rows.
constexpr int64_t kPartBytes = int64_t{6} << 20;

static inline __attribute__((always_inline)) float cut_bf16(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  b &= 0xFFFF0000u;
  float r;
  std::memcpy(&r, &b, sizeof r);
  return r;
}

// RAII: ATen's oneDNN convolutions (CONV) or matrix products (MATMUL) of float32 tensors may
// compute in bf16 while it lives (torch.backends.mkldnn.conv / .matmul.fp32_precision =
// "bf16"; the setting before is restored).
class Bf16Precision {
 public:
  explicit Bf16Precision(at::Float32Op op)
      : op_(op), before_(at::globalContext().float32Precision(at::Float32Backend::MKLDNN, op)) {
    at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, op_,
                                            at::Float32Precision::BF16);
  }
  ~Bf16Precision() {
    at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, op_, before_);
  }
  Bf16Precision(const Bf16Precision&) = delete;
  Bf16Precision& operator=(const Bf16Precision&) = delete;

 private:
  at::Float32Op op_;
  at::Float32Precision before_;
};

// The exponent e with max over channels c of |alpha[c]| * max|dZ of channel c| in
// [2^e, 2^(e+1)) (alpha null: 1), channel c's rows at g + c * n + b * img_stride, b < nb (n
// values each; channel_abs_max, the int8 forms' channel maximum); false where a value is not
// finite or a scaled maximum overflows. e = 0 where every value is 0.
bool max_exponent(const float* g, int64_t channels, int64_t img_stride, int64_t nb, int64_t n,
                  const float* alpha, int* e) {
  std::vector<float> mx(static_cast<size_t>(channels));
  std::vector<char> bad(static_cast<size_t>(channels));
  at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      bool nonfinite = false;
      float m = channel_abs_max(g + c * n, img_stride, nb, n, &nonfinite);
      if (alpha != nullptr) m *= std::fabs(alpha[c]);
      mx[c] = m;
      bad[c] = nonfinite || !(m <= FLT_MAX);
    }
  });
  float m = 0.0f;
  for (int64_t c = 0; c < channels; ++c) {
    if (bad[c]) return false;
    m = std::max(m, mx[c]);
  }
  *e = 0;
  if (m > 0.0f) std::frexp(m, e), *e -= 1;  // m = f * 2^(e+1), f in [0.5, 1)
  return true;
}

// 2^-e as two float factors whose product scales exactly: one factor where 2^-e is a float
// (e >= -127; 2^-127 is an exact subnormal), 2^64 first otherwise (every value is then below
// 2^-127, and x * 2^64 is exact).
struct Scale {
  float a, b;
};
Scale scale_of(int e) {
  return e >= -127 ? Scale{std::ldexp(1.0f, -e), 1.0f}
                   : Scale{std::ldexp(1.0f, 64), std::ldexp(1.0f, -e - 64)};
}

// Part p of value i: dst[p * part_stride + i] for n values v[i] * 2^-e (each product exact, or
// rounded once where it is subnormal). Plain float arithmetic and bit masks: vectorisable.
static inline __attribute__((always_inline)) void split_run(const float* v, int64_t n,
                                                            Scale sc, float* dst,
                                                            int64_t part_stride) {
  float* hi = dst;
  float* mid = dst + part_stride;
  float* lo = dst + 2 * part_stride;
  for (int64_t i = 0; i < n; ++i) {
    const float x = (v[i] * sc.a) * sc.b;
    const float h = cut_bf16(x);
    const float r = x - h;
    const float m = cut_bf16(r);
    hi[i] = h;
    mid[i] = m;
    lo[i] = cut_bf16(r - m);  // r - m itself where x is normal (it has <= 8 bits then)
  }
}

// Items (images, or output rows) per chunk, at most B: one item's buffers take item_bytes.
int64_t chunk_items(int64_t B, int64_t item_bytes) {
  return std::max<int64_t>(1, std::min<int64_t>(B, kPartBytes / std::max<int64_t>(1, item_bytes)));
}

}  // namespace

bool bf16_matrix_supported() {
  static const bool ok = [] {
    if (!at::globalContext().userEnabledMkldnn()) return false;
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto it = caps.find("amx_bf16");
    if (it == caps.end() || !it->second.isBool() || !it->second.toBool()) return false;
    return at::cpu::init_amx();
  }();
  return ok && at::globalContext().userEnabledMkldnn();
}

std::tuple<at::Tensor, int64_t> bf16_split(const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && x.device().is_cpu(),
                   "binslt: bf16_split takes a float32 CPU tensor, got ", x.scalar_type(), " on ",
                   x.device());
  const at::Tensor v = x.contiguous();
  const int64_t n = v.numel();
  int e = 0;
  TORCH_CHECK_VALUE(max_exponent(v.data_ptr<float>(), 1, 0, 1, n, nullptr, &e),
                    "binslt: bf16_split: the tensor holds NaN or inf, which has no exact bf16 "
                    "parts");
  at::Tensor parts = empty_big({3, n}, v.options());
  // in parallel over blocks (each block's parts at their own offsets)
  const float* src = v.data_ptr<float>();
  float* dst = parts.data_ptr<float>();
  const Scale sc = scale_of(e);
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    split_run(src + i0, i1 - i0, sc, dst + i0, n);
  });
  std::vector<int64_t> shape{3};
  for (int64_t d : v.sizes()) shape.push_back(d);
  return {parts.view(shape), static_cast<int64_t>(e)};
}

at::Tensor weight_grad_bf16x3(const ConvShape& s, int64_t Ci, const at::Tensor& x_packed,
                              const at::Tensor& gz) {
  const int64_t S = s.Ho * s.Wo;
  const float* g = gz.data_ptr<float>();
  int e = 0;
  if (!max_exponent(g, s.Co, s.Co * S, s.B, S, nullptr, &e)) return at::Tensor();
  const Scale mul = scale_of(e);
  const at::TensorOptions opts = gz.options();
  const int64_t taps = s.KH * s.KW;
  const int64_t K = taps * Ci;  // columns of the unfolded input: (tap, ci)
  // The product sums over output pixels, so any split of them works: chunks of output rows
  // (b, oy), each with its parts and unfolded input under kPartBytes (or one row's).
  const int64_t R = s.B * s.Ho;
  const int64_t rc =
      chunk_items(R, (3 * s.Co + K) * s.Wo * static_cast<int64_t>(sizeof(float)));
  const uint32_t* xs = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  // the chunks' (lo + mid) + hi, summed over the chunks in double
  at::Tensor acc = at::zeros({s.Co, K}, opts.dtype(at::kDouble));
  double* ap = acc.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, 256 / s.Wo);
  for (int64_t r0 = 0; r0 < R; r0 += rc) {
    const int64_t nr = std::min(rc, R - r0);
    const int64_t M = nr * s.Wo;
    // [3 * Co, M]: part p of channel co in row p * Co + co; column i * Wo + ox is output
    // pixel (oy, ox) of image b, where r0 + i = b * Ho + oy
    at::Tensor parts = empty_big({3 * s.Co, M}, opts);
    float* pp = parts.data_ptr<float>();
    at::parallel_for(0, nr * s.Co, grain, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t i = j / s.Co, co = j % s.Co;
        const int64_t b = (r0 + i) / s.Ho, oy = (r0 + i) % s.Ho;
        split_run(g + (b * s.Co + co) * S + oy * s.Wo, s.Wo, mul, pp + co * M + i * s.Wo,
                  s.Co * M);
      }
    });
    at::Tensor xcol = empty_big({M, K}, opts);  // [M, taps * Ci], 0/1 from the input's bits
    unfold_output_rows_bits(s, Ci, xs, r0, nr, xcol.data_ptr<float>());
    at::Tensor prod;
    {
      Bf16Precision bf16(at::Float32Op::MATMUL);
      prod = at::mm(parts, xcol);  // [3 Co, K]
    }
    parts.reset();
    xcol.reset();
    const float* pr = prod.data_ptr<float>();
    at::parallel_for(0, s.Co * K, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        ap[i] += (static_cast<double>(pr[2 * s.Co * K + i]) +
                  static_cast<double>(pr[s.Co * K + i])) +
                 static_cast<double>(pr[i]);
    });
  }
  // scaled back, rounded once; [Co, taps, Ci] -> [Co, Ci, kh, kw]
  const at::Tensor r = acc * std::ldexp(1.0, e);
  return r.view({s.Co, taps, Ci})
      .permute({0, 2, 1})
      .reshape({s.Co, Ci, s.KH, s.KW})
      .to(at::kFloat)
      .contiguous();
}

at::Tensor input_grad_bf16x3(const ConvShape& s, int64_t Ci, const at::Tensor& gz,
                             const at::Tensor& w_mask, const at::Tensor& w_pos,
                             const float* alpha) {
  const int64_t S = s.Ho * s.Wo;
  const float* g = gz.data_ptr<float>();
  int e = 0;
  if (!max_exponent(g, s.Co, s.Co * S, s.B, S, alpha, &e)) return at::Tensor();
  const Scale mul = scale_of(e);
  const std::vector<float> ones(static_cast<size_t>(s.Co), 1.0f);
  const at::Tensor w_sign = dense_weight(s, Ci, w_mask, w_pos, ones.data());  // {-1, 0, +1}
  const int64_t oph = s.H - ((s.Ho - 1) * s.stride - 2 * s.padding + s.KH);
  const int64_t opw = s.W - ((s.Wo - 1) * s.stride - 2 * s.padding + s.KW);
  const int64_t bc = chunk_items(s.B, 3 * std::max(s.Co * S, Ci * s.H * s.W) *
                                           static_cast<int64_t>(sizeof(float)));
  at::Tensor gx = empty_big({s.B, Ci, s.H, s.W}, gz.options());
  const double back = std::ldexp(1.0, e);
  for (int64_t b0 = 0; b0 < s.B; b0 += bc) {
    const int64_t nb = std::min(bc, s.B - b0);
    // [3 * nb, Co, Ho, Wo]: part p of image b at image p * nb + b; alpha[co] * dZ rounded to
    // float32 once, then split
    at::Tensor parts = empty_big({3 * nb, s.Co, s.Ho, s.Wo}, gz.options());
    float* pp = parts.data_ptr<float>();
    at::parallel_for(0, nb * s.Co, 4, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(static_cast<size_t>(S));
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / s.Co, co = r % s.Co;
        const float* src = g + ((b0 + b) * s.Co + co) * S;
        for (int64_t i = 0; i < S; ++i) row[i] = alpha[co] * src[i];
        split_run(row.data(), S, mul, pp + (b * s.Co + co) * S, nb * s.Co * S);
      }
    });
    at::Tensor r;
    {
      Bf16Precision bf16(at::Float32Op::CONV);
      r = at::conv_transpose2d(parts, w_sign, {}, {s.stride, s.stride}, {s.padding, s.padding},
                               {oph, opw});
    }
    r = r.contiguous();
    const float* rp = r.data_ptr<float>();
    float* out = gx.data_ptr<float>() + b0 * Ci * s.H * s.W;
    const int64_t part = nb * Ci * s.H * s.W;
    at::parallel_for(0, part, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        out[i] = static_cast<float>(
            ((static_cast<double>(rp[2 * part + i]) + static_cast<double>(rp[part + i])) +
             static_cast<double>(rp[i])) *
            back);
    });
  }
  return gx.view({s.T, s.N, Ci, s.H, s.W});
}

}  // namespace cpu
}  // namespace binslt
