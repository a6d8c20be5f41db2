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

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "binslt/bconv_event.h"
#include "binslt/bconv_popcount.h"
#include "binslt/cpu_checks.h"
#include "binslt/epilogue_cpu.h"
#include "binslt/lif.h"
#include "binslt/pack_cpu.h"
#include "binslt/transpose_cpu.h"

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
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vpopcntdq");
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

// Forward algorithm: bit-parallel AND+popcount over every input word ("dense"), or the sum of the
// weight columns of the input spikes ("event"); "auto" picks by the fraction of set input bits.
enum class Algo : int { kAuto = -1, kDense = 0, kEvent = 1 };
static std::atomic<int> g_algo_override{static_cast<int>(Algo::kAuto)};

// Below this fraction of set bits in the packed input the event kernel is the faster one.
// Measured with benchmarks/cpu_algos.py (anchor layer T=4 N=16 128->128 16x16, prune rate 0.5,
// 2 threads, AMD EPYC Zen 4, op only, training BN), dense vs event forward in ms, event kernel
// with one loop per kernel row (session 3):
//   avx512: 3.32/2.00 at 5 %, 3.51/2.76 at 15 %, 3.31/3.06 at 22 %, 3.35/3.66 at 30 %,
//           3.29/5.08 at 50 %;
//   avx2  : 8.02/2.21 at 5 %, 7.73/3.75 at 22 %, 7.95/6.38 at 50 %, 7.60/7.60 at 60 %,
//           8.58/10.35 at 70 %;
//   popcnt: 27.5/14.1 at 60 %, 28.3/16.7 at 70 % (scalar: no faster dense kernel either).
// so the crossover is ~26 % on AVX-512, ~60 % on AVX2 and above 70 % without vector units.
static double event_max_rate(Isa isa) {
  return isa == Isa::kAvx512 ? 0.26 : isa == Isa::kAvx2 ? 0.6 : 0.75;
}

void set_cpu_conv_algo(const std::string& name) {
  Algo want;
  if (name == "auto") want = Algo::kAuto;
  else if (name == "dense") want = Algo::kDense;
  else if (name == "event") want = Algo::kEvent;
  else
    TORCH_CHECK(false, "binslt: unknown CPU conv algorithm '", name,
                "'; expected one of auto, dense, event");
  g_algo_override.store(static_cast<int>(want));
}

std::string cpu_conv_algo() {
  switch (static_cast<Algo>(g_algo_override.load())) {
    case Algo::kDense: return "dense";
    case Algo::kEvent: return "event";
    default: return "auto";
  }
}

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
  // Explicit: the generic body's 64-float accumulator array is not kept in ymm registers.
  int c = 0;
  for (; c + 64 <= n; c += 64) {
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
    for (int e = 0; e < m; ++e) {
      const float* src = gzb + offs[e] + c;
      for (int j = 0; j < 8; ++j) a[j] = _mm256_add_ps(a[j], _mm256_loadu_ps(src + 8 * j));
    }
    for (int j = 0; j < 8; ++j)
      _mm256_storeu_ps(g + c + 8 * j, _mm256_add_ps(_mm256_loadu_ps(g + c + 8 * j), a[j]));
  }
  for (; c + 8 <= n; c += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int e = 0; e < m; ++e) a = _mm256_add_ps(a, _mm256_loadu_ps(gzb + offs[e] + c));
    _mm256_storeu_ps(g + c, _mm256_add_ps(_mm256_loadu_ps(g + c), a));
  }
  for (; c < n; ++c) {
    float a = 0.0f;
    for (int e = 0; e < m; ++e) a += gzb[offs[e] + c];
    g[c] += a;
  }
}
__attribute__((target("avx512f"))) static void gather_sum_avx512(const float* gzb,
                                                                 const int32_t* offs, int m,
                                                                 float* g, int n) {
  int c = 0;
  for (; c + 128 <= n; c += 128) {  // 128 channels per pass over the offsets: 8 accumulators
    __m512 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm512_setzero_ps();
    for (int e = 0; e < m; ++e) {
      const float* src = gzb + offs[e] + c;
      for (int j = 0; j < 8; ++j) a[j] = _mm512_add_ps(a[j], _mm512_loadu_ps(src + 16 * j));
    }
    for (int j = 0; j < 8; ++j)
      _mm512_storeu_ps(g + c + 16 * j, _mm512_add_ps(_mm512_loadu_ps(g + c + 16 * j), a[j]));
  }
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
using EventFn = void (*)(const EventGeom&, int16_t*);

EventFn event_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return &row_counts_event_avx512;
    case Isa::kAvx2: return &row_counts_event_avx2;
    default: return &row_counts_event_base;
  }
}

// Fraction of set bits among the packed input words (runs before every forward: hardware
// popcount where the CPU has it, in parallel; the scalar loop measured 0.13 ms on the anchor).
static inline __attribute__((always_inline)) int64_t count_bits_body(const uint64_t* p,
                                                                     int64_t n) {
  int64_t bits = 0;
  for (int64_t i = 0; i < n; ++i) bits += __builtin_popcountll(p[i]);
  return bits;
}
__attribute__((target("popcnt"))) static int64_t count_bits_popcnt(const uint64_t* p,
                                                                   int64_t n) {
  return count_bits_body(p, n);
}
static int64_t count_bits_base(const uint64_t* p, int64_t n) { return count_bits_body(p, n); }

// Set bits among n packed words (input spikes, weight mask planes).
int64_t count_set_bits(const uint32_t* p, int64_t n) {
  auto fn = isa_supported(Isa::kPopcnt) ? &count_bits_popcnt : &count_bits_base;
  const int64_t n64 = n / 2;
  int64_t bits = at::parallel_reduce(
      0, n64, 16384, int64_t{0},
      [&](int64_t i0, int64_t i1, int64_t acc) {
        uint64_t buf[64];
        for (int64_t i = i0; i < i1; i += 64) {  // memcpy: the words are only 4-byte aligned
          const int64_t m = std::min<int64_t>(64, i1 - i);
          std::memcpy(buf, p + 2 * i, static_cast<size_t>(m) * 8);
          acc += fn(buf, m);
        }
        return acc;
      },
      std::plus<int64_t>());
  if (n % 2) bits += __builtin_popcount(p[n - 1]);
  return bits;
}

double packed_rate(const at::Tensor& x_packed) {
  const uint32_t* p = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  const int64_t n = x_packed.numel();
  if (n == 0) return 0.0;
  return static_cast<double>(count_set_bits(p, n)) / (32.0 * static_cast<double>(n));
}

bool use_event_rate(double rate) {
  const Algo a = static_cast<Algo>(g_algo_override.load());
  if (a != Algo::kAuto) return a == Algo::kEvent;
  return rate < event_max_rate(active_isa());
}
bool use_event(const at::Tensor& x_packed) {
  const Algo a = static_cast<Algo>(g_algo_override.load());
  if (a != Algo::kAuto) return a == Algo::kEvent;
  return use_event_rate(packed_rate(x_packed));
}

// The fraction of nonzero values of float spikes, from 64 evenly spaced runs of 256 values
// (the algorithm choice only needs an estimate; a full pass would read the whole input twice).
double sampled_rate(const float* x, int64_t n) {
  if (n <= 0) return 0.0;
  constexpr int64_t kRuns = 64, kRun = 256;
  if (n <= kRuns * kRun) {
    int64_t nz = 0;
    for (int64_t i = 0; i < n; ++i) nz += x[i] != 0.0f;
    return static_cast<double>(nz) / static_cast<double>(n);
  }
  int64_t nz = 0;
  for (int64_t r = 0; r < kRuns; ++r) {
    const float* p = x + (n - kRun) * r / (kRuns - 1);
    for (int64_t i = 0; i < kRun; ++i) nz += p[i] != 0.0f;
  }
  return static_cast<double>(nz) / static_cast<double>(kRuns * kRun);
}


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

