// Fused binary convolution + epilogue + multi-step LIF (forward), and its backward.
//
// Forward: exact ternary counts by AND + popcount over packed channel-last words
// (binslt/bconv_popcount.h), per output tile (image n, a block of output rows, all T), then the
// epilogue and the LIF over T while the tile is in cache. With training BatchNorm the statistics
// need every count first: pass 1 stores the counts and exact integer sums, pass 2 runs the
// epilogue + LIF from the stored counts.
//
// Backward: H is recomputed from the saved integer counts (never stored), BPTT gives dL/dX, the
// BN backward gives dL/dZ; the weight gradient is a masked sum over the set bits of the packed
// input (no multiplies), the input gradient is a transposed convolution with W_eff done by ATen
// (oneDNN), which measured fastest for that dense float product.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include "binslt/bconv_popcount.h"
#include "binslt/cpu_checks.h"
#include "binslt/epilogue_cpu.h"
#include "binslt/lif.h"

namespace binslt {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// Runtime ISA selection
// ---------------------------------------------------------------------------------------------

enum class Isa : int { kAuto = -1, kScalar = 0, kPopcnt = 1, kAvx2 = 2, kAvx512 = 3 };

static std::atomic<int> g_isa_override{static_cast<int>(Isa::kAuto)};

static bool isa_supported(Isa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kPopcnt:
      return __builtin_cpu_supports("popcnt");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
    default:
      return false;
  }
#else
  return isa == Isa::kScalar;
#endif
}

static Isa best_isa() {
  static const Isa best = [] {
    for (Isa i : {Isa::kAvx512, Isa::kAvx2, Isa::kPopcnt})
      if (isa_supported(i)) return i;
    return Isa::kScalar;
  }();
  return best;
}

static Isa active_isa() {
  const int o = g_isa_override.load();
  return o < 0 ? best_isa() : static_cast<Isa>(o);
}

static const char* isa_name(Isa i) {
  switch (i) {
    case Isa::kScalar: return "scalar";
    case Isa::kPopcnt: return "popcnt";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    default: return "auto";
  }
}

// Python-visible (binslt._C): force a code path ("auto", "scalar", "popcnt", "avx2", "avx512").
void set_cpu_isa(const std::string& name) {
  Isa want = Isa::kAuto;
  if (name == "auto") want = Isa::kAuto;
  else if (name == "scalar") want = Isa::kScalar;
  else if (name == "popcnt") want = Isa::kPopcnt;
  else if (name == "avx2") want = Isa::kAvx2;
  else if (name == "avx512") want = Isa::kAvx512;
  else
    TORCH_CHECK(false, "binslt: unknown CPU path '", name,
                "'; expected one of auto, scalar, popcnt, avx2, avx512");
  TORCH_CHECK(want == Isa::kAuto || isa_supported(want), "binslt: this CPU cannot run the '",
              name, "' path");
  g_isa_override.store(static_cast<int>(want));
}

std::string cpu_isa() { return isa_name(active_isa()); }

// ---------------------------------------------------------------------------------------------
// Weight gradient: g[0:n] += sum_s gzb[offs[s] : offs[s] + n], the sum held in registers
// ---------------------------------------------------------------------------------------------

