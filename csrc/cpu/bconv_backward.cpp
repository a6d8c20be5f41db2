// Backward of the fused binary conv + epilogue + LIF (binslt::bconv_lif_bwd).
//
// H is recomputed from the saved integer counts (never stored), BPTT gives dL/dX (the gradient
// of the input current), the BN backward gives dL/dZ; then the weight gradient
// (bconv_weight_grad.cpp) and the input gradient (bconv_input_grad.cpp) follow from dZ.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "binslt/aligned_vector.h"
#include "binslt/big_tensor.h"
#include "binslt/bconv_cpu.h"
#include "binslt/checks.h"
#include "binslt/cpu_algos.h"
#include "binslt/epilogue_cpu.h"
#include "binslt/float_key.h"
#include "binslt/isa_run.h"
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

// A residual of spikes given as words [T, N, Ho, Wo, ceil(Co/32)]: channel c's spikes of image n
// at flat pixels [s0, s0 + L) as 0. / 1., step t's into dst[t * kRowChunk + i].
inline void residual_rows(const ConvShape& s, const uint32_t* bits, int64_t n, int64_t c,
                          int64_t s0, int L, float* dst) {
  const int64_t cw = (s.Co + 31) / 32, S = s.Ho * s.Wo;
  const uint32_t bit = 1u << (c & 31);
  for (int64_t t = 0; t < s.T; ++t) {
    const uint32_t* w = bits + ((t * s.N + n) * S + s0) * cw + (c >> 5);
    float* out = dst + t * kRowChunk;
    for (int i = 0; i < L; ++i) out[i] = (w[i * cw] & bit) ? 1.0f : 0.0f;
  }
}

// What the LIF/BN backward of every channel reads and writes: dL/dspikes from gs, or from pg
// (then gs is unused); dL/dX into gcur, dL/dZ into gz, the per-channel sums into gsc / gsh.
template <typename CT>
struct LifBnJob {
  const ConvShape* s;
  const CT* counts;
  const float* gs;
  const PoolGrad* pg;
  const float* alpha;
  const ChannelAffine* aff;
  const float* res;
  const uint32_t* res_bits;  // or the residual as spike words [T, N, Ho, Wo, ceil(Co/32)]
  NeuronParams p;
  float *gcur, *gz, *gsc, *gsh;
  char* nonfinite;  // [Co]: channel c's dZ holds a NaN or an infinity
  float* absmax;    // [Co]: channel c's largest |dZ| (the int8 weight gradient's scale)
};

// One thread's scratch: hbuf, gbuf, rbuf T * kRowChunk floats, acc_g / acc_gx kRowChunk doubles.
struct LifBnScratch {
  float *hbuf, *gbuf, *rbuf;
  double *acc_g, *acc_gx;
};

// dL/dX (grad_current) and dL/dZ of channel c from its counts, and the channel's sums.
template <typename CT>
static inline __attribute__((always_inline)) void lif_bn_channel_body(const LifBnJob<CT>& job,
                                                                      int64_t c,
                                                                      const LifBnScratch& sc) {
  const ConvShape& s = *job.s;
  const CT* counts = job.counts;
  const PoolGrad* pg = job.pg;
  const float* res = job.res;
  const NeuronParams p = job.p;
  const ChannelAffine aff = job.aff[c];
  float* gcur = job.gcur;
  float* gz = job.gz;
  double* acc_g = sc.acc_g;
  double* acc_gx = sc.acc_gx;
  const int64_t S = s.Ho * s.Wo;
  const int64_t step_stride = s.N * s.Co * S;
  const double m = static_cast<double>(s.T * s.N * S);
  const float a = job.alpha[c];
  for (int i = 0; i < kRowChunk; ++i) acc_g[i] = acc_gx[i] = 0.0;
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t s0 = 0; s0 < S; s0 += kRowChunk) {
      const int L = static_cast<int>(std::min<int64_t>(kRowChunk, S - s0));
      const int64_t off = (n * s.Co + c) * S + s0;
      const CT* cr = counts + off;
      auto zat = [cr, a, step_stride](int t, int i) {
        return static_cast<float>(cr[t * step_stride + i]) * a;
      };
      if (pg != nullptr) pg->rows(s, n, c, s0, L, sc.gbuf);
      const float* r = res != nullptr ? res + off : nullptr;
      if (job.res_bits != nullptr) {  // the row's residual spikes out of their words
        residual_rows(s, job.res_bits, n, c, s0, L, sc.rbuf);
        r = sc.rbuf;
      }
      BpttRow row{pg != nullptr ? sc.gbuf : job.gs + off, gcur + off, sc.hbuf, acc_g, acc_gx,
                  pg != nullptr ? kRowChunk : step_stride};
      if (job.res_bits != nullptr) row.res_step = kRowChunk;
      lif_backward_row(static_cast<int>(s.T), L, zat, aff, r, step_stride, p, row);
    }
  double sg = 0.0, sgx = 0.0;
  for (int i = 0; i < kRowChunk; ++i) {
    sg += acc_g[i];
    sgx += acc_gx[i];
  }
  job.gsh[c] = static_cast<float>(sg);
  job.gsc[c] = static_cast<float>(sgx);
  const ZGrad zg = make_zgrad(aff, sg, sgx, m);
  // The largest |v| and the non-finite test as one integer max of abs_key (float_key.h: a float
  // max or test left this loop scalar).
  uint32_t top = 0;
  for (int64_t tn = 0; tn < s.T * s.N; ++tn) {
    const int64_t off = (tn * s.Co + c) * S;
    for (int64_t i = 0; i < S; ++i) {
      const float v = zg(gcur[off + i], static_cast<float>(counts[off + i]) * a);
      gz[off + i] = v;
      const uint32_t key = abs_key(v);
      top = key > top ? key : top;
    }
  }
  job.nonfinite[c] = static_cast<char>(top >= KeyOf<float>::kInf);
  job.absmax[c] = float_of_key(top);  // read only where every channel is finite
}

