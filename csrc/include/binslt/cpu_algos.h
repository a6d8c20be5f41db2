// Algorithm selection of the CPU kernels: which instruction-set path runs (chosen at runtime from
// the CPU's features, never -march=native), which forward algorithm bconv_lif takes and which
// input-gradient algorithm bconv_lif_bwd takes. One configuration holds the three choices; "auto"
// in a field lets the measured rules in cpu_algos.cpp decide. Python sets it through
// binslt.ops.cpu_algorithms (binslt/_cpu_algos.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>

namespace binslt {
namespace cpu {

enum class Isa : int8_t { kAuto = -1, kScalar = 0, kPopcnt = 1, kAvx2 = 2, kAvx512 = 3 };

// Forward: bit-parallel AND + popcount over every input word ("dense", bconv_popcount.h), or the
// sum of the weight columns of the input spikes ("event", bconv_event.h), or, for inference on a
// CPU with AMX-INT8, oneDNN's int8 convolution of the 0/1 spikes and the {-1, 0, +1} weights
// ("onednn", bconv_onednn.cpp; the training forward then takes "dense").
enum class ConvAlgo : int8_t { kAuto = -1, kDense = 0, kEvent = 1, kOnednn = 2 };

// Input gradient: the dense transposed convolution of ATen, the ternary add/subtract kernel
// (AVX-512, stride 1) in its plain or its combination form (bconv_input_grad.cpp), or the whole
// conv as one matrix over a small map ("unfold", bconv_unfold.cpp), or, at stride 1 on a CPU with
// AMX-INT8, oneDNN's int8 convolution of dZ's three int8 limbs with the {-1, 0, +1} weight
// ("int8", bconv_grad_int8.cpp).
enum class GradXAlgo : int8_t {
  kAuto = -1, kDense = 0, kTernary = 1, kCombo = 2, kUnfold = 3, kInt8 = 4
};

// Weight gradient: sums of dZ rows over the input's set bits ("event", bconv_weight_grad.cpp),
// or ATen's dense weight-gradient convolution of the unpacked 0/1 input ("dense": a GEMM, whose
// cost does not follow the spikes but which streams dZ through the cache in blocks), or the
// unfold form's GEMM over the pixel pairs of a small map and its fold into taps ("unfold"), or
// the dense form as one GEMM per tap over the pixel pairs it joins ("taps", bconv_weight_grad.cpp:
// no padding multiplied, for small maps), or, at stride 1, the dense form as exact int8 x int8
// products of dZ's three int8 limbs and the 0/1 input ("int8", bconv_grad_int8.cpp: AMX-INT8
// through ATen's _int_mm; "auto" takes it only on a CPU with AMX-INT8).
enum class GradWAlgo : int8_t {
  kAuto = -1, kEvent = 0, kDense = 1, kUnfold = 2, kTaps = 3, kInt8 = 4
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

// Forward: the event kernel for packed input x_packed (its fraction of set bits decides under
// "auto"), or for float spikes x of n values (a sampled estimate of their nonzero fraction).
bool use_event_packed(const at::Tensor& x_packed);
bool use_event_float(const float* x, int64_t n);

// Inference: oneDNN's int8 convolution (AMX) where PyTorch has it and the CPU has AMX-INT8
// (onednn_int8_supported), for maps of at least a measured number of output pixels and layers
// of at least a measured number of channel pairs under "auto", always under "onednn".
bool onednn_int8_supported();
bool use_onednn_infer(int64_t Ho, int64_t Wo, int64_t Ci, int64_t Co);

// Input gradient: the ternary kernel (plain or combination form) or the dense one, for a conv of
// the given stride over a W-wide input with Ci input channels, `weights` = Co*kh*kw*Ci weights
// whose mask planes are mask_words[0, n_words) (their set bits are counted only under "auto"), and
// combination planes of combo_bytes per thread.
struct GradXChoice {
  bool ternary, combos;
};

// Both gradients: the unfold form for a conv whose kh*kw-tap products over an H x W input are at
// least twice the H*W pixel pairs the unfold matrix holds per output pixel (a 3x3 kernel over at
// most 2x2 pixels), and whose matrix (`unfold_bytes`) stays small; or when a field forces it.
bool unfold_pays(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t unfold_bytes);
bool use_unfold_grad_x(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t unfold_bytes);
bool use_unfold_grad_w(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t unfold_bytes);
// The dense input gradient's layout: from the margined channel-last dZ (see
// input_grad_margined) for maps of at least a measured number of output pixels, under "auto"
// and "dense" (the same ATen convolution, another memory layout).
bool use_margined_grad_x(int64_t Ho, int64_t Wo);
GradXChoice choose_grad_x(int64_t stride, int64_t W, int64_t Ci, int64_t weights,
                          int64_t combo_bytes, const uint32_t* mask_words, int64_t n_words);

// Weight gradient: the dense (GEMM) form for packed input x_packed [B, H, W, Cw] whose
// gradient has `grad_floats` = Co*Ci*kh*kw values (the input's fraction of set bits and the
// gradient's size decide under "auto").
bool use_dense_grad_w(const at::Tensor& x_packed, int64_t grad_floats);

// Where the dense form is taken: its tap form (true) for maps of at most a measured number of
// output pixels under "auto", always under "taps"; ATen's weight-gradient convolution otherwise.
bool use_taps_grad_w(int64_t Ho, int64_t Wo);

// The int8 form for a conv of this stride from a padded Hp x Wp map to Ho x Wo: under "int8"
// wherever it applies (stride 1, a map within int8_grad_w_max_grid), under "auto" there on a CPU
// with AMX-INT8 (onednn_int8_supported) for maps above the tap form's, where the dense form is
// the choice or the input fires often enough (see kAutoRules).
// The int8 input gradient for a conv of this stride and padding with a KH x KW kernel, to an
// Ho x Wo map: under "int8" wherever it applies (stride 1, padding <= kernel - 1), under "auto"
// there on a CPU with AMX-INT8 for maps of a measured size range (see kAutoRules).
bool use_int8_grad_x(int64_t stride, int64_t padding, int64_t KH, int64_t KW, int64_t Ho,
                     int64_t Wo);

bool use_int8_grad_w(const at::Tensor& x_packed, int64_t stride, int64_t Ho, int64_t Wo,
                     int64_t Hp, int64_t Wp, int64_t grad_floats);

}  // namespace cpu
}  // namespace binslt
