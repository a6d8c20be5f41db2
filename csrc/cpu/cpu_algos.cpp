// Algorithm selection of the CPU kernels (see binslt/cpu_algos.h): the configuration, the ISA
// detection, and the measured rules that "auto" applies.
#include "binslt/cpu_algos.h"
#include "binslt/bconv_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iterator>
#include <mutex>

#include <unistd.h>

#include "binslt/checks.h"
#include "binslt/pack_cpu.h"

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
  // Weight gradient: the dense GEMM forms from this fraction of set bits in the packed input
  // (grad_w_dense_min_rate_large where the gradient is over grad_w_large_bytes: the event form's
  // schedule in blocks of images, see weight_grad). Measured: at 128->128 16x16, N=32, T=4 the
  // event form (per image) was 0.6-0.95x the GEMM's time up to rate 0.5 (an A/B of
  // bconv_lif_bwd on a 2-core AMD EPYC with AVX-512, event vs dense, interleaved medians). Large
  // gradients, 2-core AMD EPYC with AVX2, `benchmarks/cpu_algos.py --shape T,N,Ci,Co,H --rates
  // 0.1,0.2,0.3,0.5,0.7 --isas avx2` (part weight_grad, the call with the LIF/BN stage), event /
  // the best GEMM form at those rates: 256->256 8x8 N=32 0.33, 0.51, 0.72, 1.17, 1.60; 512->512
  // 4x4 N=32 0.43, 0.58, 0.79, 1.28, 1.78; 256->512 4x4 N=32 0.45, 0.57, 0.74, 1.13, 1.60;
  // 128->256 8x8 N=32 0.42, 0.56, 0.76, 1.14, 1.48; 128->256 8x8 N=8 0.42, 0.57, 0.72, 1.11,
  // 1.42; 256->256 8x8 N=8 0.39, 0.55, 0.75, 1.10, 1.46: crossing at 0.4-0.45 whatever dZ's size
  // (over all images at once, before the blocks, the crossover fell with dZ's size, to ~0.12 at
  // 8 MiB).
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
  // cost loses (512->512 2x2: 2.5 event -> 3.5; 2048->256 1x1: 0.37 -> 0.63). With float spikes
  // out (a layer called on its own) oneDNN lost where the counts went through a transpose into
  // the bit kernels' tiles: the same Xeon, plan_check.py (T=4, N=16 anchor 128->128 16x16 rate
  // 0.15, VGG-11's convs at N=8), event against onednn: anchor 3.6 vs 6.9 ms, 64->64 32x32 4.0
  // vs 6.3, 256->256 8x8 1.7 vs 2.5, 512->512 4x4 3.1 vs 3.7 (dense 2.9). Its float output is now
  // its packed words unpacked, and the anchor still runs faster on the event kernel (2.7 vs 4.6
  // ms), so the table takes it for packed output only (a measured key may still pick it).
  int64_t onednn_min_pixels;
  int64_t onednn_min_channel_pairs;
  // Weight gradient where the CPU has AMX-INT8: the int8 limb form at any stride, from this
  // fraction of set input bits at stride 1, instead of the event, dense and tap forms (the unfold
  // form keeps maps of a few pixels; a pointwise conv takes it only where the dense rule holds).
  // Since the limb form's unfold vectorised (AVX-512BW) and its limb unit comes from the LIF/BN
  // stage, it leads the event form nearly everywhere: the 2-core Xeon with AMX, 2026-12-06, the
  // measured keys of the VGG-11 and ResNet-19 N=32 T=4 search steps (BINSLT_PLAN_MEASURE=all,
  // grad_w alone, ms int8 / event / dense): ResNet-19 64->128 32x32 at rate 0.25-0.30 33.0 / 73.7 /
  // 96.2; 128->128 32x32 at 0.20-0.25 59.0 / 105.3 / 186.4, with a residual at 0.15-0.20 56.7 /
  // 74.4; the stride-2 128->256 32x32 25.4 / 153.7 / 107.9 and 256->512 16x16 29.3 / 109.8 / 82.2
  // (the rule took event at stride 2); 256->256 16x16 47.9 / 71.6, with a residual 47.8 / 51.4;
  // 512->512 8x8 63.1 / 69.5, with a residual at 0.10-0.20 64.1-65.5 / 59.0-60.9 (event 8 % ahead,
  // the one loss); VGG-11 pooled 64->64 32x32 22.8 / 28.7, 128->128 16x16 17.3 / 19.2, 256->256 8x8
  // 15.5 / 15.3, 512->512 4x4 20.6 / 25.0 (taps 28.5). The rule before (event below a rate of 0.18
  // of the padded grid, stride 1 only) cost ResNet-19's step ~9 % (4288 -> 3926 ms with int8
  // forced, 6 interleaved steps each). Below a rate of ~0.12 the event form's work, which follows
  // the spikes, wins again: plan_check.py's anchor (128->128 16x16, N=16, T=4, train_fwdbwd, ms
  // event / int8) at rate 0.05 19.8 / 24.0, 0.15 24.1 / 24.8, 0.30 29.9 / 25.4.
  double int8_grad_w_min_rate;
  // ... but the event form on mid-sized maps of few output channels below a rate: at stride 1,
  // at most int8_grad_w_event_max_channels output channels, (taps_grad_w_max_pixels,
  // int8_grad_w_event_max_pixels] output pixels and a rate below int8_grad_w_event_max_rate.
  // Since the event form's scratch rows sit on 64-byte lines it leads there (the 2-core Xeon
  // with AMX, 2026-12-07, ms event / int8): plan_check.py's anchor (128->128 16x16, N=16, rate
  // 0.2, train_fwdbwd) at T=4 21.3 / 23.3, T=8 38.0 / 44.0, at rate 0.30 28.0 / 25.1; VGG-11's
  // N=32 search step, its pooled 128->128 16x16 at rate 0.15-0.20 (measured key, grad_w alone)
  // 12.5 / 15.8; while at 32x32 (ResNet-19's 128->128 at rate 0.20-0.25, 73.8 / 60.6) and from
  // 256 output channels (ResNet-19's 256->256 16x16 at 0.15-0.20, 61.8 / 47.5) int8 stays ahead.
  int64_t int8_grad_w_event_max_channels;
  int64_t int8_grad_w_event_max_pixels;
  double int8_grad_w_event_max_rate;
  // Input gradient where the CPU has AMX-INT8: the int8 limb form on maps of
  // [int8_grad_x_min_pixels, int8_grad_x_max_pixels] output pixels (the range measured; 2x2 and
  // 1x1 take the unfold form), at any stride. At stride 2 (one conv per pair of stride classes),
  // the 2-core Xeon with AMX, ResNet-19's N=32 T=4 layers, the whole backward call with the int8
  // weight gradient, medians of 5 interleaved, ms dense / int8: 128->256 32x32 176.9 / 99.0,
  // 256->512 16x16 147.7 / 85.7. The same replayed calls, whole call ms, dense /
  // ternary / int8: 512->512 4x4 pooled 62.4 / 195 / 58.9; 256->256 8x8 pooled 53.1 / 83.0 /
  // 36.8; 128->256 8x8 31.5 / 46.2 / 23.4; 128->128 16x16 pooled 52.8 / 49.6 / 38.1; 64->64
  // 32x32 pooled 104.1 / 90.7 / 76.0 (the ternary form was auto at 16x16 and 32x32). At 4x4 the
  // dense conv is ahead again (the same Xeon, 2026-12-06, VGG-11 N=32 search step, measured
  // keys, ms dense / int8: 512->512 pooled 32.1 / 38.4, 256->512 15.8 / 16.4; plan_check.py at
  // N=8, whole layer: 54.1 / 62.9 and 29.5 / 33.8), so the range starts at 8x8 -- for the
  // convolution. Below it, at stride 1, the int8 form runs as one matrix product over the
  // unfolded limbs (int8_grad_x_unfolds, bconv_cpu.h), which leads the dense conv there: the
  // same Xeon, 2026-12-07, measured keys, ms dense / int8 unfolded: 512->512 4x4 pooled
  // 27.2 / 14.6, 256->512 4x4 13.3 / 9.3.
  int64_t int8_grad_x_min_pixels;
  int64_t int8_grad_x_max_pixels;
  // ... from this many (input, output) channel pairs: the whole backward call with the int8
  // weight gradient (benchmarks-style op loop, T=4, medians of 30, ms dense / int8 unfolded):
  // 256->256 4x4 N=32 11.6-12.0 / 8.4-9.4, 128->256 N=32 6.6-7.1 / 5.5-6.0, and below, the
  // default search's N=64 layers, 128->128 6.6 / 5.8-6.0 and 64->128 3.8-3.9 / 3.6-3.8. There a
  // few percent of the call would change that search's gradient rounding, which moves its
  // 30-epoch result (98.89 -> 98.61 % with the rule at every 4x4 map): the dense form stays.
  int64_t int8_unfolded_grad_x_min_channel_pairs;
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
    /*grad_w_dense_min_rate_large=*/0.4,
    /*grad_w_large_bytes=*/1 << 20,
    /*unfold_min_taps_per_pixel=*/2.0,
    /*unfold_max_bytes=*/64 << 20,
    /*margined_grad_x_min_pixels=*/1024,
    /*taps_grad_w_max_pixels=*/16,
    /*onednn_min_pixels=*/16,
    /*onednn_min_channel_pairs=*/64 * 64,
    /*int8_grad_w_min_rate=*/0.1,
    /*int8_grad_w_event_max_channels=*/128,
    /*int8_grad_w_event_max_pixels=*/256,
    /*int8_grad_w_event_max_rate=*/0.25,
    /*int8_grad_x_min_pixels=*/64,
    /*int8_grad_x_max_pixels=*/1024,
    /*int8_unfolded_grad_x_min_channel_pairs=*/128 * 256,
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
    case GradWAlgo::kPointwise: return "pointwise";
    case GradWAlgo::kBf16x3: return "bf16x3";
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
    case GradXAlgo::kMargined: return "margined";
    case GradXAlgo::kPointwise: return "pointwise";
    case GradXAlgo::kBf16x3: return "bf16x3";
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
                                          GradXAlgo::kUnfold, GradXAlgo::kInt8,
                                          GradXAlgo::kMargined, GradXAlgo::kPointwise,
                                          GradXAlgo::kBf16x3};
  static constexpr GradWAlgo kGradWs[] = {GradWAlgo::kAuto, GradWAlgo::kEvent,
                                          GradWAlgo::kDense, GradWAlgo::kUnfold,
                                          GradWAlgo::kTaps, GradWAlgo::kInt8,
                                          GradWAlgo::kPointwise, GradWAlgo::kBf16x3};
  AlgoConfig c;
  c.isa = parse_choice(isa, "isa path", kIsas, &isa_name);
  c.conv = parse_choice(conv, "conv algorithm", kConvs, &conv_name);
  c.grad_x = parse_choice(grad_x, "input-gradient algorithm", kGradXs, &grad_x_name);
  c.grad_w = parse_choice(grad_w, "weight-gradient algorithm", kGradWs, &grad_w_name);
  TORCH_CHECK(c.isa == Isa::kAuto || isa_supported(c.isa), "binslt: this CPU cannot run the '",
              isa, "' path");
  TORCH_CHECK(c.grad_x != GradXAlgo::kInt8 || onednn_int8_runs(),
              "binslt: the 'int8' input gradient (oneDNN's int8 convolution) needs a CPU with "
              "AMX-INT8 or AVX-512 VNNI and a PyTorch built with oneDNN; this machine has not "
              "both");
  TORCH_CHECK((c.grad_x != GradXAlgo::kTernary && c.grad_x != GradXAlgo::kCombo) ||
                  isa_supported(Isa::kAvx512),
              "binslt: the '", grad_x, "' input-gradient kernel needs AVX-512, which this CPU "
              "lacks");
  TORCH_CHECK(c.conv != ConvAlgo::kOnednn || onednn_int8_runs(),
              "binslt: the 'onednn' conv (oneDNN's int8 convolution) needs a CPU with AMX-INT8 "
              "or AVX-512 VNNI and a PyTorch built with oneDNN; this machine has not both");
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
  f["onednn_int8_forced"] = onednn_int8_runs();  // ... or VNNI: the int8 forms run when forced
  f["bf16_matrix"] = bf16_matrix_supported();  // AMX-BF16 and oneDNN: "bf16x3" on the engine
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
double packed_rate(const at::Tensor& x_packed) {
  const uint32_t* p = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  const int64_t n = x_packed.numel();
  if (n == 0) return 0.0;
  return static_cast<double>(count_set_bits(p, n)) / (32.0 * static_cast<double>(n));
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

// ---------------------------------------------------------------------------------------------
// The plans
// ---------------------------------------------------------------------------------------------

const char* plan_name(FwdPlan a) {
  switch (a) {
    case FwdPlan::kDense: return "dense";
    case FwdPlan::kEvent: return "event";
    case FwdPlan::kAten: return "aten";
    default: return "onednn";
  }
}

const char* plan_name(GradXPlan a) {
  switch (a) {
    case GradXPlan::kNone: return "none";
    case GradXPlan::kDense: return "dense";
    case GradXPlan::kMargined: return "margined";
    case GradXPlan::kTernary: return "ternary";
    case GradXPlan::kCombo: return "combo";
    case GradXPlan::kUnfold: return "unfold";
    case GradXPlan::kInt8: return "int8";
    case GradXPlan::kBf16x3: return "bf16x3";
    default: return "pointwise";
  }
}

const char* plan_name(GradWPlan a) {
  switch (a) {
    case GradWPlan::kEvent: return "event";
    case GradWPlan::kDense: return "dense";
    case GradWPlan::kTaps: return "taps";
    case GradWPlan::kUnfold: return "unfold";
    case GradWPlan::kInt8: return "int8";
    case GradWPlan::kBf16x3: return "bf16x3";
    default: return "pointwise";
  }
}

const char* source_name(PlanSource p) {
  switch (p) {
    case PlanSource::kForced: return "forced";
    case PlanSource::kMeasured: return "measured";
    case PlanSource::kMeasuring: return "measuring";
    default: return "table";
  }
}

std::string ForwardPlan::describe() const {
  return c10::str("isa=", isa_name(isa), " forward=", plan_name(conv), " source=",
                  source_name(source));
}

// One source where both gradients agree (dL/dx not wanted: the weight gradient's), else
// "<grad_x's>/<grad_w's>".
std::string BackwardPlan::describe() const {
  const bool one = source_x == source_w || grad_x == GradXPlan::kNone;
  const std::string src =
      one ? std::string(source_name(source_w))
          : c10::str(source_name(source_x), "/", source_name(source_w));
  return c10::str("isa=", isa_name(isa), " grad_x=", plan_name(grad_x), " grad_w=",
                  plan_name(grad_w), " source=", src,
                  nonfinite ? " (int8 gave way: dZ not finite)" : "");
}

namespace {

// The geometry facts the rules and the checks of forced choices share.
struct Facts {
  const ConvShape& s;
  int64_t Ci;
  bool pointwise;    // 1x1 kernel, stride 1, no padding: both gradients are matrix products
  bool margins_fit;  // stride 1 and padding <= kernel - 1: dZ's zero margins give the
                     // transposed conv as a forward conv (the margined and int8 input gradients)
  int64_t unfold_bytes;
  int64_t grad_w_floats;
  explicit Facts(const ConvShape& sh, int64_t ci)
      : s(sh),
        Ci(ci),
        pointwise(sh.KH == 1 && sh.KW == 1 && sh.stride == 1 && sh.padding == 0),
        margins_fit(sh.stride == 1 && sh.padding <= sh.KH - 1 && sh.padding <= sh.KW - 1),
        unfold_bytes(unfold_matrix_bytes(sh, ci)),
        grad_w_floats(sh.Co * ci * sh.KH * sh.KW) {}
  int64_t pixels() const { return s.Ho * s.Wo; }
  bool unfold_pays() const {
    return static_cast<double>(s.KH * s.KW) >=
               kAutoRules.unfold_min_taps_per_pixel * static_cast<double>(s.H * s.W) &&
           unfold_bytes <= kAutoRules.unfold_max_bytes;
  }
};

[[noreturn]] void cannot(const char* field, const char* name, const std::string& why) {
  TORCH_CHECK_VALUE(false, "binslt: the forced ", field, " '", name, "' cannot run this call: ",
                    why, "; force another algorithm or 'auto' (binslt.ops.cpu_algorithms), and "
                    "see binslt.ops.plan for the plan a call takes");
  __builtin_unreachable();
}

std::string shape_of(const Facts& f) {
  return c10::str(f.s.KH, "x", f.s.KW, " kernel, stride ", f.s.stride, ", padding ", f.s.padding,
                  ", ", f.s.H, "x", f.s.W, " input");
}

void check_unfold(const Facts& f, const char* field) {
  if (f.unfold_bytes > (int64_t{1} << 30))
    cannot(field, "unfold", c10::str("it would build a ", f.unfold_bytes >> 20, " MiB matrix for "
                                     "this ", f.s.H, "x", f.s.W, " map (it is meant for maps of "
                                     "a few pixels)"));
}

// The dense weight-gradient forms pay from a firing rate (a lower one for a large gradient).
bool dense_grad_w_rule(const Facts& f, double rate) {
  if (f.grad_w_floats * static_cast<int64_t>(sizeof(float)) <= kAutoRules.grad_w_large_bytes)
    return rate >= kAutoRules.grad_w_dense_min_rate;
  return rate >= kAutoRules.grad_w_dense_min_rate_large;
}

GradWPlan forced_grad_w(const Facts& f, GradWAlgo a) {
  const char* field = "weight-gradient algorithm";
  switch (a) {
    case GradWAlgo::kEvent: return GradWPlan::kEvent;
    case GradWAlgo::kDense: return GradWPlan::kDense;
    case GradWAlgo::kTaps: return GradWPlan::kTaps;
    case GradWAlgo::kUnfold:
      check_unfold(f, field);
      return GradWPlan::kUnfold;
    case GradWAlgo::kInt8:
      if (f.s.Wo > int8_grad_w_max_pixels())
        cannot(field, "int8", c10::str("its output rows may have at most ",
                                       int8_grad_w_max_pixels(), " pixels, this one has ",
                                       f.s.Wo));
      return GradWPlan::kInt8;
    case GradWAlgo::kBf16x3: return GradWPlan::kBf16x3;
    default:
      if (!f.pointwise)
        cannot(field, "pointwise", c10::str("it needs a 1x1 kernel at stride 1 without padding, "
                                            "this conv has a ", shape_of(f)));
      return GradWPlan::kPointwise;
  }
}

// The float input-gradient rule: the ternary kernels (AVX-512, stride 1) where a row fills their
// vectors and the weight density suits them, the dense transposed conv otherwise.
GradXPlan float_grad_x_rule(const Facts& f, Isa isa, const BackwardQuery& q) {
  if (f.s.stride != 1 || isa != Isa::kAvx512 || f.s.W < kAutoRules.ternary_min_width)
    return GradXPlan::kDense;
  const double density = q.weight_density.get();
  const int64_t combo = ternary_combo_bytes(f.s);
  if (density >= kAutoRules.combo_min_density && f.Ci >= kAutoRules.combo_min_in_channels &&
      combo <= kAutoRules.combo_max_bytes)
    return GradXPlan::kCombo;
  return density <= kAutoRules.ternary_max_density ? GradXPlan::kTernary : GradXPlan::kDense;
}

GradXPlan forced_grad_x(const Facts& f, Isa isa, GradXAlgo a) {
  const char* field = "input-gradient algorithm";
  switch (a) {
    case GradXAlgo::kDense: return GradXPlan::kDense;
    case GradXAlgo::kTernary:
    case GradXAlgo::kCombo: {
      const char* name = a == GradXAlgo::kTernary ? "ternary" : "combo";
      if (isa != Isa::kAvx512)
        cannot(field, name, c10::str("it needs the avx512 path, the kernels run the ",
                                     isa_name(isa), " one"));
      if (f.s.stride != 1)
        cannot(field, name, c10::str("it runs at stride 1 only, this conv has stride ",
                                     f.s.stride));
      return a == GradXAlgo::kTernary ? GradXPlan::kTernary : GradXPlan::kCombo;
    }
    case GradXAlgo::kUnfold:
      check_unfold(f, field);
      return GradXPlan::kUnfold;
    case GradXAlgo::kBf16x3: return GradXPlan::kBf16x3;
    case GradXAlgo::kInt8: return GradXPlan::kInt8;
    case GradXAlgo::kMargined:
      if (!f.margins_fit)
        cannot(field, "margined", c10::str("it needs stride 1 and padding <= kernel size - 1, "
                                           "this conv has a ", shape_of(f)));
      return GradXPlan::kMargined;
    default:
      if (!f.pointwise)
        cannot(field, "pointwise", c10::str("it needs a 1x1 kernel at stride 1 without padding, "
                                            "this conv has a ", shape_of(f)));
      return GradXPlan::kPointwise;
  }
}

}  // namespace

// The rules, in one place. Every threshold is a field of kAutoRules (above, with the
// measurements behind it). A forced field of the configuration (cpu_algorithms) replaces the
// rule of its part and runs exactly that algorithm: where it cannot run the call, ValueError
// says why (nothing is rewritten into another algorithm).
//
// Forward (plan_forward):
//   * "onednn" for inference with packed output only, on a CPU with AMX-INT8, for maps of at
//     least onednn_min_pixels output pixels and layers of at least onednn_min_channel_pairs
//     (Ci, Co) pairs (the training forward takes it where measured faster: its second pass from
//     the stored counts costs what the bit kernels' does, so only deep layers gain);
//   * else "event" where the counts fit int16 (Ci*kh*kw <= 32767; its lanes accumulate in int16)
//     and the input's fraction of set bits is below event_max_rate_<isa> (its work follows the
//     spikes, the dense kernel's the vector width);
//   * else "dense".
// Weight gradient (plan_backward), in this order:
//   * "unfold" where the kernel's taps are at least unfold_min_taps_per_pixel times the input's
//     pixels (a 3x3 kernel over 1x1, 1x2, 2x2) and its matrix is at most unfold_max_bytes (not for
//     a pointwise conv: 1x1, stride 1, no padding, whose product is already per pixel);
//   * "int8" on a CPU with AMX-INT8, at any stride; at stride 1 from int8_grad_w_min_rate, or on
//     maps of at most taps_grad_w_max_pixels output pixels at any rate (a pointwise conv only
//     where the dense rule holds); not at stride 1 on maps of (taps_grad_w_max_pixels,
//     int8_grad_w_event_max_pixels] output pixels with at most int8_grad_w_event_max_channels
//     output channels below int8_grad_w_event_max_rate (there the float rule's form);
//   * the dense rule: the input's rate at least grad_w_dense_min_rate (grad_w_dense_min_rate_large
//     for a gradient over grad_w_large_bytes) -> "pointwise" for a pointwise conv, "taps" on maps
//     of at most taps_grad_w_max_pixels output pixels, "dense" otherwise;
//   * else "event".
// Input gradient ("none" when dL/dx is not wanted), in this order:
//   * "pointwise" for a pointwise conv; "unfold" where the unfold rule above holds;
//   * "int8" on a CPU with AMX-INT8 (any stride: one conv per pair of stride classes), for maps
//     of [int8_grad_x_min_pixels, int8_grad_x_max_pixels] output pixels, and at stride 1 on
//     maps where its unfolded execution runs (int8_grad_x_unfolds: at most 16 input pixels)
//     from int8_unfolded_grad_x_min_channel_pairs channel pairs;
//   * on the avx512 path at stride 1 on rows of at least ternary_min_width: "combo" from a weight
//     density of combo_min_density with at least combo_min_in_channels input channels and
//     planes within combo_max_bytes, else "ternary" up to ternary_max_density;
//   * else the dense conv: "margined" (from the weight gradient's channel-last zero-margined copy
//     of dZ) at stride 1 with padding <= kernel - 1 on maps of at least margined_grad_x_min_pixels
//     output pixels when the weight gradient is "event" or "int8", "dense" (NCHW) otherwise.
// The int8 forms give way to float forms where dZ is not finite (grad_*_nonfinite): the rule's
// float choice under "auto", "event" / "dense" when int8 was forced.
//
// Measuring (measure_mode(): "forward" by default, "all" adds the backward) replaces the rule of
// an "auto" field by the fastest of its candidates, timed on the first call of each key (the op,
// shapes, variant, ISA path, threads and the input's rate bucket) and cached (memory and
// the JSON file); only calls of the ops measure (op set), never queries from shapes:
//   * forward: "dense", "event" (int16 counts), "onednn" (AMX-INT8: inference, and the
//     training forward, which stores oneDNN's counts and runs the bit kernels' second pass); the
//     affine op "aten" and "onednn";
//   * weight gradient: "event", "dense", "taps" (maps of at most measure_taps_max_pixels),
//     "unfold" (matrix within unfold_max_bytes, not pointwise), "int8" (AMX-INT8),
//     "pointwise" (pointwise convs);
//   * input gradient: "dense", "margined" and "int8" (AMX-INT8) where the margins fit, "ternary"
//     and "combo" (avx512 path, stride 1), "unfold", "pointwise".
// A cached winner that is not among the call's candidates is ignored (and timed again).
namespace {

constexpr int64_t kMeasureTapsMaxPixels = 256;  // the tap form's candidacy (one GEMM per tap)

std::vector<FwdPlan> forward_candidates(const ForwardQuery& q, bool int16) {
  std::vector<FwdPlan> v;
  if (q.affine) {
    v.push_back(FwdPlan::kAten);
  } else {
    v.push_back(FwdPlan::kDense);
    if (int16) v.push_back(FwdPlan::kEvent);
  }
  if (onednn_int8_supported() && (q.affine || q.Ci > 0)) v.push_back(FwdPlan::kOnednn);
  return v;
}

std::vector<GradWPlan> grad_w_candidates(const Facts& f) {
  std::vector<GradWPlan> v{GradWPlan::kEvent, GradWPlan::kDense};
  if (f.pixels() <= kMeasureTapsMaxPixels) v.push_back(GradWPlan::kTaps);
  if (!f.pointwise && f.unfold_bytes <= kAutoRules.unfold_max_bytes)
    v.push_back(GradWPlan::kUnfold);
  if (f.s.Wo <= int8_grad_w_max_pixels() && onednn_int8_supported())
    v.push_back(GradWPlan::kInt8);
  if (bf16_matrix_supported()) v.push_back(GradWPlan::kBf16x3);
  if (f.pointwise) v.push_back(GradWPlan::kPointwise);
  return v;
}

std::vector<GradXPlan> grad_x_candidates(const Facts& f, Isa isa) {
  std::vector<GradXPlan> v{GradXPlan::kDense};
  if (f.margins_fit) v.push_back(GradXPlan::kMargined);
  if (isa == Isa::kAvx512 && f.s.stride == 1) {
    v.push_back(GradXPlan::kTernary);
    v.push_back(GradXPlan::kCombo);
  }
  if (!f.pointwise && f.unfold_bytes <= kAutoRules.unfold_max_bytes)
    v.push_back(GradXPlan::kUnfold);
  if (onednn_int8_supported()) v.push_back(GradXPlan::kInt8);
  if (bf16_matrix_supported()) v.push_back(GradXPlan::kBf16x3);
  if (f.pointwise) v.push_back(GradXPlan::kPointwise);
  return v;
}

std::string measure_key(const char* op, const char* part, const ConvShape& s, int64_t Ci,
                        const std::string& variant, Isa isa, double rate) {
  return c10::str(op, part, " ", conv_shapes(s, Ci), variant.empty() ? "" : " ", variant,
                  " isa=", isa_name(isa), " threads=", at::get_num_threads(), " ",
                  rate_bucket(rate));
}

// The measured choice of one field: the cached winner where it is a candidate (plan field and
// source set, true), else the candidates to time and the key (false); nothing with one
// candidate.
template <class Alg>
void apply_measurement(const std::vector<Alg>& cands, const std::string& key, Alg* choice,
                       PlanSource* source, std::vector<Alg>* to_time, std::string* key_out) {
  if (cands.size() < 2) return;
  const std::string w = measured_winner(key);
  for (Alg c : cands)
    if (!w.empty() && w == plan_name(c)) {
      *choice = c;
      *source = PlanSource::kMeasured;
      return;
    }
  *to_time = cands;
  *key_out = key;
}

}  // namespace

ForwardPlan plan_forward(const ForwardQuery& q) {
  const AlgoConfig cfg = algo_config();
  const ConvShape& s = q.s;
  ForwardPlan plan{active_isa(), q.affine ? FwdPlan::kAten : FwdPlan::kDense};
  const bool int16 = s.Cw > 0 && counts_dtype(s.Cw, s.KH, s.KW) == at::kShort;
  const char* field = "conv algorithm";
  if (cfg.conv != ConvAlgo::kAuto) plan.source = PlanSource::kForced;
  if (q.affine && cfg.conv != ConvAlgo::kAuto) {  // no bit kernels: "onednn" or ATen's conv
    if (cfg.conv == ConvAlgo::kOnednn) plan.conv = FwdPlan::kOnednn;
    return plan;
  }
  switch (cfg.conv) {
    case ConvAlgo::kDense:
      return plan;
    case ConvAlgo::kEvent:
      if (!int16)
        cannot(field, "event", c10::str("its lanes accumulate in int16 and this layer's counts "
                                        "need int32 (Ci*kh*kw = ", 32 * s.Cw * s.KH * s.KW,
                                        " > 32767)"));
      plan.conv = FwdPlan::kEvent;
      return plan;
    case ConvAlgo::kOnednn:
      plan.conv = FwdPlan::kOnednn;
      return plan;
    default:
      break;
  }
  if (q.affine) {
    if (onednn_int8_supported()) plan.conv = FwdPlan::kOnednn;
  } else if (q.infer && q.packed_out && s.Ho * s.Wo >= kAutoRules.onednn_min_pixels &&
             q.Ci * s.Co >= kAutoRules.onednn_min_channel_pairs && onednn_int8_supported()) {
    plan.conv = FwdPlan::kOnednn;
  } else if (int16) {
    const double max_rate = plan.isa == Isa::kAvx512 ? kAutoRules.event_max_rate_avx512
                            : plan.isa == Isa::kAvx2 ? kAutoRules.event_max_rate_avx2
                                                     : kAutoRules.event_max_rate_other;
    if (q.rate.get() < max_rate) plan.conv = FwdPlan::kEvent;
  }
  if (q.op != nullptr && measure_mode() != MeasureMode::kOff)
    apply_measurement(forward_candidates(q, int16),
                      measure_key(q.op, "", s, q.Ci, q.variant, plan.isa, q.rate.get()),
                      &plan.conv, &plan.source, &plan.candidates, &plan.key);
  return plan;
}

BackwardPlan plan_backward(const BackwardQuery& q) {
  const AlgoConfig cfg = algo_config();
  const Facts f(q.s, q.Ci);
  BackwardPlan plan{active_isa(), GradXPlan::kNone, GradWPlan::kEvent, GradXPlan::kNone,
                    GradWPlan::kEvent};
  // Weight gradient.
  GradWPlan float_w = GradWPlan::kEvent;  // the rule without the split forms
  const bool measure = q.op != nullptr && measure_mode() == MeasureMode::kAll;
  if (cfg.grad_w != GradWAlgo::kAuto) {
    plan.grad_w = forced_grad_w(f, cfg.grad_w);
    float_w = split_form(plan.grad_w) ? GradWPlan::kEvent : plan.grad_w;
    plan.source_w = PlanSource::kForced;
  } else if (!f.pointwise && f.unfold_pays()) {
    plan.grad_w = float_w = GradWPlan::kUnfold;
  } else {
    const bool dense = dense_grad_w_rule(f, q.rate.get());
    float_w = !dense ? GradWPlan::kEvent
              : f.pointwise ? GradWPlan::kPointwise
              : f.pixels() <= kAutoRules.taps_grad_w_max_pixels ? GradWPlan::kTaps
                                                                 : GradWPlan::kDense;
    const bool event_leads = f.s.stride == 1 && !f.pointwise &&
                             f.s.Co <= kAutoRules.int8_grad_w_event_max_channels &&
                             f.pixels() > kAutoRules.taps_grad_w_max_pixels &&
                             f.pixels() <= kAutoRules.int8_grad_w_event_max_pixels &&
                             q.rate.get() < kAutoRules.int8_grad_w_event_max_rate;
    const bool int8 = f.s.Wo <= int8_grad_w_max_pixels() && onednn_int8_supported() &&
                      (!f.pointwise || dense) && !event_leads &&
                      (f.s.stride > 1 || q.rate.get() >= kAutoRules.int8_grad_w_min_rate ||
                       (!f.pointwise && f.pixels() <= kAutoRules.taps_grad_w_max_pixels));
    // (The bf16x3 form is a measured candidate on AMX-BF16, not in the table: no AMX-BF16
    // timings of it yet.)
    plan.grad_w = int8 ? GradWPlan::kInt8 : float_w;
  }
  if (measure && cfg.grad_w == GradWAlgo::kAuto) {
    apply_measurement(grad_w_candidates(f),
                      measure_key(q.op, " grad_w", q.s, q.Ci, q.variant, plan.isa, q.rate.get()),
                      &plan.grad_w, &plan.source_w, &plan.candidates_w, &plan.key_w);
    if (!split_form(plan.grad_w)) float_w = plan.grad_w;
  }
  plan.grad_w_nonfinite = float_w;
  if (!q.need_grad_x) return plan;
  // Input gradient.
  auto dense_layout = [&](GradWPlan w) {
    return f.margins_fit && f.pixels() >= kAutoRules.margined_grad_x_min_pixels &&
                   (w == GradWPlan::kEvent || w == GradWPlan::kInt8)
               ? GradXPlan::kMargined
               : GradXPlan::kDense;
  };
  if (cfg.grad_x != GradXAlgo::kAuto) {
    plan.grad_x = forced_grad_x(f, plan.isa, cfg.grad_x);
    plan.grad_x_nonfinite = split_form(plan.grad_x) ? GradXPlan::kDense : plan.grad_x;
    plan.source_x = PlanSource::kForced;
    return plan;
  } else if (f.pointwise) {
    plan.grad_x = plan.grad_x_nonfinite = GradXPlan::kPointwise;
  } else if (f.unfold_pays()) {
    plan.grad_x = plan.grad_x_nonfinite = GradXPlan::kUnfold;
  } else {
    GradXPlan float_x = float_grad_x_rule(f, plan.isa, q);
    if (float_x == GradXPlan::kDense) float_x = dense_layout(plan.grad_w);
    const bool int8 = onednn_int8_supported() &&
                      ((f.pixels() >= kAutoRules.int8_grad_x_min_pixels &&
                        f.pixels() <= kAutoRules.int8_grad_x_max_pixels) ||
                       (int8_grad_x_unfolds(f.s) &&
                        q.Ci * f.s.Co >= kAutoRules.int8_unfolded_grad_x_min_channel_pairs));
    plan.grad_x = int8 ? GradXPlan::kInt8 : float_x;
    plan.grad_x_nonfinite = float_x;
  }
  if (measure) {
    // The rate bucket and the weight density's tenth (the ternary forms' work follows it).
    const std::string variant =
        c10::str(q.variant, q.variant.empty() ? "" : " ", "wd",
                 static_cast<int>(q.weight_density.get() * 10.0));
    apply_measurement(grad_x_candidates(f, plan.isa),
                      measure_key(q.op, " grad_x", q.s, q.Ci, variant, plan.isa, q.rate.get()),
                      &plan.grad_x, &plan.source_x, &plan.candidates_x, &plan.key_x);
    if (!split_form(plan.grad_x)) plan.grad_x_nonfinite = plan.grad_x;
  }
  return plan;
}

// ---------------------------------------------------------------------------------------------
// Measuring: the mode, and the cache of winners (memory, and the JSON file binslt.ops.plan
// names and loads; written here, whole, to a temporary file renamed over it)
// ---------------------------------------------------------------------------------------------

namespace {

std::atomic<int> g_measure{-1};  // -1: BINSLT_PLAN_MEASURE decides

struct CacheEntry {
  std::string winner;
  std::map<std::string, double> ms;
};

struct PlanCache {
  std::mutex mu;
  std::map<std::string, CacheEntry> entries;
  std::string path, cpu, build;
};

PlanCache& plan_cache() {
  static PlanCache* c = new PlanCache();  // never destroyed: ops may run during exit
  return *c;
}

std::string json_string(const std::string& v) {
  std::string o = "\"";
  for (char ch : v) {
    if (ch == '"' || ch == '\\') {
      o += '\\';
      o += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      o += buf;
    } else {
      o += ch;
    }
  }
  return o + "\"";
}

// The file: {"format": 1, "cpu": ..., "build": ..., "plans": {key: {"plan": name,
// "ms": {candidate: ms}}}}. Called with the lock held; a failure to write warns (the winners
// stay in memory).
void write_cache(const PlanCache& c) {
  if (c.path.empty()) return;
  std::string out = c10::str("{\n  \"format\": 1,\n  \"cpu\": ", json_string(c.cpu),
                             ",\n  \"build\": ", json_string(c.build), ",\n  \"plans\": {");
  bool first = true;
  for (const auto& [key, e] : c.entries) {
    out += c10::str(first ? "\n    " : ",\n    ", json_string(key), ": {\"plan\": ",
                    json_string(e.winner), ", \"ms\": {");
    bool f2 = true;
    for (const auto& [name, ms] : e.ms) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.4f", ms);
      out += c10::str(f2 ? "" : ", ", json_string(name), ": ", buf);
      f2 = false;
    }
    out += "}}";
    first = false;
  }
  out += "\n  }\n}\n";
  const std::string tmp = c10::str(c.path, ".tmp", static_cast<int64_t>(getpid()));
  FILE* fp = std::fopen(tmp.c_str(), "w");
  bool ok = fp != nullptr && std::fwrite(out.data(), 1, out.size(), fp) == out.size();
  if (fp != nullptr) ok = std::fclose(fp) == 0 && ok;
  ok = ok && std::rename(tmp.c_str(), c.path.c_str()) == 0;
  if (!ok) {
    std::remove(tmp.c_str());
    TORCH_WARN_ONCE("binslt: could not write the measured CPU plans to ", c.path,
                    " (they stay in memory for this process); set BINSLT_CACHE_DIR to a "
                    "writable directory");
  }
}

}  // namespace

