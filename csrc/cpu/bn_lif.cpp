// Epilogue (eval affine / training BatchNorm) + residual + multi-step LIF over a real current
// z: [T, N, C, *] (dense first layer, linear layers, standalone LIF), and its backward.
//
// The epilogue is applied elementwise into a scratch X, then the LIF runs over flat rows of
// [T, N*C*S], so that any trailing layout (S = 1 for linear layers) vectorizes the same way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "binslt/checks.h"
#include "binslt/epilogue_cpu.h"
#include "binslt/lif.h"

namespace binslt {
namespace cpu {
namespace {

struct Dims {
  int64_t T, N, C, S;
};

Dims check_z(const at::Tensor& z, const char* op) {
  check_on_cpu(z, op, "z");
  TORCH_CHECK(z.dim() >= 3, "binslt::", op, ": z must be [T, N, C, *] (time-major), got shape ",
              shape_str(z));
  TORCH_CHECK(z.scalar_type() == at::kFloat, "binslt::", op,
              ": z must be float32 (convert with .float()), got ", z.scalar_type());
  Dims d{z.size(0), z.size(1), z.size(2), 1};
  for (int64_t i = 3; i < z.dim(); ++i) d.S *= z.size(i);
  TORCH_CHECK(d.T >= 1, "binslt::", op, ": z needs at least one timestep, got shape ",
              shape_str(z));
  return d;
}

// The residual of bn_lif: like z (contiguous float32), or None.
std::optional<at::Tensor> residual_like_z(const std::optional<at::Tensor>& r, const at::Tensor& z,
                                          const char* op) {
  if (!r.has_value()) return std::nullopt;
  check_on_cpu(*r, op, "residual");
  return output_like(*r, z.sizes(), op, "residual");
}

// Batch statistics per channel in double (two passes): mean and biased variance.
void batch_stats(const float* z, const Dims& d, float* mean, float* var) {
  const double m = static_cast<double>(d.T * d.N * d.S);
  at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0.0;
      for (int64_t tn = 0; tn < d.T * d.N; ++tn) {
        const float* r = z + (tn * d.C + c) * d.S;
        for (int64_t i = 0; i < d.S; ++i) s += r[i];
      }
      const double mu = s / m;
      double q = 0.0;
      for (int64_t tn = 0; tn < d.T * d.N; ++tn) {
        const float* r = z + (tn * d.C + c) * d.S;
        for (int64_t i = 0; i < d.S; ++i) {
          const double e = r[i] - mu;
          q += e * e;
        }
      }
      mean[c] = static_cast<float>(mu);
      var[c] = static_cast<float>(q / m);
    }
  });
}

std::vector<ChannelAffine> affines(const float* scale, const float* shift, const float* mean,
                                   const float* var, bool train, double eps, int64_t C) {
  std::vector<ChannelAffine> a(C);
  for (int64_t c = 0; c < C; ++c) {
    a[c].train = train;
    a[c].scale = scale[c];
    a[c].shift = shift[c];
    a[c].mean = train ? mean[c] : 0.0f;
    a[c].invstd = train ? invstd_of(var[c], eps) : 1.0f;
  }
  return a;
}

// X = epilogue(z) + residual, elementwise.
void apply_epilogue(const float* z, const float* res, const std::vector<ChannelAffine>& aff,
                    const Dims& d, float* x) {
  at::parallel_for(0, d.T * d.N * d.C, std::max<int64_t>(1, 4096 / std::max<int64_t>(d.S, 1)), [&](int64_t r0,
                                                                             int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const ChannelAffine a = aff[row % d.C];
      const float* zr = z + row * d.S;
      float* xr = x + row * d.S;
      for (int64_t i = 0; i < d.S; ++i) xr[i] = a.apply(zr[i]);
      if (res != nullptr) {
        const float* rr = res + row * d.S;
        for (int64_t i = 0; i < d.S; ++i) xr[i] = xr[i] + rr[i];
      }
    }
  });
}

const ChannelAffine kIdentity{0.0f, 1.0f, 1.0f, 0.0f, false};

}  // namespace

// z: [T, N, C, *] float32; scale, shift: [C]; residual: like z or None
// -> spikes like z (float32), mean [C], var [C] (zeros unless bn_train)
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lif_cpu(
    const at::Tensor& z_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const std::optional<at::Tensor>& residual_in, bool bn_train, double bn_eps, double tau,
    bool decay_input, double v_threshold, std::optional<double> v_reset) {
  const char* op = "bn_lif";
  const Dims d = check_z(z_in, op);
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset);
  check_bn_eps(op, bn_eps);
  const at::Tensor scale = cpu_channel_vec(scale_in, op, "scale", d.C);
  const at::Tensor shift = cpu_channel_vec(shift_in, op, "shift", d.C);
  const auto res = residual_like_z(residual_in, z_in, op);
  const at::Tensor z = z_in.contiguous();

  at::Tensor mean = at::zeros({d.C}, z.options());
  at::Tensor var = at::zeros({d.C}, z.options());
  if (bn_train) batch_stats(z.data_ptr<float>(), d, mean.data_ptr<float>(), var.data_ptr<float>());
  const auto aff = affines(scale.data_ptr<float>(), shift.data_ptr<float>(),
                           mean.data_ptr<float>(), var.data_ptr<float>(), bn_train, bn_eps, d.C);
  at::Tensor x = at::empty_like(z);
  apply_epilogue(z.data_ptr<float>(), res ? res->data_ptr<float>() : nullptr, aff, d,
                 x.data_ptr<float>());

  at::Tensor spikes = at::empty_like(z);
  const int64_t M = d.N * d.C * d.S;
  const float* xp = x.data_ptr<float>();
  float* sp = spikes.data_ptr<float>();
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, chunks, 4, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t off = ch * kRowChunk;
      const int L = static_cast<int>(std::min<int64_t>(kRowChunk, M - off));
      const float* xr = xp + off;
      auto zat = [&](int t, int i) { return xr[t * M + i]; };
      lif_forward_row(static_cast<int>(d.T), L, zat, kIdentity, nullptr, M, p, sp + off);
    }
  });
  return {spikes, mean, var};
}