// One thread's per-lane values of a row of channels [c0, c1) (lane i: pixel i % S of channel
// c0 + i / S, S = Ho * Wo) besides the LaneTable's: the BN backward's terms, the largest |dZ|.
struct alignas(64) LaneScratch {
  double k[kRowChunk], mg[kRowChunk], mgx[kRowChunk];
  uint32_t top[kRowChunk];
};

// lif_bn_channel_body for channels [c0, c1) at once, (c1 - c0) * S <= kRowChunk, with the same
// arithmetic: each lane runs its pixel's steps as the per-channel row does, and each channel's sums
// add its lanes in the same order, so the results are bit-identical to it.
template <typename CT>
static inline __attribute__((always_inline)) void lif_bn_block_body(const LifBnJob<CT>& job,
                                                                    int64_t c0, int64_t c1,
                                                                    const LaneTable& lanes,
                                                                    const LifBnScratch& sc,
                                                                    LaneScratch& ln) {
  const ConvShape& s = *job.s;
  const CT* counts = job.counts;
  const PoolGrad* pg = job.pg;
  const NeuronParams p = job.p;
  float* gcur = job.gcur;
  float* gz = job.gz;
  double* acc_g = sc.acc_g;
  double* acc_gx = sc.acc_gx;
  const int64_t S = s.Ho * s.Wo;
  const int L = static_cast<int>((c1 - c0) * S);
  const int64_t step_stride = s.N * s.Co * S;
  const double m = static_cast<double>(s.T * s.N * S);
  const LaneAffine laff = lanes.affine(c0);
  const float* la = lanes.alpha(c0);
  for (int i = 0; i < kRowChunk; ++i) acc_g[i] = acc_gx[i] = 0.0;
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t off = (n * s.Co + c0) * S;
    const CT* cr = counts + off;
    auto zat = [cr, la, step_stride](int t, int i) {
      return static_cast<float>(cr[t * step_stride + i]) * la[i];
    };
    if (pg != nullptr)
      for (int64_t c = c0; c < c1; ++c)
        pg->rows(s, n, c, 0, static_cast<int>(S), sc.gbuf + (c - c0) * S);
    const float* r = job.res != nullptr ? job.res + off : nullptr;
    if (job.res_bits != nullptr) {  // the rows' residual spikes out of their words
      for (int64_t c = c0; c < c1; ++c)
        residual_rows(s, job.res_bits, n, c, 0, static_cast<int>(S), sc.rbuf + (c - c0) * S);
      r = sc.rbuf;
    }
    BpttRow row{pg != nullptr ? sc.gbuf : job.gs + off, gcur + off, sc.hbuf, acc_g, acc_gx,
                pg != nullptr ? kRowChunk : step_stride};
    if (job.res_bits != nullptr) row.res_step = kRowChunk;
    lif_backward_row(static_cast<int>(s.T), L, zat, laff, r, step_stride, p, row);
  }
  for (int64_t c = c0; c < c1; ++c) {
    // The per-channel row adds its kRowChunk lanes: the S used, then zeros (which turn a -0.0
    // sum into +0.0; one x + 0.0 does the same).
    double sg = 0.0, sgx = 0.0;
    for (int64_t i = (c - c0) * S; i < (c - c0 + 1) * S; ++i) {
      sg += acc_g[i];
      sgx += acc_gx[i];
    }
    if (S < kRowChunk) {
      sg += 0.0;
      sgx += 0.0;
    }
    job.gsh[c] = static_cast<float>(sg);
    job.gsc[c] = static_cast<float>(sgx);
    const ZGrad zg = make_zgrad(job.aff[c], sg, sgx, m);
    for (int64_t i = (c - c0) * S; i < (c - c0 + 1) * S; ++i) {
      ln.k[i] = zg.k;
      ln.mg[i] = zg.mg;
      ln.mgx[i] = zg.mgx;
    }
  }
  const LaneZGrad zg{ln.k, ln.mg, ln.mgx, laff.mean, laff.invstd, laff.scale, laff.train};
  uint32_t* top = ln.top;
  for (int i = 0; i < L; ++i) top[i] = 0;
  for (int64_t tn = 0; tn < s.T * s.N; ++tn) {
    const int64_t off = (tn * s.Co + c0) * S;
    const CT* cr = counts + off;
    const float* gc = gcur + off;
    float* out = gz + off;
    for (int i = 0; i < L; ++i) {
      const float v = zg(gc[i], static_cast<float>(cr[i]) * la[i], i);
      out[i] = v;
      const uint32_t key = abs_key(v);
      top[i] = key > top[i] ? key : top[i];
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    uint32_t t = 0;
    for (int64_t i = (c - c0) * S; i < (c - c0 + 1) * S; ++i) t = top[i] > t ? top[i] : t;
    job.nonfinite[c] = static_cast<char>(t >= KeyOf<float>::kInf);
    job.absmax[c] = float_of_key(t);
  }
}

