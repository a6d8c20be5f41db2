// The op contract on the C++ side (host code only): the argument checks that the CPU and the
// CUDA kernels share, with the messages and exception types of the Python validator
// (binslt/_contract.py), so that every backend raises the same thing for the same bad argument.
// TORCH_CHECK_VALUE raises ValueError in Python, TORCH_CHECK_TYPE raises TypeError. Device checks
// stay with each backend (their text differs by nature) but raise ValueError too.
//
// Every check runs before any allocation or launch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "binslt/lif.h"

namespace binslt {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

// Counts of a binary conv with Cw input words per position and a kh x kw kernel: int16 when every
// count fits (|count| <= 32 * Cw * kh * kw <= 32767), else int32.
inline at::ScalarType counts_dtype(int64_t Cw, int64_t kh, int64_t kw) {
  return 32 * Cw * kh * kw <= 32767 ? at::kShort : at::kInt;
}

// Output size of a convolution along one axis: (in + 2*padding - k) // stride + 1, with floor
// division (as Python's //), so a kernel larger than the padded input gives a size < 1.
inline int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t padding) {
  const int64_t n = in + 2 * padding - k;
  return (n >= 0 ? n / stride : -((-n + stride - 1) / stride)) + 1;
}

// Batch-norm statistics that a forward kernel computed over a non-empty batch: a channel whose
// mean or variance is NaN or inf means the layer's current (its input, weights or gain) is not
// finite there. An error (ValueError) rather than NaN entering the running statistics: the check
// reads the C values the kernel wrote, on the host, without a device synchronisation.
inline void check_batch_stats(const char* op, const float* mean, const float* var, int64_t C) {
  int64_t bad = 0, first = -1;
  for (int64_t c = 0; c < C; ++c) {
    if (std::isfinite(mean[c]) && std::isfinite(var[c])) continue;
    if (first < 0) first = c;
    ++bad;
  }
  TORCH_CHECK_VALUE(bad == 0, "binslt::", op, ": BN batch statistics are not finite in ", bad,
                    " of ", C, " channels (channel ", first, ": mean ",
                    first < 0 ? 0.0f : mean[first], ", var ", first < 0 ? 0.0f : var[first],
                    "); the layer's input, weights or gain hold NaN or inf");
}

// ---------------------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------------------

// tau > 0 and finite (LIF), or +inf with decay_input = false: the IF neuron, H = V + X. +inf runs
// through the LIF arithmetic unchanged ((V - V_r) / inf is a signed zero, so H = V - 0 + X = V + X
// exactly; the BPTT carry 1 - 1/inf is 1; dH/dX is 1). With decay_input = true it would be H = V:
// the input never reaches the neuron.
inline void check_tau(const char* op, double tau, bool decay_input) {
  if (std::isinf(tau) && tau > 0.0) {
    TORCH_CHECK_VALUE(!decay_input, "binslt::", op,
                      ": tau=inf (an IF neuron, no leak) needs decay_input=False: with "
                      "decay_input=True H = V and the input never reaches the neuron, got "
                      "decay_input=True");
    return;
  }
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0.0, "binslt::", op,
                    ": tau must be finite and > 0 (or +inf with decay_input=False: IF), got ",
                    tau);
}

inline void check_bn_eps(const char* op, double bn_eps) {
  TORCH_CHECK_VALUE(std::isfinite(bn_eps) && bn_eps > 0.0, "binslt::", op,
                    ": bn_eps must be finite and > 0, got ", bn_eps);
}

inline void check_stride_padding(const char* op, int64_t stride, int64_t padding) {
  TORCH_CHECK_VALUE(stride >= 1, "binslt::", op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding >= 0, "binslt::", op, ": padding must be >= 0, got ", padding);
}

// T timesteps in a packed batch of B = T*N images.
inline void check_timesteps(const char* op, int64_t T, int64_t B) {
  TORCH_CHECK_VALUE(T >= 1 && B % T == 0, "binslt::", op, ": T=", T,
                    " must be >= 1 and divide the packed batch T*N=", B);
}

