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
#include <type_traits>
#include <immintrin.h>

#include <torch/library.h>

#include "binslt/big_tensor.h"
#include "binslt/bconv_cpu.h"
#include "binslt/checks.h"
#include "binslt/pack_cpu.h"
#include "binslt/cpu_algos.h"
#include "binslt/infer_tile.h"
#include "binslt/lif.h"

namespace binslt {
namespace cpu {

namespace {

std::optional<c10::OperatorHandle> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchema({name, ""});
}

bool onednn_int8_ops() {
  static const bool ok = find_op("onednn::qconv_prepack") &&
                         find_op("onednn::qconv2d_pointwise") &&
                         isa_supported(Isa::kAvx512);  // the route's LIF packs with AVX-512
  return ok;
}

}  // namespace

bool onednn_int8_supported() {
  static const bool ok = [] {
    if (!onednn_int8_ops()) return false;
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto it = caps.find("amx_int8");
    if (it == caps.end() || !it->second.isBool() || !it->second.toBool()) return false;
    return at::cpu::init_amx();  // the kernel's permission to use the AMX tile state
  }();
  return ok;
}

bool onednn_int8_runs() {
  // VNNI's byte dot products accumulate in int32 (without VNNI oneDNN pairs bytes into
  // saturating int16 sums): the int8 convolution is exact on either engine.
  static const bool ok = onednn_int8_supported() ||
                         (onednn_int8_ops() && at::cpu::is_avx512_vnni_supported());
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

at::Tensor spikes_u8_from_packed(const at::Tensor& x_packed) {
  const int64_t B = x_packed.size(0), H = x_packed.size(1), W = x_packed.size(2),
                Cw = x_packed.size(3);
  at::Tensor out = empty_big({B, 32 * Cw, H, W}, x_packed.options().dtype(at::kByte),
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
  at::Tensor out = empty_big({B, C, H, W}, opts.dtype(at::kByte), at::MemoryFormat::ChannelsLast);
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

// The prepacked weights of recent calls, keyed by the planes' contents (copied into the entry,
// compared word for word: a hit is always the same weight) and the geometry; an eval loop meets
// the same layers every call. At most kCacheEntries, least recently used first out.
namespace {
struct PackedEntry {
  std::vector<int64_t> geometry;
  std::vector<uint32_t> planes;  // mask words, then sign words
  std::vector<at::Tensor> packed;
};
constexpr size_t kCacheEntries = 64;
std::mutex g_cache_mutex;
std::list<PackedEntry> g_cache;  // most recent first
}  // namespace

const at::Tensor& onednn_unit_scale() {
  static const at::Tensor* t = new at::Tensor(at::ones({1}, at::TensorOptions().dtype(at::kFloat)));
  return *t;
}
const at::Tensor& onednn_zero_point() {
  static const at::Tensor* t = new at::Tensor(at::zeros({1}, at::TensorOptions().dtype(at::kLong)));
  return *t;
}

OnednnConv::OnednnConv(const ConvShape& s, int64_t Ci, const uint32_t* mbits,
                       const uint32_t* pbits, int64_t chunk_images, bool cached)
    : stride_(s.stride), padding_(s.padding) {
  TORCH_CHECK(onednn_int8_runs(),
              "binslt: the 'onednn' conv needs PyTorch's oneDNN int8 convolution on a CPU with "
              "AMX-INT8 or AVX-512 VNNI");
  // input channel parts of at most kPartWeightBytes of weights, in multiples of 64 channels
  const int64_t per_channel = s.Co * s.KH * s.KW;
  const int64_t parts = std::min<int64_t>(std::max<int64_t>(1, (Ci + 63) / 64),
                                          (per_channel * Ci + kPartWeightBytes - 1) /
                                              kPartWeightBytes);
  const int64_t step = (Ci + parts - 1) / parts;
  const int64_t part = parts == 1 ? Ci : (step + 63) / 64 * 64;
  for (int64_t c0 = 0; c0 < Ci; c0 += part) part_begin_.push_back(c0);
  const int64_t n_words = s.Co * s.KH * s.KW * s.Cw;
  std::vector<int64_t> geometry{s.Co, Ci, s.KH, s.KW, s.Cw, s.H, s.W, stride_, padding_,
                                chunk_images, part};
  if (cached) {  // compared in place: the planes are copied only into a new entry
    const size_t bytes = n_words * sizeof(uint32_t);
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    for (auto it = g_cache.begin(); it != g_cache.end(); ++it)
      if (it->geometry == geometry && it->planes.size() == 2 * static_cast<size_t>(n_words) &&
          std::memcmp(it->planes.data(), mbits, bytes) == 0 &&
          std::memcmp(it->planes.data() + n_words, pbits, bytes) == 0) {
        packed_ = it->packed;
        g_cache.splice(g_cache.begin(), g_cache, it);
        return;
      }
  }
  const std::vector<int64_t> st{stride_, stride_}, pd{padding_, padding_}, dl{1, 1};
  static const c10::OperatorHandle prepack = *find_op("onednn::qconv_prepack");
  const at::Tensor w = int8_weight(s, Ci, mbits, pbits);
  for (int64_t c0 : part_begin_) {
    const int64_t len = std::min(part, Ci - c0);
    torch::jit::Stack stack{
        parts == 1 ? w : w.narrow(1, c0, len).contiguous(at::MemoryFormat::ChannelsLast),
        onednn_unit_scale(),
        1.0,
        int64_t{0},
        st,
        pd,
        dl,
        int64_t{1},
        std::vector<int64_t>{chunk_images, len, s.H, s.W}};
    prepack.callBoxed(&stack);
    packed_.push_back(stack[0].toTensor());
  }
  if (!cached) return;
  std::vector<uint32_t> planes(2 * n_words);
  std::memcpy(planes.data(), mbits, n_words * sizeof(uint32_t));
  std::memcpy(planes.data() + n_words, pbits, n_words * sizeof(uint32_t));
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  g_cache.push_front(PackedEntry{std::move(geometry), std::move(planes), packed_});
  if (g_cache.size() > kCacheEntries) g_cache.pop_back();
}

at::Tensor OnednnConv::call(const at::Tensor& x_u8, const at::Tensor& packed) const {
  static const c10::OperatorHandle conv = *find_op("onednn::qconv2d_pointwise");
  const std::vector<int64_t> st{stride_, stride_}, pd{padding_, padding_}, dl{1, 1};
  torch::jit::Stack stack{x_u8,
                          1.0,
                          int64_t{0},
                          packed,
                          onednn_unit_scale(),
                          onednn_zero_point(),
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

at::Tensor OnednnConv::operator()(const at::Tensor& x_u8) const {
  if (packed_.size() == 1) return call(x_u8, packed_[0]);
  const int64_t Ci = x_u8.size(1);
  at::Tensor z;
  for (size_t i = 0; i < packed_.size(); ++i) {
    const int64_t c0 = part_begin_[i];
    const int64_t c1 = i + 1 < packed_.size() ? part_begin_[i + 1] : Ci;
    const at::Tensor r =
        call(x_u8.narrow(1, c0, c1 - c0).contiguous(at::MemoryFormat::ChannelsLast), packed_[i]);
    if (i == 0)
      z = r;
    else
      z.add_(r);  // integer counts below 2^24: the float sum is exact
  }
  return z;
}

void OnednnConv::steps(const at::Tensor& x_u8, int64_t T, int64_t N, int64_t n0, int64_t m,
                       std::vector<at::Tensor>& z) const {
  z.resize(T);
  if (m == N) {  // (call_images' condition)
    const at::Tensor all = (*this)(x_u8.narrow(0, 0, T * N));
    for (int64_t t = 0; t < T; ++t) z[t] = all.narrow(0, t * N, N);
    return;
  }
  for (int64_t t = 0; t < T; ++t) z[t] = (*this)(x_u8.narrow(0, t * N + n0, m));
}

// ---------------------------------------------------------------------------------------------
// The onednn route's epilogue (bconv_lif_infer, plan forward=onednn)
// ---------------------------------------------------------------------------------------------

namespace {

// bconv_affine_infer's current of one integer count: (count * alpha) * scale + shift, the one
// expression its output and a fused shortcut's residual (infer_onednn) both use.
inline float affine_current(float count, float alpha, float scale, float shift) {
  return (count * alpha) * scale + shift;
}

// The eval epilogue and the LIF over T of one pixel's Co channels in channel-last order: counts
// zt[t] + off (Co floats a step), residual rt[t] + roff likewise (or rt null), the spikes out as
// pack_spikes bits, words[t * Cw + w]. Sixteen channels a vector, kGroup vectors at a time (their
// steps' dependency chains through the division overlap), each membrane in a register through
// the T steps, lanes past Co masked off; per channel the float operations of lif_counts in the
// same order, so the same spikes: the current (count * alpha) * scale + shift (+ residual), then
// lif_charge, lif_fire and lif_reset written out for the neuron kind of the template arguments
// (soft reset, decay_input, tau a power of two).
template <bool kRes, bool kSoft, bool kDecayInput, bool kPow2>
__attribute__((target("avx512f"))) void lif_pixel_words_t(const FwdEpilogue& ep, int64_t T,
                                                          int64_t Co, int64_t Cw,
                                                          const float* const* zt, int64_t off,
                                                          const float* const* rt, int64_t roff,
                                                          uint32_t* words) {
  constexpr int kGroup = 4;
  const NeuronParams& p = ep.p;
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512 vr = kSoft ? zero : _mm512_set1_ps(p.v_reset);  // also V before the first step
  const __m512 tau = _mm512_set1_ps(kPow2 ? p.inv_tau : p.tau);
  const __m512 thr = _mm512_set1_ps(p.v_threshold);
  for (int64_t g0 = 0; g0 < Co; g0 += 16 * kGroup) {  // every word is stored once a step
    __mmask16 m[kGroup];
    __m512 a[kGroup], sc[kGroup], sh[kGroup], v[kGroup];
    for (int b = 0; b < kGroup; ++b) {
      const int64_t left = Co - (g0 + 16 * b);
      m[b] = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                        : static_cast<__mmask16>(left > 0 ? (1u << left) - 1u : 0u);
      a[b] = _mm512_maskz_loadu_ps(m[b], ep.alpha + g0 + 16 * b);
      sc[b] = _mm512_maskz_loadu_ps(m[b], ep.scale + g0 + 16 * b);
      sh[b] = _mm512_maskz_loadu_ps(m[b], ep.shift + g0 + 16 * b);
      v[b] = vr;
    }
    for (int64_t t = 0; t < T; ++t) {
      uint32_t bits[kGroup];
      for (int b = 0; b < kGroup; ++b) {
        const int64_t c0 = g0 + 16 * b;
        const __m512 z = _mm512_maskz_loadu_ps(m[b], zt[t] + off + c0);
        __m512 x = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(z, a[b]), sc[b]), sh[b]);
        if (kRes) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m[b], rt[t] + roff + c0));
        const __m512 d = _mm512_sub_ps(v[b], vr);  // lif_charge
        __m512 h;
        if (kDecayInput) {
          const __m512 q = _mm512_sub_ps(x, d);
          h = _mm512_add_ps(v[b], kPow2 ? _mm512_mul_ps(q, tau) : _mm512_div_ps(q, tau));
        } else {
          const __m512 q = kPow2 ? _mm512_mul_ps(d, tau) : _mm512_div_ps(d, tau);
          h = _mm512_add_ps(_mm512_sub_ps(v[b], q), x);
        }
        const __mmask16 fire =  // lif_fire: h - v_threshold >= 0 (false for NaN)
            _mm512_mask_cmp_ps_mask(m[b], _mm512_sub_ps(h, thr), zero, _CMP_GE_OQ);
        const __m512 sk = _mm512_maskz_mov_ps(fire, one);
        v[b] = kSoft  // lif_reset
                   ? _mm512_sub_ps(h, _mm512_mul_ps(sk, thr))
                   : _mm512_add_ps(_mm512_mul_ps(sk, vr),
                                   _mm512_mul_ps(_mm512_sub_ps(one, sk), h));
        bits[b] = fire;
      }
      for (int b = 0; b < kGroup; b += 2) {
        const int64_t c0 = g0 + 16 * b;
        if (c0 < Co) words[t * Cw + c0 / 32] = bits[b] | (bits[b + 1] << 16);
      }
    }
  }
}

// The template argument that is the bool b.
template <class F>
inline void with_flag(bool b, const F& f) {
  if (b)
    f(std::true_type{});
  else
    f(std::false_type{});
}

void lif_pixel_words(const FwdEpilogue& ep, int64_t T, int64_t Co, int64_t Cw,
                     const float* const* zt, int64_t off, const float* const* rt, int64_t roff,
                     uint32_t* words) {
  const NeuronParams& p = ep.p;
  with_flag(rt != nullptr, [&](auto res) {
    with_flag(p.soft_reset, [&](auto soft) {
      with_flag(p.decay_input, [&](auto decay) {
        with_flag(p.tau_pow2, [&](auto pow2) {
          lif_pixel_words_t<decltype(res)::value, decltype(soft)::value, decltype(decay)::value,
                            decltype(pow2)::value>(ep, T, Co, Cw, zt, off, rt, roff, words);
        });
      });
    });
  });
}

// Cw pack_spikes words -> 32*Cw floats 0. / 1.
__attribute__((target("avx512f"))) void words_to_floats(const uint32_t* w, int64_t Cw,
                                                         float* out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < Cw; ++i) {
    _mm512_storeu_ps(out + 32 * i, _mm512_maskz_mov_ps(static_cast<__mmask16>(w[i]), one));
    _mm512_storeu_ps(out + 32 * i + 16,
                     _mm512_maskz_mov_ps(static_cast<__mmask16>(w[i] >> 16), one));
  }
}

// A chunk of images [n0, n1) whose T count maps z[t] ([n1 - n0, Co, Ho, Wo] ChannelsLast floats:
// the conv's, or one current's T times) and its tiles: R output rows, row_blocks per image;
// res_cl: the chunk's residual already channel-last ([T] maps laid out as z's; a shortcut's
// current), or null.
struct OnednnChunk {
  const float* const* z;
  int64_t n0, n1, R, row_blocks;
  const float* const* res_cl = nullptr;
};

// Output rows per tile for chunks of nb images: up to kRowChunk pixels, halved while the tiles
// are under four a thread, a whole number of pool windows.
int64_t tile_rows(const ConvShape& s, int64_t nb, int64_t pool) {
  const int64_t nthreads = at::get_num_threads();
  int64_t R = std::max<int64_t>(1, std::min<int64_t>(s.Ho, kRowChunk / s.Wo));
  while (R > 1 && nb * ((s.Ho + R - 1) / R) < 4 * nthreads) R = (R + 1) / 2;
  if (pool > 1) R = (R + pool - 1) / pool * pool;
  return R;
}

// infer_onednn's packed output: per tile (image n, output rows [oy0, oy1)), each pixel's spike
// bits straight from the channel-last counts (lif_pixel_words: no transpose), then the 2x2 OR
// of the words (pool 2) and their store; the chunk's residual is transposed channel-last first.
void infer_onednn_packed(const ConvShape& s, const InferOut& io, const OnednnChunk& ch,
                         const FwdEpilogue& ep) {
  const int64_t S = s.Ho * s.Wo, Cw = io.Cow, q = io.pool;
  const int64_t n0 = ch.n0, nb = ch.n1 - ch.n0, R = ch.R;
  const float* res = ep.res;
  const float* const* zt = ch.z;
  std::vector<const float*> rt(s.T, nullptr);
  const bool has_res = res != nullptr || ch.res_cl != nullptr;
  // The residual of the chunk channel-last, [T][nb][S][Co], as the counts are.
  std::vector<float> rz(res != nullptr ? s.T * nb * S * s.Co : 0);
  if (ch.res_cl != nullptr) {
    for (int64_t t = 0; t < s.T; ++t) rt[t] = ch.res_cl[t];
  } else if (res != nullptr) {
    const TransposeFn transpose = transpose_f32_fn();
    at::parallel_for(0, s.T * nb, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / nb, n = n0 + j % nb;
        transpose(res + (t * s.N + n) * s.Co * S, rz.data() + j * S * s.Co, s.Co, S);
      }
    });
    for (int64_t t = 0; t < s.T; ++t) rt[t] = rz.data() + t * nb * S * s.Co;
  }
  at::parallel_for(0, nb * ch.row_blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint32_t> words(R * s.Wo * s.T * Cw);
    // a packed residual's pixel as floats [T][32*Cw], and its step pointers
    std::vector<float> rb(io.res_words != nullptr ? s.T * 32 * Cw : 0);
    std::vector<const float*> rbt(s.T);
    for (int64_t t = 0; t < s.T && io.res_words != nullptr; ++t) rbt[t] = rb.data() + t * 32 * Cw;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n = n0 + it / ch.row_blocks, oy0 = (it % ch.row_blocks) * R;
      const int64_t oy1 = std::min(s.Ho, oy0 + R);
      for (int64_t oy = oy0; oy < oy1; ++oy)
        for (int64_t ox = 0; ox < s.Wo; ++ox) {
          const int64_t pix = oy * s.Wo + ox, off = ((n - n0) * S + pix) * s.Co;
          const float* const* r = has_res ? rt.data() : nullptr;
          int64_t roff = off;
          if (io.res_words != nullptr) {
            for (int64_t t = 0; t < s.T; ++t)
              words_to_floats(io.res_words + ((t * s.N + n) * S + pix) * Cw, Cw,
                              rb.data() + t * 32 * Cw);
            r = rbt.data();
            roff = 0;
          }
          lif_pixel_words(ep, s.T, s.Co, Cw, zt, off, r, roff,
                          words.data() + ((oy - oy0) * s.Wo + ox) * s.T * Cw);
        }
      for (int64_t r = 0; r < (oy1 - oy0) / q; ++r)
        for (int64_t ox = 0; ox < io.Wq; ++ox)
          for (int64_t t = 0; t < s.T; ++t) {
            uint32_t* dst =
                io.packed + (((t * s.N + n) * io.Hq + oy0 / q + r) * io.Wq + ox) * Cw;
            const uint32_t* w0 = words.data() + ((q * r) * s.Wo + q * ox) * s.T * Cw + t * Cw;
            if (q == 1) {
              for (int64_t w = 0; w < Cw; ++w) dst[w] = w0[w];
            } else {
              const uint32_t* w1 = w0 + s.Wo * s.T * Cw;
              const int64_t px = s.T * Cw;  // the next pixel's words
              for (int64_t w = 0; w < Cw; ++w) dst[w] = w0[w] | w0[px + w] | w1[w] | w1[px + w];
            }
          }
    }
  });
}