// dL/dX (grad_current) and dL/dZ from the counts, and the per-channel sums, over all channels:
// a channel per row, or row_block_channels channels per row where the maps are short.
template <typename CT>
void lif_bn_backward(const LifBnJob<CT>& job) {
  const Isa isa = active_isa();
  const ConvShape& s = *job.s;
  const int64_t per = row_block_channels(lanes_per_row(s.Ho * s.Wo), s.Co);
  const int64_t blocks = (s.Co + per - 1) / per;
  const LaneTable lanes(job.alpha, job.aff, per > 1 ? s.Co : 0, s.Ho * s.Wo);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    line_vector<float> hbuf(static_cast<size_t>(s.T) * kRowChunk);
    line_vector<float> gbuf(job.pg != nullptr ? static_cast<size_t>(s.T) * kRowChunk : 0);
    line_vector<float> rbuf(job.res_bits != nullptr ? static_cast<size_t>(s.T) * kRowChunk : 0);
    line_vector<double> acc_g(kRowChunk), acc_gx(kRowChunk);
    const LifBnScratch sc{hbuf.data(), gbuf.data(), rbuf.data(), acc_g.data(), acc_gx.data()};
    if (per == 1) {
      for (int64_t c = b0; c < b1; ++c)
        run_for_isa(isa, [&]() __attribute__((always_inline)) { lif_bn_channel_body(job, c, sc); });
      return;
    }
    auto ln = std::make_unique<LaneScratch>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * per, c1 = std::min(s.Co, c0 + per);
      run_for_isa(isa, [&]() __attribute__((always_inline)) {
        lif_bn_block_body(job, c0, c1, lanes, sc, *ln);
      });
    }
  });
}

// The op's tensor arguments as they come (bconv_lif_bwd_pool2: grad is the pooled gradient and
// pool_packed the unpooled spikes' bits).
struct BwdInputs {
  const at::Tensor& grad;
  const std::optional<at::Tensor>& pool_packed;
  const at::Tensor &counts, &x_packed, &w_mask, &w_pos;
  const at::Tensor &alpha, &scale, &shift, &mean, &var;
  const std::optional<at::Tensor>& residual;
};

// The op's other settings (the neuron's are packed into NeuronParams).
struct BwdSettings {
  int64_t in_channels, stride, padding;
  bool bn_train;
  double bn_eps;
  bool need_grad_x, need_grad_current;
};