// The checks of the conv geometry for an input of B = T*N images H x W with Cw words per pixel
// (what x_packed has, or what the float input packs to).
ConvShape check_conv_dims(int64_t B, int64_t H, int64_t W, int64_t Cw, const char* xname,
                          const at::Tensor& w_mask, const at::Tensor& w_pos, int64_t T,
                          int64_t stride, int64_t padding, const char* op) {
  check_tensor(w_mask, op, "w_mask", 4, at::kInt, "[Co, kh, kw, Cw] int32 from pack_weight");
  check_tensor(w_pos, op, "w_pos", 4, at::kInt, "[Co, kh, kw, Cw] int32 from pack_weight");
  TORCH_CHECK(w_mask.sizes() == w_pos.sizes(), "binslt::", op,
              ": w_mask and w_pos must have the same shape, got ", shape_str(w_mask), " and ",
              shape_str(w_pos));
  ConvShape s;
  s.B = B;
  s.H = H;
  s.W = W;
  s.Cw = Cw;
  s.Co = w_mask.size(0);
  s.KH = w_mask.size(1);
  s.KW = w_mask.size(2);
  TORCH_CHECK(s.Co >= 1 && s.KH >= 1 && s.KW >= 1, "binslt::", op,
              ": the weight must have at least one output channel and a kernel of at least "
              "1x1, got w_mask of shape ", shape_str(w_mask));
  TORCH_CHECK(w_mask.size(3) == s.Cw, "binslt::", op, ": the weight has ", w_mask.size(3),
              " words per position but ", xname, " has ", s.Cw,
              " (pack both with the same in_channels)");
  TORCH_CHECK(stride >= 1, "binslt::", op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, "binslt::", op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(T >= 1 && s.B % T == 0, "binslt::", op, ": ", xname, "'s first dim (", s.B,
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

ConvShape check_conv(const at::Tensor& x_packed, const at::Tensor& w_mask,
                     const at::Tensor& w_pos, int64_t T, int64_t stride, int64_t padding,
                     const char* op) {
  check_tensor(x_packed, op, "x_packed", 4, at::kInt, "[T*N, H, W, Cw] int32 from pack_spikes");
  return check_conv_dims(x_packed.size(0), x_packed.size(1), x_packed.size(2), x_packed.size(3),
                         "x_packed", w_mask, w_pos, T, stride, padding, op);
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
  int64_t CoP = 16;
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

// The ternary weight sign(w)*M as int8 [KH][32*Cw][KW][CoB] (output channels innermost, zero
// padding), the table of the event kernel (see bconv_event.h for why kx sits inside ci).
// One table row: dst[o] = sign * mask bit j of output channel o (mrow/prow: [Co] words).
static inline __attribute__((always_inline)) void table_row_body(const uint32_t* mrow,
                                                                 const uint32_t* prow, int j,
                                                                 int64_t Co, int64_t CoB,
                                                                 int8_t* dst) {
  for (int64_t o = 0; o < Co; ++o) {
    const int m = static_cast<int>((mrow[o] >> j) & 1u);
    const int sg = static_cast<int>((prow[o] >> j) & 1u);
    dst[o] = static_cast<int8_t>(m * (2 * sg - 1));
  }
  for (int64_t o = Co; o < CoB; ++o) dst[o] = 0;
}
static void table_row_base(const uint32_t* mrow, const uint32_t* prow, int j, int64_t Co,
                           int64_t CoB, int8_t* dst) {
  table_row_body(mrow, prow, j, Co, CoB, dst);
}
__attribute__((target("avx2"))) static void table_row_avx2(const uint32_t* mrow,
                                                           const uint32_t* prow, int j,
                                                           int64_t Co, int64_t CoB, int8_t* dst) {
  table_row_body(mrow, prow, j, Co, CoB, dst);
}
__attribute__((target("avx512f,avx512bw"))) static void table_row_avx512(
    const uint32_t* mrow, const uint32_t* prow, int j, int64_t Co, int64_t CoB, int8_t* dst) {
  table_row_body(mrow, prow, j, Co, CoB, dst);
}

at::Tensor event_table(const ConvShape& s, const uint32_t* mask, const uint32_t* pos,
                       int64_t CoB) {
  const Isa isa = active_isa();
  auto row = isa == Isa::kAvx512 ? &table_row_avx512
             : isa == Isa::kAvx2 ? &table_row_avx2
                                 : &table_row_base;
  const int64_t Ci = 32 * s.Cw, K = s.KH * s.KW;
  // The planes as [K][Cw][Co], so that a table row reads its Co words contiguously.
  std::vector<uint32_t> mt(K * s.Cw * s.Co), pt(K * s.Cw * s.Co);
  for (int64_t o = 0; o < s.Co; ++o)
    for (int64_t kq = 0; kq < K * s.Cw; ++kq) {
      mt[kq * s.Co + o] = mask[o * K * s.Cw + kq];
      pt[kq * s.Co + o] = pos[o * K * s.Cw + kq];
    }
  at::Tensor wt = at::empty({K * Ci * CoB}, at::TensorOptions().dtype(at::kChar));
  int8_t* w = wt.data_ptr<int8_t>();
  // Every byte written once, branch-free (this runs on every forward): row (ky, ci, kx).
  at::parallel_for(0, s.KH * Ci * s.KW, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ky = r / (Ci * s.KW), ci = (r / s.KW) % Ci, kx = r % s.KW;
      const int64_t kq = (ky * s.KW + kx) * s.Cw + (ci >> 5);
      const int j = static_cast<int>(ci & 31);
      row(mt.data() + kq * s.Co, pt.data() + kq * s.Co, j, s.Co, CoB, w + r * CoB);
    }
  });
  return wt;
}

template <typename ST>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void transpose_store_avx512(
    const ST* tile, int64_t stride, int64_t Wo, int64_t Co, int16_t* dst, int64_t S) {
  transpose_store_body(tile, stride, Wo, Co, dst, S);
}
template <typename ST>
__attribute__((target("avx2"))) void transpose_store_avx2(const ST* tile, int64_t stride,
                                                          int64_t Wo, int64_t Co, int16_t* dst,
                                                          int64_t S) {
  transpose_store_body(tile, stride, Wo, Co, dst, S);
}

// One output row of counts: tile [Wo][ostride] (channel-last) -> dst [c][ox] (c stride S), and
// with sums != nullptr the exact per-channel sums of the counts and of their squares.
template <typename ST, typename CT>
inline void store_counts(Isa isa, const ST* tile, int64_t ostride, int64_t Wo, int64_t Co,
                         CT* dst, int64_t S, int64_t* sums) {
  if constexpr (std::is_same_v<CT, int16_t>) {
    if (isa == Isa::kAvx512)
      transpose_store_avx512(tile, ostride, Wo, Co, dst, S);
    else if (isa == Isa::kAvx2)
      transpose_store_avx2(tile, ostride, Wo, Co, dst, S);
    else
      transpose_store_body(tile, ostride, Wo, Co, dst, S);
  } else {
    for (int64_t ox = 0; ox < Wo; ++ox)
      for (int64_t c = 0; c < Co; ++c) dst[c * S + ox] = static_cast<CT>(tile[ox * ostride + c]);
  }
  if (sums == nullptr) return;
  for (int64_t ox = 0; ox < Wo; ++ox) {
    const ST* src = tile + ox * ostride;
    for (int64_t c = 0; c < Co; ++c) {
      const int64_t v = src[c];
      sums[2 * c] += v;
      sums[2 * c + 1] += v * v;
    }
  }
}

// lif_forward_row over integer counts (z = count * a), compiled for the wider vector units too.
// The LIF float arithmetic is the same on every path: -ffp-contract=off (setup.py) keeps the
// compiler from fusing it into FMAs, so the spikes do not depend on the CPU.
template <typename CT>
static inline __attribute__((always_inline)) void lif_counts_body(
    int T, int L, const CT* cr, int64_t cts, float a, const ChannelAffine& aff, const float* res,
    int64_t ts, const NeuronParams& p, float* out) {
  auto zat = [cr, a, cts](int t, int i) { return static_cast<float>(cr[t * cts + i]) * a; };
  lif_forward_row(T, L, zat, aff, res, ts, p, out);
}
template <typename CT>
__attribute__((target("avx512f"))) void lif_counts_avx512(int T, int L, const CT* cr,
                                                          int64_t cts, float a,
                                                          const ChannelAffine& aff,
                                                          const float* res, int64_t ts,
                                                          const NeuronParams& p, float* out) {
  lif_counts_body(T, L, cr, cts, a, aff, res, ts, p, out);
}
template <typename CT>
__attribute__((target("avx2"))) void lif_counts_avx2(int T, int L, const CT* cr, int64_t cts,
                                                     float a, const ChannelAffine& aff,
                                                     const float* res, int64_t ts,
                                                     const NeuronParams& p, float* out) {
  lif_counts_body(T, L, cr, cts, a, aff, res, ts, p, out);
}
template <typename CT>
void lif_counts(Isa isa, int T, int L, const CT* cr, int64_t cts, float a,
                const ChannelAffine& aff, const float* res, int64_t ts, const NeuronParams& p,
                float* out) {
  if (isa == Isa::kAvx512)
    lif_counts_avx512(T, L, cr, cts, a, aff, res, ts, p, out);
  else if (isa == Isa::kAvx2)
    lif_counts_avx2(T, L, cr, cts, a, aff, res, ts, p, out);
  else
    lif_counts_body(T, L, cr, cts, a, aff, res, ts, p, out);
}

// The input: packed and padded words (xpad, [T*N, Hp, Wp, Cw]), or float spikes xf
// [T*N, C, H, W] (inference only; xpad undefined), which each tile packs itself, into a
// per-thread padded image, for the input rows it reads (non-binary values set *bad).
struct FloatInput {
  bool on = false;  // x may be null for an empty input
  const float* x = nullptr;
  int64_t C = 0;
  std::atomic<bool>* bad = nullptr;
};

// infer (eval epilogue only, counts unused): each tile's counts live in a per-thread buffer
// [T][Co][R*Wo] and never reach memory (no 2-byte-per-neuron write and read back).
template <typename CT>
void forward_impl(const ConvShape& s, const at::Tensor& xpad, const FloatInput& xf,
                  const PackedW& pw, const uint32_t* pos_orig, const int8_t* wt, int64_t CoB,
                  const float* alpha, const float* scale, const float* shift, const float* res,
                  bool bn_train, double bn_eps, const NeuronParams& p, bool infer, CT* counts,
                  float* spikes, float* mean_out, float* var_out) {
  const int64_t Hp = s.H + 2 * s.padding, Wp = s.W + 2 * s.padding;
  const uint32_t* xp =
      xf.on ? nullptr : reinterpret_cast<const uint32_t*>(xpad.data_ptr<int32_t>());
  const int64_t S = s.Ho * s.Wo;
  const int64_t ts = s.N * s.Co * S;  // elements between timesteps
  const Isa isa = active_isa();
  const RowFn fn = row_fn(isa);
  const bool event = wt != nullptr;
  const EventFn efn = event_fn(isa);
  const int64_t ostride = event ? CoB : pw.CoP;  // row stride of the count tile

  // Tile: image n, R output rows, all T and all channels.
  const int64_t nthreads = at::get_num_threads();
  int64_t R = std::max<int64_t>(1, std::min<int64_t>(s.Ho, kRowChunk / s.Wo));
  while (R > 1 && s.N * ((s.Ho + R - 1) / R) < 4 * nthreads) R = (R + 1) / 2;
  const int64_t row_blocks = (s.Ho + R - 1) / R;

  std::vector<int64_t> sums(bn_train ? nthreads * s.Co * 2 : 0, 0);
  std::vector<ChannelAffine> aff(s.Co);
  for (int64_t c = 0; c < s.Co; ++c) aff[c] = ChannelAffine{0.0f, 1.0f, scale[c], shift[c], false};

  TORCH_INTERNAL_ASSERT(!(infer && bn_train), "bconv_lif: inference needs the eval epilogue");
  const int64_t Lmax = R * s.Wo;  // neurons per channel in a tile
  TORCH_INTERNAL_ASSERT(!(xf.on && !infer), "bconv_lif: float input is for inference only");
  const PackWordFn pack_fn = pack_word_fn();
  const int64_t plane = s.H * s.W;
  at::parallel_for(0, s.N * row_blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<CT> loc(infer ? s.T * s.Co * Lmax : 0);
    // Float input: this thread's padded packed image (margins stay zero; each tile writes the
    // interior rows it reads) and the packed rows before padding.
    std::vector<uint32_t> pimg(xf.on ? Hp * Wp * s.Cw : 0, 0u);
    std::vector<uint32_t> prow(xf.on ? std::min(s.H, (R - 1) * s.stride + s.KH) * s.W * s.Cw
                                    : 0);
    bool bad = false;
    std::vector<int32_t> tmp(event ? 0 : s.Wo * ostride);
    std::vector<int16_t> tmp16(event ? s.Wo * ostride : 0);
    EventList ev;
    std::vector<int8_t> acc8(event ? s.Wo * 256 : 0);
    std::vector<int> pending(event ? s.Wo : 0);
    EventGeom eg;
    eg.acc8 = acc8.data();
    eg.pending = pending.data();
    eg.wt = wt;
    eg.Wp = static_cast<int>(Wp);
    eg.Wo = static_cast<int>(s.Wo);
    eg.stride = static_cast<int>(s.stride);
    eg.KH = static_cast<int>(s.KH);
    eg.KW = static_cast<int>(s.KW);
    eg.Ci = static_cast<int>(32 * s.Cw);
    eg.CoB = static_cast<int>(CoB);
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
        const int64_t r0 = oy0 * s.stride;  // padded input rows [r0, r1) feed this tile
        const int64_t r1 = (oy1 - 1) * s.stride + s.KH;
        if (xf.on) {
          // image rows [h0, h1) of every channel: one strided pack per word, then row copies
          // into the margined image
          const int64_t h0 = std::max<int64_t>(0, r0 - s.padding);
          const int64_t h1 = std::min<int64_t>(s.H, r1 - s.padding);
          if (h1 > h0) {
            const float* xb = xf.x + (b * xf.C) * plane + h0 * s.W;
            for (int64_t wd = 0; wd < s.Cw; ++wd)
              bad |= pack_fn(xb + 32 * wd * plane, std::min<int64_t>(32, xf.C - 32 * wd), plane,
                             (h1 - h0) * s.W, s.Cw, prow.data() + wd);
            for (int64_t h = h0; h < h1; ++h)
              std::memcpy(pimg.data() + ((h + s.padding) * Wp + s.padding) * s.Cw,
                          prow.data() + (h - h0) * s.W * s.Cw, s.W * s.Cw * sizeof(uint32_t));
          }
          g.img = pimg.data();
        } else {
          g.img = xp + b * Hp * Wp * s.Cw;
        }
        if (event) {
          ev.build(g.img + r0 * Wp * s.Cw, static_cast<int>(r1 - r0), static_cast<int>(Wp),
                   static_cast<int>(s.Cw), static_cast<int>(s.KW * CoB), static_cast<int>(CoB),
                   isa == Isa::kAvx512);
          eg.start = ev.start.data();
          eg.off = ev.off.data();
        }
        for (int64_t oy = oy0; oy < oy1; ++oy) {
          if (event) {
            eg.iy0 = static_cast<int>(oy * s.stride - r0);
            efn(eg, tmp16.data());
          } else {
            g.iy0 = static_cast<int>(oy * s.stride);
            fn(g, tmp.data());
          }
          CT* crow = infer ? loc.data() + t * s.Co * Lmax + (oy - oy0) * s.Wo
                           : counts + (b * s.Co) * S + oy * s.Wo;
          const int64_t cs = infer ? Lmax : S;
          if (event)
            store_counts(isa, tmp16.data(), ostride, s.Wo, s.Co, crow, cs, my_sums);
          else
            store_counts(isa, tmp.data(), ostride, s.Wo, s.Co, crow, cs, my_sums);
        }
      }
      if (bn_train) continue;
      // Epilogue + LIF over T for this tile, while its counts are in cache.
      const int L = static_cast<int>((oy1 - oy0) * s.Wo);
      for (int64_t c = 0; c < s.Co; ++c) {
        const int64_t off = (n * s.Co + c) * S + oy0 * s.Wo;
        const CT* cr = infer ? loc.data() + c * Lmax : counts + off;
        lif_counts(isa, static_cast<int>(s.T), L, cr, infer ? s.Co * Lmax : ts, alpha[c],
                   aff[c], res ? res + off : nullptr, ts, p, spikes + off);
      }
    }
    if (bad) xf.bad->store(true, std::memory_order_relaxed);
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
      lif_counts(isa, static_cast<int>(s.T), L, counts + off, ts, alpha[c], aff[c],
                 res ? res + off : nullptr, ts, p, spikes + off);
    }
  });
}

}  // namespace