// The neuron settings of an op, checked (tau, v_threshold, v_reset, surrogate, surrogate_alpha).
// The forward ops pass the defaults surrogate = 0, surrogate_alpha = 2.
inline NeuronParams checked_neuron(const char* op, double tau, bool decay_input,
                                   double v_threshold, std::optional<double> v_reset,
                                   bool detach_reset = false, int64_t surrogate = 0,
                                   double surrogate_alpha = 2.0) {
  check_tau(op, tau, decay_input);
  TORCH_CHECK_VALUE(std::isfinite(v_threshold), "binslt::", op,
                    ": v_threshold must be finite, got ", v_threshold);
  TORCH_CHECK_VALUE(!v_reset.has_value() || std::isfinite(*v_reset), "binslt::", op,
                    ": v_reset must be None (soft reset) or finite, got ", v_reset.value_or(0.0));
  TORCH_CHECK_VALUE(surrogate >= 0 && surrogate < kNumSurrogates, "binslt::", op,
                    ": surrogate must be 0 (atan), 1 (sigmoid), 2 (rect) or 3 "
                    "(piecewise_quadratic), got ", surrogate);
  TORCH_CHECK_VALUE(std::isfinite(surrogate_alpha) && surrogate_alpha > 0.0, "binslt::", op,
                    ": surrogate_alpha must be finite and > 0, got ", surrogate_alpha);
  return neuron_params(tau, decay_input, v_threshold, v_reset.has_value(), v_reset.value_or(0.0),
                       detach_reset, surrogate, surrogate_alpha);
}

// ---------------------------------------------------------------------------------------------
// Tensors (the caller checks the device first)
// ---------------------------------------------------------------------------------------------

// The device check of the CPU kernels.
inline void check_on_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "binslt::", op, ": ", name,
                    " must be a CPU tensor for the CPU kernel, got device ", t.device());
}

// A CPU kernel's tensor argument: on the CPU, of the given rank (< 0: any) and exact dtype;
// layout says what is expected.
inline void check_cpu_tensor(const at::Tensor& t, const char* op, const char* name, int64_t rank,
                             at::ScalarType dtype, const char* layout) {
  check_on_cpu(t, op, name);
  TORCH_CHECK(rank < 0 || t.dim() == rank, "binslt::", op, ": ", name, " must have rank ", rank,
              " (", layout, "), got shape ", shape_str(t));
  TORCH_CHECK(t.scalar_type() == dtype, "binslt::", op, ": ", name, " must be ", dtype, " (",
              layout, "), got ", t.scalar_type());
}

// A per-channel vector (alpha, scale, shift, mean, var): 1-D of length c, any floating dtype;
// returned as contiguous float32.
inline at::Tensor channel_vec(const at::Tensor& t, const char* op, const char* name, int64_t c) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == c, "binslt::", op, ": ", name,
                    " must have shape [", c, "] (one value per output channel), got ",
                    shape_str(t));
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "binslt::", op, ": ", name,
                   " must be a floating tensor, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// channel_vec for a CPU kernel.
inline at::Tensor cpu_channel_vec(const at::Tensor& t, const char* op, const char* name,
                                  int64_t c) {
  check_on_cpu(t, op, name);
  return channel_vec(t, op, name, c);
}

// The device checks of the CUDA kernels: a CUDA tensor, on the device of ref.
inline void check_on_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "binslt::", op, ": ", name,
                    " must be a CUDA tensor for the CUDA kernel, got device ", t.device());
}
inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name) {
  check_on_cuda(t, op, name);
  TORCH_CHECK_VALUE(t.device() == ref.device(), "binslt::", op, ": ", name, " is on ",
                    t.device(), " but the other inputs are on ", ref.device());
}