MeasureMode measure_mode() {
  const int m = g_measure.load(std::memory_order_relaxed);
  if (m >= 0) return static_cast<MeasureMode>(m);
  const char* v = std::getenv("BINSLT_PLAN_MEASURE");
  if (v == nullptr || v[0] == '\0') return MeasureMode::kForward;
  if (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0) return MeasureMode::kOff;
  if (std::strcmp(v, "1") == 0 || std::strcmp(v, "all") == 0) return MeasureMode::kAll;
  if (std::strcmp(v, "forward") == 0) return MeasureMode::kForward;
  TORCH_WARN_ONCE("binslt: BINSLT_PLAN_MEASURE='", v, "' is not one of 0, off, forward, 1, all; "
                  "measuring the forward ops (the default)");
  return MeasureMode::kForward;
}

void set_measure_mode(const std::string& mode) {
  int m = mode == "off" ? 0 : mode == "forward" ? 1 : mode == "all" ? 2 : mode == "env" ? -1 : -2;
  TORCH_CHECK_VALUE(m != -2, "binslt.ops.plan.measure: the mode must be 'off', 'forward', 'all' "
                    "or 'env', got '", mode, "'");
  g_measure.store(m, std::memory_order_relaxed);
}

std::string measure_mode_name() {
  switch (measure_mode()) {
    case MeasureMode::kOff: return "off";
    case MeasureMode::kAll: return "all";
    default: return "forward";
  }
}