// grad_spikes, z: [T, N, C, *] float32; scale, shift, mean, var: [C]; residual: like z or None
// -> grad_z like z, grad_current like z, grad_scale [C], grad_shift [C]
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_lif_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& scale_in,
    const at::Tensor& shift_in, const at::Tensor& mean_in, const at::Tensor& var_in,
    const std::optional<at::Tensor>& residual_in, bool bn_train, double bn_eps, double tau,
    bool decay_input, double v_threshold, std::optional<double> v_reset, bool detach_reset,
    int64_t surrogate, double surrogate_alpha) {
  const char* op = "bn_lif_bwd";
  const Dims d = check_z(z_in, op);
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset, detach_reset,
                                        surrogate, surrogate_alpha);
  check_bn_eps(op, bn_eps);
  check_on_cpu(grad_in, op, "grad_spikes");
  const at::Tensor gs = output_like(grad_in, z_in.sizes(), op, "grad_spikes");
  const at::Tensor scale = cpu_channel_vec(scale_in, op, "scale", d.C);
  const at::Tensor shift = cpu_channel_vec(shift_in, op, "shift", d.C);
  const at::Tensor mean = cpu_channel_vec(mean_in, op, "mean", d.C);
  const at::Tensor var = cpu_channel_vec(var_in, op, "var", d.C);
  const auto res = residual_like_z(residual_in, z_in, op);
  const at::Tensor z = z_in.contiguous();
  const auto aff = affines(scale.data_ptr<float>(), shift.data_ptr<float>(),
                           mean.data_ptr<float>(), var.data_ptr<float>(), bn_train, bn_eps, d.C);
  at::Tensor x = at::empty_like(z);
  apply_epilogue(z.data_ptr<float>(), res ? res->data_ptr<float>() : nullptr, aff, d,
                 x.data_ptr<float>());

  // BPTT over flat rows.
  at::Tensor gcur = at::empty_like(z);
  const int64_t M = d.N * d.C * d.S;
  const float* xp = x.data_ptr<float>();
  const float* gp = gs.data_ptr<float>();
  float* gcp = gcur.data_ptr<float>();
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, chunks, 4, [&](int64_t c0, int64_t c1) {
    std::vector<float> hbuf(static_cast<size_t>(d.T) * kRowChunk);
    double dummy_g[kRowChunk] = {}, dummy_gx[kRowChunk] = {};  // per-channel sums are taken below
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t off = ch * kRowChunk;
      const int L = static_cast<int>(std::min<int64_t>(kRowChunk, M - off));
      const float* xr = xp + off;
      auto zat = [&](int t, int i) { return xr[t * M + i]; };
      lif_backward_row(static_cast<int>(d.T), L, zat, kIdentity, nullptr, M, p, gp + off,
                       gcp + off, hbuf.data(), dummy_g, dummy_gx);
    }
  });

  // Per-channel sums, then dL/dz.
  at::Tensor gscale = at::empty({d.C}, z.options());
  at::Tensor gshift = at::empty({d.C}, z.options());
  at::Tensor gz = at::empty_like(z);
  const float* zp = z.data_ptr<float>();
  float* gzp = gz.data_ptr<float>();
  float* gscp = gscale.data_ptr<float>();
  float* gshp = gshift.data_ptr<float>();
  const double m = static_cast<double>(d.T * d.N * d.S);
  at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const ChannelAffine a = aff[c];
      double sg = 0.0, sgx = 0.0;
      for (int64_t tn = 0; tn < d.T * d.N; ++tn) {
        const int64_t off = (tn * d.C + c) * d.S;
        for (int64_t i = 0; i < d.S; ++i) {
          const double g = gcp[off + i];
          sg += g;
          sgx += g * a.normalized(zp[off + i]);
        }
      }
      gshp[c] = static_cast<float>(sg);
      gscp[c] = static_cast<float>(sgx);
      const ZGrad zg = make_zgrad(a, sg, sgx, m);
      for (int64_t tn = 0; tn < d.T * d.N; ++tn) {
        const int64_t off = (tn * d.C + c) * d.S;
        for (int64_t i = 0; i < d.S; ++i) gzp[off + i] = zg(gcp[off + i], zp[off + i]);
      }
    }
  });
  return {gz, gcur, gscale, gshift};
}

}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("bn_lif", &binslt::cpu::bn_lif_cpu);
  m.impl("bn_lif_bwd", &binslt::cpu::bn_lif_bwd_cpu);
}
