// Algorithm selection of the CPU kernels: which instruction-set path runs (chosen at runtime from
// the CPU's features, never -march=native) and which algorithm each part of the conv ops runs.
// One configuration holds the forced choices ("auto" in a field: the measured rules); per call,
// plan_forward / plan_backward (cpu_algos.cpp, where the rules are written down once) turn it
// and the call's shapes into a named plan that the drivers execute. Python sets the
// configuration through binslt.ops.cpu_algorithms and asks for plans through binslt.ops.plan.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "binslt/bconv_cpu.h"

namespace binslt {
namespace cpu {

enum class Isa : int8_t { kAuto = -1, kScalar = 0, kPopcnt = 1, kAvx2 = 2, kAvx512 = 3 };

// Forward: bit-parallel AND + popcount over every input word ("dense", bconv_popcount.h), or the
// sum of the weight columns of the input spikes ("event", bconv_event.h), or, for inference on a
// CPU with AMX-INT8, oneDNN's int8 convolution of the 0/1 spikes and the {-1, 0, +1} weights
// ("onednn", bconv_onednn.cpp; inference only).
enum class ConvAlgo : int8_t { kAuto = -1, kDense = 0, kEvent = 1, kOnednn = 2 };

// Input gradient: the dense transposed convolution of ATen, the ternary add/subtract kernel
// (AVX-512, stride 1) in its plain or its combination form (bconv_input_grad.cpp), or the whole
// conv as one matrix over a small map ("unfold", bconv_unfold.cpp), or, at stride 1 on a CPU with
// AMX-INT8, oneDNN's int8 convolution of dZ's three int8 limbs with the {-1, 0, +1} weight
// ("int8", bconv_grad_int8.cpp); "margined" is the dense form from dZ channel-last with zero margins (stride 1), "pointwise" one
// matrix product (a 1x1 kernel at stride 1 without padding: the linear layers).
enum class GradXAlgo : int8_t {
  kAuto = -1, kDense = 0, kTernary = 1, kCombo = 2, kUnfold = 3, kInt8 = 4, kMargined = 5,
  kPointwise = 6
};

// Weight gradient: sums of dZ rows over the input's set bits ("event", bconv_weight_grad.cpp),
// or ATen's dense weight-gradient convolution of the unpacked 0/1 input ("dense": a GEMM, whose
// cost does not follow the spikes but which streams dZ through the cache in blocks), or the
// unfold form's GEMM over the pixel pairs of a small map and its fold into taps ("unfold"), or
// the dense form as one GEMM per tap over the pixel pairs it joins ("taps", bconv_weight_grad.cpp:
// no padding multiplied, for small maps), or, at stride 1, the dense form as exact int8 x int8
// products of dZ's three int8 limbs and the 0/1 input ("int8", bconv_grad_int8.cpp: AMX-INT8
// through ATen's _int_mm where the CPU has it), or one matrix product ("pointwise", as for the
// input gradient).
enum class GradWAlgo : int8_t {
  kAuto = -1, kEvent = 0, kDense = 1, kUnfold = 2, kTaps = 3, kInt8 = 4, kPointwise = 5
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
// whether the call is inference (bconv_lif_infer) and the input's fraction of set bits.
struct ForwardQuery {
  ConvShape s;
  int64_t Ci;
  bool infer;
  LazyValue rate;
};

// The backward's: also whether dL/dx is wanted, and the fraction of nonzero weights.
struct BackwardQuery {
  ConvShape s;
  int64_t Ci;
  bool need_grad_x;
  LazyValue rate;
  LazyValue weight_density;
};

// Forward algorithms (the ConvAlgo names).
enum class FwdPlan : int8_t { kDense, kEvent, kOnednn };
// Input-gradient algorithms: the GradXAlgo names, and "margined" (the dense conv from the
// channel-last zero-margined dZ), "pointwise" (one matrix product, 1x1 stride 1 unpadded),
// "none" (dL/dx not wanted).
enum class GradXPlan : int8_t {
  kNone, kDense, kMargined, kTernary, kCombo, kUnfold, kInt8, kPointwise
};
// Weight-gradient algorithms: the GradWAlgo names and "pointwise".
enum class GradWPlan : int8_t { kEvent, kDense, kTaps, kUnfold, kInt8, kPointwise };

const char* plan_name(FwdPlan a);
const char* plan_name(GradXPlan a);
const char* plan_name(GradWPlan a);

struct ForwardPlan {
  Isa isa;
  FwdPlan conv;
  std::string describe() const;  // "isa=avx2 forward=event"
};

struct BackwardPlan {
  Isa isa;
  GradXPlan grad_x;
  GradWPlan grad_w;
  // The float forms the int8 forms give way to where dZ holds a value that is not finite (it
  // has no int8 limbs): the plan's own choice when it is not int8.
  GradXPlan grad_x_nonfinite;
  GradWPlan grad_w_nonfinite;
  bool nonfinite = false;  // set by the driver where an int8 form gave way
  std::string describe() const;  // "isa=avx2 grad_x=dense grad_w=event"
};

// The one decision point of each op (a forced algorithm is validated here: ValueError naming
// why it cannot run this call).
ForwardPlan plan_forward(const ForwardQuery& q);
BackwardPlan plan_backward(const BackwardQuery& q);

// Python-visible: the plan a call would take, from shapes. x_shape [T, N, Ci, H, W], w_shape
// [Co, Ci, kh, kw], rate the input's fraction of spikes (infer: float spikes in);
// {"isa", "forward"} / {"isa", "grad_x", "grad_w"} -> name.
std::map<std::string, std::string> plan_forward_for(const std::vector<int64_t>& x_shape,
                                                    const std::vector<int64_t>& w_shape,
                                                    int64_t stride, int64_t padding, double rate,
                                                    bool infer);
std::map<std::string, std::string> plan_backward_for(const std::vector<int64_t>& x_shape,
                                                     const std::vector<int64_t>& w_shape,
                                                     int64_t stride, int64_t padding,
                                                     double rate, double weight_density,
                                                     bool need_grad_x);

// Fraction of set bits among packed input words, and the sampled nonzero fraction of n float
// spikes.
double packed_rate(const at::Tensor& x_packed);
double sampled_rate(const float* x, int64_t n);

// Inference: oneDNN's int8 convolution (AMX) where PyTorch has it and the CPU has AMX-INT8.
bool onednn_int8_supported();

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