// The output of infer_onednn_packed: packed words in place, or a float output's words
// ([T * N, Hq, Wq, Cow], io.packed pointing at them) unpacked into the spikes by finish().
struct WordsOut {
  InferOut io;
  std::vector<uint32_t> words;
  WordsOut(const ConvShape& s, const InferOut& in) : io(in) {
    if (io.packed != nullptr) return;
    words.resize(static_cast<size_t>(s.T * s.N * io.Hq * io.Wq * io.Cow));
    io.packed = words.data();
  }
  void finish(const ConvShape& s, float* spikes) const {
    if (!words.empty())
      unpack_words_to_planes(words.data(), s.T * s.N, io.Hq * io.Wq, io.Cow, s.Co, spikes);
  }
};

}  // namespace

// Inference with the counts from oneDNN's int8 convolution (OnednnConv): a chunk of images at a
// time, its T steps' convs (OnednnConv::steps: one call where the chunk is the batch; oneDNN's
// own threads) and then, in parallel over (image, row block) tiles, each pixel's epilogue, LIF
// and spike bits straight from the channel-last counts (infer_onednn_packed). A float output is
// those words unpacked at the end: a tile of float spikes would need the counts transposed to
// the bit kernels' [T][Co][L] rows first, which took longer than the conv (VGG-11's 256->256
// 8x8 pooled layer, N=32, T=4, on a 2-core Xeon with AMX: 5.4 ms with float output against
// 3.0 ms packed). The float counts are the integers exactly, so the spikes are those of the
// bit kernels bit for bit.
void infer_onednn(const ConvShape& s, const at::Tensor& x_u8, int64_t Ci, const uint32_t* mbits,
                  const uint32_t* pbits, const FwdEpilogue& ep, const InferOut& io_in,
                  float* spikes, const OnednnShortcut* shortcut) {
  TORCH_INTERNAL_ASSERT(shortcut == nullptr || ep.res == nullptr,
                        "infer_onednn: a shortcut is the residual");
  const int64_t S = s.Ho * s.Wo;
  // Images per chunk: its T float count maps within the chunk (read back by the LIF)
  const int64_t nb = OnednnConv::chunk_images(s.N, s.T * S * s.Co);
  const OnednnConv conv(s, Ci, mbits, pbits, OnednnConv::call_images(s.T, s.N, nb));
  const int64_t R = tile_rows(s, nb, io_in.pool);
  const int64_t row_blocks = (s.Ho + R - 1) / R;
  WordsOut out(s, io_in);
  std::optional<OnednnConv> sc_conv;
  if (shortcut != nullptr)
    sc_conv.emplace(shortcut->s, shortcut->Ci, shortcut->mbits, shortcut->pbits,
                    OnednnConv::call_images(s.T, s.N, nb));
  std::vector<at::Tensor> z(s.T), zr(shortcut != nullptr ? s.T : 0);
  std::vector<const float*> zp(s.T), zrp(zr.size());
  for (int64_t n0 = 0; n0 < s.N; n0 += nb) {
    const int64_t n1 = std::min(s.N, n0 + nb);
    conv.steps(x_u8, s.T, s.N, n0, n1 - n0, z);
    for (int64_t t = 0; t < s.T; ++t) zp[t] = z[t].data_ptr<float>();
    if (shortcut != nullptr) {
      // the shortcut's counts, channel-last as z's, turned in place into its current
      const float *a = shortcut->alpha, *sc = shortcut->scale, *sh = shortcut->shift;
      sc_conv->steps(shortcut->x_u8, s.T, s.N, n0, n1 - n0, zr);
      for (int64_t t = 0; t < s.T; ++t) {
        float* r = zr[t].data_ptr<float>();
        at::parallel_for(0, (n1 - n0) * S, 256, [&](int64_t p0, int64_t p1) {
          for (int64_t px = p0; px < p1; ++px) {
            float* row = r + px * s.Co;
            for (int64_t c = 0; c < s.Co; ++c) row[c] = affine_current(row[c], a[c], sc[c], sh[c]);
          }
        });
        zrp[t] = r;
      }
    }
    infer_onednn_packed(
        s, out.io, OnednnChunk{zp.data(), n0, n1, R, row_blocks, shortcut ? zrp.data() : nullptr},
        ep);
  }
  out.finish(s, spikes);
}

