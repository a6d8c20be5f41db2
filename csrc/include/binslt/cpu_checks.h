// Argument checks shared by the CPU entry points: messages say what was expected and how to fix it.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "binslt/lif.h"

namespace binslt {
namespace cpu {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

// Rank, device and (exact) dtype of a tensor argument.
inline void check_tensor(const at::Tensor& t, const char* op, const char* name, int64_t rank,
                         at::ScalarType dtype, const char* layout) {
  TORCH_CHECK(t.device().is_cpu(), "binslt::", op, ": ", name,
              " must be a CPU tensor for the CPU kernel, got device ", t.device());
  TORCH_CHECK(rank < 0 || t.dim() == rank, "binslt::", op, ": ", name, " must have rank ", rank,
              " (", layout, "), got shape ", shape_str(t));
  TORCH_CHECK(t.scalar_type() == dtype, "binslt::", op, ": ", name, " must be ", dtype,
              " (", layout, "), got ", t.scalar_type());
}

// A per-channel float vector [c]; other float dtypes are converted, the result is contiguous.
inline at::Tensor channel_vec(const at::Tensor& t, const char* op, const char* name, int64_t c) {
  TORCH_CHECK(t.device().is_cpu(), "binslt::", op, ": ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c, "binslt::", op, ": ", name,
              " must have shape [", c, "] (one value per output channel), got ", shape_str(t));
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "binslt::", op, ": ", name,
              " must be a float tensor, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// Checked neuron settings from an op's scalar arguments (shared by every CPU entry point).
inline NeuronParams neuron(double tau, bool decay_input, double v_threshold,
                    std::optional<double> v_reset, bool detach_reset, int64_t surrogate,
                    double surrogate_alpha, const char* op) {
  TORCH_CHECK(tau > 0.0, "binslt::", op, ": tau must be > 0 (SpikingJelly needs tau >= 1), got ",
              tau);
  TORCH_CHECK(surrogate == 0 || surrogate == 1, "binslt::", op,
              ": surrogate must be 0 (atan) or 1 (sigmoid), got ", surrogate);
  return neuron_params(tau, decay_input, v_threshold, v_reset.has_value(), v_reset.value_or(0.0),
                       detach_reset, surrogate, surrogate_alpha);
}

}  // namespace cpu
}  // namespace binslt
