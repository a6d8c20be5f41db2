// Algorithm selection of the CPU kernels: which instruction-set path runs (chosen at runtime from
// the CPU's features, never -march=native) and which algorithm each part of the conv ops runs.
// One configuration holds the forced choices ("auto" in a field: the measured rules); per call,
// plan_forward / plan_backward (cpu_algos.cpp, where the rules are written down once) turn it
// and the call's shapes into a named plan that the drivers execute. Python sets the
// configuration through binslt.ops.cpu_algorithms and asks for plans through binslt.ops.plan.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "binslt/bconv_cpu.h"

namespace binslt {
namespace cpu {

enum class Isa : int8_t { kAuto = -1, kScalar = 0, kPopcnt = 1, kAvx2 = 2, kAvx512 = 3 };

// Forward: bit-parallel AND + popcount over every input word ("dense", bconv_popcount.h), or the
// sum of the weight columns of the input spikes ("event", bconv_event.h), or, for inference on a
// CPU with AMX-INT8, oneDNN's int8 convolution of the 0/1 spikes and the {-1, 0, +1} weights
// ("onednn", bconv_onednn.cpp; inference only). bconv_affine_infer (BinConv2d's no-grad op) has
// no bit kernels: it runs "onednn" or ATen's float convolution of the 0/1 spikes (the plan
// "aten", which a forced "dense" or "event" runs there).
enum class ConvAlgo : int8_t { kAuto = -1, kDense = 0, kEvent = 1, kOnednn = 2 };

// Input gradient: the dense transposed convolution of ATen, the ternary add/subtract kernel
// (AVX-512, stride 1) in its plain or its combination form (bconv_input_grad.cpp), or the whole
// conv as one matrix over a small map ("unfold", bconv_unfold.cpp), or, at stride 1 on a CPU with
// AMX-INT8, oneDNN's int8 convolution of dZ's three int8 limbs with the {-1, 0, +1} weight
// ("int8", bconv_grad_int8.cpp), or the dense form as three products of bf16-exact parts of
// alpha * dZ with the {-1, 0, +1} weight ("bf16x3", bconv_grad_bf16.cpp: a bf16 matrix engine
// through oneDNN where the CPU has AMX-BF16); "margined" is the dense form from dZ channel-last
// with zero margins (stride 1), "pointwise" one matrix product (a 1x1 kernel at stride 1 without
// padding: the linear layers).
enum class GradXAlgo : int8_t {
  kAuto = -1, kDense = 0, kTernary = 1, kCombo = 2, kUnfold = 3, kInt8 = 4, kMargined = 5,
  kPointwise = 6, kBf16x3 = 7
};

// Weight gradient: sums of dZ rows over the input's set bits ("event", bconv_weight_grad.cpp),
// or ATen's dense weight-gradient convolution of the unpacked 0/1 input ("dense": a GEMM, whose
// cost does not follow the spikes but which streams dZ through the cache in blocks), or the
// unfold form's GEMM over the pixel pairs of a small map and its fold into taps ("unfold"), or
// the dense form as one GEMM per tap over the pixel pairs it joins ("taps", bconv_weight_grad.cpp:
// no padding multiplied, for small maps), or, at stride 1, the dense form as exact int8 x int8
// products of dZ's three int8 limbs and the 0/1 input ("int8", bconv_grad_int8.cpp: AMX-INT8
// through ATen's _int_mm where the CPU has it), or the dense form as three products of dZ's
// bf16-exact parts and the 0/1 input ("bf16x3", as for the input gradient), or one matrix product
// ("pointwise", as for the input gradient).
enum class GradWAlgo : int8_t {
  kAuto = -1, kEvent = 0, kDense = 1, kUnfold = 2, kTaps = 3, kInt8 = 4, kPointwise = 5,
  kBf16x3 = 6
};

struct AlgoConfig {
  Isa isa = Isa::kAuto;
  ConvAlgo conv = ConvAlgo::kAuto;
  GradXAlgo grad_x = GradXAlgo::kAuto;
  GradWAlgo grad_w = GradWAlgo::kAuto;  // four bytes: the configuration is one lock-free atomic
};

AlgoConfig algo_config();

// Python-visible: the configuration by name ({"isa", "conv", "grad_x", "grad_w"} -> name), and
// setting all four at once (ValueError for an unknown name, RuntimeError for a path this CPU
// cannot run).
std::map<std::string, std::string> cpu_algorithms();
void set_cpu_algorithms(const std::string& isa, const std::string& conv,
                        const std::string& grad_x, const std::string& grad_w);

bool isa_supported(Isa isa);
Isa best_isa();    // what "auto" runs on this CPU
Isa active_isa();  // the forced path, else best_isa()
const char* isa_name(Isa isa);

// Python-visible: the path the kernels take now, and the raw CPU feature flags behind it.
std::string cpu_kernel_isa();
std::map<std::string, bool> cpu_feature_flags();
bool cpu_openmp();

// Set bits among n packed words (input spikes, weight mask planes), hardware popcount where the
// CPU has it, in parallel.
int64_t count_set_bits(const uint32_t* p, int64_t n);

// ---------------------------------------------------------------------------------------------
// Plans: which algorithm each part of a conv op runs, decided once per call by plan_forward /
// plan_backward (cpu_algos.cpp, where the rules are described) and executed by the drivers.
// ---------------------------------------------------------------------------------------------

// A value computed only when a rule needs it (the input's firing rate costs a pass over it).
class LazyValue {
 public:
  LazyValue() = default;
  explicit LazyValue(double v) : value_(v), known_(true) {}
  explicit LazyValue(std::function<double()> f) : f_(std::move(f)) {}
  double get() const {
    if (!known_) {
      value_ = f_ ? f_() : 0.0;
      known_ = true;
    }
    return value_;
  }