// The onednn route's per-pixel epilogue, LIF and spike words over a float current, alpha = 1
// ((z * 1) * scale + shift is z * scale + shift exactly, bn_lif_infer's), all images one chunk.
void lif_infer_channels_last(const ConvShape& s, const float* const* zt, const FwdEpilogue& ep,
                             const InferOut& io_in, float* spikes) {
  const int64_t R = tile_rows(s, s.N, io_in.pool);
  WordsOut out(s, io_in);
  infer_onednn_packed(s, out.io, OnednnChunk{zt, 0, s.N, R, (s.Ho + R - 1) / R}, ep);
  out.finish(s, spikes);
}

// binslt::bconv_affine_infer (BinConv2d's no-grad path on spikes): y = (count * alpha) * scale +
// shift, [B, Co, Ho, Wo] float32. The counts come from oneDNN's int8 convolution ("onednn", CPU
// with AMX-INT8) or from ATen's float convolution of the 0/1 spikes and the {-1, 0, +1} weights
// ("aten": every partial sum an integer below 2^24, exact too), as plan_forward decides.
at::Tensor bconv_affine_infer_cpu(const at::Tensor& x_in, const at::Tensor& w_mask_in,
                                  const at::Tensor& w_pos_in, const at::Tensor& alpha_in,
                                  const at::Tensor& scale_in, const at::Tensor& shift_in,
                                  int64_t stride, int64_t padding) {
  const char* op = "bconv_affine_infer";
  const PlanLog log(op);
  check_on_cpu(x_in, op, "x");
  const bool packed = x_in.scalar_type() == at::kInt;
  TORCH_CHECK_VALUE(x_in.dim() == 4 && (packed || x_in.scalar_type() == at::kFloat), "binslt::",
                    op, ": x must be float32 spikes [B, C, H, W] or packed words [B, H, W, Cw] "
                    "int32, got ", x_in.scalar_type(), " of shape ", shape_str(x_in));
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = packed ? 0 : x.size(1);
  const int64_t H = packed ? x.size(1) : x.size(2), W = packed ? x.size(2) : x.size(3);
  const int64_t Cw = packed ? x.size(3) : words_for(static_cast<int>(C));
  const ConvShape s = check_conv_dims({B, H, W, Cw, "x"}, w_mask_in, w_pos_in, 1, stride,
                                      padding, op);
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
    for (int64_t i = 0; i < S; ++i) row[i] = affine_current(row[i], ap[c], sp[c], hp[c]);
  };
  ForwardQuery q{s, Ci, true, LazyValue([&] {
                   return packed ? packed_rate(x) : sampled_rate(x.data_ptr<float>(), x.numel());
                 })};
  q.affine = true;
  q.op = op;
  q.variant = c10::str(packed ? "packed_in" : c10::toString(x_in.scalar_type()),
                       x_in.is_contiguous() ? "" : " strided");
  ForwardPlan plan = plan_forward(q);
  auto run = [&](const ForwardPlan& pl) -> at::Tensor {
    // "aten", or nothing to convolve
    if (B == 0 || s.Co == 0 || S == 0 || pl.conv != FwdPlan::kOnednn) {
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
    at::Tensor out = empty_big({B, s.Co, s.Ho, s.Wo}, x.options().dtype(at::kFloat));
    float* o = out.data_ptr<float>();
    const int64_t nb = OnednnConv::chunk_images(B, S * s.Co);
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
  };
  const at::Tensor out = run_forward_plan(plan, run);
  log.emit(conv_shapes(s, Ci), plan.describe());
  return out;
}

}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("bconv_affine_infer", &binslt::cpu::bconv_affine_infer_cpu);
}