// The checked, contiguous inputs.
struct BwdArgs {
  const char* op;
  ConvShape s;
  int64_t Ci;
  at::Tensor gs, gpool, pool_packed, counts, x_packed, w_mask, w_pos;
  at::Tensor alpha, scale, shift, mean, var;
  std::optional<at::Tensor> res;  // float [T, N, Co, Ho, Wo], or spike words [T, N, Ho, Wo, Cow]
  BwdSettings st;
  NeuronParams p;
  PoolGrad pool{};
  const PoolGrad* pool_grad() const { return pool_packed.defined() ? &pool : nullptr; }
};

BwdArgs check_bwd(const char* op, const BwdInputs& in, const BwdSettings& st,
                  const NeuronParams& p) {
  TORCH_CHECK(in.counts.dim() == 5, "binslt::", op,
              ": counts must be [T, N, Co, Ho, Wo] (from bconv_lif), got shape ",
              shape_str(in.counts));
  BwdArgs a;
  a.op = op;
  a.st = st;
  a.p = p;
  a.s = check_conv(in.x_packed, in.w_mask, in.w_pos, in.counts.size(0), st.stride, st.padding,
                   op);
  const ConvShape& s = a.s;
  const std::vector<int64_t> oshape{s.T, s.N, s.Co, s.Ho, s.Wo};
  TORCH_CHECK(in.counts.sizes() == at::IntArrayRef(oshape), "binslt::", op, ": counts must have "
              "shape ", at::IntArrayRef(oshape), " for this input/weight/stride/padding, got ",
              shape_str(in.counts));
  const at::ScalarType count_type = counts_dtype(s.Cw, s.KH, s.KW);
  // (int8: the autograd path keeps counts that all fit in int8 as int8 on the CPU)
  TORCH_CHECK(in.counts.scalar_type() == count_type || in.counts.scalar_type() == at::kChar,
              "binslt::", op, ": counts must be ", count_type,
              " for this weight (as returned by bconv_lif), or int8, got ",
              in.counts.scalar_type());
  TORCH_CHECK_VALUE(st.in_channels >= 1 && st.in_channels <= 32 * s.Cw, "binslt::", op,
                    ": in_channels must be in [1, 32*Cw] = [1, ", 32 * s.Cw, "], got ",
                    st.in_channels);
  a.Ci = st.in_channels;
  check_bn_eps(op, st.bn_eps);
  if (!in.pool_packed.has_value()) {
    a.gs = cpu_output_like(in.grad, oshape, op, "grad_spikes");
  } else {
    TORCH_CHECK_VALUE(s.Ho >= 2 && s.Wo >= 2, "binslt::", op, ": a 2x2-pooled layer needs an "
                      "output of at least 2x2, got ", s.Ho, "x", s.Wo);
    const std::vector<int64_t> pshape{s.T, s.N, s.Co, s.Ho / 2, s.Wo / 2};
    a.gpool = cpu_output_like(in.grad, pshape, op, "grad_pooled");
    const at::Tensor& pk = *in.pool_packed;
    check_on_cpu(pk, op, "pool_packed");
    const int64_t cwo = (s.Co + 31) / 32;
    TORCH_CHECK_VALUE(pk.scalar_type() == at::kInt && pk.dim() == 4 && pk.size(0) == s.B &&
                          pk.size(1) == s.Ho && pk.size(2) == s.Wo && pk.size(3) == cwo,
                      "binslt::", op, ": pool_packed must be the unpooled spikes packed, [T*N, "
                      "Ho, Wo, ceil(Co/32)] = [", s.B, ", ", s.Ho, ", ", s.Wo, ", ", cwo,
                      "] int32, got ", pk.scalar_type(), " of shape ", shape_str(pk));
    a.pool_packed = pk.contiguous();
    a.pool = PoolGrad{a.gpool.data_ptr<float>(),
                      reinterpret_cast<const uint32_t*>(a.pool_packed.data_ptr<int32_t>()),
                      s.Ho / 2, s.Wo / 2, cwo};
  }
  a.alpha = cpu_channel_vec(in.alpha, op, "alpha", s.Co);
  a.scale = cpu_channel_vec(in.scale, op, "scale", s.Co);
  a.shift = cpu_channel_vec(in.shift, op, "shift", s.Co);
  a.mean = cpu_channel_vec(in.mean, op, "mean", s.Co);
  a.var = cpu_channel_vec(in.var, op, "var", s.Co);
  if (in.residual.has_value() && in.residual->scalar_type() == at::kInt) {
    // a residual of spikes as pack_spikes words, read so by the LIF/BN stage (as the forward)
    const int64_t cwo = (s.Co + 31) / 32;
    check_on_cpu(*in.residual, op, "residual");
    TORCH_CHECK_VALUE(in.residual->sizes() == at::IntArrayRef({s.T, s.N, s.Ho, s.Wo, cwo}),
                      "binslt::", op, ": a packed residual must be spike words [T, N, Ho, Wo, "
                      "ceil(Co/32)] = ", at::IntArrayRef({s.T, s.N, s.Ho, s.Wo, cwo}),
                      ", got shape ", shape_str(*in.residual));
    a.res = in.residual->contiguous();
  } else if (in.residual.has_value()) {
    a.res = cpu_output_like(*in.residual, oshape, op, "residual");
  }
  a.counts = in.counts.contiguous();
  a.x_packed = in.x_packed.contiguous();
  a.w_mask = in.w_mask.contiguous();
  a.w_pos = in.w_pos.contiguous();
  return a;
}