// The body of both ops. x: x_packed [T*N, H, W, Cw] int32, or with xf.on the float spikes
// (inference only); s was checked by the caller. w_mask, w_pos: [Co, kh, kw, Cw] int32;
// alpha, scale, shift: [Co] float32; residual: [T, N, Co, Ho, Wo] float32 or None
// -> spikes [T, N, Co, Ho, Wo] float32, counts [T, N, Co, Ho, Wo] int16/int32 (undefined when
// infer), mean, var [Co]
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_run(
    const char* op, const ConvShape& s, const at::Tensor& x, const FloatInput& xf,
    const at::Tensor& w_mask_in, const at::Tensor& w_pos_in, const at::Tensor& alpha_in,
    const at::Tensor& scale_in, const at::Tensor& shift_in,
    const std::optional<at::Tensor>& residual_in, bool bn_train, double bn_eps, double tau,
    bool decay_input, double v_threshold, std::optional<double> v_reset, bool infer) {
  const at::Tensor alpha = channel_vec(alpha_in, op, "alpha", s.Co);
  const at::Tensor scale = channel_vec(scale_in, op, "scale", s.Co);
  const at::Tensor shift = channel_vec(shift_in, op, "shift", s.Co);
  const std::vector<int64_t> oshape{s.T, s.N, s.Co, s.Ho, s.Wo};
  const auto res = check_out_like(residual_in, oshape, op, "residual");
  const NeuronParams p = neuron(tau, decay_input, v_threshold, v_reset, false, 0, 2.0, op);

  const at::Tensor w_mask = w_mask_in.contiguous(), w_pos = w_pos_in.contiguous();
  const int64_t padding = s.padding;
  at::Tensor xpad;
  if (!xf.on)
    xpad = padding > 0
               ? at::constant_pad_nd(x, {0, 0, padding, padding, padding, padding}, 0).contiguous()
               : x.contiguous();
  const uint32_t* mbits = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
  const uint32_t* pbits = reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>());
  // The event kernel accumulates in int16: only where the counts are int16 too.
  const bool event = s.Cw > 0 && counts_dtype(s) == at::kShort &&
                     (xf.on ? use_event_rate(sampled_rate(xf.x, s.B * xf.C * s.H * s.W))
                           : use_event(x));
  const int64_t CoB = (s.Co + 63) / 64 * 64;
  PackedW pw;
  std::vector<uint32_t> pos_masked;
  at::Tensor wt;
  if (event) {
    wt = event_table(s, mbits, pbits, CoB);
  } else {
    pw = repack(s, mbits, pbits);
    pos_masked.resize(w_pos.numel());
    for (size_t i = 0; i < pos_masked.size(); ++i) pos_masked[i] = mbits[i] & pbits[i];
  }
  const int8_t* wtp = event ? wt.data_ptr<int8_t>() : nullptr;

  const auto opts = x.options();
  at::Tensor spikes = at::empty(oshape, opts.dtype(at::kFloat));
  at::Tensor counts;
  if (!infer) counts = at::empty(oshape, opts.dtype(counts_dtype(s)));
  at::Tensor mean = at::zeros({s.Co}, opts.dtype(at::kFloat));
  at::Tensor var = at::zeros({s.Co}, opts.dtype(at::kFloat));
  const float* rp = res ? res->data_ptr<float>() : nullptr;
  if (counts_dtype(s) == at::kShort) {
    forward_impl<int16_t>(s, xpad, xf, pw, pos_masked.data(), wtp, CoB, alpha.data_ptr<float>(),
                          scale.data_ptr<float>(), shift.data_ptr<float>(), rp, bn_train, bn_eps,
                          p, infer, infer ? nullptr : counts.data_ptr<int16_t>(),
                          spikes.data_ptr<float>(), mean.data_ptr<float>(),
                          var.data_ptr<float>());
  } else {
    forward_impl<int32_t>(s, xpad, xf, pw, pos_masked.data(), wtp, CoB, alpha.data_ptr<float>(),
                          scale.data_ptr<float>(), shift.data_ptr<float>(), rp, bn_train, bn_eps,
                          p, infer, infer ? nullptr : counts.data_ptr<int32_t>(),
                          spikes.data_ptr<float>(), mean.data_ptr<float>(),
                          var.data_ptr<float>());
  }
  return {spikes, counts, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_cpu(
    const at::Tensor& x_packed, const at::Tensor& w_mask, const at::Tensor& w_pos,
    const at::Tensor& alpha, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& residual, int64_t T, int64_t stride, int64_t padding,
    bool bn_train, double bn_eps, double tau, bool decay_input, double v_threshold,
    std::optional<double> v_reset) {
  const char* op = "bconv_lif";
  const ConvShape s = check_conv(x_packed, w_mask, w_pos, T, stride, padding, op);
  return bconv_lif_run(op, s, x_packed, FloatInput{}, w_mask, w_pos, alpha, scale, shift,
                       residual, bn_train, bn_eps, tau, decay_input, v_threshold, v_reset, false);
}

// Inference (eval epilogue, no backward) straight from float spikes x [T, N, C, H, W]: each
// tile packs the input rows it reads (no packed copy of the input, no second pass over it).
at::Tensor bconv_lif_infer_cpu(const at::Tensor& x_in, const at::Tensor& w_mask,
                               const at::Tensor& w_pos, const at::Tensor& alpha,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const std::optional<at::Tensor>& residual, int64_t stride,
                               int64_t padding, double tau, bool decay_input, double v_threshold,
                               std::optional<double> v_reset) {
  const char* op = "bconv_lif_infer";
  TORCH_CHECK(x_in.device().is_cpu(), "binslt::", op, ": x must be a CPU tensor, got ",
              x_in.device());
  TORCH_CHECK(x_in.dim() == 5, "binslt::", op, ": x must be spikes [T, N, C, H, W], got shape ",
              shape_str(x_in));
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "binslt::", op,
              ": x must be floating-point spikes (0. or 1.), got ", x_in.scalar_type());
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4);
  TORCH_CHECK(T >= 1, "binslt::", op, ": x needs T >= 1 timesteps, got shape ", shape_str(x));
  const ConvShape s = check_conv_dims(T * N, H, W, words_for(static_cast<int>(C)), "x", w_mask,
                                      w_pos, T, stride, padding, op);
  std::atomic<bool> bad{false};
  const FloatInput xf{true, x.data_ptr<float>(), C, &bad};
  at::Tensor spikes = std::get<0>(bconv_lif_run(op, s, x, xf, w_mask, w_pos, alpha, scale, shift,
                                                residual, false, 1e-5, tau, decay_input,
                                                v_threshold, v_reset, true));
  TORCH_CHECK_VALUE(!bad.load(), "binslt::", op, ": ", kNotBinaryMsg);
  return spikes;
}