static inline __attribute__((always_inline)) void gather_sum_body(const float* gzb,
                                                                  const int32_t* offs, int m,
                                                                  float* g, int n) {
  constexpr int kW = 64;
  int c = 0;
  for (; c + kW <= n; c += kW) {
    float acc[kW] = {};
    for (int s = 0; s < m; ++s) {
      const float* src = gzb + offs[s] + c;
      for (int j = 0; j < kW; ++j) acc[j] += src[j];
    }
    for (int j = 0; j < kW; ++j) g[c + j] += acc[j];
  }
  if (c < n) {
    const int rem = n - c;
    float acc[kW] = {};
    for (int s = 0; s < m; ++s) {
      const float* src = gzb + offs[s] + c;
      for (int j = 0; j < rem; ++j) acc[j] += src[j];
    }
    for (int j = 0; j < rem; ++j) g[c + j] += acc[j];
  }
}
static void gather_sum_base(const float* gzb, const int32_t* offs, int m, float* g, int n) {
  gather_sum_body(gzb, offs, m, g, n);
}
__attribute__((target("avx2"))) static void gather_sum_avx2(const float* gzb,
                                                            const int32_t* offs, int m, float* g,
                                                            int n) {
  gather_sum_body(gzb, offs, m, g, n);
}
__attribute__((target("avx512f"))) static void gather_sum_avx512(const float* gzb,
                                                                 const int32_t* offs, int m,
                                                                 float* g, int n) {
  int c = 0;
  for (; c + 64 <= n; c += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int e = 0; e < m; ++e) {
      const float* src = gzb + offs[e] + c;
      a0 = _mm512_add_ps(a0, _mm512_loadu_ps(src));
      a1 = _mm512_add_ps(a1, _mm512_loadu_ps(src + 16));
      a2 = _mm512_add_ps(a2, _mm512_loadu_ps(src + 32));
      a3 = _mm512_add_ps(a3, _mm512_loadu_ps(src + 48));
    }
    _mm512_storeu_ps(g + c, _mm512_add_ps(_mm512_loadu_ps(g + c), a0));
    _mm512_storeu_ps(g + c + 16, _mm512_add_ps(_mm512_loadu_ps(g + c + 16), a1));
    _mm512_storeu_ps(g + c + 32, _mm512_add_ps(_mm512_loadu_ps(g + c + 32), a2));
    _mm512_storeu_ps(g + c + 48, _mm512_add_ps(_mm512_loadu_ps(g + c + 48), a3));
  }
  for (; c < n; c += 16) {
    const __mmask16 k = n - c >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (n - c)) - 1u);
    __m512 a = _mm512_setzero_ps();
    for (int e = 0; e < m; ++e) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(k, gzb + offs[e] + c));
    _mm512_mask_storeu_ps(g + c, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, g + c), a));
  }
}

namespace {

using RowFn = void (*)(const RowGeom&, int32_t*);

RowFn row_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return &row_counts_avx512;
    case Isa::kAvx2: return &row_counts_avx2;
    case Isa::kPopcnt: return &row_counts_popcnt;
    default: return &row_counts_scalar;
  }
}

struct ConvShape {
  int64_t B, H, W, Cw, Co, KH, KW, Ho, Wo, T, N;
  int64_t stride, padding;
};

