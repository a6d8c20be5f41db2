// The forward conv as oneDNN's int8 convolution (AMX-INT8 tiles where the CPU has them), for
// bconv_lif_infer: spikes are {0, 1} (u8) and the masked sign weights {-1, 0, +1} (s8), so
// oneDNN's int32 sums are the integer counts exactly (|count| <= 9 * Ci < 2^24, also exact as
// the float32 it writes with unit scales). The counts then meet the same epilogue and LIF as the
// bit kernels' (bconv_forward.cpp), so spikes are bit for bit those of "dense" and "event".
//
// The ops are PyTorch's own onednn::qconv_prepack / onednn::qconv2d_pointwise (the x86
// quantization backend of torch.compile), called through the dispatcher: nothing of oneDNN is
// linked or written here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <atomic>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>
#include <optional>
#include <immintrin.h>

#include <torch/library.h>

#include "binslt/bconv_cpu.h"
#include "binslt/checks.h"
#include "binslt/pack_cpu.h"
#include "binslt/cpu_algos.h"

namespace binslt {
namespace cpu {

namespace {

std::optional<c10::OperatorHandle> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchema({name, ""});
}

}  // namespace

bool onednn_int8_supported() {
  static const bool ok = [] {
    if (!find_op("onednn::qconv_prepack") || !find_op("onednn::qconv2d_pointwise")) return false;
    if (!isa_supported(Isa::kAvx512)) return false;  // the route's LIF packs with AVX-512
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto it = caps.find("amx_int8");
    if (it == caps.end() || !it->second.isBool() || !it->second.toBool()) return false;
    return at::cpu::init_amx();  // the kernel's permission to use the AMX tile state
  }();
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Operands in oneDNN's layouts
// ---------------------------------------------------------------------------------------------

// 32 bits -> 32 bytes 0/1 (AVX-512BW masked move), or the plain loop.
__attribute__((target("avx512bw,avx512vl"))) static void bits_to_bytes_avx512(
    const uint32_t* w, int64_t n_words, uint8_t* dst) {
  const __m256i one = _mm256_set1_epi8(1);
  for (int64_t i = 0; i < n_words; ++i)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * i),
                        _mm256_maskz_mov_epi8(static_cast<__mmask32>(w[i]), one));
}
static void bits_to_bytes_base(const uint32_t* w, int64_t n_words, uint8_t* dst) {
  for (int64_t i = 0; i < n_words; ++i)
    for (int b = 0; b < 32; ++b) dst[32 * i + b] = static_cast<uint8_t>((w[i] >> b) & 1u);
}

BitsToBytesFn bits_to_bytes_fn() {
  return isa_supported(Isa::kAvx512) ? &bits_to_bytes_avx512 : &bits_to_bytes_base;
}

at::Tensor spikes_u8_from_packed(const at::Tensor& x_packed) {
  const int64_t B = x_packed.size(0), H = x_packed.size(1), W = x_packed.size(2),
                Cw = x_packed.size(3);
  at::Tensor out = at::empty({B, 32 * Cw, H, W}, x_packed.options().dtype(at::kByte),
                             at::MemoryFormat::ChannelsLast);
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const auto fn = isa_supported(Isa::kAvx512) ? &bits_to_bytes_avx512 : &bits_to_bytes_base;
  const int64_t per_image = H * W * Cw;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    fn(src + b0 * per_image, (b1 - b0) * per_image, dst + b0 * per_image * 32);
  });
  return out;
}

at::Tensor spikes_u8_from_float(const float* x, int64_t B, int64_t C, int64_t H, int64_t W,
                                const at::TensorOptions& opts, bool* bad) {
  at::Tensor out = at::empty({B, C, H, W}, opts.dtype(at::kByte), at::MemoryFormat::ChannelsLast);
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t S = H * W;
  const TransposeFn transpose = transpose_f32_fn();
  std::atomic<bool> any_bad{false};
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(S * C);  // one image channel-last
    bool my_bad = false;
    for (int64_t b = b0; b < b1; ++b) {
      transpose(x + b * C * S, tmp.data(), C, S);
      uint8_t* d = dst + b * S * C;
      for (int64_t i = 0; i < S * C; ++i) {
        const float v = tmp[i];
        my_bad |= !(v == 0.0f || v == 1.0f);
        d[i] = static_cast<uint8_t>(v != 0.0f);
      }
    }
    if (my_bad) any_bad.store(true, std::memory_order_relaxed);
  });
  *bad = any_bad.load();
  return out;
}

// ---------------------------------------------------------------------------------------------
// The convolution
// ---------------------------------------------------------------------------------------------