namespace {

// dL/dX (grad_current) and dL/dZ of channel c from its counts; the channel's sums go to gsc/gsh.
// hbuf: T * kRowChunk floats, acc_g / acc_gx: kRowChunk doubles (scratch).
template <typename CT>
static inline __attribute__((always_inline)) void lif_bn_channel_body(
    const ConvShape& s, int64_t c, const CT* counts, const float* gs, const float* alpha,
    const ChannelAffine& aff, const float* res, const NeuronParams& p, float* gcur, float* gz,
    float* gsc, float* gsh, float* hbuf, double* acc_g, double* acc_gx) {
  const int64_t S = s.Ho * s.Wo;
  const int64_t ts = s.N * s.Co * S;
  const double m = static_cast<double>(s.T * s.N * S);
  const float a = alpha[c];
  for (int i = 0; i < kRowChunk; ++i) acc_g[i] = acc_gx[i] = 0.0;
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t s0 = 0; s0 < S; s0 += kRowChunk) {
      const int L = static_cast<int>(std::min<int64_t>(kRowChunk, S - s0));
      const int64_t off = (n * s.Co + c) * S + s0;
      const CT* cr = counts + off;
      auto zat = [cr, a, ts](int t, int i) { return static_cast<float>(cr[t * ts + i]) * a; };
      lif_backward_row(static_cast<int>(s.T), L, zat, aff, res ? res + off : nullptr, ts, p,
                       gs + off, gcur + off, hbuf, acc_g, acc_gx);
    }
  double sg = 0.0, sgx = 0.0;
  for (int i = 0; i < kRowChunk; ++i) {
    sg += acc_g[i];
    sgx += acc_gx[i];
  }
  gsh[c] = static_cast<float>(sg);
  gsc[c] = static_cast<float>(sgx);
  const ZGrad zg = make_zgrad(aff, sg, sgx, m);
  for (int64_t tn = 0; tn < s.T * s.N; ++tn) {
    const int64_t off = (tn * s.Co + c) * S;
    for (int64_t i = 0; i < S; ++i)
      gz[off + i] = zg(gcur[off + i], static_cast<float>(counts[off + i]) * a);
  }
}