ConvShape check_conv(const at::Tensor& x_packed, const at::Tensor& w_mask,
                     const at::Tensor& w_pos, int64_t T, int64_t stride, int64_t padding,
                     const char* op) {
  check_tensor(x_packed, op, "x_packed", 4, at::kInt, "[T*N, H, W, Cw] int32 from pack_spikes");
  check_tensor(w_mask, op, "w_mask", 4, at::kInt, "[Co, kh, kw, Cw] int32 from pack_weight");
  check_tensor(w_pos, op, "w_pos", 4, at::kInt, "[Co, kh, kw, Cw] int32 from pack_weight");
  TORCH_CHECK(w_mask.sizes() == w_pos.sizes(), "binslt::", op,
              ": w_mask and w_pos must have the same shape, got ", shape_str(w_mask), " and ",
              shape_str(w_pos));
  ConvShape s;
  s.B = x_packed.size(0);
  s.H = x_packed.size(1);
  s.W = x_packed.size(2);
  s.Cw = x_packed.size(3);
  s.Co = w_mask.size(0);
  s.KH = w_mask.size(1);
  s.KW = w_mask.size(2);
  TORCH_CHECK(s.Co >= 1 && s.KH >= 1 && s.KW >= 1, "binslt::", op,
              ": the weight must have at least one output channel and a kernel of at least "
              "1x1, got w_mask of shape ", shape_str(w_mask));
  TORCH_CHECK(w_mask.size(3) == s.Cw, "binslt::", op, ": the weight has ", w_mask.size(3),
              " words per position but x_packed has ", s.Cw,
              " (pack both with the same in_channels)");
  TORCH_CHECK(stride >= 1, "binslt::", op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, "binslt::", op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(T >= 1 && s.B % T == 0, "binslt::", op, ": x_packed's first dim (", s.B,
              ") must be T*N with T=", T, " >= 1");
  s.T = T;
  s.N = s.B / T;
  s.stride = stride;
  s.padding = padding;
  s.Ho = (s.H + 2 * padding - s.KH) / stride + 1;
  s.Wo = (s.W + 2 * padding - s.KW) / stride + 1;
  TORCH_CHECK(s.H + 2 * padding >= s.KH && s.W + 2 * padding >= s.KW && s.Ho >= 1 && s.Wo >= 1,
              "binslt::", op, ": kernel ", s.KH, "x", s.KW, " does not fit the padded input ",
              s.H + 2 * padding, "x", s.W + 2 * padding);
  return s;
}


std::optional<at::Tensor> check_out_like(const std::optional<at::Tensor>& r,
                                         at::IntArrayRef shape, const char* op,
                                         const char* name) {
  if (!r.has_value()) return std::nullopt;
  TORCH_CHECK(r->device().is_cpu(), "binslt::", op, ": ", name, " must be a CPU tensor, got ",
              r->device());
  TORCH_CHECK(r->sizes() == shape, "binslt::", op, ": ", name, " must have shape ", shape,
              " ([T, N, Co, Ho, Wo]), got ", shape_str(*r));
  TORCH_CHECK(at::isFloatingType(r->scalar_type()), "binslt::", op, ": ", name,
              " must be a float tensor, got ", r->scalar_type());
  return r->to(at::kFloat).contiguous();
}

at::ScalarType counts_dtype(const ConvShape& s) {
  return 32 * s.Cw * s.KH * s.KW <= 32767 ? at::kShort : at::kInt;
}

// Weight planes repacked for the vector kernels: [KH][KW][Cw][CoP], and neg = mask & ~pos in the
// original layout for the scalar kernels.
struct PackedW {
  int64_t CoP;
  std::vector<uint32_t> pos_r, neg_r, neg;
};

PackedW repack(const ConvShape& s, const uint32_t* mask, const uint32_t* pos) {
  PackedW pw;
  pw.CoP = (s.Co + 15) / 16 * 16;
  const int64_t per = s.KH * s.KW * s.Cw;
  pw.neg.resize(s.Co * per);
  pw.pos_r.assign(per * pw.CoP, 0u);
  pw.neg_r.assign(per * pw.CoP, 0u);
  for (int64_t o = 0; o < s.Co; ++o)
    for (int64_t k = 0; k < per; ++k) {
      const uint32_t m = mask[o * per + k], p = pos[o * per + k] & m;
      pw.neg[o * per + k] = m & ~p;
      pw.pos_r[k * pw.CoP + o] = p;
      pw.neg_r[k * pw.CoP + o] = m & ~p;
    }
  return pw;
}

template <typename CT>
void forward_impl(const ConvShape& s, const at::Tensor& xpad, const PackedW& pw,
                  const uint32_t* pos_orig, const float* alpha, const float* scale,
                  const float* shift, const float* res, bool bn_train, double bn_eps,
                  const NeuronParams& p, CT* counts, float* spikes, float* mean_out,
                  float* var_out) {
  const int64_t Hp = xpad.size(1), Wp = xpad.size(2);
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(xpad.data_ptr<int32_t>());
  const int64_t S = s.Ho * s.Wo;
  const int64_t ts = s.N * s.Co * S;  // elements between timesteps
  const RowFn fn = row_fn(active_isa());

  // Tile: image n, R output rows, all T and all channels.
  const int64_t nthreads = at::get_num_threads();
  int64_t R = std::max<int64_t>(1, std::min<int64_t>(s.Ho, kRowChunk / s.Wo));
  while (R > 1 && s.N * ((s.Ho + R - 1) / R) < 4 * nthreads) R = (R + 1) / 2;
  const int64_t row_blocks = (s.Ho + R - 1) / R;

  std::vector<int64_t> sums(bn_train ? nthreads * s.Co * 2 : 0, 0);
  std::vector<ChannelAffine> aff(s.Co);
  for (int64_t c = 0; c < s.Co; ++c) aff[c] = ChannelAffine{0.0f, 1.0f, scale[c], shift[c], false};

  at::parallel_for(0, s.N * row_blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> tmp(s.Wo * pw.CoP);
    int64_t* my_sums = bn_train ? sums.data() + at::get_thread_num() * s.Co * 2 : nullptr;
    RowGeom g;
    g.Wp = static_cast<int>(Wp);
    g.Cw = static_cast<int>(s.Cw);
    g.Wo = static_cast<int>(s.Wo);
    g.stride = static_cast<int>(s.stride);
    g.KH = static_cast<int>(s.KH);
    g.KW = static_cast<int>(s.KW);
    g.Co = static_cast<int>(s.Co);
    g.CoP = static_cast<int>(pw.CoP);
    g.wpos_r = pw.pos_r.data();
    g.wneg_r = pw.neg_r.data();
    g.wpos = pos_orig;
    g.wneg = pw.neg.data();
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n = it / row_blocks, oy0 = (it % row_blocks) * R;
      const int64_t oy1 = std::min(s.Ho, oy0 + R);
      for (int64_t t = 0; t < s.T; ++t) {
        const int64_t b = t * s.N + n;
        g.img = xp + b * Hp * Wp * s.Cw;
        for (int64_t oy = oy0; oy < oy1; ++oy) {
          g.iy0 = static_cast<int>(oy * s.stride);
          fn(g, tmp.data());
          CT* crow = counts + (b * s.Co) * S + oy * s.Wo;
          for (int64_t c = 0; c < s.Co; ++c) {
            CT* dst = crow + c * S;
            int64_t sm = 0, sq = 0;
            for (int64_t ox = 0; ox < s.Wo; ++ox) {
              const int32_t v = tmp[ox * pw.CoP + c];
              dst[ox] = static_cast<CT>(v);
              sm += v;
              sq += static_cast<int64_t>(v) * v;
            }
            if (my_sums != nullptr) {
              my_sums[2 * c] += sm;
              my_sums[2 * c + 1] += sq;
            }
          }
        }
      }
      if (bn_train) continue;
      // Epilogue + LIF over T for this tile, while its counts are in cache.
      const int L = static_cast<int>((oy1 - oy0) * s.Wo);
      for (int64_t c = 0; c < s.Co; ++c) {
        const int64_t off = (n * s.Co + c) * S + oy0 * s.Wo;
        const CT* cr = counts + off;
        const float a = alpha[c];
        auto zat = [&](int t, int i) { return static_cast<float>(cr[t * ts + i]) * a; };
        lif_forward_row(static_cast<int>(s.T), L, zat, aff[c], res ? res + off : nullptr, ts, p,
                        spikes + off);
      }
    }
  });
  if (!bn_train) return;

  // Exact per-channel statistics of the integer counts, then Z = alpha * count.
  const int64_t M = s.T * s.N * S;
  for (int64_t c = 0; c < s.Co; ++c) {
    __int128 sm = 0, sq = 0;
    for (int64_t th = 0; th < nthreads; ++th) {
      sm += sums[(th * s.Co + c) * 2];
      sq += sums[(th * s.Co + c) * 2 + 1];
    }
    const double mc = static_cast<double>(sm) / static_cast<double>(M);
    const double vc = static_cast<double>(sq * M - sm * sm) / (static_cast<double>(M) * M);
    const double a = alpha[c];
    mean_out[c] = static_cast<float>(a * mc);
    var_out[c] = static_cast<float>(a * a * vc);
    aff[c] = ChannelAffine{mean_out[c], invstd_of(var_out[c], bn_eps), scale[c], shift[c], true};
  }
  const int64_t chunks = (S + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, s.N * s.Co * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t nc = it / chunks, s0 = (it % chunks) * kRowChunk;
      const int64_t c = nc % s.Co;
      const int L = static_cast<int>(std::min<int64_t>(kRowChunk, S - s0));
      const int64_t off = nc * S + s0;
      const CT* cr = counts + off;
      const float a = alpha[c];
      auto zat = [&](int t, int i) { return static_cast<float>(cr[t * ts + i]) * a; };
      lif_forward_row(static_cast<int>(s.T), L, zat, aff[c], res ? res + off : nullptr, ts, p,
                      spikes + off);
    }
  });
}

}  // namespace

