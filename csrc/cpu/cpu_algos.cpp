// Algorithm selection of the CPU kernels (see binslt/cpu_algos.h): the configuration, the ISA
// detection, and the measured rules that "auto" applies.
#include "binslt/cpu_algos.h"
#include "binslt/bconv_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>

namespace binslt {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// The measured crossovers of "auto", in one table. They come from benchmarks/cpu_algos.py on the
// anchor layer (T=4 N=16 128->128 16x16, 3x3, prune rate 0.5, 2 threads); the timings are in
// benchmarks/results/cpu_algos_cpu-amd-epyc.csv, the discussion in docs/benchmarks.md.
// ---------------------------------------------------------------------------------------------

struct AutoRules {
  // Forward: the event kernel below this fraction of set bits in the packed input. Its work
  // follows the spikes, the dense kernel's does not, so the crossover moves up as the dense
  // kernel loses vector width.
  double event_max_rate_avx512;
  double event_max_rate_avx2;
  double event_max_rate_other;  // popcnt and scalar
  // Input gradient (AVX-512, stride 1): the ternary kernels where a row fills its 16-lane
  // vectors; their work follows the nonzero weights.
  int64_t ternary_min_width;
  double ternary_max_density;  // plain ternary kernel up to this fraction of nonzero weights
  // The combination form from this density, where enough input channels share its planes and
  // one thread's planes fit L2.
  double combo_min_density;
  int64_t combo_min_in_channels;
  int64_t combo_max_bytes;
  // Weight gradient: the dense GEMM form from this fraction of set bits in the packed input; a
  // lower bar where the gradient is over grad_w_large_bytes (the event form then sums over all
  // images per input channel and reads dZ rows from memory: at 256->256 8x8, N=32, T=4 it took
  // 1.8x the GEMM's time at rate 0.15 and 6.3x at 0.5, while at 128->128 16x16 it was 0.6-0.95x
  // up to rate 0.5; an A/B of bconv_lif_bwd on a 2-core AMD EPYC with AVX-512, event vs dense,
  // interleaved medians).
  double grad_w_dense_min_rate;
  double grad_w_dense_min_rate_large;
  int64_t grad_w_large_bytes;
  // Both gradients: the unfold form where a kernel's taps are at least this many times the
  // input pixels (a 3x3 kernel over 1x1 / 1x2 / 2x2) and its matrix fits in this many bytes.
  double unfold_min_taps_per_pixel;
  int64_t unfold_max_bytes;
  // Dense input gradient: from dZ channel-last with zero margins (the event weight gradient's
  // copy, read in place) as a forward conv of the flipped weight, on maps of at least this many
  // output pixels. oneDNN then reorders neither dZ nor dX (NCHW in reorders both: ~1 dZ of extra
  // memory). 2-core AMD EPYC, AVX2, N=32 T=4: 64->64 32x32 105 -> 72 ms (+ ~8 ms back to
  // NCHW); at 16x16 and below the NCHW transposed conv was as fast or faster.
  int64_t margined_grad_x_min_pixels;
  // Dense weight gradient: the tap form (one GEMM per tap over the pixel pairs it joins) on maps
  // of at most this many output pixels. 2-core AMD EPYC, AVX2, N=32 T=4, 3x3: 512->512 4x4
  // 208 -> 79 ms, 256->512 4x4 52 -> 39 ms against ATen's convolution; at 8x8 even or slower,
  // at 16x16 slower (prototype, interleaved medians of 5).
  int64_t taps_grad_w_max_pixels;
  // Inference forward: oneDNN's int8 (AMX) convolution on maps of at least this many output
  // pixels and at least this many (input channel, output channel) pairs, where the CPU has
  // AMX-INT8. 2-core Xeon with AMX, N=32 T=4, rate 0.3, packed out (bconv_lif_infer, medians
  // of 7): 128->128 32x32 26.0 (dense) / 25.0 (event) -> 10.5 ms, 256->256 8x8 pooled 5.5 -> 2.0,
  // 512->512 4x4 pooled 5.6 -> 4.9; at 2x2 and 1x1 (linear layers) and 32->32 4x4 oneDNN's fixed
  // cost loses (512->512 2x2: 2.5 event -> 3.5; 2048->256 1x1: 0.37 -> 0.63).
  int64_t onednn_min_pixels;
  int64_t onednn_min_channel_pairs;
  // Weight gradient at stride 1 where the CPU has AMX-INT8: the int8 limb form instead of the
  // dense GEMM (ATen's float convolution) wherever that is the choice, and instead of the event
  // form from this fraction of set bits times the share of the padded grid that is output
  // (rate * Ho*Wo / (Hp*Wp)); the tap form keeps maps of at most taps_grad_w_max_pixels.
  // 2-core Xeon with AMX, VGG-11 N=32 T=4 search step, each layer's bconv_lif_bwd(_pool2)
  // call replayed (medians of 5, ms, whole call with dX): 64->64 32x32 pooled (rate 0.26,
  // 0.23 of the grid) event 100.8 -> int8 84.8; 128->128 16x16 pooled (rate 0.17, 0.13) event
  // 56.3 vs int8 62.7; 256->256 8x8 pooled (dense chosen) 61.6 -> 53.5; 128->256 8x8 35.3 ->
  // 33.4; 128->128 16x16 38.5 -> 37.1; 512->512 4x4 taps 62.4 vs int8 63.1.
  double int8_grad_w_min_rate;
  // Input gradient at stride 1 where the CPU has AMX-INT8: the int8 limb form on maps of
  // [int8_grad_x_min_pixels, int8_grad_x_max_pixels] output pixels (the range measured; 2x2 and
  // 1x1 take the unfold form). The same replayed calls, whole call ms, dense /
  // ternary / int8: 512->512 4x4 pooled 62.4 / 195 / 58.9; 256->256 8x8 pooled 53.1 / 83.0 /
  // 36.8; 128->256 8x8 31.5 / 46.2 / 23.4; 128->128 16x16 pooled 52.8 / 49.6 / 38.1; 64->64
  // 32x32 pooled 104.1 / 90.7 / 76.0 (the ternary form was auto at 16x16 and 32x32).
  int64_t int8_grad_x_min_pixels;
  int64_t int8_grad_x_max_pixels;
};

constexpr AutoRules kAutoRules{
    /*event_max_rate_avx512=*/0.26,
    /*event_max_rate_avx2=*/0.6,
    /*event_max_rate_other=*/0.75,
    /*ternary_min_width=*/16,
    /*ternary_max_density=*/0.55,
    /*combo_min_density=*/0.4,
    /*combo_min_in_channels=*/128,
    /*combo_max_bytes=*/512 << 10,
    /*grad_w_dense_min_rate=*/0.5,
    /*grad_w_dense_min_rate_large=*/0.1,
    /*grad_w_large_bytes=*/1 << 20,
    /*unfold_min_taps_per_pixel=*/2.0,
    /*unfold_max_bytes=*/64 << 20,
    /*margined_grad_x_min_pixels=*/1024,
    /*taps_grad_w_max_pixels=*/16,
    /*onednn_min_pixels=*/16,
    /*onednn_min_channel_pairs=*/64 * 64,
    /*int8_grad_w_min_rate=*/0.18,
    /*int8_grad_x_min_pixels=*/16,
    /*int8_grad_x_max_pixels=*/1024,
};

// ---------------------------------------------------------------------------------------------
// The configuration
// ---------------------------------------------------------------------------------------------

static std::atomic<AlgoConfig> g_config{AlgoConfig{}};

AlgoConfig algo_config() { return g_config.load(std::memory_order_relaxed); }

bool isa_supported(Isa isa) {
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
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq");
    default:
      return false;
  }
#else
  return isa == Isa::kScalar;
#endif
}

