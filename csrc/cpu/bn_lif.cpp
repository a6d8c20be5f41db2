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

#include "binslt/aligned_vector.h"
#include "binslt/big_tensor.h"
#include "binslt/checks.h"
#include "binslt/cpu_algos.h"
#include "binslt/epilogue_cpu.h"
#include "binslt/infer_tile.h"
#include "binslt/isa_run.h"
#include "binslt/lif.h"
#include "binslt/pack_cpu.h"

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

// z read in place: each step [N, C, S] contiguous, steps `step` floats apart (0 when one current
// is expanded over T, as direct encoding's first layer gives it; it is never copied T times).
struct ZView {
  const float* p;
  int64_t step;
  const float* row(const Dims& d, int64_t tn, int64_t c) const {
    return p + (tn / d.N) * step + ((tn % d.N) * d.C + c) * d.S;
  }
};

ZView z_view(const at::Tensor& z_in, const Dims& d, at::Tensor* holder) {
  if (d.T > 1 && z_in.stride(0) == 0) {  // the one current (made contiguous), read T times
    *holder = z_in.select(0, 0).contiguous();
    return {holder->data_ptr<float>(), 0};
  }
  *holder = z_in.contiguous();
  return {holder->data_ptr<float>(), d.N * d.C * d.S};
}

// A current whose steps are [N, C, H, W] in ChannelsLast (and not also contiguous, as one
// channel's are), steps N*H*W*C floats apart, or one step expanded over T (time stride 0).
bool channels_last_current(const at::Tensor& z) {
  const at::Tensor z0 = z.select(0, 0);
  if (z0.is_contiguous() || !z0.is_contiguous(at::MemoryFormat::ChannelsLast)) return false;
  return z.size(0) == 1 || z.stride(0) == 0 || z.stride(0) == z0.numel();
}

// lif_forward_row / lif_backward_row over a current row zr (steps zstep apart) with its channel's
// epilogue, compiled for the wider vector units too (run_for_isa: the baseline build leaves these
// loops scalar). The float arithmetic is the same on every path (-ffp-contract=off, setup.py).
void lif_fwd(Isa isa, int T, int L, const float* zr, int64_t zstep, const ChannelAffine& aff,
             const float* res, int64_t ostep, const NeuronParams& p, float* out) {
  run_for_isa(isa, [&]() __attribute__((always_inline)) {
    auto zat = [zr, zstep](int t, int i) { return zr[t * zstep + i]; };
    lif_forward_row(T, L, zat, aff, res, ostep, p, out);
  });
}

// One BPTT row (io: dL/dspikes in, dL/dX out, scratch); the per-lane sums it keeps are not used
// (bn_lif_bwd sums per channel in order).
void lif_bwd(Isa isa, const NeuronParams& p, int T, int L, const float* zr, int64_t zstep,
             const ChannelAffine& aff, const float* res, int64_t ostep, const BpttRow& io) {
  run_for_isa(isa, [&]() __attribute__((always_inline)) {
    double dummy_g[kRowChunk] = {}, dummy_gx[kRowChunk] = {};
    auto zat = [zr, zstep](int t, int i) { return zr[t * zstep + i]; };
    lif_backward_row(T, L, zat, aff, res, ostep, p,
                     BpttRow{io.gs, io.gcur, io.hbuf, dummy_g, dummy_gx, io.gs_step});
  });
}

// Rows of one channel ([T, N, C, S] with S this long or more) run the LIF per (n, c) with their
// channel's epilogue, reading z in place (no epilogue scratch); shorter ones (linear layers,
// S = 1) run flat rows over an epilogue scratch X so that their vectors stay full.
constexpr int64_t kChannelRows = 32;

// f(c, z chunk at step 0, offset of the chunk in a [T, N, C, S] tensor's step 0, length, a
// thread's T * kRowChunk scratch) for every kRowChunk-long chunk of every (n, c) row, in
// parallel over the rows.
template <class F>
void for_channel_rows(const Dims& d, const ZView& zv, const F& f) {
  at::parallel_for(0, d.N * d.C, 1, [&](int64_t r0, int64_t r1) {
    line_vector<float> hbuf(static_cast<size_t>(d.T) * kRowChunk);
    for (int64_t row = r0; row < r1; ++row) {
      const float* zr = zv.row(d, row / d.C, row % d.C);
      for (int64_t i0 = 0; i0 < d.S; i0 += kRowChunk) {
        const int L = static_cast<int>(std::min<int64_t>(kRowChunk, d.S - i0));
        f(row % d.C, zr + i0, row * d.S + i0, L, hbuf.data());
      }
    }
  });
}