// x_packed: [T*N, H, W, Cw] int32; w_mask, w_pos: [Co, kh, kw, Cw] int32;
// alpha, scale, shift: [Co] float32; residual: [T, N, Co, Ho, Wo] float32 or None
// -> spikes [T, N, Co, Ho, Wo] float32, counts [T, N, Co, Ho, Wo] int16/int32, mean, var [Co]
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_cpu(
    const at::Tensor& x_packed_in, const at::Tensor& w_mask_in, const at::Tensor& w_pos_in,
    const at::Tensor& alpha_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const std::optional<at::Tensor>& residual_in, int64_t T, int64_t stride, int64_t padding,
    bool bn_train, double bn_eps, double tau, bool decay_input, double v_threshold,
    std::optional<double> v_reset) {
  const char* op = "bconv_lif";
  const ConvShape s = check_conv(x_packed_in, w_mask_in, w_pos_in, T, stride, padding, op);
  const at::Tensor alpha = channel_vec(alpha_in, op, "alpha", s.Co);
  const at::Tensor scale = channel_vec(scale_in, op, "scale", s.Co);
  const at::Tensor shift = channel_vec(shift_in, op, "shift", s.Co);
  const std::vector<int64_t> oshape{s.T, s.N, s.Co, s.Ho, s.Wo};
  const auto res = check_out_like(residual_in, oshape, op, "residual");
  const NeuronParams p = neuron(tau, decay_input, v_threshold, v_reset, false, 0, 2.0, op);

  const at::Tensor w_mask = w_mask_in.contiguous(), w_pos = w_pos_in.contiguous();
  const at::Tensor xpad =
      padding > 0 ? at::constant_pad_nd(x_packed_in, {0, 0, padding, padding, padding, padding}, 0)
                        .contiguous()
                  : x_packed_in.contiguous();
  const PackedW pw = repack(s, reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>()),
                            reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>()));
  std::vector<uint32_t> pos_masked(w_pos.numel());
  {
    const uint32_t* m = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
    const uint32_t* q = reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>());
    for (size_t i = 0; i < pos_masked.size(); ++i) pos_masked[i] = m[i] & q[i];
  }

  const auto opts = x_packed_in.options();
  at::Tensor spikes = at::empty(oshape, opts.dtype(at::kFloat));
  at::Tensor counts = at::empty(oshape, opts.dtype(counts_dtype(s)));
  at::Tensor mean = at::zeros({s.Co}, opts.dtype(at::kFloat));
  at::Tensor var = at::zeros({s.Co}, opts.dtype(at::kFloat));
  const float* rp = res ? res->data_ptr<float>() : nullptr;
  if (counts.scalar_type() == at::kShort) {
    forward_impl<int16_t>(s, xpad, pw, pos_masked.data(), alpha.data_ptr<float>(),
                          scale.data_ptr<float>(), shift.data_ptr<float>(), rp, bn_train, bn_eps,
                          p, counts.data_ptr<int16_t>(), spikes.data_ptr<float>(),
                          mean.data_ptr<float>(), var.data_ptr<float>());
  } else {
    forward_impl<int32_t>(s, xpad, pw, pos_masked.data(), alpha.data_ptr<float>(),
                          scale.data_ptr<float>(), shift.data_ptr<float>(), rp, bn_train, bn_eps,
                          p, counts.data_ptr<int32_t>(), spikes.data_ptr<float>(),
                          mean.data_ptr<float>(), var.data_ptr<float>());
  }
  return {spikes, counts, mean, var};
}