Isa best_isa() {
  static const Isa best = [] {
    for (Isa i : {Isa::kAvx512, Isa::kAvx2, Isa::kPopcnt})
      if (isa_supported(i)) return i;
    return Isa::kScalar;
  }();
  return best;
}

Isa active_isa() {
  const Isa forced = algo_config().isa;
  return forced == Isa::kAuto ? best_isa() : forced;
}

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::kScalar: return "scalar";
    case Isa::kPopcnt: return "popcnt";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    default: return "auto";
  }
}

static const char* conv_name(ConvAlgo a) {
  switch (a) {
    case ConvAlgo::kDense: return "dense";
    case ConvAlgo::kEvent: return "event";
    case ConvAlgo::kOnednn: return "onednn";
    default: return "auto";
  }
}

static const char* grad_w_name(GradWAlgo a) {
  switch (a) {
    case GradWAlgo::kEvent: return "event";
    case GradWAlgo::kDense: return "dense";
    case GradWAlgo::kUnfold: return "unfold";
    case GradWAlgo::kTaps: return "taps";
    case GradWAlgo::kInt8: return "int8";
    default: return "auto";
  }
}

static const char* grad_x_name(GradXAlgo a) {
  switch (a) {
    case GradXAlgo::kDense: return "dense";
    case GradXAlgo::kTernary: return "ternary";
    case GradXAlgo::kCombo: return "combo";
    case GradXAlgo::kUnfold: return "unfold";
    case GradXAlgo::kInt8: return "int8";
    default: return "auto";
  }
}