#define BINSLT_LIF_BN_CHANNEL_ARGS                                                            \
  const ConvShape &s, int64_t c, const CT *counts, const float *gs, const float *alpha,      \
      const ChannelAffine &aff, const float *res, const NeuronParams &p, float *gcur,        \
      float *gz, float *gsc, float *gsh, float *hbuf, double *acc_g, double *acc_gx
#define BINSLT_LIF_BN_CHANNEL_PASS \
  s, c, counts, gs, alpha, aff, res, p, gcur, gz, gsc, gsh, hbuf, acc_g, acc_gx

template <typename CT>
__attribute__((target("avx512f"))) void lif_bn_channel_avx512(BINSLT_LIF_BN_CHANNEL_ARGS) {
  lif_bn_channel_body(BINSLT_LIF_BN_CHANNEL_PASS);
}
template <typename CT>
__attribute__((target("avx2"))) void lif_bn_channel_avx2(BINSLT_LIF_BN_CHANNEL_ARGS) {
  lif_bn_channel_body(BINSLT_LIF_BN_CHANNEL_PASS);
}

template <typename CT>
void lif_bn_channel_base(BINSLT_LIF_BN_CHANNEL_ARGS) {
  lif_bn_channel_body(BINSLT_LIF_BN_CHANNEL_PASS);
}

// dL/dX (grad_current) and dL/dZ from the counts; returns per-channel sums through gsc/gsh.
template <typename CT>
void lif_bn_backward(const ConvShape& s, const CT* counts, const float* gs, const float* alpha,
                     const std::vector<ChannelAffine>& aff, const float* res,
                     const NeuronParams& p, float* gcur, float* gz, float* gsc, float* gsh) {
  const Isa isa = active_isa();
  at::parallel_for(0, s.Co, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> hbuf(static_cast<size_t>(s.T) * kRowChunk);
    std::vector<double> acc_g(kRowChunk), acc_gx(kRowChunk);
    for (int64_t c = c0; c < c1; ++c) {
      auto fn = isa == Isa::kAvx512 ? &lif_bn_channel_avx512<CT>
                : isa == Isa::kAvx2 ? &lif_bn_channel_avx2<CT>
                                    : &lif_bn_channel_base<CT>;
      fn(s, c, counts, gs, alpha, aff[c], res, p, gcur, gz, gsc, gsh, hbuf.data(), acc_g.data(),
         acc_gx.data());
    }
  });
}

// Where each input channel of one image spiked: positions (py, px) and, for stride 1, the offset
// of the output pixel its last tap (KH-1, KW-1) feeds in the margined dZ image (>= 0).
struct SpikeLists {
  std::vector<int32_t> start, py, px, base;

  void build(const uint32_t* xb, const ConvShape& s, int64_t Ci, int64_t mt, int64_t ml,
             int64_t Wz) {
    const int64_t HW = s.H * s.W;
    start.assign(Ci + 1, 0);
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
    base.resize(start[Ci]);
    std::vector<int32_t> fill(start.begin(), start.end() - 1);
    for (int64_t q = 0; q < HW * s.Cw; ++q) {
      uint32_t bits = xb[q];
      const int64_t pos = q / s.Cw, w = q % s.Cw;
      const int32_t iy = static_cast<int32_t>(pos / s.W), ix = static_cast<int32_t>(pos % s.W);
      while (bits) {
        const int64_t ci = w * 32 + __builtin_ctz(bits);
        bits &= bits - 1;
        if (ci >= Ci) break;
        py[fill[ci]] = iy;
        px[fill[ci]] = ix;
        base[fill[ci]++] = static_cast<int32_t>(
            ((iy + s.padding + mt - (s.KH - 1)) * Wz + (ix + s.padding + ml - (s.KW - 1))) *
            s.Co);
      }
    }
  }
};

// dL/dW_eff[co][ci][ky][kx] = sum over output positions of dZ * x (x binary: no multiplies).
// For each (input channel, tap) sum the dZ channel vectors of the output pixels its spikes feed,
// in registers, and add the sum into the gradient row once.
// gz_cl is [B, Ho + 2*mt, Wo + 2*ml, Co] with zero margins (channels_last_copy): with stride 1
// every (spike, tap) then lands inside it, so a tap only shifts the base pointer of one offset
// list per channel (no per-tap bounds checks); other strides check each position.
// Two schedules: per image (each thread sums into its own copy of the gradient, then the copies
// are added; the image's dZ stays in L2), or, where a copy of the gradient per thread would not
// fit L2 (deep layers: many channels, small maps), per input channel (each thread owns its rows;
// the spike lists of all images are built first).
at::Tensor weight_grad(const ConvShape& s, int64_t Ci, const at::Tensor& x_packed,
                       const at::Tensor& gz_cl, int64_t mt, int64_t ml) {
  const int64_t nthreads = at::get_num_threads();
  const int64_t per = Ci * s.KH * s.KW * s.Co;
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  const float* dz = gz_cl.data_ptr<float>();
  const Isa isa = active_isa();
  auto gsum = isa == Isa::kAvx512 ? &gather_sum_avx512
              : isa == Isa::kAvx2 ? &gather_sum_avx2
                                  : &gather_sum_base;
  const int co = static_cast<int>(s.Co);
  const int64_t HW = s.H * s.W;
  const int64_t Hz = s.Ho + 2 * mt, Wz = s.Wo + 2 * ml;  // the margined dZ image
  const bool unit = s.stride == 1;

  const int64_t img = Hz * Wz * s.Co;  // floats per margined dZ image
  // Stride 1: tap (ky, kx) of a spike with base offset o reads dZ at o + tap_shift(ky, kx).
  auto tap_shift = [&](int64_t ky, int64_t kx) {
    return ((s.KH - 1 - ky) * Wz + (s.KW - 1 - kx)) * s.Co;
  };
  // Other strides: appends, for tap (ky, kx), the dZ offsets (image b's at b * img) of the spikes
  // of channel ci in image b that land on an output pixel.
  auto strided_offsets = [&](const SpikeLists& L, int64_t b, int64_t ci, int64_t ky, int64_t kx,
                             std::vector<int32_t>& offs) {
    const int dy = static_cast<int>(s.padding - ky), dx = static_cast<int>(s.padding - kx);
    const int ho = static_cast<int>(s.Ho), wo = static_cast<int>(s.Wo);
    const int st = static_cast<int>(s.stride);
    for (int32_t e = L.start[ci]; e < L.start[ci + 1]; ++e) {
      const int oyn = L.py[e] + dy, oxn = L.px[e] + dx;
      if (oyn < 0 || oxn < 0 || oyn % st != 0 || oxn % st != 0) continue;
      const int oy = oyn / st, ox = oxn / st;
      if (oy >= ho || ox >= wo) continue;
      offs.push_back(static_cast<int32_t>(b * img + ((oy + mt) * Wz + (ox + ml)) * s.Co));
    }
  };

  // Adds channel ci's sums over image b (lists L) into G[ci] rows.
  auto accumulate = [&](const SpikeLists& L, int64_t b, int64_t ci, float* Gci,
                        std::vector<int32_t>& offs) {
    const int32_t e0 = L.start[ci], e1 = L.start[ci + 1];
    if (e0 == e1) return;
    for (int64_t ky = 0; ky < s.KH; ++ky)
      for (int64_t kx = 0; kx < s.KW; ++kx) {
        float* gout = Gci + (ky * s.KW + kx) * s.Co;
        if (unit) {
          gsum(dz + b * img + tap_shift(ky, kx), L.base.data() + e0, e1 - e0, gout, co);
          continue;
        }
        offs.clear();
        strided_offsets(L, b, ci, ky, kx, offs);
        if (!offs.empty()) gsum(dz, offs.data(), static_cast<int>(offs.size()), gout, co);
      }
  };

  at::Tensor g = at::zeros({Ci, s.KH, s.KW, s.Co}, gz_cl.options());
  float* gp = g.data_ptr<float>();
  const bool by_channel = per * static_cast<int64_t>(sizeof(float)) > (1 << 20) &&
                          s.B * img < (int64_t{1} << 31);  // offsets over all images fit int32
  if (by_channel) {
    // Per input channel and tap, one register sum over the spikes of every image: the gradient
    // row is written once (per image it would be read and written B times).
    std::vector<SpikeLists> lists(s.B);
    at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) lists[b].build(xp + b * HW * s.Cw, s, Ci, mt, ml, Wz);
    });
    at::parallel_for(0, Ci, 1, [&](int64_t c0, int64_t c1) {
      std::vector<int32_t> offs;
      for (int64_t ci = c0; ci < c1; ++ci) {
        float* Gci = gp + ci * s.KH * s.KW * s.Co;
        if (unit) {
          offs.clear();
          for (int64_t b = 0; b < s.B; ++b)
            for (int32_t e = lists[b].start[ci]; e < lists[b].start[ci + 1]; ++e)
              offs.push_back(static_cast<int32_t>(b * img + lists[b].base[e]));
          if (offs.empty()) continue;
          for (int64_t ky = 0; ky < s.KH; ++ky)
            for (int64_t kx = 0; kx < s.KW; ++kx)
              gsum(dz + tap_shift(ky, kx), offs.data(), static_cast<int>(offs.size()),
                   Gci + (ky * s.KW + kx) * s.Co, co);
          continue;
        }
        for (int64_t ky = 0; ky < s.KH; ++ky)
          for (int64_t kx = 0; kx < s.KW; ++kx) {
            offs.clear();
            for (int64_t b = 0; b < s.B; ++b) strided_offsets(lists[b], b, ci, ky, kx, offs);
            if (!offs.empty())
              gsum(dz, offs.data(), static_cast<int>(offs.size()),
                   Gci + (ky * s.KW + kx) * s.Co, co);
          }
      }
    });
  } else {
    std::vector<float> partial(static_cast<size_t>(nthreads - 1) * per, 0.0f);
    at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
      const int th = at::get_thread_num();
      float* G = th == 0 ? gp : partial.data() + (th - 1) * per;
      SpikeLists L;
      std::vector<int32_t> offs;
      for (int64_t b = b0; b < b1; ++b) {
        L.build(xp + b * HW * s.Cw, s, Ci, mt, ml, Wz);
        for (int64_t ci = 0; ci < Ci; ++ci)
          accumulate(L, b, ci, G + ci * s.KH * s.KW * s.Co, offs);
      }
    });
    if (nthreads > 1)
      at::parallel_for(0, per, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          float acc = gp[i];
          for (int64_t th = 1; th < nthreads; ++th) acc += partial[(th - 1) * per + i];
          gp[i] = acc;
        }
      });
  }
  return g.permute({3, 0, 1, 2}).contiguous();  // [Co, Ci, kh, kw]
}