// The residual of bn_lif: like z (contiguous float32), or None.
std::optional<at::Tensor> residual_like_z(const std::optional<at::Tensor>& r, const at::Tensor& z,
                                          const char* op) {
  if (!r.has_value()) return std::nullopt;
  check_on_cpu(*r, op, "residual");
  return output_like(*r, z.sizes(), op, "residual");
}

// Batch statistics per channel in double (two passes): mean and biased variance, each sum with
// one accumulator per position of a row (so that the loops vectorise), the positions' sums
// added in order at the end.
void batch_stats(const ZView& z, const Dims& d, float* mean, float* var) {
  const double m = static_cast<double>(d.T * d.N * d.S);
  const Isa isa = active_isa();
  at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
    line_vector<double> acc(d.S);
    double* __restrict a = acc.data();
    auto total = [&]() {
      double t = 0.0;
      for (int64_t i = 0; i < d.S; ++i) t += a[i];
      return t;
    };
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(acc.begin(), acc.end(), 0.0);
      run_for_isa(isa, [&]() __attribute__((always_inline)) {
        for (int64_t tn = 0; tn < d.T * d.N; ++tn) {
          const float* r = z.row(d, tn, c);
          for (int64_t i = 0; i < d.S; ++i) a[i] += r[i];
        }
      });
      const double mu = total() / m;
      std::fill(acc.begin(), acc.end(), 0.0);
      run_for_isa(isa, [&]() __attribute__((always_inline)) {
        for (int64_t tn = 0; tn < d.T * d.N; ++tn) {
          const float* r = z.row(d, tn, c);
          for (int64_t i = 0; i < d.S; ++i) {
            const double e = r[i] - mu;
            a[i] += e * e;
          }
        }
      });
      mean[c] = static_cast<float>(mu);
      var[c] = static_cast<float>(total() / m);
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
void apply_epilogue(const ZView& z, const float* res, const std::vector<ChannelAffine>& aff,
                    const Dims& d, float* x) {
  at::parallel_for(0, d.T * d.N * d.C, std::max<int64_t>(1, 4096 / std::max<int64_t>(d.S, 1)), [&](int64_t r0,
                                                                             int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const ChannelAffine a = aff[row % d.C];
      const float* zr = z.row(d, row / d.C, row % d.C);
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
  at::Tensor z;
  const ZView zv = z_view(z_in, d, &z);

  at::Tensor mean = at::zeros({d.C}, z.options());
  at::Tensor var = at::zeros({d.C}, z.options());
  if (bn_train) batch_stats(zv, d, mean.data_ptr<float>(), var.data_ptr<float>());
  if (bn_train && d.T * d.N * d.S > 0)
    check_batch_stats(op, mean.data_ptr<float>(), var.data_ptr<float>(), d.C);
  const auto aff = affines(scale.data_ptr<float>(), shift.data_ptr<float>(),
                           mean.data_ptr<float>(), var.data_ptr<float>(), bn_train, bn_eps, d.C);
  at::Tensor spikes = empty_big(z_in.sizes(), z.options());
  const float* rp = res ? res->data_ptr<float>() : nullptr;
  const int64_t M = d.N * d.C * d.S;
  float* sp = spikes.data_ptr<float>();
  const Isa isa = active_isa();
  const int T = static_cast<int>(d.T);
  if (d.S >= kChannelRows) {
    for_channel_rows(d, zv, [&](int64_t c, const float* zr, int64_t off, int L, float*) {
      lif_fwd(isa, T, L, zr, zv.step, aff[c], rp ? rp + off : nullptr, M, p, sp + off);
    });
    return {spikes, mean, var};
  }
  at::Tensor x = empty_big(z_in.sizes(), z.options());
  apply_epilogue(zv, rp, aff, d, x.data_ptr<float>());
  const float* xp = x.data_ptr<float>();
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, chunks, 4, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t off = ch * kRowChunk;
      const int L = static_cast<int>(std::min<int64_t>(kRowChunk, M - off));
      lif_fwd(isa, T, L, xp + off, M, kIdentity, nullptr, M, p, sp + off);
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
    int64_t surrogate, double surrogate_alpha, bool need_grad_current) {
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
  at::Tensor z;
  const ZView zv = z_view(z_in, d, &z);
  const auto aff = affines(scale.data_ptr<float>(), shift.data_ptr<float>(),
                           mean.data_ptr<float>(), var.data_ptr<float>(), bn_train, bn_eps, d.C);
  const float* rp = res ? res->data_ptr<float>() : nullptr;
  const Isa isa = active_isa();
  const int T = static_cast<int>(d.T);

  // BPTT: per (n, c) row in place, or flat rows over an epilogue scratch (short rows).
  at::Tensor gcur = empty_big(z_in.sizes(), z.options());
  const int64_t M = d.N * d.C * d.S;
  const float* gp = gs.data_ptr<float>();
  float* gcp = gcur.data_ptr<float>();
  if (d.S >= kChannelRows) {
    for_channel_rows(d, zv, [&](int64_t c, const float* zr, int64_t off, int L, float* hbuf) {
      lif_bwd(isa, p, T, L, zr, zv.step, aff[c], rp ? rp + off : nullptr, M,
              BpttRow{gp + off, gcp + off, hbuf, nullptr, nullptr, -1});
    });
  } else {
    at::Tensor x = empty_big(z_in.sizes(), z.options());
    apply_epilogue(zv, rp, aff, d, x.data_ptr<float>());
    const float* xp = x.data_ptr<float>();
    const int64_t chunks = (M + kRowChunk - 1) / kRowChunk;
    at::parallel_for(0, chunks, 4, [&](int64_t c0, int64_t c1) {
      line_vector<float> hbuf(static_cast<size_t>(d.T) * kRowChunk);
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t off = ch * kRowChunk;
        const int L = static_cast<int>(std::min<int64_t>(kRowChunk, M - off));
        lif_bwd(isa, p, T, L, xp + off, M, kIdentity, nullptr, M,
                BpttRow{gp + off, gcp + off, hbuf.data(), nullptr, nullptr, -1});
      }
    });
  }

  // Per-channel sums (double, one accumulator per position of a row so that the loop
  // vectorises; the positions' sums added in order at the end), then dL/dz.
  at::Tensor gscale = at::empty({d.C}, z.options());
  at::Tensor gshift = at::empty({d.C}, z.options());
  // Without need_grad_current, dL/dX becomes dL/dz in its own buffer, element by element (each
  // value is read once, at the index it is written to): one z-sized tensor less at the peak.
  at::Tensor gz = need_grad_current ? empty_big(z_in.sizes(), z.options()) : gcur;
  float* gzp = gz.data_ptr<float>();
  float* gscp = gscale.data_ptr<float>();
  float* gshp = gshift.data_ptr<float>();
  const double m = static_cast<double>(d.T * d.N * d.S);
  at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
    line_vector<double> acc_g(d.S), acc_gx(d.S);
    for (int64_t c = c0; c < c1; ++c) {
      const ChannelAffine a = aff[c];
      std::fill(acc_g.begin(), acc_g.end(), 0.0);
      std::fill(acc_gx.begin(), acc_gx.end(), 0.0);
      double* __restrict ag = acc_g.data();
      double* __restrict agx = acc_gx.data();
      run_for_isa(isa, [&]() __attribute__((always_inline)) {
        for (int64_t tn = 0; tn < d.T * d.N; ++tn) {
          const int64_t off = (tn * d.C + c) * d.S;
          const float* zr = zv.row(d, tn, c);
          for (int64_t i = 0; i < d.S; ++i) {
            const double g = gcp[off + i];
            ag[i] += g;
            agx[i] += g * a.normalized(zr[i]);
          }
        }
      });
      double sg = 0.0, sgx = 0.0;
      for (int64_t i = 0; i < d.S; ++i) {
        sg += ag[i];
        sgx += agx[i];
      }
      gshp[c] = static_cast<float>(sg);
      gscp[c] = static_cast<float>(sgx);
      const ZGrad zg = make_zgrad(a, sg, sgx, m);
      run_for_isa(isa, [&]() __attribute__((always_inline)) {
        for (int64_t tn = 0; tn < d.T * d.N; ++tn) {
          const int64_t off = (tn * d.C + c) * d.S;
          const float* zr = zv.row(d, tn, c);
          for (int64_t i = 0; i < d.S; ++i) gzp[off + i] = zg(gcp[off + i], zr[i]);
        }
      });
    }
  });
  if (!need_grad_current) return {gz, at::empty({0}, z.options()), gscale, gshift};
  return {gz, gcur, gscale, gshift};
}