// The exact dtype of a CUDA kernel's tensor argument (TypeError).
inline void check_dtype(const at::Tensor& t, const char* op, const char* name,
                        at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "binslt::", op, ": ", name, " must be ", dtype,
                   ", got ", t.scalar_type());
}

// channel_vec for a CUDA kernel (on the device of ref).
inline at::Tensor cuda_channel_vec(const at::Tensor& t, const at::Tensor& ref, const char* op,
                                   const char* name, int64_t c) {
  check_same_device(t, ref, op, name);
  return channel_vec(t, op, name, c);
}

// A tensor shaped like the output (residual, grad_spikes): the given shape, any floating dtype;
// returned as contiguous float32.
inline at::Tensor output_like(const at::Tensor& t, at::IntArrayRef shape, const char* op,
                              const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "binslt::", op, ": ", name, " must have shape ", shape,
                    ", got ", shape_str(t));
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "binslt::", op, ": ", name,
                   " must be a floating tensor, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// The packed weight planes agree with each other and with the packed input (x_words words per
// position in the tensor named xname).
inline void check_weight_planes(const char* op, const at::Tensor& w_mask, const at::Tensor& w_pos,
                                const char* xname, int64_t x_words) {
  TORCH_CHECK_VALUE(w_mask.sizes() == w_pos.sizes(), "binslt::", op,
                    ": w_mask and w_pos must have the same shape, got ", shape_str(w_mask),
                    " and ", shape_str(w_pos));
  TORCH_CHECK_VALUE(w_mask.dim() == 4 && w_mask.size(0) >= 1 && w_mask.size(1) >= 1 &&
                        w_mask.size(2) >= 1,
                    "binslt::", op,
                    ": w_mask must be [Co, kh, kw, Cw] (from pack_weight) with at least one "
                    "output channel and a kernel of at least 1x1, got shape ",
                    shape_str(w_mask));
  TORCH_CHECK_VALUE(w_mask.size(3) == x_words, "binslt::", op, ": the weight has ",
                    w_mask.size(3), " words per position but ", xname, " has ", x_words,
                    " (pack both with the same in_channels)");
}

// The output size of an H x W input with a kh x kw kernel (Ho, Wo >= 1).
struct OutHW {
  int64_t Ho, Wo;
};
inline OutHW check_out_hw(const char* op, int64_t H, int64_t W, int64_t kh, int64_t kw,
                          int64_t stride, int64_t padding) {
  const OutHW o{out_size(H, kh, stride, padding), out_size(W, kw, stride, padding)};
  TORCH_CHECK_VALUE(o.Ho >= 1 && o.Wo >= 1, "binslt::", op, ": input ", H, "x", W,
                    " is smaller than the kernel ", kh, "x", kw, " with padding ", padding);
  return o;
}

// The inference input x: float spikes [T, N, C, H, W] or packed words [T, N, H, W, Cw] int32
// (-> true).
inline bool check_infer_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 5, "binslt::", op,
                    ": x must be spikes [T, N, C, H, W] (or packed words [T, N, H, W, Cw] "
                    "int32), got shape ",
                    shape_str(x));
  if (x.scalar_type() == at::kInt) return true;
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "binslt::", op,
                   ": x must be floating-point spikes (0. or 1.) or packed int32 words, got ",
                   x.scalar_type());
  return false;
}

// Fused max-pooling of the output spikes: pool = 1 (none) or 2 (2x2, stride 2), which needs an
// output of at least 2x2.
inline void check_pool(const char* op, int64_t pool, int64_t Ho, int64_t Wo) {
  TORCH_CHECK_VALUE(pool == 1 || pool == 2, "binslt::", op, ": pool must be 1 or 2, got ", pool);
  TORCH_CHECK_VALUE(Ho >= pool && Wo >= pool, "binslt::", op, ": pool=", pool,
                    " needs a conv output of at least ", pool, "x", pool, ", got ", Ho, "x", Wo);
}

}  // namespace binslt