// W = sign * mask in {-1, 0, +1} as int8 [Co, Ci, KH, KW] in ChannelsLast (the planes' own
// [Co, KH, KW, Ci] order), from the planes [Co, KH, KW, Cw].
static at::Tensor int8_weight(const ConvShape& s, int64_t Ci, const uint32_t* mbits,
                              const uint32_t* pbits) {
  const int64_t rows = s.Co * s.KH * s.KW;
  at::Tensor w = at::empty({s.Co, s.KH, s.KW, Ci}, at::TensorOptions().dtype(at::kChar));
  int8_t* wp = w.data_ptr<int8_t>();
  const auto fn = isa_supported(Isa::kAvx512) ? &bits_to_bytes_avx512 : &bits_to_bytes_base;
  std::vector<uint8_t> m(32 * s.Cw), q(32 * s.Cw);
  for (int64_t r = 0; r < rows; ++r) {
    fn(mbits + r * s.Cw, s.Cw, m.data());
    fn(pbits + r * s.Cw, s.Cw, q.data());
    int8_t* dst = wp + r * Ci;
    for (int64_t ci = 0; ci < Ci; ++ci) dst[ci] = static_cast<int8_t>(m[ci] * (2 * q[ci] - 1));
  }
  return w.permute({0, 3, 1, 2});
}

// The prepacked weights of recent calls, keyed by the planes' contents (copied, compared word for
// word: a hit is always the same weight) and the geometry; an eval loop meets the same layers
// every call. At most kCacheEntries, least recently used first out.
namespace {
struct PackedEntry {
  std::vector<int64_t> geometry;
  std::vector<uint32_t> planes;  // mask words, then sign words
  at::Tensor packed;
};
constexpr size_t kCacheEntries = 64;
std::mutex g_cache_mutex;
std::list<PackedEntry> g_cache;  // most recent first
}  // namespace

OnednnConv::OnednnConv(const ConvShape& s, int64_t Ci, const uint32_t* mbits,
                       const uint32_t* pbits, int64_t chunk_images)
    : stride_(s.stride), padding_(s.padding) {
  TORCH_CHECK(onednn_int8_supported(),
              "binslt: the 'onednn' conv needs PyTorch's oneDNN int8 convolution on a CPU with "
              "AMX-INT8");
  w_scale_ = at::ones({s.Co}, at::TensorOptions().dtype(at::kFloat));
  w_zero_ = at::zeros({s.Co}, at::TensorOptions().dtype(at::kLong));
  const int64_t n_words = s.Co * s.KH * s.KW * s.Cw;
  std::vector<int64_t> geometry{s.Co, Ci, s.KH, s.KW, s.Cw, s.H, s.W, stride_, padding_,
                                chunk_images};
  std::vector<uint32_t> planes(2 * n_words);
  std::memcpy(planes.data(), mbits, n_words * sizeof(uint32_t));
  std::memcpy(planes.data() + n_words, pbits, n_words * sizeof(uint32_t));
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    for (auto it = g_cache.begin(); it != g_cache.end(); ++it)
      if (it->geometry == geometry && it->planes == planes) {
        packed_ = it->packed;
        g_cache.splice(g_cache.begin(), g_cache, it);
        return;
      }
  }
  const std::vector<int64_t> st{stride_, stride_}, pd{padding_, padding_}, dl{1, 1};
  static const c10::OperatorHandle prepack = *find_op("onednn::qconv_prepack");
  torch::jit::Stack stack{int8_weight(s, Ci, mbits, pbits),
                          w_scale_,
                          1.0,
                          int64_t{0},
                          st,
                          pd,
                          dl,
                          int64_t{1},
                          std::vector<int64_t>{chunk_images, Ci, s.H, s.W}};
  prepack.callBoxed(&stack);
  packed_ = stack[0].toTensor();
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  g_cache.push_front(PackedEntry{std::move(geometry), std::move(planes), packed_});
  if (g_cache.size() > kCacheEntries) g_cache.pop_back();
}

at::Tensor OnednnConv::operator()(const at::Tensor& x_u8) const {
  static const c10::OperatorHandle conv = *find_op("onednn::qconv2d_pointwise");
  const std::vector<int64_t> st{stride_, stride_}, pd{padding_, padding_}, dl{1, 1};
  torch::jit::Stack stack{x_u8,
                          1.0,
                          int64_t{0},
                          packed_,
                          w_scale_,
                          w_zero_,
                          c10::IValue(),  // bias
                          st,
                          pd,
                          dl,
                          int64_t{1},
                          1.0,
                          int64_t{0},
                          c10::IValue(at::kFloat),
                          std::string("none"),
                          c10::List<std::optional<at::Scalar>>(),
                          c10::IValue()};
  conv.callBoxed(&stack);
  at::Tensor z = stack[0].toTensor();
  return z.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? z
             : z.contiguous(at::MemoryFormat::ChannelsLast);
}