__attribute__((target("avx512f"))) void transpose_f32_avx512(const float* src, float* dst,
                                                             int64_t R, int64_t C) {
  transpose_f32_body<16>(src, dst, R, C);
}
__attribute__((target("avx2"))) void transpose_f32_avx2(const float* src, float* dst, int64_t R,
                                                        int64_t C) {
  transpose_f32_body<8>(src, dst, R, C);
}
void transpose_f32_base(const float* src, float* dst, int64_t R, int64_t C) {
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) dst[j * R + i] = src[i * C + j];
}

// [B, C, H, W] float (contiguous) -> [B, H + 2*mt, W + 2*ml, C] contiguous with zero margins,
// by 16x16 register-tile transposes (ATen's permute().contiguous() measured ~5x slower for this
// on the anchor shape).
at::Tensor channels_last_copy(const at::Tensor& x, int64_t mt, int64_t ml) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hz = H + 2 * mt, Wz = W + 2 * ml;
  at::Tensor out = at::empty({B, Hz, Wz, C}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const Isa isa = active_isa();
  auto fn = isa == Isa::kAvx512 ? &transpose_f32_avx512
            : isa == Isa::kAvx2 ? &transpose_f32_avx2
                                : &transpose_f32_base;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(mt + ml > 0 ? H * W * C : 0);
    for (int64_t b = b0; b < b1; ++b) {
      float* ob = dst + b * Hz * Wz * C;
      if (mt + ml == 0) {
        fn(src + b * C * H * W, ob, C, H * W);
        continue;
      }
      fn(src + b * C * H * W, tmp.data(), C, H * W);
      std::fill(ob, ob + mt * Wz * C, 0.0f);
      std::fill(ob + (mt + H) * Wz * C, ob + Hz * Wz * C, 0.0f);
      for (int64_t y = 0; y < H; ++y) {
        float* row = ob + (mt + y) * Wz * C;
        std::fill(row, row + ml * C, 0.0f);
        std::memcpy(row + ml * C, tmp.data() + y * W * C, W * C * sizeof(float));
        std::fill(row + (ml + W) * C, row + Wz * C, 0.0f);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Input gradient with ternary weights (stride 1, AVX-512)
// ---------------------------------------------------------------------------------------------
//
// dX[ci][iy][ix] = sum_{ky,kx,co} W[co][ci][ky][kx] * dZ[co][iy+pad-ky][ix+pad-kx], W = +-alpha
// or 0. With dZ' = alpha * dZ in a zero-margined plane per channel, every nonzero weight is one
// add or subtract of a shifted dZ' row, 16 pixels per vector: half the weights are pruned, so
// this does half the float work of the dense transposed convolution and no multiplies. Work per
// image: for each block of 16 output channels (their dZ' planes, ~20 KB, stay in L1), each input
// channel adds its block's list of (+, -) plane offsets into 4 rows of dX at a time.
struct TernaryLists {
  int64_t nblk;
  std::vector<int64_t> start;  // [(Ci * nblk + cb) * KW + kx + 1] into off
  std::vector<int32_t> npos;   // the first npos offsets of a list add, the rest subtract
  std::vector<int32_t> off;
};

constexpr int kGxCB = 16;  // output channels per block

// Lists per (ci, output-channel block, kx): offsets (co - c0) * plane + (pad - ky + MY) * RS into
// the block's dZ' planes for that kx (see gx_image_avx512).
TernaryLists ternary_lists(const ConvShape& s, int64_t Ci, const uint32_t* mask,
                           const uint32_t* pos, int64_t MY, int64_t RS, int64_t plane) {
  TernaryLists tl;
  tl.nblk = (s.Co + kGxCB - 1) / kGxCB;
  const int64_t per_ci = tl.nblk * s.KW;  // lists per input channel
  const int64_t nl = Ci * per_ci;
  tl.start.assign(nl + 1, 0);
  tl.npos.assign(nl, 0);
  // Count, then fill in parallel over input channels (this runs on every backward).
  std::vector<int64_t> cnt(nl, 0);
  at::parallel_for(0, Ci, 8, [&](int64_t a0, int64_t a1) {
    for (int64_t ci = a0; ci < a1; ++ci) {
      const int64_t w = ci >> 5;
      const uint32_t bit = 1u << (ci & 31);
      for (int64_t co = 0; co < s.Co; ++co)
        for (int64_t ky = 0; ky < s.KH; ++ky)
          for (int64_t kx = 0; kx < s.KW; ++kx) {
            const int64_t idx = ((co * s.KH + ky) * s.KW + kx) * s.Cw + w;
            if (mask[idx] & bit) ++cnt[ci * per_ci + (co / kGxCB) * s.KW + kx];
          }
    }
  });
  for (int64_t li = 0; li < nl; ++li) tl.start[li + 1] = tl.start[li] + cnt[li];
  tl.off.resize(tl.start[nl]);
  at::parallel_for(0, Ci, 8, [&](int64_t a0, int64_t a1) {
    std::vector<int64_t> pfill(per_ci), nfill(per_ci);
    for (int64_t ci = a0; ci < a1; ++ci) {
      const int64_t w = ci >> 5;
      const uint32_t bit = 1u << (ci & 31);
      // Positive weights first in each list: count them, then place both kinds.
      std::fill(pfill.begin(), pfill.end(), 0);
      for (int64_t co = 0; co < s.Co; ++co)
        for (int64_t ky = 0; ky < s.KH; ++ky)
          for (int64_t kx = 0; kx < s.KW; ++kx) {
            const int64_t idx = ((co * s.KH + ky) * s.KW + kx) * s.Cw + w;
            if ((mask[idx] & bit) && (pos[idx] & bit)) ++pfill[(co / kGxCB) * s.KW + kx];
          }
      for (int64_t l = 0; l < per_ci; ++l) {
        tl.npos[ci * per_ci + l] = static_cast<int32_t>(pfill[l]);
        nfill[l] = tl.start[ci * per_ci + l] + pfill[l];
        pfill[l] = tl.start[ci * per_ci + l];
      }
      for (int64_t co = 0; co < s.Co; ++co)
        for (int64_t ky = 0; ky < s.KH; ++ky)
          for (int64_t kx = 0; kx < s.KW; ++kx) {
            const int64_t idx = ((co * s.KH + ky) * s.KW + kx) * s.Cw + w;
            if (!(mask[idx] & bit)) continue;
            const int64_t l = (co / kGxCB) * s.KW + kx;
            const int32_t o = static_cast<int32_t>((co % kGxCB) * plane + (s.padding - ky + MY) * RS);
            tl.off[(pos[idx] & bit) ? pfill[l]++ : nfill[l]++] = o;
          }
    }
  });
  return tl;
}

// Combination form (the "four Russians" trick for ternary products): within an output-channel
// block, groups of kGxG = 4 channels; for each group and kx the 3^4 = 81 signed sums of its four
// dZ' planes are built once per image (code = sum_i d_i 3^i, d_i = 0 pruned, 1 plus, 2 minus),
// and an input channel then adds one combination per (group, ky): ~0.94 adds instead of ~2 at
// half the weights pruned. Lists per (ci, block, kx): offsets ((g * 81 + code) * plane +
// (pad - ky + MY) * RS) into the block's combination planes, all added (npos = count).
constexpr int kGxG = 4;
constexpr int kGxCombos = 81;  // 3^kGxG
constexpr int kGxGroups = kGxCB / kGxG;

TernaryLists combo_lists(const ConvShape& s, int64_t Ci, const uint32_t* mask,
                         const uint32_t* pos, int64_t MY, int64_t RS, int64_t plane) {
  TernaryLists tl;
  tl.nblk = (s.Co + kGxCB - 1) / kGxCB;
  const int64_t per_ci = tl.nblk * s.KW;
  const int64_t nl = Ci * per_ci;
  tl.start.assign(nl + 1, 0);
  tl.npos.assign(nl, 0);
  // code of (ci, group, ky, kx): the digits of the group's (up to) four channels
  auto code = [&](int64_t ci, int64_t cb, int64_t g, int64_t ky, int64_t kx) {
    const int64_t w = ci >> 5;
    const uint32_t bit = 1u << (ci & 31);
    int c = 0, p3 = 1;
    for (int i = 0; i < kGxG; ++i, p3 *= 3) {
      const int64_t co = cb * kGxCB + g * kGxG + i;
      if (co >= s.Co) break;
      const int64_t idx = ((co * s.KH + ky) * s.KW + kx) * s.Cw + w;
      if (mask[idx] & bit) c += ((pos[idx] & bit) ? 1 : 2) * p3;
    }
    return c;
  };
  std::vector<int64_t> cnt(nl, 0);
  at::parallel_for(0, Ci, 8, [&](int64_t a0, int64_t a1) {
    for (int64_t ci = a0; ci < a1; ++ci)
      for (int64_t cb = 0; cb < tl.nblk; ++cb)
        for (int64_t kx = 0; kx < s.KW; ++kx)
          for (int64_t g = 0; g < kGxGroups; ++g)
            for (int64_t ky = 0; ky < s.KH; ++ky)
              if (code(ci, cb, g, ky, kx) != 0) ++cnt[ci * per_ci + cb * s.KW + kx];
  });
  for (int64_t li = 0; li < nl; ++li) tl.start[li + 1] = tl.start[li] + cnt[li];
  tl.off.resize(tl.start[nl]);
  at::parallel_for(0, Ci, 8, [&](int64_t a0, int64_t a1) {
    for (int64_t ci = a0; ci < a1; ++ci)
      for (int64_t cb = 0; cb < tl.nblk; ++cb)
        for (int64_t kx = 0; kx < s.KW; ++kx) {
          const int64_t li = ci * per_ci + cb * s.KW + kx;
          int64_t f = tl.start[li];
          for (int64_t g = 0; g < kGxGroups; ++g)
            for (int64_t ky = 0; ky < s.KH; ++ky) {
              const int c = code(ci, cb, g, ky, kx);
              if (c == 0) continue;
              tl.off[f++] = static_cast<int32_t>((g * kGxCombos + c) * plane +
                                                 (s.padding - ky + MY) * RS);
            }
          tl.npos[li] = static_cast<int32_t>(f - tl.start[li]);
        }
  });
  return tl;
}

// The 81 combinations of each group of the block's dZ' planes (zbuf) into cbuf
// [kGxGroups][81][plane]; combination 0 stays the zero plane. Channels past Co only ever carry
// digit 0, so the combinations that read their (stale) planes are never referenced.
__attribute__((target("avx512f"))) static void build_combos(const float* zbuf, float* cbuf,
                                                            int64_t ngroups, int64_t plane) {
  for (int64_t g = 0; g < ngroups; ++g) {
    float* cg = cbuf + g * kGxCombos * plane;
    int64_t n = 1;  // combinations of the first i channels: codes [0, n)
    for (int i = 0; i < kGxG; ++i, n *= 3) {
      const float* pi = zbuf + (g * kGxG + i) * plane;
      for (int64_t c = 0; c < n; ++c) {
        const float* src = cg + c * plane;
        float* plus = cg + (c + n) * plane;
        float* minus = cg + (c + 2 * n) * plane;
        for (int64_t x = 0; x < plane; x += 16) {
          const __m512 a = _mm512_load_ps(src + x), b = _mm512_load_ps(pi + x);
          _mm512_store_ps(plus + x, _mm512_add_ps(a, b));
          _mm512_store_ps(minus + x, _mm512_sub_ps(a, b));
        }
      }
    }
  }
}

// RB rows of one 16-pixel column block: acc[r] (+/-)= zb[off + r*RS] (64-byte aligned loads).
template <int RB>
__attribute__((target("avx512f"), always_inline)) static inline void gx_rows(
    const float* zb, int64_t RS, const int32_t* off, int np, int nt, __mmask16 k, bool first,
    float* out, int64_t W) {
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r)
    acc[r] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(k, out + r * W);
  for (int j = 0; j < np; ++j) {
    const float* p = zb + off[j];
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_add_ps(acc[r], _mm512_load_ps(p + r * RS));
  }
  for (int j = np; j < nt; ++j) {
    const float* p = zb + off[j];
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_sub_ps(acc[r], _mm512_load_ps(p + r * RS));
  }
  for (int r = 0; r < RB; ++r) _mm512_mask_storeu_ps(out + r * W, k, acc[r]);
}

// One image: gxb [Ci][H][W] from gzb [Co][Ho][Wo]. For each block of 16 output channels and each
// kernel column kx, zbuf gets their dZ' = alpha * dZ planes shifted by kx (row y + MY holds
// dZ'[y][x + pad - kx], zero outside, rows RS floats apart), so that every load of a 16-pixel run
// is one aligned vector; the 16 planes (~20 KB) stay in L1 while all input channels use them.
// With cbuf (combination form, see combo_lists) the lists index the block's combination planes
// instead of zbuf.
__attribute__((target("avx512f"))) void gx_image_avx512(const ConvShape& s, int64_t Ci,
                                                        const TernaryLists& tl, const float* gzb,
                                                        const float* alpha, float* zbuf,
                                                        float* cbuf, int64_t MY, int64_t RS,
                                                        int64_t plane, float* gxb) {
  const int64_t H = s.H, W = s.W, S = s.Ho * s.Wo;
  for (int64_t cb = 0; cb < tl.nblk; ++cb) {
    const int64_t c0 = cb * kGxCB, c1 = std::min(s.Co, c0 + kGxCB);
    for (int64_t kx = 0; kx < s.KW; ++kx) {
      const int64_t sh = s.padding - kx;
      for (int64_t co = c0; co < c1; ++co) {
        const float a = alpha[co];
        const float* src = gzb + co * S;
        float* dst = zbuf + (co - c0) * plane + MY * RS;
        // Row y: dst[x] = a * src[x + sh] for x + sh in [0, Wo), else 0.
        const int64_t xa = std::max<int64_t>(0, -sh), xb = std::min<int64_t>(RS, s.Wo - sh);
        for (int64_t y = 0; y < s.Ho; ++y) {
          float* d = dst + y * RS;
          const float* r = src + y * s.Wo + sh;
          for (int64_t x = 0; x < xa; ++x) d[x] = 0.0f;
          for (int64_t x = xa; x < xb; ++x) d[x] = r[x] * a;
          for (int64_t x = std::max(xa, xb); x < RS; ++x) d[x] = 0.0f;
        }
      }
      if (cbuf != nullptr) build_combos(zbuf, cbuf, (c1 - c0 + kGxG - 1) / kGxG, plane);
      const float* zb = cbuf != nullptr ? cbuf : zbuf;
      for (int64_t ci = 0; ci < Ci; ++ci) {
        const int64_t li = (ci * tl.nblk + cb) * s.KW + kx;
        const int32_t* off = tl.off.data() + tl.start[li];
        const int nt = static_cast<int>(tl.start[li + 1] - tl.start[li]);
        const int np = tl.npos[li];
        const bool first = cb == 0 && kx == 0;
        if (nt == 0 && !first) continue;
        float* gxc = gxb + ci * H * W;
        for (int64_t x0 = 0; x0 < W; x0 += 16) {
          const __mmask16 k = W - x0 >= 16 ? static_cast<__mmask16>(0xFFFF)
                                           : static_cast<__mmask16>((1u << (W - x0)) - 1u);
          int64_t y = 0;
          for (; y + 8 <= H; y += 8)
            gx_rows<8>(zb + y * RS + x0, RS, off, np, nt, k, first, gxc + y * W + x0, W);
          for (; y + 4 <= H; y += 4)
            gx_rows<4>(zb + y * RS + x0, RS, off, np, nt, k, first, gxc + y * W + x0, W);
          for (; y < H; ++y)
            gx_rows<1>(zb + y * RS + x0, RS, off, np, nt, k, first, gxc + y * W + x0, W);
        }
      }
    }
  }
}

// The dZ' plane geometry of the ternary kernels: MY margin rows above and below, rows of RS
// floats (whole aligned 16-float vectors), plane floats per channel.
struct GxGeom {
  int64_t MY, RS, plane;
};
GxGeom gx_geom(const ConvShape& s) {
  GxGeom g;
  g.MY = std::max<int64_t>(0, s.KH - 1 - s.padding);
  g.RS = (s.W + 15) / 16 * 16;
  g.plane = (s.Ho + 2 * g.MY) * g.RS;
  return g;
}

// Bytes of one thread's combination planes (gx_image_avx512 with cbuf).
int64_t combo_bytes(const ConvShape& s) {
  return kGxGroups * kGxCombos * gx_geom(s).plane * static_cast<int64_t>(sizeof(float));
}

void grad_x_ternary_avx512(const ConvShape& s, int64_t Ci, const float* gz,
                           const uint32_t* mask, const uint32_t* pos, const float* alpha,
                           bool combos, float* gx) {
  const GxGeom gg = gx_geom(s);
  const int64_t MY = gg.MY, RS = gg.RS, plane = gg.plane;
  const TernaryLists tl = combos ? combo_lists(s, Ci, mask, pos, MY, RS, plane)
                                 : ternary_lists(s, Ci, mask, pos, MY, RS, plane);
  at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
    // 64-byte aligned planes; the margin rows are zero and stay zero.
    at::Tensor zt = at::zeros({kGxCB * plane}, at::TensorOptions().dtype(at::kFloat));
    float* zbuf = zt.data_ptr<float>();
    at::Tensor ct;
    if (combos) ct = at::zeros({kGxGroups * kGxCombos * plane}, zt.options());
    float* cbuf = combos ? ct.data_ptr<float>() : nullptr;
    for (int64_t b = b0; b < b1; ++b)
      gx_image_avx512(s, Ci, tl, gz + b * s.Co * s.Ho * s.Wo, alpha, zbuf, cbuf, MY, RS, plane,
                      gx + b * Ci * s.H * s.W);
  });
}