// The LIF/BN stage's outputs: dL/dZ [B, Co, Ho, Wo], grad_current (or [0]), grad_scale,
// grad_shift.
struct LifBnOut {
  at::Tensor gz, gcur, gscale, gshift;
  bool gz_finite = true;  // no NaN or infinity in dL/dZ
  std::vector<float> absmax;  // [Co]: each channel's largest |dL/dZ|
};

LifBnOut lif_bn_stage(const BwdArgs& a) {
  const ConvShape& s = a.s;
  std::vector<ChannelAffine> aff(s.Co);
  for (int64_t c = 0; c < s.Co; ++c) {
    const float sc = a.scale.data_ptr<float>()[c], sh = a.shift.data_ptr<float>()[c];
    aff[c] = a.st.bn_train
                 ? ChannelAffine{a.mean.data_ptr<float>()[c],
                                 invstd_of(a.var.data_ptr<float>()[c], a.st.bn_eps), sc, sh, true}
                 : ChannelAffine{0.0f, 1.0f, sc, sh, false};
  }
  const auto fopts = a.counts.options().dtype(at::kFloat);
  LifBnOut o;
  o.gz = empty_big({s.B, s.Co, s.Ho, s.Wo}, fopts);
  o.gcur = a.st.need_grad_current ? empty_big({s.T, s.N, s.Co, s.Ho, s.Wo}, fopts)
                                  : at::empty({0}, fopts);
  o.gscale = at::empty({s.Co}, fopts);
  o.gshift = at::empty({s.Co}, fopts);
  // Without grad_current, dL/dX goes into dZ's buffer and becomes dL/dZ in place.
  float* gcur_p = a.st.need_grad_current ? o.gcur.data_ptr<float>() : o.gz.data_ptr<float>();
  std::vector<char> nonfinite(s.Co, 0);
  o.absmax.assign(s.Co, 0.0f);
  auto run = [&](auto* counts) {
    using CT = std::remove_const_t<std::remove_pointer_t<decltype(counts)>>;
    const LifBnJob<CT> job{&s,
                           counts,
                           a.gs.defined() ? a.gs.data_ptr<float>() : nullptr,
                           a.pool_grad(),
                           a.alpha.data_ptr<float>(),
                           aff.data(),
                           a.res && a.res->scalar_type() == at::kFloat
                               ? a.res->data_ptr<float>()
                               : nullptr,
                           a.res && a.res->scalar_type() == at::kInt
                               ? reinterpret_cast<const uint32_t*>(a.res->data_ptr<int32_t>())
                               : nullptr,
                           a.p,
                           gcur_p,
                           o.gz.data_ptr<float>(),
                           o.gscale.data_ptr<float>(),
                           o.gshift.data_ptr<float>(),
                           nonfinite.data(),
                           o.absmax.data()};
    lif_bn_backward(job);
  };
  if (a.counts.scalar_type() == at::kChar)
    run(a.counts.data_ptr<int8_t>());
  else if (a.counts.scalar_type() == at::kShort)
    run(a.counts.data_ptr<int16_t>());
  else
    run(a.counts.data_ptr<int32_t>());
  o.gz_finite = std::all_of(nonfinite.begin(), nonfinite.end(), [](char b) { return b == 0; });
  return o;
}

