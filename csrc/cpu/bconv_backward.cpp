// Backward of the fused binary conv + epilogue + LIF (binslt::bconv_lif_bwd).
//
// H is recomputed from the saved integer counts (never stored), BPTT gives dL/dX (the gradient
// of the input current), the BN backward gives dL/dZ; then the weight gradient
// (bconv_weight_grad.cpp) and the input gradient (bconv_input_grad.cpp) follow from dZ.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "binslt/bconv_cpu.h"
#include "binslt/checks.h"
#include "binslt/cpu_algos.h"
#include "binslt/epilogue_cpu.h"
#include "binslt/lif.h"
#include "binslt/pack_cpu.h"

namespace binslt {
namespace cpu {
namespace {

// dL/dspikes of a layer whose spikes were 2x2 max-pooled in training (bconv_lif_bwd_pool2),
// read a row chunk at a time from the pooled gradient and the unpooled spikes' bits with
// spike_pool2_bwd's routing, so the unpooled gradient is never stored whole.
struct PoolGrad {
  const float* g;        // [B, Co, Hq, Wq], B = T * N
  const uint32_t* bits;  // [B, Ho, Wo, Cwo]: pack_spikes of the unpooled spikes
  int64_t Hq, Wq, Cwo;

  // dst[t * kRowChunk + i] = dL/ds at step t, image n, channel c, flat pixel s0 + i (i < L):
  // the window's gradient at its first 1 in row-major order (at its first position when all
  // four are 0), 0 elsewhere and on an odd last row / column.
  void rows(const ConvShape& s, int64_t n, int64_t c, int64_t s0, int L, float* dst) const {
    const int64_t word = c >> 5;
    const uint32_t bit = uint32_t{1} << (c & 31);
    // A chunk of whole window rows (it starts on an even row and ends on an even row or at the
    // map's end): one route per window, its gradient written to the one position it picks.
    const int64_t pair = 2 * s.Wo;
    if (s0 % pair == 0 && (L % pair == 0 || s0 + L == s.Ho * s.Wo)) {
      const int64_t y0 = s0 / s.Wo, yend = std::min<int64_t>(2 * Hq, y0 + L / s.Wo);
      for (int64_t t = 0; t < s.T; ++t) {
        const int64_t b = t * s.N + n;
        const uint32_t* img = bits + b * s.Ho * s.Wo * Cwo + word;
        const float* gp = g + (b * s.Co + c) * Hq * Wq;
        float* out = dst + t * kRowChunk;
        std::fill(out, out + L, 0.0f);
        for (int64_t y = y0; y < yend; y += 2) {
          const uint32_t* r0 = img + y * s.Wo * Cwo;
          const uint32_t* r1 = r0 + s.Wo * Cwo;
          const float* grow = gp + (y >> 1) * Wq;
          float* o0 = out + (y - y0) * s.Wo;
          for (int64_t q = 0; q < Wq; ++q) {
            const int64_t r = pool2_route(r0 + 2 * q * Cwo, r1 + 2 * q * Cwo, Cwo, bit);
            o0[(r >> 1) * s.Wo + 2 * q + (r & 1)] = grow[q];
          }
        }
      }
      return;
    }
    for (int64_t t = 0; t < s.T; ++t) {
      const int64_t b = t * s.N + n;
      const uint32_t* img = bits + b * s.Ho * s.Wo * Cwo + word;
      const float* gp = g + (b * s.Co + c) * Hq * Wq;
      float* out = dst + t * kRowChunk;
      int64_t y = s0 / s.Wo, x = s0 % s.Wo;
      for (int i = 0; i < L; ++i) {
        float v = 0.0f;
        if (y < 2 * Hq && x < 2 * Wq) {
          const uint32_t* r0 = img + ((y & ~int64_t{1}) * s.Wo + (x & ~int64_t{1})) * Cwo;
          const uint32_t* r1 = r0 + s.Wo * Cwo;
          if ((((y & 1) << 1) | (x & 1)) == pool2_route(r0, r1, Cwo, bit))
            v = gp[(y >> 1) * Wq + (x >> 1)];
        }
        out[i] = v;
        if (++x == s.Wo) {
          x = 0;
          ++y;
        }
      }
    }
  }
};

// dL/dX (grad_current) and dL/dZ of channel c from its counts; the channel's sums go to gsc/gsh.
// dL/dspikes come from gs, or from pg (then gs is unused). hbuf, gbuf: T * kRowChunk floats,
// acc_g / acc_gx: kRowChunk doubles (scratch).
template <typename CT>
static inline __attribute__((always_inline)) void lif_bn_channel_body(
    const ConvShape& s, int64_t c, const CT* counts, const float* gs, const PoolGrad* pg,
    const float* alpha, const ChannelAffine& aff, const float* res, const NeuronParams& p,
    float* gcur, float* gz, float* gsc, float* gsh, float* hbuf, float* gbuf, double* acc_g,
    double* acc_gx) {
  const int64_t S = s.Ho * s.Wo;
  const int64_t step_stride = s.N * s.Co * S;
  const double m = static_cast<double>(s.T * s.N * S);
  const float a = alpha[c];
  for (int i = 0; i < kRowChunk; ++i) acc_g[i] = acc_gx[i] = 0.0;
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t s0 = 0; s0 < S; s0 += kRowChunk) {
      const int L = static_cast<int>(std::min<int64_t>(kRowChunk, S - s0));
      const int64_t off = (n * s.Co + c) * S + s0;
      const CT* cr = counts + off;
      auto zat = [cr, a, step_stride](int t, int i) {
        return static_cast<float>(cr[t * step_stride + i]) * a;
      };
      if (pg != nullptr) pg->rows(s, n, c, s0, L, gbuf);
      lif_backward_row(static_cast<int>(s.T), L, zat, aff, res ? res + off : nullptr, step_stride,
                       p, pg != nullptr ? gbuf : gs + off, gcur + off, hbuf, acc_g, acc_gx,
                       pg != nullptr ? kRowChunk : step_stride);
    }
  double sg = 0.0, sgx = 0.0;
  for (int i = 0; i < kRowChunk; ++i) {
    sg += acc_g[i];
    sgx += acc_gx[i];
  }
  gsh[c] = static_cast<float>(sg);
  gsc[c] = static_cast<float>(sgx);
  const ZGrad zg = make_zgrad(aff, sg, sgx, m);
  for (int64_t tn = 0; tn < s.T * s.N; ++tn) {
    const int64_t off = (tn * s.Co + c) * S;
    for (int64_t i = 0; i < S; ++i)
      gz[off + i] = zg(gcur[off + i], static_cast<float>(counts[off + i]) * a);
  }
}

#define BINSLT_LIF_BN_CHANNEL_ARGS                                                            \
  const ConvShape &s, int64_t c, const CT *counts, const float *gs, const PoolGrad *pg,      \
      const float *alpha, const ChannelAffine &aff, const float *res, const NeuronParams &p, \
      float *gcur, float *gz, float *gsc, float *gsh, float *hbuf, float *gbuf,              \
      double *acc_g, double *acc_gx
#define BINSLT_LIF_BN_CHANNEL_PASS \
  s, c, counts, gs, pg, alpha, aff, res, p, gcur, gz, gsc, gsh, hbuf, gbuf, acc_g, acc_gx

template <typename CT>
__attribute__((target("avx512f"))) void lif_bn_channel_avx512(BINSLT_LIF_BN_CHANNEL_ARGS) {
  lif_bn_channel_body(BINSLT_LIF_BN_CHANNEL_PASS);
}
template <typename CT>
__attribute__((target("avx2"))) void lif_bn_channel_avx2(BINSLT_LIF_BN_CHANNEL_ARGS) {
  lif_bn_channel_body(BINSLT_LIF_BN_CHANNEL_PASS);
}

template <typename CT>
void lif_bn_channel_base(BINSLT_LIF_BN_CHANNEL_ARGS) {
  lif_bn_channel_body(BINSLT_LIF_BN_CHANNEL_PASS);
}

// dL/dX (grad_current) and dL/dZ from the counts; returns per-channel sums through gsc/gsh.
template <typename CT>
void lif_bn_backward(const ConvShape& s, const CT* counts, const float* gs, const PoolGrad* pg,
                     const float* alpha, const std::vector<ChannelAffine>& aff, const float* res,
                     const NeuronParams& p, float* gcur, float* gz, float* gsc, float* gsh) {
  const Isa isa = active_isa();
  at::parallel_for(0, s.Co, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> hbuf(static_cast<size_t>(s.T) * kRowChunk);
    std::vector<float> gbuf(pg != nullptr ? static_cast<size_t>(s.T) * kRowChunk : 0);
    std::vector<double> acc_g(kRowChunk), acc_gx(kRowChunk);
    for (int64_t c = c0; c < c1; ++c) {
      auto fn = isa == Isa::kAvx512 ? &lif_bn_channel_avx512<CT>
                : isa == Isa::kAvx2 ? &lif_bn_channel_avx2<CT>
                                    : &lif_bn_channel_base<CT>;
      fn(s, c, counts, gs, pg, alpha, aff[c], res, p, gcur, gz, gsc, gsh, hbuf.data(),
         gbuf.data(), acc_g.data(), acc_gx.data());
    }
  });
}


}  // namespace