// The no-grad eval path of a real-input conv layer (direct encoding's first layer): the eval
// epilogue and the LIF over z [T, N, C, H, W] float32, whose time stride may be 0 (one current
// expanded over T is read in place, never copied T times), then the 2x2 OR-pool (pool = 2) and
// the pack_spikes words (packed_out), in one pass per image: no float spike tensor is written
// unless asked for. -> spikes [T, N, C, H/pool, W/pool] float32, or words
// [T, N, H/pool, W/pool, ceil(C/32)] int32. The spikes are bn_lif's (eval epilogue) pooled as
// max_pool2d pools them.
at::Tensor bn_lif_infer_cpu(const at::Tensor& z_in, const at::Tensor& scale_in,
                            const at::Tensor& shift_in, double tau, bool decay_input,
                            double v_threshold, std::optional<double> v_reset, int64_t pool,
                            bool packed_out) {
  const char* op = "bn_lif_infer";
  check_on_cpu(z_in, op, "z");
  TORCH_CHECK_VALUE(z_in.dim() == 5, "binslt::", op,
                    ": z must be [T, N, C, H, W] (time-major conv currents), got shape ",
                    shape_str(z_in));
  TORCH_CHECK_TYPE(z_in.scalar_type() == at::kFloat, "binslt::", op,
                   ": z must be float32 (convert with .float()), got ", z_in.scalar_type());
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset);
  const int64_t T = z_in.size(0), N = z_in.size(1), C = z_in.size(2), H = z_in.size(3),
                W = z_in.size(4);
  TORCH_CHECK_VALUE(T >= 1, "binslt::", op, ": z needs at least one timestep, got shape ",
                    shape_str(z_in));
  check_pool(op, pool, H, W);
  const at::Tensor scale = cpu_channel_vec(scale_in, op, "scale", C);
  const at::Tensor shift = cpu_channel_vec(shift_in, op, "shift", C);
  const int64_t S = H * W, step = N * C * S;
  const Dims d{T, N, C, S};
  const int64_t Hq = H / pool, Wq = W / pool, Cw = words_for(static_cast<int>(C));
  at::Tensor out = packed_out ? empty_big({T, N, Hq, Wq, Cw}, z_in.options().dtype(at::kInt))
                              : empty_big({T, N, C, Hq, Wq}, z_in.options());
  if (out.numel() == 0) return out;
  const float* scp = scale.data_ptr<float>();
  const float* shp = shift.data_ptr<float>();
  const bool direct = pool == 1 && !packed_out;
  float* of = packed_out ? nullptr : out.data_ptr<float>();
  uint32_t* ow = packed_out ? reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()) : nullptr;
  const Isa isa = active_isa();
  if (isa == Isa::kAvx512 && channels_last_current(z_in)) {
    // A channel-last current (the layer's conv of a few-channel image in ChannelsLast): each
    // pixel's channels across the vector lanes, its words straight from the compare masks.
    ConvShape cs{};
    cs.T = T, cs.N = N, cs.B = T * N, cs.Co = C, cs.H = cs.Ho = H, cs.W = cs.Wo = W;
    const std::vector<float> ones(static_cast<size_t>(C), 1.0f);
    InferOut io;
    io.pool = pool, io.packed = ow, io.Hq = Hq, io.Wq = Wq, io.Cow = Cw;
    std::vector<const float*> zt(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) zt[t] = z_in.data_ptr<float>() + t * z_in.stride(0);
    lif_infer_channels_last(cs, zt.data(), FwdEpilogue{isa, ones.data(), scp, shp, nullptr, p},
                            io, of);
    return out;
  }
  at::Tensor z;
  const ZView zv = z_view(z_in, d, &z);  // an expanded current is read in place
  // By image: a thread owns every word of its images (the channels of one word share it).
  // Packed output: a word's 32 channels are computed, then stored together (pool_pack).
  const int64_t group = packed_out ? 32 : 1;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> sp(direct ? 0 : static_cast<size_t>(group * T * S));
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t c0 = 0; c0 < C; c0 += group) {
        const int64_t c1 = std::min(C, c0 + group);
        for (int64_t c = c0; c < c1; ++c) {
          const ChannelAffine aff{0.0f, 1.0f, scp[c], shp[c], false};
          const float* zc = zv.row(d, n, c);
          // direct: straight into the output ([T][N][C][S], steps `step` apart)
          float* dst = direct ? of + (n * C + c) * S : sp.data() + (c - c0) * T * S;
          const int64_t dstep = direct ? step : S;
          for (int64_t i0 = 0; i0 < S; i0 += kRowChunk) {
            const int L = static_cast<int>(std::min<int64_t>(kRowChunk, S - i0));
            lif_fwd(isa, static_cast<int>(T), L, zc + i0, zv.step, aff, nullptr, dstep, p,
                    dst + i0);
          }
        }
        if (direct) continue;
        const int nch = static_cast<int>(c1 - c0);
        const PoolRows rows{T, N, W, Hq, Wq, n, 0, Hq};
        if (packed_out && pool == 2)
          pool_pack<2>(rows, sp.data(), T * S, nch, S, Cw, c0 / 32, ow);
        else if (packed_out)
          pool_pack<1>(rows, sp.data(), T * S, nch, S, Cw, c0 / 32, ow);
        else if (pool == 2)
          pool_store<2>(rows, sp.data(), S, C, c0, of);
        else
          pool_store<1>(rows, sp.data(), S, C, c0, of);
      }
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("bn_lif", &binslt::cpu::bn_lif_cpu);
  m.impl("bn_lif_bwd", &binslt::cpu::bn_lif_bwd_cpu);
  m.impl("bn_lif_infer", &binslt::cpu::bn_lif_infer_cpu);
}