// The weight gradient of plan.grad_w from dZ (gz); absmax: dZ finite, each channel's largest
// |dZ| (the int8 form's scale, else found from dZ). The event form leaves its channel-last,
// zero-margined copy of dZ in gz_cl, and releases gz when the input gradient is to run from that
// copy ("margined"). A split form (int8, bf16x3) that meets a dZ that is not finite gives way to
// plan.grad_w_nonfinite (recorded in the plan).
at::Tensor run_grad_w(const BwdArgs& a, BackwardPlan& plan, at::Tensor& gz, at::Tensor& gz_cl,
                      const float* absmax = nullptr) {
  const ConvShape& s = a.s;
  const int64_t Ci = a.Ci;
  for (;;) {
    switch (plan.grad_w) {
      case GradWPlan::kUnfold:
        return weight_grad_unfold(s, Ci, gz, unpack_spikes_cpu(a.x_packed, Ci));
      case GradWPlan::kInt8:
      case GradWPlan::kBf16x3: {
        at::Tensor gw = plan.grad_w == GradWPlan::kInt8
                            ? weight_grad_int8(s, Ci, a.x_packed, gz, absmax)
                            : weight_grad_bf16x3(s, Ci, a.x_packed, gz);
        if (gw.defined()) return gw;
        plan.grad_w = plan.grad_w_nonfinite;
        plan.nonfinite = true;
        break;
      }
      case GradWPlan::kPointwise: {
        const int64_t S = s.Ho * s.Wo;
        const at::Tensor gz_t =
            gz.view({s.B, s.Co, S}).permute({1, 0, 2}).reshape({s.Co, s.B * S});
        return at::mm(gz_t, unpack_rows(a.x_packed, Ci)).view({s.Co, Ci, 1, 1});
      }
      case GradWPlan::kTaps:
        return weight_grad_taps(s, Ci, a.x_packed, gz);
      case GradWPlan::kDense: {
        // ATen's weight gradient of the 0/1 input, unpacked.
        const at::Tensor x = unpack_spikes_cpu(a.x_packed, Ci);
        const at::Tensor w_shape = at::empty({s.Co, Ci, s.KH, s.KW}, gz.options());
        return std::get<1>(at::convolution_backward(
            gz, x, w_shape, std::nullopt, {s.stride, s.stride}, {s.padding, s.padding}, {1, 1},
            false, {0, 0}, 1, {false, true, false}));
      }
      default: {  // event: dZ channel-last, with zero margins where stride 1 lets taps reach
                  // past the border (see weight_grad)
        const int64_t mt = s.stride == 1 ? std::max<int64_t>(0, s.KH - 1 - s.padding) : 0;
        const int64_t ml = s.stride == 1 ? std::max<int64_t>(0, s.KW - 1 - s.padding) : 0;
        if (plan.grad_x != GradXPlan::kMargined)  // each image turned channel-last in turn
          return weight_grad(s, Ci, a.x_packed, gz, false, mt, ml);
        // the margined input gradient reads the whole copy too: one dZ in memory from here on
        gz_cl = channels_last_copy(gz, mt, ml);
        gz.reset();
        return weight_grad(s, Ci, a.x_packed, gz_cl, true, mt, ml);
      }
    }
  }
}

// The input gradient of plan.grad_x ([0] for "none"); gz_cl: the event weight gradient's copy
// of dZ, if it made one (the margined form's input, made here otherwise). With gz_spent (dZ
// finite and read by nothing after), the int8 form writes the input gradient over dZ where the
// two have one shape (Ci = Co, the same map): one float map less at the backward's peak.
at::Tensor run_grad_x(const BwdArgs& a, BackwardPlan& plan, at::Tensor& gz, at::Tensor& gz_cl,
                      bool gz_spent = false) {
  const ConvShape& s = a.s;
  const int64_t Ci = a.Ci;
  const float* ap = a.alpha.data_ptr<float>();
  for (;;) {
    switch (plan.grad_x) {
      case GradXPlan::kNone:
        return at::empty({0}, a.counts.options().dtype(at::kFloat));
      case GradXPlan::kPointwise: {
        const at::Tensor w = dense_weight(s, Ci, a.w_mask, a.w_pos, ap).view({s.Co, Ci});
        return at::matmul(w.t(), gz.view({s.B, s.Co, s.Ho * s.Wo}))
            .view({s.T, s.N, Ci, s.H, s.W});
      }
      case GradXPlan::kUnfold:
        return input_grad_unfold(s, Ci, gz, a.w_mask, a.w_pos, ap);
      case GradXPlan::kInt8:
      case GradXPlan::kBf16x3: {
        const bool over_gz = gz_spent && Ci == s.Co && s.H == s.Ho && s.W == s.Wo;
        at::Tensor gx = plan.grad_x == GradXPlan::kInt8
                            ? input_grad_int8(s, Ci, gz, a.w_mask, a.w_pos, ap, over_gz)
                            : input_grad_bf16x3(s, Ci, gz, a.w_mask, a.w_pos, ap);
        if (gx.defined()) return gx;
        plan.grad_x = plan.grad_x_nonfinite;
        plan.nonfinite = true;
        break;
      }
      case GradXPlan::kTernary:
      case GradXPlan::kCombo:
        return input_grad_ternary(s, Ci, gz, a.w_mask, a.w_pos, ap,
                                  plan.grad_x == GradXPlan::kCombo);
      case GradXPlan::kDense:
        return input_grad_dense(s, Ci, gz, a.w_mask, a.w_pos, ap);
      default: {  // margined
        if (!gz_cl.defined()) {
          gz_cl = channels_last_copy(gz, s.KH - 1 - s.padding, s.KW - 1 - s.padding);
          gz.reset();
        }
        return input_grad_margined(s, Ci, std::move(gz_cl), a.w_mask, a.w_pos, ap);
      }
    }
  }
}