// grad_spikes: [T, N, Co, Ho, Wo] float32; counts: [T, N, Co, Ho, Wo] int16/int32 (from
// bconv_lif); x_packed: [T*N, H, W, Cw] int32; w_mask, w_pos: [Co, kh, kw, Cw] int32;
// alpha, scale, shift, mean, var: [Co] float32; residual: [T, N, Co, Ho, Wo] float32 or None
// -> grad_x [T, N, Ci, H, W] (or [0]), grad_weight [Co, Ci, kh, kw], grad_current like counts
//    (or [0] unless need_grad_current: dL/dX is then written into dL/dZ's buffer and turned into
//    dL/dZ in place, element by element), grad_scale [Co], grad_shift [Co]
// bconv_lif_bwd_pool2: grad_in is the gradient of the 2x2-pooled spikes [T, N, Co, Ho/2, Wo/2]
// and pool_packed [T*N, Ho, Wo, ceil(Co/32)] int32 the unpooled spikes' bits (pool_packed_in set).
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_bwd_impl(
    const char* op, const at::Tensor& grad_in, const std::optional<at::Tensor>& pool_packed_in,
    const at::Tensor& counts_in, const at::Tensor& x_packed_in,
    const at::Tensor& w_mask_in, const at::Tensor& w_pos_in, const at::Tensor& alpha_in,
    const at::Tensor& scale_in, const at::Tensor& shift_in, const at::Tensor& mean_in,
    const at::Tensor& var_in, const std::optional<at::Tensor>& residual_in, int64_t in_channels,
    int64_t stride, int64_t padding, bool bn_train, double bn_eps, double tau, bool decay_input,
    double v_threshold, std::optional<double> v_reset, bool detach_reset, int64_t surrogate,
    double surrogate_alpha, bool need_grad_x, bool need_grad_current) {
  TORCH_CHECK(counts_in.dim() == 5, "binslt::", op,
              ": counts must be [T, N, Co, Ho, Wo] (from bconv_lif), got shape ",
              shape_str(counts_in));
  const ConvShape s =
      check_conv(x_packed_in, w_mask_in, w_pos_in, counts_in.size(0), stride, padding, op);
  const std::vector<int64_t> oshape{s.T, s.N, s.Co, s.Ho, s.Wo};
  TORCH_CHECK(counts_in.sizes() == at::IntArrayRef(oshape), "binslt::", op, ": counts must have "
              "shape ", at::IntArrayRef(oshape), " for this input/weight/stride/padding, got ",
              shape_str(counts_in));
  const at::ScalarType count_type = counts_dtype(s.Cw, s.KH, s.KW);
  // (int8: the autograd path keeps counts that all fit in int8 as int8 on the CPU)
  TORCH_CHECK(counts_in.scalar_type() == count_type || counts_in.scalar_type() == at::kChar,
              "binslt::", op, ": counts must be ", count_type,
              " for this weight (as returned by bconv_lif), or int8, got ",
              counts_in.scalar_type());
  TORCH_CHECK_VALUE(in_channels >= 1 && in_channels <= 32 * s.Cw, "binslt::", op,
                    ": in_channels must be in [1, 32*Cw] = [1, ", 32 * s.Cw, "], got ",
                    in_channels);
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset, detach_reset,
                                        surrogate, surrogate_alpha);
  check_bn_eps(op, bn_eps);
  at::Tensor gs, gpool, pool_packed;
  PoolGrad pool{};
  if (!pool_packed_in.has_value()) {
    gs = cpu_output_like(grad_in, oshape, op, "grad_spikes");
  } else {
    TORCH_CHECK_VALUE(s.Ho >= 2 && s.Wo >= 2, "binslt::", op, ": a 2x2-pooled layer needs an "
                      "output of at least 2x2, got ", s.Ho, "x", s.Wo);
    const std::vector<int64_t> pshape{s.T, s.N, s.Co, s.Ho / 2, s.Wo / 2};
    gpool = cpu_output_like(grad_in, pshape, op, "grad_pooled");
    const at::Tensor& pk = *pool_packed_in;
    check_on_cpu(pk, op, "pool_packed");
    const int64_t cwo = (s.Co + 31) / 32;
    TORCH_CHECK_VALUE(pk.scalar_type() == at::kInt && pk.dim() == 4 && pk.size(0) == s.B &&
                          pk.size(1) == s.Ho && pk.size(2) == s.Wo && pk.size(3) == cwo,
                      "binslt::", op, ": pool_packed must be the unpooled spikes packed, [T*N, "
                      "Ho, Wo, ceil(Co/32)] = [", s.B, ", ", s.Ho, ", ", s.Wo, ", ", cwo,
                      "] int32, got ", pk.scalar_type(), " of shape ", shape_str(pk));
    pool_packed = pk.contiguous();
    pool = PoolGrad{gpool.data_ptr<float>(),
                    reinterpret_cast<const uint32_t*>(pool_packed.data_ptr<int32_t>()), s.Ho / 2,
                    s.Wo / 2, cwo};
  }
  const float* gsp = gs.defined() ? gs.data_ptr<float>() : nullptr;
  const PoolGrad* pgp = pool_packed_in.has_value() ? &pool : nullptr;
  const at::Tensor alpha = cpu_channel_vec(alpha_in, op, "alpha", s.Co);
  const at::Tensor scale = cpu_channel_vec(scale_in, op, "scale", s.Co);
  const at::Tensor shift = cpu_channel_vec(shift_in, op, "shift", s.Co);
  const at::Tensor mean = cpu_channel_vec(mean_in, op, "mean", s.Co);
  const at::Tensor var = cpu_channel_vec(var_in, op, "var", s.Co);
  std::optional<at::Tensor> res;
  if (residual_in.has_value()) res = cpu_output_like(*residual_in, oshape, op, "residual");
  const at::Tensor counts = counts_in.contiguous();
  const at::Tensor x_packed = x_packed_in.contiguous();
  const at::Tensor w_mask = w_mask_in.contiguous(), w_pos = w_pos_in.contiguous();

  std::vector<ChannelAffine> aff(s.Co);
  const float* ap = alpha.data_ptr<float>();
  for (int64_t c = 0; c < s.Co; ++c) {
    const float sc = scale.data_ptr<float>()[c], sh = shift.data_ptr<float>()[c];
    aff[c] = bn_train ? ChannelAffine{mean.data_ptr<float>()[c],
                                      invstd_of(var.data_ptr<float>()[c], bn_eps), sc, sh, true}
                      : ChannelAffine{0.0f, 1.0f, sc, sh, false};
  }
  const auto fopts = counts.options().dtype(at::kFloat);
  at::Tensor gz = at::empty({s.B, s.Co, s.Ho, s.Wo}, fopts);
  at::Tensor gcur = need_grad_current ? at::empty(oshape, fopts) : at::empty({0}, fopts);
  float* gcur_p = need_grad_current ? gcur.data_ptr<float>() : gz.data_ptr<float>();
  at::Tensor gscale = at::empty({s.Co}, fopts), gshift = at::empty({s.Co}, fopts);
  const float* rp = res ? res->data_ptr<float>() : nullptr;
  if (counts.scalar_type() == at::kChar)
    lif_bn_backward<int8_t>(s, counts.data_ptr<int8_t>(), gsp, pgp, ap, aff, rp, p, gcur_p,
                            gz.data_ptr<float>(), gscale.data_ptr<float>(),
                            gshift.data_ptr<float>());
  else if (counts.scalar_type() == at::kShort)
    lif_bn_backward<int16_t>(s, counts.data_ptr<int16_t>(), gsp, pgp, ap, aff, rp, p,
                             gcur_p, gz.data_ptr<float>(),
                             gscale.data_ptr<float>(), gshift.data_ptr<float>());
  else
    lif_bn_backward<int32_t>(s, counts.data_ptr<int32_t>(), gsp, pgp, ap, aff, rp, p,
                             gcur_p, gz.data_ptr<float>(),
                             gscale.data_ptr<float>(), gshift.data_ptr<float>());

  // A 1x1 kernel at stride 1 without padding (the linear layers, see ops.spiking_layer): both
  // gradients are plain matrix products over the B * Ho * Wo pixels.
  const bool pointwise = s.KH == 1 && s.KW == 1 && stride == 1 && padding == 0;
  const int64_t S = s.Ho * s.Wo;
  const int64_t unfold_bytes = unfold_matrix_bytes(s, in_channels);
  TORCH_CHECK(!(use_unfold_grad_x(s.H, s.W, s.KH, s.KW, unfold_bytes) ||
                use_unfold_grad_w(s.H, s.W, s.KH, s.KW, unfold_bytes)) ||
                  pointwise || unfold_bytes <= (int64_t{1} << 30),
              "binslt::", op, ": the forced 'unfold' gradient form would build a ",
              unfold_bytes >> 20, " MiB matrix for this ", s.H, "x", s.W, " map (it is meant "
              "for maps of a few pixels); use cpu_algorithms(grad_x='auto', grad_w='auto')");
  at::Tensor gw;
  bool int8_w = false;
  const bool int8_x = need_grad_x && !pointwise &&
                      !use_unfold_grad_x(s.H, s.W, s.KH, s.KW, unfold_bytes) &&
                      use_int8_grad_x(stride, padding, s.KH, s.KW, s.Ho, s.Wo);
  if (!pointwise && use_unfold_grad_w(s.H, s.W, s.KH, s.KW, unfold_bytes)) {
    gw = weight_grad_unfold(s, in_channels, gz, unpack_spikes_cpu(x_packed, in_channels));
  } else if (use_int8_grad_w(x_packed, stride, s.Ho, s.Wo, s.H + 2 * padding, s.W + 2 * padding,
                             s.Co * in_channels * s.KH * s.KW)) {
    gw = weight_grad_int8(s, in_channels, x_packed, gz);  // undefined where dZ is not finite
    int8_w = gw.defined();
  }
  if (gw.defined()) {
    // (the unfold or the int8 form)
  } else if (pointwise && (algo_config().grad_w == GradWAlgo::kUnfold ||
                           use_dense_grad_w(x_packed, s.Co * in_channels * s.KH * s.KW))) {
    // (A pointwise conv's matrix product is already its unfold form, per pixel.)
    const at::Tensor gz_t = gz.view({s.B, s.Co, S}).permute({1, 0, 2}).reshape({s.Co, s.B * S});
    gw = at::mm(gz_t, unpack_rows(x_packed, in_channels)).view({s.Co, in_channels, 1, 1});
  } else if (use_dense_grad_w(x_packed, s.Co * in_channels * s.KH * s.KW)) {
    if (use_taps_grad_w(s.Ho, s.Wo)) {
      gw = weight_grad_taps(s, in_channels, x_packed, gz);
    } else {
      // The GEMM form: ATen's weight gradient of the 0/1 input, unpacked.
      const at::Tensor x = unpack_spikes_cpu(x_packed, in_channels);
      const at::Tensor w_shape = at::empty({s.Co, in_channels, s.KH, s.KW}, fopts);
      gw = std::get<1>(at::convolution_backward(
          gz, x, w_shape, std::nullopt, {stride, stride}, {padding, padding}, {1, 1}, false,
          {0, 0}, 1, {false, true, false}));
    }
  } else {
    // dZ channel-last for the event form, with zero margins where stride 1 lets taps reach
    // past the border (see weight_grad).
    const int64_t margin_top = stride == 1 ? std::max<int64_t>(0, s.KH - 1 - padding) : 0;
    const int64_t margin_left = stride == 1 ? std::max<int64_t>(0, s.KW - 1 - padding) : 0;
    at::Tensor gz_cl = channels_last_copy(gz, margin_top, margin_left);
    // dX from the same margined copy where that form is the choice: the NCHW dZ goes now, the
    // copy inside input_grad_margined (one dZ in memory from here on).
    const bool dx_margined = need_grad_x && !pointwise && !int8_x &&
        input_grad_takes_margined(s, in_channels, w_mask, margin_top, margin_left);
    if (dx_margined) gz.reset();
    gw = weight_grad(s, in_channels, x_packed, gz_cl, margin_top, margin_left);
    if (dx_margined)
      return {input_grad_margined(s, in_channels, std::move(gz_cl), w_mask, w_pos, ap), gw, gcur,
              gscale, gshift};
  }

  at::Tensor gx = at::empty({0}, fopts);
  if (need_grad_x && pointwise) {
    const at::Tensor w = dense_weight(s, in_channels, w_mask, w_pos, ap).view({s.Co, in_channels});
    gx = at::matmul(w.t(), gz.view({s.B, s.Co, S})).view({s.T, s.N, in_channels, s.H, s.W});
  } else if (need_grad_x && use_unfold_grad_x(s.H, s.W, s.KH, s.KW, unfold_bytes)) {
    gx = input_grad_unfold(s, in_channels, gz, w_mask, w_pos, ap);
  } else if (int8_x && (gx = input_grad_int8(s, in_channels, gz, w_mask, w_pos, ap)).defined()) {
    // (undefined where dZ is not finite: then the float forms below)
  } else if (need_grad_x) {
    // After the int8 weight gradient, the margined form where it is the choice (the event
    // form's copy would have fed it).
    const int64_t mt = std::max<int64_t>(0, s.KH - 1 - padding),
                  ml = std::max<int64_t>(0, s.KW - 1 - padding);
    if (int8_w && !int8_x && input_grad_takes_margined(s, in_channels, w_mask, mt, ml)) {
      at::Tensor gz_cl = channels_last_copy(gz, mt, ml);
      gz.reset();
      gx = input_grad_margined(s, in_channels, std::move(gz_cl), w_mask, w_pos, ap);
    } else {
      gx = input_grad(s, in_channels, gz, w_mask, w_pos, ap);
    }
  }
  return {gx, gw, gcur, gscale, gshift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& counts_in, const at::Tensor& x_packed_in,
    const at::Tensor& w_mask_in, const at::Tensor& w_pos_in, const at::Tensor& alpha_in,
    const at::Tensor& scale_in, const at::Tensor& shift_in, const at::Tensor& mean_in,
    const at::Tensor& var_in, const std::optional<at::Tensor>& residual_in, int64_t in_channels,
    int64_t stride, int64_t padding, bool bn_train, double bn_eps, double tau, bool decay_input,
    double v_threshold, std::optional<double> v_reset, bool detach_reset, int64_t surrogate,
    double surrogate_alpha, bool need_grad_x, bool need_grad_current) {
  return bconv_lif_bwd_impl("bconv_lif_bwd", grad_in, std::nullopt, counts_in, x_packed_in,
                            w_mask_in, w_pos_in, alpha_in, scale_in, shift_in, mean_in, var_in,
                            residual_in, in_channels, stride, padding, bn_train, bn_eps, tau,
                            decay_input, v_threshold, v_reset, detach_reset, surrogate,
                            surrogate_alpha, need_grad_x, need_grad_current);
}