std::string rate_bucket(double rate) {
  static constexpr double kEdges[] = {0.0,  0.02, 0.05, 0.1, 0.15, 0.2,
                                      0.25, 0.3,  0.4,  0.5, 0.7,  1.0};
  size_t i = 0;
  while (i + 2 < std::size(kEdges) && rate >= kEdges[i + 1]) ++i;
  char buf[32];
  std::snprintf(buf, sizeof buf, "r%.2f-%.2f", kEdges[i], kEdges[i + 1]);
  return buf;
}

std::string measured_winner(const std::string& key) {
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const auto it = c.entries.find(key);
  return it == c.entries.end() ? std::string() : it->second.winner;
}

void record_measurement(const std::string& key, const std::string& winner,
                        const std::vector<std::pair<std::string, double>>& ms) {
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  CacheEntry& e = c.entries[key];
  e.winner = winner;
  e.ms.clear();
  for (const auto& [name, t] : ms) e.ms[name] = t;
  write_cache(c);
}

void plan_cache_configure(const std::string& path, const std::string& cpu,
                          const std::string& build) {
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.path = path;
  c.cpu = cpu;
  c.build = build;
}

void plan_cache_insert(const std::string& key, const std::string& winner,
                       const std::map<std::string, double>& ms) {
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.entries[key] = CacheEntry{winner, ms};
}

