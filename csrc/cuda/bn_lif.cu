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
EpiGeom epi_geom_of(const Tensor& z, const char* op) {
  TORCH_CHECK_VALUE(z.dim() >= 3, "binslt::", op, ": z must have shape [T, N, C, *], got ",
                    z.sizes());
  EpiGeom g;
  g.T = z.size(0);
  g.N = z.size(1);
  g.C = z.size(2);
  g.S = 1;
  for (int64_t d = 3; d < z.dim(); ++d) g.S *= z.size(d);
  return g;
}

// The checked per-channel vectors (float32) and residual of bn_lif / bn_lif_bwd; they own the
// memory that the EpiArgs built from them point to.
struct BnInputs {
  Tensor scale, shift, mean, var, residual;
};

BnInputs check_bn_inputs(const Tensor& z, const Tensor& scale, const Tensor& shift,
                         const Tensor* mean, const Tensor* var,
                         const std::optional<Tensor>& residual, const char* op) {
  const int64_t c = z.size(2);
  BnInputs in;
  in.scale = cuda_channel_vec(scale, z, op, "scale", c);
  in.shift = cuda_channel_vec(shift, z, op, "shift", c);
  if (mean != nullptr) in.mean = cuda_channel_vec(*mean, z, op, "mean", c);
  if (var != nullptr) in.var = cuda_channel_vec(*var, z, op, "var", c);
  if (residual.has_value()) {
    check_same_device(*residual, z, op, "residual");
    in.residual = output_like(*residual, z.sizes(), op, "residual");
  }
  return in;
}

EpiArgs epi_args(const BnInputs& in, const Tensor& mean, const Tensor& var, bool bn_train,
                 double bn_eps) {
  EpiArgs a{};
  a.alpha = nullptr;
  a.scale = in.scale.data_ptr<float>();
  a.shift = in.shift.data_ptr<float>();
  a.mean = mean.data_ptr<float>();
  a.var = var.data_ptr<float>();
  a.residual = in.residual.defined() ? in.residual.data_ptr<float>() : nullptr;
  a.bn_train = bn_train;
  a.eps = static_cast<float>(bn_eps);
  return a;
}

// z: [T, N, C, *] float32; scale, shift: [C] floating; residual: like z or None
// -> spikes like z, mean [C], var [C] (zeros unless bn_train)
std::tuple<Tensor, Tensor, Tensor> bn_lif_cuda(const Tensor& z_in, const Tensor& scale_in,
                                               const Tensor& shift_in,
                                               const std::optional<Tensor>& residual,
                                               bool bn_train, double bn_eps, double tau,
                                               bool decay_input, double v_threshold,
                                               std::optional<double> v_reset) {
  const char* op = "bn_lif";
  check_on_cuda(z_in, op, "z");
  check_dtype(z_in, op, "z", at::kFloat);
  const EpiGeom g = epi_geom_of(z_in, op);
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset);
  check_bn_eps(op, bn_eps);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const BnInputs in = check_bn_inputs(z_in, scale_in, shift_in, nullptr, nullptr, residual, op);
  const Tensor z = z_in.contiguous();
  Tensor mean = at::zeros({g.C}, z.options());
  Tensor var = at::zeros({g.C}, z.options());
  const EpiArgs a = epi_args(in, mean, var, bn_train, bn_eps);
  Tensor spikes = at::empty_like(z);
  if (z.numel() == 0) return {spikes, mean, var};
  if (bn_train) launch_channel_stats<float>(z.data_ptr<float>(), nullptr, g, mean, var);
  launch_lif_forward<float>(z.data_ptr<float>(), a, g, p, spikes.data_ptr<float>());
  return {spikes, mean, var};
}

// -> grad_z like z, grad_current like z (computed, but returned empty [0] unless
//    need_grad_current), grad_scale [C], grad_shift [C]
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_lif_bwd_cuda(
    const Tensor& grad_spikes_in, const Tensor& z_in, const Tensor& scale_in,
    const Tensor& shift_in, const Tensor& mean_in, const Tensor& var_in,
    const std::optional<Tensor>& residual, bool bn_train, double bn_eps, double tau,
    bool decay_input, double v_threshold, std::optional<double> v_reset, bool detach_reset,
    int64_t surrogate, double surrogate_alpha, bool need_grad_current) {
  const char* op = "bn_lif_bwd";
  check_on_cuda(z_in, op, "z");
  check_dtype(z_in, op, "z", at::kFloat);
  const EpiGeom g = epi_geom_of(z_in, op);
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset, detach_reset,
                                        surrogate, surrogate_alpha);
  check_bn_eps(op, bn_eps);
  check_same_device(grad_spikes_in, z_in, op, "grad_spikes");
  const Tensor gs = output_like(grad_spikes_in, z_in.sizes(), op, "grad_spikes");
  const c10::cuda::CUDAGuard guard(z_in.device());
  const BnInputs in =
      check_bn_inputs(z_in, scale_in, shift_in, &mean_in, &var_in, residual, op);
  const Tensor z = z_in.contiguous();
  const EpiArgs a = epi_args(in, in.mean, in.var, bn_train, bn_eps);
  Tensor g_z = at::empty_like(z), g_cur = at::empty_like(z);
  Tensor g_scale = at::empty({g.C}, z.options()), g_shift = at::empty({g.C}, z.options());
  launch_epilogue_backward<float>(gs.data_ptr<float>(), z.data_ptr<float>(), a, g, p, g_z, g_cur,
                                  g_scale, g_shift);
  if (!need_grad_current) g_cur = at::empty({0}, z.options());
  return {g_z, g_cur, g_scale, g_shift};
}

}  // namespace
}  // namespace cuda
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CUDA, m) {
  m.impl("bn_lif", &binslt::cuda::bn_lif_cuda);
  m.impl("bn_lif_bwd", &binslt::cuda::bn_lif_bwd_cuda);
}