// Input-gradient algorithm: oneDNN's dense transposed convolution, or the ternary add/subtract
// kernel above in its plain or combination form (AVX-512, stride 1); "auto" chooses by the
// measured rule in bconv_lif_bwd_cpu.
enum class GxAlgo : int { kAuto = -1, kDense = 0, kTernary = 1, kCombo = 2 };
static std::atomic<int> g_gx_override{static_cast<int>(GxAlgo::kAuto)};

}  // namespace

void set_cpu_grad_x_algo(const std::string& name) {
  GxAlgo want;
  if (name == "auto") want = GxAlgo::kAuto;
  else if (name == "dense") want = GxAlgo::kDense;
  else if (name == "ternary") want = GxAlgo::kTernary;
  else if (name == "combo") want = GxAlgo::kCombo;
  else
    TORCH_CHECK(false, "binslt: unknown CPU input-gradient algorithm '", name,
                "'; expected one of auto, dense, ternary, combo");
  TORCH_CHECK(want == GxAlgo::kAuto || want == GxAlgo::kDense || isa_supported(Isa::kAvx512),
              "binslt: the '", name, "' input-gradient kernel needs AVX-512, which this CPU lacks");
  g_gx_override.store(static_cast<int>(want));
}

std::string cpu_grad_x_algo() {
  switch (static_cast<GxAlgo>(g_gx_override.load())) {
    case GxAlgo::kDense: return "dense";
    case GxAlgo::kTernary: return "ternary";
    case GxAlgo::kCombo: return "combo";
    default: return "auto";
  }
}