std::map<std::string, std::map<std::string, double>> plan_cache_entries() {
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  std::map<std::string, std::map<std::string, double>> out;
  for (const auto& [key, e] : c.entries) out[key] = e.ms;
  return out;
}

std::map<std::string, std::string> plan_cache_winners() {
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  std::map<std::string, std::string> out;
  for (const auto& [key, e] : c.entries) out[key] = e.winner;
  return out;
}

void plan_cache_clear() {
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.entries.clear();
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ---------------------------------------------------------------------------------------------
// Plans from shapes (binslt.ops.plan), and the plan log
// ---------------------------------------------------------------------------------------------

namespace {

ConvShape shape_from(const std::vector<int64_t>& x_shape, const std::vector<int64_t>& w_shape,
                     int64_t stride, int64_t padding) {
  TORCH_CHECK_VALUE(x_shape.size() == 5, "binslt.ops.plan: x_shape must be [T, N, Ci, H, W], "
                    "got ", at::IntArrayRef(x_shape));
  TORCH_CHECK_VALUE(w_shape.size() == 4, "binslt.ops.plan: weight_shape must be [Co, Ci, kh, "
                    "kw], got ", at::IntArrayRef(w_shape));
  for (int64_t d : x_shape)
    TORCH_CHECK_VALUE(d >= 1, "binslt.ops.plan: x_shape must be positive, got ",
                      at::IntArrayRef(x_shape));
  for (int64_t d : w_shape)
    TORCH_CHECK_VALUE(d >= 1, "binslt.ops.plan: weight_shape must be positive, got ",
                      at::IntArrayRef(w_shape));
  TORCH_CHECK_VALUE(x_shape[2] == w_shape[1], "binslt.ops.plan: x_shape's Ci (", x_shape[2],
                    ") and weight_shape's (", w_shape[1], ") differ");
  check_stride_padding("plan", stride, padding);
  ConvShape s;
  s.T = x_shape[0];
  s.N = x_shape[1];
  s.B = s.T * s.N;
  s.Cw = (x_shape[2] + 31) / 32;
  s.H = x_shape[3];
  s.W = x_shape[4];
  s.Co = w_shape[0];
  s.KH = w_shape[2];
  s.KW = w_shape[3];
  s.stride = stride;
  s.padding = padding;
  const OutHW o = check_out_hw("plan", s.H, s.W, s.KH, s.KW, stride, padding);
  s.Ho = o.Ho;
  s.Wo = o.Wo;
  return s;
}

// The fraction of set bits in the packed words of an input whose spikes fire at `rate` (the
// words' unused high bits are zero).
double bit_rate(const ConvShape& s, const std::vector<int64_t>& x_shape, double rate) {
  return rate * static_cast<double>(x_shape[2]) / static_cast<double>(32 * s.Cw);
}

void check_fraction(const char* name, double v) {
  TORCH_CHECK_VALUE(v >= 0.0 && v <= 1.0, "binslt.ops.plan: ", name, " must be a fraction in "
                    "[0, 1], got ", v);
}

std::atomic<bool> g_verbose{false};

}  // namespace

std::map<std::string, std::string> plan_forward_for(const std::vector<int64_t>& x_shape,
                                                    const std::vector<int64_t>& w_shape,
                                                    int64_t stride, int64_t padding, double rate,
                                                    const std::string& op, bool packed_out) {
  check_fraction("rate", rate);
  TORCH_CHECK_VALUE(op == "bconv_lif" || op == "bconv_lif_infer" || op == "bconv_affine_infer",
                    "binslt.ops.plan: op must be 'bconv_lif', 'bconv_lif_infer' or "
                    "'bconv_affine_infer', got '", op, "'");
  const ConvShape s = shape_from(x_shape, w_shape, stride, padding);
  const bool infer = op == "bconv_lif_infer", affine = op == "bconv_affine_infer";
  // The inference op samples its float spikes; the others count the packed words' bits.
  ForwardQuery q{s, x_shape[2], infer, LazyValue(infer ? rate : bit_rate(s, x_shape, rate))};
  q.affine = affine;
  q.packed_out = infer && packed_out;
  const ForwardPlan p = plan_forward(q);
  return {{"isa", isa_name(p.isa)}, {"forward", plan_name(p.conv)},
          {"source", source_name(p.source)}};
}

std::map<std::string, std::string> plan_backward_for(const std::vector<int64_t>& x_shape,
                                                     const std::vector<int64_t>& w_shape,
                                                     int64_t stride, int64_t padding,
                                                     double rate, double weight_density,
                                                     bool need_grad_x) {
  check_fraction("rate", rate);
  check_fraction("weight_density", weight_density);
  const ConvShape s = shape_from(x_shape, w_shape, stride, padding);
  const BackwardPlan p = plan_backward({s, x_shape[2], need_grad_x,
                                        LazyValue(bit_rate(s, x_shape, rate)),
                                        LazyValue(weight_density)});
  return {{"isa", isa_name(p.isa)}, {"grad_x", plan_name(p.grad_x)},
          {"grad_w", plan_name(p.grad_w)},
          {"source", p.source_x == p.source_w || !need_grad_x
                         ? std::string(source_name(p.source_w))
                         : c10::str(source_name(p.source_x), "/", source_name(p.source_w))}};
}

bool plan_verbose() {
  if (g_verbose.load(std::memory_order_relaxed)) return true;
  const char* v = std::getenv("BINSLT_VERBOSE");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

void set_plan_verbose(bool on) { g_verbose.store(on, std::memory_order_relaxed); }

PlanLog::PlanLog(const char* op)
    : op_(op), on_(plan_verbose()), start_(std::chrono::steady_clock::now()) {}

void PlanLog::emit(const std::string& shapes, const std::string& plan) const {
  if (!on_) return;
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_)
          .count();
  std::fprintf(stderr, "binslt_verbose,cpu,%s,%s,%s,%.3f\n", op_, shapes.c_str(), plan.c_str(),
               ms);
  std::fflush(stderr);
}

std::string conv_shapes(const ConvShape& s, int64_t Ci) {
  return c10::str("x=", s.T, "x", s.N, "x", Ci, "x", s.H, "x", s.W, " w=", s.Co, "x", Ci, "x",
                  s.KH, "x", s.KW, " stride=", s.stride, " padding=", s.padding);
}

}  // namespace cpu
}  // namespace binslt
