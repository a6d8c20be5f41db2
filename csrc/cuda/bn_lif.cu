// binslt::bn_lif and binslt::bn_lif_bwd for CUDA tensors: (BN | affine) (+ residual) + multi-step
// LIF over a real current z: [T, N, C, *]. BN training is two passes: per-channel statistics,
// then normalize + LIF. Semantics: binslt.reference.bn_lif_reference / bn_lif_bwd_reference.
#include <torch/library.h>

#include <tuple>

#include "epilogue.cuh"

namespace binslt {
namespace cuda {
namespace {

using at::Tensor;

// z: [T, N, C, *] float32 -> geometry with S = product of the trailing dims.
EpiGeom epi_geom_of(const Tensor& z) {
  TORCH_CHECK_VALUE(z.dim() >= 3, "binslt.bn_lif: z must have shape [T, N, C, *], got ",
                    z.sizes());
  EpiGeom g;
  g.T = z.size(0);
  g.N = z.size(1);
  g.C = z.size(2);
  g.S = 1;
  for (int64_t d = 3; d < z.dim(); ++d) g.S *= z.size(d);
  return g;
}

EpiArgs epi_args(const Tensor& z, const Tensor& scale, const Tensor& shift, const Tensor* mean,
                 const Tensor* var, const std::optional<Tensor>& residual, Tensor& res_c,
                 bool bn_train, double bn_eps) {
  const int64_t c = z.size(2);
  check_channel_vec(scale, z, "scale", c);
  check_channel_vec(shift, z, "shift", c);
  EpiArgs a{};
  a.alpha = nullptr;
  a.scale = scale.data_ptr<float>();
  a.shift = shift.data_ptr<float>();
  a.mean = mean != nullptr ? mean->data_ptr<float>() : nullptr;
  a.var = var != nullptr ? var->data_ptr<float>() : nullptr;
  a.residual = nullptr;
  if (residual.has_value()) {
    check_same_device(*residual, z, "residual");
    check_dtype(*residual, "residual", at::kFloat);
    TORCH_CHECK_VALUE(residual->sizes() == z.sizes(), "binslt.bn_lif: residual must have z's shape ",
                      z.sizes(), ", got ", residual->sizes());
    res_c = residual->contiguous();
    a.residual = res_c.data_ptr<float>();
  }
  a.bn_train = bn_train;
  a.eps = static_cast<float>(bn_eps);
  return a;
}

// z: [T, N, C, *] float32; scale, shift: [C] float32; residual: like z or None
// -> spikes like z, mean [C], var [C] (zeros unless bn_train)
std::tuple<Tensor, Tensor, Tensor> bn_lif_cuda(const Tensor& z_in, const Tensor& scale_in,
                                               const Tensor& shift_in,
                                               const std::optional<Tensor>& residual,
                                               bool bn_train, double bn_eps, double tau,
                                               bool decay_input, double v_threshold,
                                               std::optional<double> v_reset) {
  check_cuda(z_in, "z");
  check_dtype(z_in, "z", at::kFloat);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const EpiGeom g = epi_geom_of(z_in);
  const NeuronParams p = make_neuron_params(tau, decay_input, v_threshold, v_reset);
  const Tensor z = z_in.contiguous();
  const Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  Tensor mean = at::zeros({g.C}, z.options());
  Tensor var = at::zeros({g.C}, z.options());
  Tensor res_c;
  const EpiArgs a = epi_args(z, scale, shift, &mean, &var, residual, res_c, bn_train, bn_eps);
  Tensor spikes = at::empty_like(z);
  if (z.numel() == 0) return {spikes, mean, var};
  if (bn_train) launch_channel_stats<float>(z.data_ptr<float>(), nullptr, g, mean, var);
  launch_lif_forward<float>(z.data_ptr<float>(), a, g, p, spikes.data_ptr<float>());
  return {spikes, mean, var};
}

// -> grad_z like z, grad_current like z, grad_scale [C], grad_shift [C]
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_lif_bwd_cuda(
    const Tensor& grad_spikes_in, const Tensor& z_in, const Tensor& scale_in,
    const Tensor& shift_in, const Tensor& mean_in, const Tensor& var_in,
    const std::optional<Tensor>& residual, bool bn_train, double bn_eps, double tau,
    bool decay_input, double v_threshold, std::optional<double> v_reset, bool detach_reset,
    int64_t surrogate, double surrogate_alpha) {
  check_cuda(z_in, "z");
  check_dtype(z_in, "z", at::kFloat);
  check_same_device(grad_spikes_in, z_in, "grad_spikes");
  check_dtype(grad_spikes_in, "grad_spikes", at::kFloat);
  TORCH_CHECK_VALUE(grad_spikes_in.sizes() == z_in.sizes(),
                    "binslt.bn_lif_bwd: grad_spikes must have z's shape ", z_in.sizes(), ", got ",
                    grad_spikes_in.sizes());
  const c10::cuda::CUDAGuard guard(z_in.device());
  const EpiGeom g = epi_geom_of(z_in);
  const NeuronParams p = make_neuron_params(tau, decay_input, v_threshold, v_reset, detach_reset,
                                            surrogate, surrogate_alpha);
  check_channel_vec(mean_in, z_in, "mean", g.C);
  check_channel_vec(var_in, z_in, "var", g.C);
  const Tensor z = z_in.contiguous(), gs = grad_spikes_in.contiguous();
  const Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const Tensor mean = mean_in.contiguous(), var = var_in.contiguous();
  Tensor res_c;
  const EpiArgs a = epi_args(z, scale, shift, &mean, &var, residual, res_c, bn_train, bn_eps);
  Tensor g_z = at::empty_like(z), g_cur = at::empty_like(z);
  Tensor g_scale = at::empty({g.C}, z.options()), g_shift = at::empty({g.C}, z.options());
  launch_epilogue_backward<float>(gs.data_ptr<float>(), z.data_ptr<float>(), a, g, p, g_z, g_cur,
                                  g_scale, g_shift);
  return {g_z, g_cur, g_scale, g_shift};
}

}  // namespace
}  // namespace cuda
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CUDA, m) {
  m.impl("bn_lif", &binslt::cuda::bn_lif_cuda);
  m.impl("bn_lif_bwd", &binslt::cuda::bn_lif_bwd_cuda);
}