namespace {

// dL/dX (grad_current) and dL/dZ from the counts; returns per-channel sums through gsc/gsh.
template <typename CT>
void lif_bn_backward(const ConvShape& s, const CT* counts, const float* gs, const float* alpha,
                     const std::vector<ChannelAffine>& aff, const float* res,
                     const NeuronParams& p, float* gcur, float* gz, float* gsc, float* gsh) {
  const int64_t S = s.Ho * s.Wo;
  const int64_t ts = s.N * s.Co * S;
  const double m = static_cast<double>(s.T * s.N * S);
  at::parallel_for(0, s.Co, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> hbuf(static_cast<size_t>(s.T) * kRowChunk);
    std::vector<double> acc_g(kRowChunk), acc_gx(kRowChunk);
    for (int64_t c = c0; c < c1; ++c) {
      const float a = alpha[c];
      std::fill(acc_g.begin(), acc_g.end(), 0.0);
      std::fill(acc_gx.begin(), acc_gx.end(), 0.0);
      for (int64_t n = 0; n < s.N; ++n)
        for (int64_t s0 = 0; s0 < S; s0 += kRowChunk) {
          const int L = static_cast<int>(std::min<int64_t>(kRowChunk, S - s0));
          const int64_t off = (n * s.Co + c) * S + s0;
          const CT* cr = counts + off;
          auto zat = [&](int t, int i) { return static_cast<float>(cr[t * ts + i]) * a; };
          lif_backward_row(static_cast<int>(s.T), L, zat, aff[c], res ? res + off : nullptr, ts,
                           p, gs + off, gcur + off, hbuf.data(), acc_g.data(), acc_gx.data());
        }
      double sg = 0.0, sgx = 0.0;
      for (int i = 0; i < kRowChunk; ++i) {
        sg += acc_g[i];
        sgx += acc_gx[i];
      }
      gsh[c] = static_cast<float>(sg);
      gsc[c] = static_cast<float>(sgx);
      const ZGrad zg = make_zgrad(aff[c], sg, sgx, m);
      for (int64_t tn = 0; tn < s.T * s.N; ++tn) {
        const int64_t off = (tn * s.Co + c) * S;
        for (int64_t i = 0; i < S; ++i)
          gz[off + i] = zg(gcur[off + i], static_cast<float>(counts[off + i]) * a);
      }
    }
  });
}