// The value of `name` among the choices of one field (listed in the error otherwise).
template <typename E, size_t K>
static E parse_choice(const std::string& name, const char* field, const E (&choices)[K],
                      const char* (*to_name)(E)) {
  std::string listed;
  for (E c : choices) {
    if (name == to_name(c)) return c;
    listed += std::string(listed.empty() ? "" : ", ") + to_name(c);
  }
  TORCH_CHECK_VALUE(false, "binslt: unknown CPU ", field, " '", name, "'; expected one of ",
                    listed);
  return choices[0];
}

std::map<std::string, std::string> cpu_algorithms() {
  const AlgoConfig c = algo_config();
  return {{"isa", isa_name(c.isa)}, {"conv", conv_name(c.conv)},
          {"grad_x", grad_x_name(c.grad_x)}, {"grad_w", grad_w_name(c.grad_w)}};
}

void set_cpu_algorithms(const std::string& isa, const std::string& conv,
                        const std::string& grad_x, const std::string& grad_w) {
  static constexpr Isa kIsas[] = {Isa::kAuto, Isa::kScalar, Isa::kPopcnt, Isa::kAvx2,
                                  Isa::kAvx512};
  static constexpr ConvAlgo kConvs[] = {ConvAlgo::kAuto, ConvAlgo::kDense, ConvAlgo::kEvent,
                                        ConvAlgo::kOnednn};
  static constexpr GradXAlgo kGradXs[] = {GradXAlgo::kAuto, GradXAlgo::kDense,
                                          GradXAlgo::kTernary, GradXAlgo::kCombo,
                                          GradXAlgo::kUnfold, GradXAlgo::kInt8};
  static constexpr GradWAlgo kGradWs[] = {GradWAlgo::kAuto, GradWAlgo::kEvent,
                                          GradWAlgo::kDense, GradWAlgo::kUnfold,
                                          GradWAlgo::kTaps, GradWAlgo::kInt8};
  AlgoConfig c;
  c.isa = parse_choice(isa, "isa path", kIsas, &isa_name);
  c.conv = parse_choice(conv, "conv algorithm", kConvs, &conv_name);
  c.grad_x = parse_choice(grad_x, "input-gradient algorithm", kGradXs, &grad_x_name);
  c.grad_w = parse_choice(grad_w, "weight-gradient algorithm", kGradWs, &grad_w_name);
  TORCH_CHECK(c.isa == Isa::kAuto || isa_supported(c.isa), "binslt: this CPU cannot run the '",
              isa, "' path");
  TORCH_CHECK(c.grad_x != GradXAlgo::kInt8 || onednn_int8_supported(),
              "binslt: the 'int8' input gradient (oneDNN's int8 convolution) needs a CPU with "
              "AMX-INT8 and a PyTorch built with oneDNN; this machine has not both");
  TORCH_CHECK(c.grad_x == GradXAlgo::kAuto || c.grad_x == GradXAlgo::kDense ||
                  c.grad_x == GradXAlgo::kUnfold || c.grad_x == GradXAlgo::kInt8 ||
                  isa_supported(Isa::kAvx512),
              "binslt: the '", grad_x, "' input-gradient kernel needs AVX-512, which this CPU "
              "lacks");
  TORCH_CHECK(c.conv != ConvAlgo::kOnednn || onednn_int8_supported(),
              "binslt: the 'onednn' conv (oneDNN's int8 convolution) needs a CPU with AMX-INT8 "
              "and a PyTorch built with oneDNN; this machine has not both");
  g_config.store(c, std::memory_order_relaxed);
}