// One gradient's candidates timed (measure_plan); run(plan) computes it. Where a split candidate
// gave way on a dZ that is not finite nothing is recorded, and the plan shows the float form.
template <class Alg, class Run>
at::Tensor time_gradient(BackwardPlan& plan, Alg BackwardPlan::*field,
                         Alg BackwardPlan::*nonfinite, const std::vector<Alg>& candidates,
                         const std::string& key, Run&& run) {
  bool invalid = false;
  at::Tensor g = measure_plan(plan, field, candidates, key, &invalid, [&](BackwardPlan& p) {
    at::Tensor r = run(p);
    invalid = invalid || p.nonfinite;
    return r;
  });
  if (invalid && split_form(plan.*field)) {
    plan.*field = plan.*nonfinite;
    plan.nonfinite = true;
  }
  return g;
}

// The body of both ops: the LIF/BN backward, the plan, then its two gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_bwd_run(
    const char* op, const BwdInputs& in, const BwdSettings& st, const NeuronParams& p) {
  const PlanLog log(op);
  const BwdArgs a = check_bwd(op, in, st, p);
  const ConvShape& s = a.s;
  const at::Tensor& w_mask = a.w_mask;
  const at::Tensor& x_packed = a.x_packed;
  const int64_t weights = s.Co * s.KH * s.KW * a.Ci;
  BackwardQuery q{s, a.Ci, st.need_grad_x,
                  LazyValue([&x_packed] { return packed_rate(x_packed); }),
                  LazyValue([&w_mask, weights] {
                    const uint32_t* m =
                        reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
                    return static_cast<double>(count_set_bits(m, w_mask.numel())) /
                           static_cast<double>(std::max<int64_t>(1, weights));
                  })};
  q.op = op;
  q.variant = c10::str(st.bn_train ? "bn_train" : "bn_eval",
                       in.residual.has_value() ? " residual" : "",
                       in.pool_packed.has_value() ? " pool=2" : "",
                       st.need_grad_current ? " grad_current" : "");
  BackwardPlan plan = plan_backward(q);
  LifBnOut o = lif_bn_stage(a);
  at::Tensor gz_cl, gw, gx;
  const bool time_x = !plan.candidates_x.empty();
  if (plan.candidates_w.empty()) {
    // dZ stays whole for the input gradient's candidates where they are to be timed
    BackwardPlan pw = plan;
    if (time_x) pw.grad_x = GradXPlan::kNone;
    gw = run_grad_w(a, pw, o.gz, gz_cl, o.gz_finite ? o.absmax.data() : nullptr);
    plan.grad_w = pw.grad_w;
    plan.nonfinite = pw.nonfinite;
  } else {
    gw = time_gradient(plan, &BackwardPlan::grad_w, &BackwardPlan::grad_w_nonfinite,
                       plan.candidates_w, plan.key_w, [&](BackwardPlan& p) {
                         p.grad_x = GradXPlan::kNone;  // keeps dZ
                         at::Tensor cl;
                         return run_grad_w(a, p, o.gz, cl);
                       });
    plan.source_w = PlanSource::kMeasuring;
  }
  // The event weight gradient's channel-last copy of dZ is read on only by the margined input
  // gradient: released before any other (measured ones make their own).
  if (time_x || plan.grad_x != GradXPlan::kMargined) gz_cl.reset();
  if (!time_x) {
    gx = run_grad_x(a, plan, o.gz, gz_cl, o.gz_finite);
  } else {
    gx = time_gradient(plan, &BackwardPlan::grad_x, &BackwardPlan::grad_x_nonfinite,
                       plan.candidates_x, plan.key_x, [&](BackwardPlan& p) {
                         at::Tensor gz = o.gz, cl;  // a handle: the margined form drops its own
                         return run_grad_x(a, p, gz, cl);
                       });
    plan.source_x = PlanSource::kMeasuring;
  }
  log.emit(conv_shapes(s, a.Ci), plan.describe());
  return {gx, gw, o.gcur, o.gscale, o.gshift};
}

}  // namespace