 private:
  std::function<double()> f_;
  mutable double value_ = 0.0;
  mutable bool known_ = false;
};

// What the forward plan depends on: the geometry, the input channels (32*Cw for packed input),
// whether the call is inference (bconv_lif_infer) and the input's fraction of set bits; affine:
// the call is bconv_affine_infer. op names the calling op (nullptr: a query from shapes, which
// never measures) and variant what else its key holds (input dtype and layout, output kind).
struct ForwardQuery {
  ConvShape s;
  int64_t Ci;
  bool infer;
  LazyValue rate;
  bool affine = false;
  const char* op = nullptr;
  std::string variant;
  bool packed_out = false;  // the inference op writes pack_spikes words
};

// The backward's: also whether dL/dx is wanted, and the fraction of nonzero weights.
struct BackwardQuery {
  ConvShape s;
  int64_t Ci;
  bool need_grad_x;
  LazyValue rate;
  LazyValue weight_density;
  const char* op = nullptr;
  std::string variant;
};

// Where a plan's choice came from: the rules' table, a forced configuration, the measurement
// cache ("measured"), or the timing of the candidates in this very call ("measuring").
enum class PlanSource : int8_t { kTable, kForced, kMeasured, kMeasuring };
const char* source_name(PlanSource p);

// Measuring (binslt.ops.plan.measure, env BINSLT_PLAN_MEASURE): off, the forward ops only
// (their algorithms give bit-identical outputs: the default), or the backward too (its
// algorithms' gradients agree within float rounding, so which one wins decides the rounding).
enum class MeasureMode : int8_t { kOff = 0, kForward = 1, kAll = 2 };
MeasureMode measure_mode();
// "off" / "forward" / "all", or "env" to follow BINSLT_PLAN_MEASURE again.
void set_measure_mode(const std::string& mode);
std::string measure_mode_name();

// Forward algorithms (the ConvAlgo names).
enum class FwdPlan : int8_t { kDense, kEvent, kOnednn, kAten };
// Input-gradient algorithms: the GradXAlgo names, and "margined" (the dense conv from the
// channel-last zero-margined dZ), "pointwise" (one matrix product, 1x1 stride 1 unpadded),
// "none" (dL/dx not wanted).
enum class GradXPlan : int8_t {
  kNone, kDense, kMargined, kTernary, kCombo, kUnfold, kInt8, kPointwise, kBf16x3
};
// Weight-gradient algorithms: the GradWAlgo names and "pointwise".
enum class GradWPlan : int8_t { kEvent, kDense, kTaps, kUnfold, kInt8, kPointwise, kBf16x3 };

// The split forms (int8, bf16x3) have no parts for a dZ that is not finite: they give way to a
// float form there.
inline bool split_form(GradXPlan a) { return a == GradXPlan::kInt8 || a == GradXPlan::kBf16x3; }
inline bool split_form(GradWPlan a) { return a == GradWPlan::kInt8 || a == GradWPlan::kBf16x3; }

const char* plan_name(FwdPlan a);
const char* plan_name(GradXPlan a);
const char* plan_name(GradWPlan a);

struct ForwardPlan {
  Isa isa;
  FwdPlan conv;
  PlanSource source = PlanSource::kTable;
  // Set when this call is to time its candidates (measuring on, "auto", no cached winner for
  // key): the driver runs each (measure_plan) and keeps the fastest.
  std::vector<FwdPlan> candidates;
  std::string key;
  std::string describe() const;  // "isa=avx2 forward=event source=table"
};

struct BackwardPlan {
  Isa isa;
  GradXPlan grad_x;
  GradWPlan grad_w;
  // The float forms the split forms (int8, bf16x3) give way to where dZ holds a value that is
  // not finite (it has no int8 limbs or bf16 parts): the plan's own choice when it is not split.
  GradXPlan grad_x_nonfinite;
  GradWPlan grad_w_nonfinite;
  bool nonfinite = false;  // set by the driver where a split form gave way
  PlanSource source_x = PlanSource::kTable, source_w = PlanSource::kTable;
  // As ForwardPlan's, per gradient (the two are timed apart, each under its own key).
  std::vector<GradXPlan> candidates_x;
  std::vector<GradWPlan> candidates_w;
  std::string key_x, key_w;
  std::string describe() const;  // "isa=avx2 grad_x=dense grad_w=event source=table"
};

// The one decision point of each op (a forced algorithm is validated here: ValueError naming
// why it cannot run this call).
ForwardPlan plan_forward(const ForwardQuery& q);
BackwardPlan plan_backward(const BackwardQuery& q);

// Python-visible: the plan a call would take by the table (or a forced configuration), from
// shapes. x_shape [T, N, Ci, H, W], w_shape [Co, Ci, kh, kw], rate the input's fraction of
// spikes, op "bconv_lif", "bconv_lif_infer" (float spikes in) or "bconv_affine_infer";
// {"isa", "forward", "source"} / {"isa", "grad_x", "grad_w", "source"} -> name.
std::map<std::string, std::string> plan_forward_for(const std::vector<int64_t>& x_shape,
                                                    const std::vector<int64_t>& w_shape,
                                                    int64_t stride, int64_t padding, double rate,
                                                    const std::string& op, bool packed_out);
std::map<std::string, std::string> plan_backward_for(const std::vector<int64_t>& x_shape,
                                                     const std::vector<int64_t>& w_shape,
                                                     int64_t stride, int64_t padding,
                                                     double rate, double weight_density,
                                                     bool need_grad_x);

// Fraction of set bits among packed input words, and the sampled nonzero fraction of n float
// spikes.
double packed_rate(const at::Tensor& x_packed);
double sampled_rate(const float* x, int64_t n);

// ---------------------------------------------------------------------------------------------
// Measured plans: the winners of timed candidates, per key (the op, its shapes and variant, the
// ISA path, the thread count and the input's rate bucket), in memory and in a JSON file that
// binslt.ops.plan names and loads (one file per CPU model + ISA features + build).
// ---------------------------------------------------------------------------------------------

// The bucket of a fraction of set bits, "r0.10-0.15": coarse, finer at low rates where the
// event forms' work changes most.
std::string rate_bucket(double rate);
// The cached winner's name for key ("" if none).
std::string measured_winner(const std::string& key);
// Records a winner with every candidate's time (ms) and rewrites the file (temp + rename).
void record_measurement(const std::string& key, const std::string& winner,
                        const std::vector<std::pair<std::string, double>>& ms);
// Python-visible: the file (path, with the CPU and build it holds for), entries loaded from it,
// the entries now ({key: {"plan": name, "<candidate>": ms...}}), and forgetting them all.
void plan_cache_configure(const std::string& path, const std::string& cpu,
                          const std::string& build);
void plan_cache_insert(const std::string& key, const std::string& winner,
                       const std::map<std::string, double>& ms);
std::map<std::string, std::map<std::string, double>> plan_cache_entries();
std::map<std::string, std::string> plan_cache_winners();
void plan_cache_clear();

// Times each candidate of one plan field (plan.*field set to it, run(plan) -> the op's output)
// in three rounds, each in the reverse order of the one before (a drift in the machine's load
// then meets every candidate; the first round also pays one-time costs: oneDNN's primitive,
// first-touched pages), up to ten while all rounds together took under 200 ms, and returns the
// output of the fastest (minimum time), leaving it in plan.*field and recording it under key.
// The choice plan.*field held (the table's) stays unless another candidate is more than
// kMeasureMargin faster: a noisy machine then does not turn a near tie into a switch. run may
// set *invalid (e.g. an int8 form gave way on a dZ that is not finite): then nothing is
// recorded.
constexpr double kMeasureMargin = 0.05;
double now_ms();
template <class Plan, class Alg, class Run>
auto measure_plan(Plan& plan, Alg Plan::*field, const std::vector<Alg>& candidates,
                  const std::string& key, bool* invalid, Run&& run) -> decltype(run(plan)) {
  using Out = decltype(run(plan));
  const size_t n = candidates.size();
  const size_t table = static_cast<size_t>(
      std::find(candidates.begin(), candidates.end(), plan.*field) - candidates.begin());
  std::vector<double> best(n, 1e300);
  size_t lead = 0;
  Out out{}, table_out{};
  double total_ms = 0.0;
  for (int round = 0; round < 10 && (round < 3 || total_ms < 200.0); ++round) {
    for (size_t j = 0; j < n; ++j) {
      const size_t i = round % 2 == 0 ? j : n - 1 - j;
      Plan p = plan;
      p.*field = candidates[i];
      const double t0 = now_ms();
      Out o = run(p);
      const double dt = now_ms() - t0;
      total_ms += dt;
      if (dt < best[i]) best[i] = dt;
      if (i == table) table_out = o;  // (tensors: a second handle, no copy)
      if (i == lead || best[i] < best[lead]) {  // (the same output where i leads already)
        lead = i;
        out = std::move(o);
      }
    }
  }
  if (table < n && lead != table && best[table] <= (1.0 + kMeasureMargin) * best[lead]) {
    lead = table;
    out = std::move(table_out);
  }
  plan.*field = candidates[lead];
  if (!*invalid) {
    std::vector<std::pair<std::string, double>> ms;
    for (size_t i = 0; i < n; ++i) ms.emplace_back(plan_name(candidates[i]), best[i]);
    record_measurement(key, plan_name(candidates[lead]), ms);
  }
  return out;
}

// A forward op's body under its plan: run(plan), or each candidate timed (measure_plan) where
// the plan carries them, the source then "measuring".
template <class Run>
auto run_forward_plan(ForwardPlan& plan, Run&& run) -> decltype(run(plan)) {
  if (plan.candidates.empty()) return run(plan);
  bool invalid = false;
  auto out = measure_plan(plan, &ForwardPlan::conv, plan.candidates, plan.key, &invalid, run);
  plan.source = PlanSource::kMeasuring;
  return out;
}

// oneDNN's int8 convolution (the "onednn" conv, the "int8" input gradient) where PyTorch has it
// and the CPU has AMX-INT8: the plan takes those forms only here.
bool onednn_int8_supported();
// ... or AVX-512 VNNI as well: where those forms run, exact, when forced (cpu_algorithms).
bool onednn_int8_runs();
// Training: a CPU with AMX-BF16 and PyTorch's oneDNN enabled, where the "bf16x3" forms run on the
// bf16 matrix engine (they run everywhere, as float32 products elsewhere).
bool bf16_matrix_supported();

// The plan log (BINSLT_VERBOSE=1, read at each call, or binslt.ops.plan.verbose()): one line
// per op call on stderr, "binslt_verbose,cpu,<op>,<shapes>,<plan>,<ms>".
bool plan_verbose();
void set_plan_verbose(bool on);
class PlanLog {
 public:
  explicit PlanLog(const char* op);
  // Writes the line (when logging is on) with the time since construction.
  void emit(const std::string& shapes, const std::string& plan) const;
  bool on() const { return on_; }

 private:
  const char* op_;
  bool on_;
  std::chrono::steady_clock::time_point start_;
};
std::string conv_shapes(const ConvShape& s, int64_t Ci);  // "x=..x.. w=.. T=4 stride=1 padding=1"

}  // namespace cpu
}  // namespace binslt