// dL/dW_eff[co][ci][ky][kx] = sum over output positions of dZ * x (x binary: no multiplies).
// Per image: list the positions where each input channel spiked, then for each (channel, tap)
// sum the dZ channel vectors of the output pixels those spikes feed, in registers, and add the
// sum into the thread's gradient row once. The image's dZ (channel-last) stays in L2.
at::Tensor weight_grad(const ConvShape& s, int64_t Ci, const at::Tensor& x_packed,
                       const at::Tensor& gz_cl /* [B, Ho, Wo, Co] */) {
  const int64_t nthreads = at::get_num_threads();
  const int64_t per = Ci * s.KH * s.KW * s.Co;
  std::vector<float> partial(static_cast<size_t>(nthreads) * per, 0.0f);
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  const float* dz = gz_cl.data_ptr<float>();
  const Isa isa = active_isa();
  auto gsum = isa == Isa::kAvx512 ? &gather_sum_avx512
              : isa == Isa::kAvx2 ? &gather_sum_avx2
                                  : &gather_sum_base;
  const int co = static_cast<int>(s.Co);
  const int64_t HW = s.H * s.W;
  at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
    float* G = partial.data() + at::get_thread_num() * per;
    std::vector<int32_t> start(Ci + 1), fill(Ci), py, px, offs(HW);
    for (int64_t b = b0; b < b1; ++b) {
      const uint32_t* xb = xp + b * HW * s.Cw;
      std::fill(start.begin(), start.end(), 0);
      for (int64_t q = 0; q < HW * s.Cw; ++q) {
        uint32_t bits = xb[q];
        const int64_t w = q % s.Cw;
        while (bits) {
          const int64_t ci = w * 32 + __builtin_ctz(bits);
          bits &= bits - 1;
          if (ci >= Ci) break;
          ++start[ci + 1];
        }
      }
      for (int64_t c = 0; c < Ci; ++c) start[c + 1] += start[c];
      py.resize(start[Ci]);
      px.resize(start[Ci]);
      for (int64_t c = 0; c < Ci; ++c) fill[c] = start[c];
      for (int64_t q = 0; q < HW * s.Cw; ++q) {
        uint32_t bits = xb[q];
        const int64_t pos = q / s.Cw, w = q % s.Cw;
        while (bits) {
          const int64_t ci = w * 32 + __builtin_ctz(bits);
          bits &= bits - 1;
          if (ci >= Ci) break;
          py[fill[ci]] = static_cast<int32_t>(pos / s.W);
          px[fill[ci]++] = static_cast<int32_t>(pos % s.W);
        }
      }
      const float* gzb = dz + b * s.Ho * s.Wo * s.Co;
      for (int64_t ci = 0; ci < Ci; ++ci) {
        const int32_t e0 = start[ci], e1 = start[ci + 1];
        if (e0 == e1) continue;
        for (int64_t ky = 0; ky < s.KH; ++ky)
          for (int64_t kx = 0; kx < s.KW; ++kx) {
            int m = 0;
            const int dy = static_cast<int>(s.padding - ky), dx = static_cast<int>(s.padding - kx);
            const int ho = static_cast<int>(s.Ho), wo = static_cast<int>(s.Wo);
            if (s.stride == 1) {
              for (int32_t e = e0; e < e1; ++e) {
                const int oy = py[e] + dy, ox = px[e] + dx;
                if (static_cast<unsigned>(oy) >= static_cast<unsigned>(ho) ||
                    static_cast<unsigned>(ox) >= static_cast<unsigned>(wo))
                  continue;
                offs[m++] = (oy * wo + ox) * co;
              }
            } else {
              const int st = static_cast<int>(s.stride);
              for (int32_t e = e0; e < e1; ++e) {
                const int oyn = py[e] + dy, oxn = px[e] + dx;
                if (oyn < 0 || oxn < 0 || oyn % st != 0 || oxn % st != 0) continue;
                const int oy = oyn / st, ox = oxn / st;
                if (oy >= ho || ox >= wo) continue;
                offs[m++] = (oy * wo + ox) * co;
              }
            }
            if (m > 0) gsum(gzb, offs.data(), m, G + ((ci * s.KH + ky) * s.KW + kx) * s.Co, co);
          }
      }
    }
  });
  at::Tensor g = at::empty({Ci, s.KH, s.KW, s.Co}, gz_cl.options());
  float* gp = g.data_ptr<float>();
  at::parallel_for(0, per, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float acc = partial[i];
      for (int64_t th = 1; th < nthreads; ++th) acc += partial[th * per + i];
      gp[i] = acc;
    }
  });
  return g.permute({3, 0, 1, 2}).contiguous();  // [Co, Ci, kh, kw]
}