// grad_spikes: [T, N, Co, Ho, Wo] float32; counts: [T, N, Co, Ho, Wo] int16/int32 (from
// bconv_lif); x_packed: [T*N, H, W, Cw] int32; w_mask, w_pos: [Co, kh, kw, Cw] int32;
// alpha, scale, shift, mean, var: [Co] float32; residual: [T, N, Co, Ho, Wo] float32, a residual
// of spikes as pack_spikes words [T, N, Ho, Wo, ceil(Co/32)] int32, or None
// -> grad_x [T, N, Ci, H, W] (or [0]), grad_weight [Co, Ci, kh, kw], grad_current like counts
//    (or [0] unless need_grad_current: dL/dX is then written into dL/dZ's buffer and turned into
//    dL/dZ in place, element by element), grad_scale [Co], grad_shift [Co]
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& counts_in, const at::Tensor& x_packed_in,
    const at::Tensor& w_mask_in, const at::Tensor& w_pos_in, const at::Tensor& alpha_in,
    const at::Tensor& scale_in, const at::Tensor& shift_in, const at::Tensor& mean_in,
    const at::Tensor& var_in, const std::optional<at::Tensor>& residual_in, int64_t in_channels,
    int64_t stride, int64_t padding, bool bn_train, double bn_eps, double tau, bool decay_input,
    double v_threshold, std::optional<double> v_reset, bool detach_reset, int64_t surrogate,
    double surrogate_alpha, bool need_grad_x, bool need_grad_current) {
  const char* op = "bconv_lif_bwd";
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset, detach_reset,
                                        surrogate, surrogate_alpha);
  const std::optional<at::Tensor> no_pool;
  return bconv_lif_bwd_run(
      op,
      {grad_in, no_pool, counts_in, x_packed_in, w_mask_in, w_pos_in, alpha_in, scale_in,
       shift_in, mean_in, var_in, residual_in},
      {in_channels, stride, padding, bn_train, bn_eps, need_grad_x, need_grad_current}, p);
}

// The same for a layer whose spikes were 2x2 max-pooled (binslt::bconv_lif_bwd_pool2): the
// pooled gradient [T, N, Co, Ho/2, Wo/2] is routed inside the LIF backward, a row chunk at a
// time, through pool_packed [T*N, Ho, Wo, ceil(Co/32)] int32 (the unpooled spikes' bits), so the
// unpooled gradient (one float per output spike) never exists whole.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_bwd_pool2_cpu(
    const at::Tensor& grad_pooled, const at::Tensor& pool_packed, const at::Tensor& counts_in,
    const at::Tensor& x_packed_in, const at::Tensor& w_mask_in, const at::Tensor& w_pos_in,
    const at::Tensor& alpha_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const at::Tensor& mean_in, const at::Tensor& var_in,
    const std::optional<at::Tensor>& residual_in, int64_t in_channels, int64_t stride,
    int64_t padding, bool bn_train, double bn_eps, double tau, bool decay_input,
    double v_threshold, std::optional<double> v_reset, bool detach_reset, int64_t surrogate,
    double surrogate_alpha, bool need_grad_x, bool need_grad_current) {
  const char* op = "bconv_lif_bwd_pool2";
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset, detach_reset,
                                        surrogate, surrogate_alpha);
  const std::optional<at::Tensor> pool(pool_packed);
  return bconv_lif_bwd_run(
      op,
      {grad_pooled, pool, counts_in, x_packed_in, w_mask_in, w_pos_in, alpha_in, scale_in,
       shift_in, mean_in, var_in, residual_in},
      {in_channels, stride, padding, bn_train, bn_eps, need_grad_x, need_grad_current}, p);
}

}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("bconv_lif_bwd", &binslt::cpu::bconv_lif_bwd_cpu);
  m.impl("bconv_lif_bwd_pool2", &binslt::cpu::bconv_lif_bwd_pool2_cpu);
}