// binslt::bconv_affine_infer (BinConv2d's no-grad path on spikes): y = (count * alpha) * scale +
// shift, [B, Co, Ho, Wo] float32. The counts come from oneDNN's int8 convolution where the CPU
// has AMX-INT8, otherwise from ATen's float convolution of the 0/1 spikes and the {-1, 0, +1}
// weights (every partial sum an integer below 2^24: exact too).
at::Tensor bconv_affine_infer_cpu(const at::Tensor& x_in, const at::Tensor& w_mask_in,
                                  const at::Tensor& w_pos_in, const at::Tensor& alpha_in,
                                  const at::Tensor& scale_in, const at::Tensor& shift_in,
                                  int64_t stride, int64_t padding) {
  const char* op = "bconv_affine_infer";
  check_on_cpu(x_in, op, "x");
  const bool packed = x_in.scalar_type() == at::kInt;
  TORCH_CHECK_VALUE(x_in.dim() == 4 && (packed || x_in.scalar_type() == at::kFloat), "binslt::",
                    op, ": x must be float32 spikes [B, C, H, W] or packed words [B, H, W, Cw] "
                    "int32, got ", x_in.scalar_type(), " of shape ", shape_str(x_in));
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = packed ? 0 : x.size(1);
  const int64_t H = packed ? x.size(1) : x.size(2), W = packed ? x.size(2) : x.size(3);
  const int64_t Cw = packed ? x.size(3) : words_for(static_cast<int>(C));
  const ConvShape s = check_conv_dims(B, H, W, Cw, "x", w_mask_in, w_pos_in, 1, stride, padding,
                                      op);
  const int64_t Ci = packed ? 32 * Cw : C, S = s.Ho * s.Wo;
  const at::Tensor alpha = cpu_channel_vec(alpha_in, op, "alpha", s.Co);
  const at::Tensor scale = cpu_channel_vec(scale_in, op, "scale", s.Co);
  const at::Tensor shift = cpu_channel_vec(shift_in, op, "shift", s.Co);
  const at::Tensor w_mask = w_mask_in.contiguous(), w_pos = w_pos_in.contiguous();
  const uint32_t* mbits = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
  const uint32_t* pbits = reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>());
  const float *ap = alpha.data_ptr<float>(), *sp = scale.data_ptr<float>(),
              *hp = shift.data_ptr<float>();
  auto affine = [&](float* row, int64_t c) {
    for (int64_t i = 0; i < S; ++i) row[i] = (row[i] * ap[c]) * sp[c] + hp[c];
  };
  if (B == 0 || s.Co == 0 || S == 0 || !onednn_int8_supported()) {
    at::Tensor xf = packed ? unpack_spikes_cpu(x, Ci) : x;
    if (!packed)
      TORCH_CHECK_VALUE(at::logical_or(xf == 0, xf == 1).all().item<bool>(), "binslt::", op,
                        ": ", kNotBinaryMsg);
    std::vector<float> one(s.Co, 1.0f);
    const at::Tensor w = dense_weight(s, Ci, w_mask, w_pos, one.data());
    at::Tensor out = at::conv2d(xf, w, {}, {stride, stride}, {padding, padding}).contiguous();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, B * s.Co, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) affine(o + i * S, i % s.Co);
    });
    return out;
  }
  bool bad = false;
  const at::Tensor x_u8 = packed ? spikes_u8_from_packed(x)
                                 : spikes_u8_from_float(x.data_ptr<float>(), B, C, H, W,
                                                        x.options(), &bad);
  TORCH_CHECK_VALUE(!bad, "binslt::", op, ": ", kNotBinaryMsg);
  at::Tensor out = at::empty({B, s.Co, s.Ho, s.Wo}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(B, (8 << 20) / (S * s.Co * 4)));
  const OnednnConv conv(s, Ci, mbits, pbits, nb);
  const TransposeFn transpose = transpose_f32_fn();
  for (int64_t b0 = 0; b0 < B; b0 += nb) {
    const int64_t b1 = std::min(B, b0 + nb);
    const at::Tensor z = conv(x_u8.narrow(0, b0, b1 - b0));
    const float* zp = z.data_ptr<float>();
    at::parallel_for(b0, b1, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t b = i0; b < i1; ++b) {
        float* ob = o + b * s.Co * S;
        transpose(zp + (b - b0) * S * s.Co, ob, S, s.Co);
        for (int64_t c = 0; c < s.Co; ++c) affine(ob + c * S, c);
      }
    });
  }
  return out;
}

}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("bconv_affine_infer", &binslt::cpu::bconv_affine_infer_cpu);
}