// The same for a layer whose spikes were 2x2 max-pooled (binslt::bconv_lif_bwd_pool2): the
// pooled gradient is routed inside the LIF backward, a row chunk at a time, so the unpooled
// gradient (one float per output spike) never exists whole.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_bwd_pool2_cpu(
    const at::Tensor& grad_pooled, const at::Tensor& pool_packed, const at::Tensor& counts_in,
    const at::Tensor& x_packed_in, const at::Tensor& w_mask_in, const at::Tensor& w_pos_in,
    const at::Tensor& alpha_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const at::Tensor& mean_in, const at::Tensor& var_in,
    const std::optional<at::Tensor>& residual_in, int64_t in_channels, int64_t stride,
    int64_t padding, bool bn_train, double bn_eps, double tau, bool decay_input,
    double v_threshold, std::optional<double> v_reset, bool detach_reset, int64_t surrogate,
    double surrogate_alpha, bool need_grad_x, bool need_grad_current) {
  return bconv_lif_bwd_impl("bconv_lif_bwd_pool2", grad_pooled, pool_packed, counts_in,
                            x_packed_in, w_mask_in, w_pos_in, alpha_in, scale_in, shift_in,
                            mean_in, var_in, residual_in, in_channels, stride, padding, bn_train,
                            bn_eps, tau, decay_input, v_threshold, v_reset, detach_reset,
                            surrogate, surrogate_alpha, need_grad_x, need_grad_current);
}

}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("bconv_lif_bwd", &binslt::cpu::bconv_lif_bwd_cpu);
  m.impl("bconv_lif_bwd_pool2", &binslt::cpu::bconv_lif_bwd_pool2_cpu);
}