std::string cpu_kernel_isa() { return isa_name(active_isa()); }

std::map<std::string, bool> cpu_feature_flags() {
  std::map<std::string, bool> f;
#if defined(__x86_64__)
  __builtin_cpu_init();
  f["popcnt"] = __builtin_cpu_supports("popcnt");
  f["avx2"] = __builtin_cpu_supports("avx2");
  f["avx512f"] = __builtin_cpu_supports("avx512f");
  f["avx512bw"] = __builtin_cpu_supports("avx512bw");
  f["avx512vl"] = __builtin_cpu_supports("avx512vl");
  f["avx512vpopcntdq"] = __builtin_cpu_supports("avx512vpopcntdq");
#endif
  f["onednn_int8"] = onednn_int8_supported();  // AMX-INT8 and the oneDNN ops: the "onednn" conv
  return f;
}

bool cpu_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Firing rates
// ---------------------------------------------------------------------------------------------

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

// Fraction of set bits among the packed input words.
static double packed_rate(const at::Tensor& x_packed) {
  const uint32_t* p = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  const int64_t n = x_packed.numel();
  if (n == 0) return 0.0;
  return static_cast<double>(count_set_bits(p, n)) / (32.0 * static_cast<double>(n));
}

// The fraction of nonzero values of float spikes, from 64 evenly spaced runs of 256 values
// (the algorithm choice only needs an estimate; a full pass would read the whole input twice).
static double sampled_rate(const float* x, int64_t n) {
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

// ---------------------------------------------------------------------------------------------
// The rules
// ---------------------------------------------------------------------------------------------

static bool event_below(double rate) {
  const Isa isa = active_isa();
  const double max_rate = isa == Isa::kAvx512 ? kAutoRules.event_max_rate_avx512
                          : isa == Isa::kAvx2 ? kAutoRules.event_max_rate_avx2
                                              : kAutoRules.event_max_rate_other;
  return rate < max_rate;
}

bool use_event_packed(const at::Tensor& x_packed) {
  const ConvAlgo a = algo_config().conv;
  if (a != ConvAlgo::kAuto) return a == ConvAlgo::kEvent;
  return event_below(packed_rate(x_packed));
}

bool use_event_float(const float* x, int64_t n) {
  const ConvAlgo a = algo_config().conv;
  if (a != ConvAlgo::kAuto) return a == ConvAlgo::kEvent;
  return event_below(sampled_rate(x, n));
}

bool use_onednn_infer(int64_t Ho, int64_t Wo, int64_t Ci, int64_t Co) {
  const ConvAlgo a = algo_config().conv;
  if (a != ConvAlgo::kAuto) return a == ConvAlgo::kOnednn;
  return Ho * Wo >= kAutoRules.onednn_min_pixels &&
         Ci * Co >= kAutoRules.onednn_min_channel_pairs && onednn_int8_supported();
}

GradXChoice choose_grad_x(int64_t stride, int64_t W, int64_t Ci, int64_t weights,
                          int64_t combo_bytes, const uint32_t* mask_words, int64_t n_words) {
  const GradXAlgo a = algo_config().grad_x;
  GradXChoice c;
  c.ternary = stride == 1 && active_isa() == Isa::kAvx512 &&
              (a == GradXAlgo::kTernary || a == GradXAlgo::kCombo ||
               (a == GradXAlgo::kAuto && W >= kAutoRules.ternary_min_width));
  c.combos = a == GradXAlgo::kCombo;
  if (c.ternary && a == GradXAlgo::kAuto) {
    const int64_t nnz = count_set_bits(mask_words, n_words);
    const double density = static_cast<double>(nnz) / static_cast<double>(weights);
    c.combos = density >= kAutoRules.combo_min_density &&
               Ci >= kAutoRules.combo_min_in_channels &&
               combo_bytes <= kAutoRules.combo_max_bytes;
    c.ternary = c.combos || density <= kAutoRules.ternary_max_density;
  }
  return c;
}

bool unfold_pays(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t unfold_bytes) {
  return static_cast<double>(KH * KW) >=
             kAutoRules.unfold_min_taps_per_pixel * static_cast<double>(H * W) &&
         unfold_bytes <= kAutoRules.unfold_max_bytes;
}

bool use_margined_grad_x(int64_t Ho, int64_t Wo) {
  const GradXAlgo a = algo_config().grad_x;
  return (a == GradXAlgo::kAuto || a == GradXAlgo::kDense) &&
         Ho * Wo >= kAutoRules.margined_grad_x_min_pixels;
}

bool use_unfold_grad_x(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t unfold_bytes) {
  const GradXAlgo a = algo_config().grad_x;
  if (a != GradXAlgo::kAuto) return a == GradXAlgo::kUnfold;
  return unfold_pays(H, W, KH, KW, unfold_bytes);
}

bool use_unfold_grad_w(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t unfold_bytes) {
  const GradWAlgo a = algo_config().grad_w;
  if (a != GradWAlgo::kAuto) return a == GradWAlgo::kUnfold;
  return unfold_pays(H, W, KH, KW, unfold_bytes);
}

bool use_dense_grad_w(const at::Tensor& x_packed, int64_t grad_floats) {
  const GradWAlgo a = algo_config().grad_w;
  if (a != GradWAlgo::kAuto) return a == GradWAlgo::kDense || a == GradWAlgo::kTaps;
  const bool large = grad_floats * static_cast<int64_t>(sizeof(float)) >
                     kAutoRules.grad_w_large_bytes;
  return packed_rate(x_packed) >= (large ? kAutoRules.grad_w_dense_min_rate_large
                                         : kAutoRules.grad_w_dense_min_rate);
}

bool use_taps_grad_w(int64_t Ho, int64_t Wo) {
  const GradWAlgo a = algo_config().grad_w;
  if (a != GradWAlgo::kAuto) return a == GradWAlgo::kTaps;
  return Ho * Wo <= kAutoRules.taps_grad_w_max_pixels;
}

bool use_int8_grad_x(int64_t stride, int64_t padding, int64_t KH, int64_t KW, int64_t Ho,
                     int64_t Wo) {
  const GradXAlgo a = algo_config().grad_x;
  if (stride != 1 || padding > KH - 1 || padding > KW - 1) return false;
  if (a != GradXAlgo::kAuto) return a == GradXAlgo::kInt8;
  return onednn_int8_supported() && Ho * Wo >= kAutoRules.int8_grad_x_min_pixels &&
         Ho * Wo <= kAutoRules.int8_grad_x_max_pixels;
}

bool use_int8_grad_w(const at::Tensor& x_packed, int64_t stride, int64_t Ho, int64_t Wo,
                     int64_t Hp, int64_t Wp, int64_t grad_floats) {
  const GradWAlgo a = algo_config().grad_w;
  if (stride != 1 || Hp * Wp > int8_grad_w_max_grid()) return false;
  if (a != GradWAlgo::kAuto) return a == GradWAlgo::kInt8;
  if (!onednn_int8_supported() || use_taps_grad_w(Ho, Wo)) return false;
  if (use_dense_grad_w(x_packed, grad_floats)) return true;
  return packed_rate(x_packed) * static_cast<double>(Ho * Wo) >=
         kAutoRules.int8_grad_w_min_rate * static_cast<double>(Hp * Wp);
}

}  // namespace cpu
}  // namespace binslt