// W_eff = alpha[co] * (+1 | -1) * mask as a dense [Co, Ci, kh, kw] float tensor.
at::Tensor dense_weight(const ConvShape& s, int64_t Ci, const at::Tensor& w_mask,
                        const at::Tensor& w_pos, const float* alpha) {
  at::Tensor w = at::empty({s.Co, Ci, s.KH, s.KW}, w_mask.options().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  const uint32_t* m = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
  const uint32_t* q = reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>());
  for (int64_t o = 0; o < s.Co; ++o)
    for (int64_t c = 0; c < Ci; ++c)
      for (int64_t k = 0; k < s.KH * s.KW; ++k) {
        const int64_t idx = (o * s.KH * s.KW + k) * s.Cw + (c >> 5);
        const uint32_t bit = bit_of(static_cast<int>(c));
        const float v = (m[idx] & bit) ? ((q[idx] & bit) ? alpha[o] : -alpha[o]) : 0.0f;
        wp[(o * Ci + c) * s.KH * s.KW + k] = v;
      }
  return w;
}

}  // namespace

// grad_spikes: [T, N, Co, Ho, Wo] float32; counts: [T, N, Co, Ho, Wo] int16/int32 (from
// bconv_lif); x_packed: [T*N, H, W, Cw] int32; w_mask, w_pos: [Co, kh, kw, Cw] int32;
// alpha, scale, shift, mean, var: [Co] float32; residual: [T, N, Co, Ho, Wo] float32 or None
// -> grad_x [T, N, Ci, H, W] (or [0]), grad_weight [Co, Ci, kh, kw], grad_current like counts,
//    grad_scale [Co], grad_shift [Co]
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& counts_in, const at::Tensor& x_packed_in,
    const at::Tensor& w_mask_in, const at::Tensor& w_pos_in, const at::Tensor& alpha_in,
    const at::Tensor& scale_in, const at::Tensor& shift_in, const at::Tensor& mean_in,
    const at::Tensor& var_in, const std::optional<at::Tensor>& residual_in, int64_t in_channels,
    int64_t stride, int64_t padding, bool bn_train, double bn_eps, double tau, bool decay_input,
    double v_threshold, std::optional<double> v_reset, bool detach_reset, int64_t surrogate,
    double surrogate_alpha, bool need_grad_x) {
  const char* op = "bconv_lif_bwd";
  TORCH_CHECK(counts_in.dim() == 5, "binslt::", op,
              ": counts must be [T, N, Co, Ho, Wo] (from bconv_lif), got shape ",
              shape_str(counts_in));
  const ConvShape s =
      check_conv(x_packed_in, w_mask_in, w_pos_in, counts_in.size(0), stride, padding, op);
  const std::vector<int64_t> oshape{s.T, s.N, s.Co, s.Ho, s.Wo};
  TORCH_CHECK(counts_in.sizes() == at::IntArrayRef(oshape), "binslt::", op, ": counts must have "
              "shape ", at::IntArrayRef(oshape), " for this input/weight/stride/padding, got ",
              shape_str(counts_in));
  TORCH_CHECK(counts_in.scalar_type() == counts_dtype(s), "binslt::", op, ": counts must be ",
              counts_dtype(s), " for this weight (as returned by bconv_lif), got ",
              counts_in.scalar_type());
  TORCH_CHECK(in_channels >= 1 && in_channels <= 32 * s.Cw, "binslt::", op,
              ": in_channels must be in [1, 32*Cw] = [1, ", 32 * s.Cw, "], got ", in_channels);
  const auto gs_opt = check_out_like(grad_in, oshape, op, "grad_spikes");
  const at::Tensor gs = *gs_opt;
  const at::Tensor alpha = channel_vec(alpha_in, op, "alpha", s.Co);
  const at::Tensor scale = channel_vec(scale_in, op, "scale", s.Co);
  const at::Tensor shift = channel_vec(shift_in, op, "shift", s.Co);
  const at::Tensor mean = channel_vec(mean_in, op, "mean", s.Co);
  const at::Tensor var = channel_vec(var_in, op, "var", s.Co);
  const auto res = check_out_like(residual_in, oshape, op, "residual");
  const NeuronParams p = neuron(tau, decay_input, v_threshold, v_reset, detach_reset, surrogate,
                                surrogate_alpha, op);
  const at::Tensor counts = counts_in.contiguous();
  const at::Tensor x_packed = x_packed_in.contiguous();
  const at::Tensor w_mask = w_mask_in.contiguous(), w_pos = w_pos_in.contiguous();

  std::vector<ChannelAffine> aff(s.Co);
  const float* ap = alpha.data_ptr<float>();
  for (int64_t c = 0; c < s.Co; ++c) {
    const float sc = scale.data_ptr<float>()[c], sh = shift.data_ptr<float>()[c];
    aff[c] = bn_train ? ChannelAffine{mean.data_ptr<float>()[c],
                                      invstd_of(var.data_ptr<float>()[c], bn_eps), sc, sh, true}
                      : ChannelAffine{0.0f, 1.0f, sc, sh, false};
  }
  const auto fopts = counts.options().dtype(at::kFloat);
  at::Tensor gcur = at::empty(oshape, fopts);
  at::Tensor gz = at::empty({s.B, s.Co, s.Ho, s.Wo}, fopts);
  at::Tensor gscale = at::empty({s.Co}, fopts), gshift = at::empty({s.Co}, fopts);
  const float* rp = res ? res->data_ptr<float>() : nullptr;
  if (counts.scalar_type() == at::kShort)
    lif_bn_backward<int16_t>(s, counts.data_ptr<int16_t>(), gs.data_ptr<float>(), ap, aff, rp, p,
                             gcur.data_ptr<float>(), gz.data_ptr<float>(),
                             gscale.data_ptr<float>(), gshift.data_ptr<float>());
  else
    lif_bn_backward<int32_t>(s, counts.data_ptr<int32_t>(), gs.data_ptr<float>(), ap, aff, rp, p,
                             gcur.data_ptr<float>(), gz.data_ptr<float>(),
                             gscale.data_ptr<float>(), gshift.data_ptr<float>());

  const at::Tensor gz_cl = gz.permute({0, 2, 3, 1}).contiguous();  // [B, Ho, Wo, Co]
  at::Tensor gw = weight_grad(s, in_channels, x_packed, gz_cl);

  at::Tensor gx;
  if (need_grad_x) {
    const at::Tensor w_eff = dense_weight(s, in_channels, w_mask, w_pos, ap);
    const int64_t oph = s.H - ((s.Ho - 1) * stride - 2 * padding + s.KH);
    const int64_t opw = s.W - ((s.Wo - 1) * stride - 2 * padding + s.KW);
    // oneDNN's channels-last path measured faster here; gz_cl is already that layout.
    gx = at::conv_transpose2d(gz_cl.permute({0, 3, 1, 2}),
                              w_eff.contiguous(at::MemoryFormat::ChannelsLast), {},
                              {stride, stride}, {padding, padding}, {oph, opw});
    gx = gx.contiguous().view({s.T, s.N, in_channels, s.H, s.W});
  } else {
    gx = at::empty({0}, fopts);
  }
  return {gx, gw, gcur, gscale, gshift};
}

}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("bconv_lif", &binslt::cpu::bconv_lif_cpu);
  m.impl("bconv_lif_bwd", &binslt::cpu::bconv_lif_bwd_cpu);
}