namespace {

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

  // dZ channel-last for the weight gradient, with zero margins where stride 1 lets taps reach
  // past the border (see weight_grad).
  const int64_t mt = stride == 1 ? std::max<int64_t>(0, s.KH - 1 - padding) : 0;
  const int64_t ml = stride == 1 ? std::max<int64_t>(0, s.KW - 1 - padding) : 0;
  const at::Tensor gz_cl = channels_last_copy(gz, mt, ml);
  at::Tensor gw = weight_grad(s, in_channels, x_packed, gz_cl, mt, ml);

  at::Tensor gx;
  const GxAlgo gxa = static_cast<GxAlgo>(g_gx_override.load());
  // 'auto' takes the ternary kernels where rows fill their 16-lane vectors (W >= 16; on 8x8
  // and 4x4 maps most lanes would idle). Their work follows the nonzero weights. Measured with
  // benchmarks/cpu_algos.py (whole backward op, anchor layer 128->128 16x16, 2 threads), dense /
  // ternary / combo ms at 20, 35, 50, 65, 80 % nonzero weights: 32.6/20.8/23.7, 31.7/25.1/25.7,
  // 33.0/30.4/28.4, 32.1/34.2/28.3, 34.1/40.1/28.9. So: the combination form from 40 % nonzero,
  // where its planes fit L2 (<= 512 KiB per thread) and enough input channels share them
  // (Ci >= 128: with 64 -> 64 at 32x32 it lost, 19.9 vs 17.7 ms ternary); else the plain ternary
  // kernel up to 55 % nonzero; else oneDNN.
  bool ternary_gx = stride == 1 && active_isa() == Isa::kAvx512 &&
                    (gxa == GxAlgo::kTernary || gxa == GxAlgo::kCombo ||
                     (gxa == GxAlgo::kAuto && s.W >= 16));
  bool combos = gxa == GxAlgo::kCombo;
  if (ternary_gx && gxa == GxAlgo::kAuto) {
    const uint32_t* mb = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
    const int64_t nnz = count_set_bits(mb, w_mask.numel());
    const double dens =
        static_cast<double>(nnz) / static_cast<double>(s.Co * s.KH * s.KW * in_channels);
    combos = dens >= 0.4 && in_channels >= 128 && combo_bytes(s) <= (512 << 10);
    ternary_gx = combos || dens <= 0.55;
  }
  if (need_grad_x && ternary_gx) {
    gx = at::empty({s.T, s.N, in_channels, s.H, s.W}, fopts);
    grad_x_ternary_avx512(s, in_channels, gz.data_ptr<float>(),
                          reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>()),
                          reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>()), ap,
                          combos, gx.data_ptr<float>());
  } else if (need_grad_x) {
    const at::Tensor w_eff = dense_weight(s, in_channels, w_mask, w_pos, ap);
    const int64_t oph = s.H - ((s.Ho - 1) * stride - 2 * padding + s.KH);
    const int64_t opw = s.W - ((s.Wo - 1) * stride - 2 * padding + s.KW);
    // NCHW in, NCHW out: as fast as oneDNN's channels-last path here (measured), and no copy of
    // the result back to the [T, N, Ci, H, W] layout.
    gx = at::conv_transpose2d(gz, w_eff, {}, {stride, stride}, {padding, padding}, {oph, opw});
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
  m.impl("bconv_lif_infer", &binslt::cpu::bconv_lif_infer_cpu);
  m.impl("bconv_lif_bwd", &binslt::cpu::bconv_lif_bwd_cpu);
}
