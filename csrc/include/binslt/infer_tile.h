// The forward's epilogue over a tile of counts, shared by the bit kernels' route
// (bconv_forward.cpp) and the oneDNN route (bconv_onednn.cpp): the LIF over T from integer
// counts, and the inference output (pooled and/or packed spikes) of one tile.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "binslt/bconv_cpu.h"
#include "binslt/cpu_algos.h"
#include "binslt/epilogue_cpu.h"
#include "binslt/isa_run.h"
#include "binslt/lif.h"
#include "binslt/pack_cpu.h"

namespace binslt {
namespace cpu {

// The forward epilogue's inputs: the ISA path, the per-channel vectors [Co] (alpha: the count's
// gain; scale, shift: the eval affine), the residual [T, N, Co, Ho, Wo] float32 (or null) and
// the neuron.
struct FwdEpilogue {
  Isa isa;
  const float* alpha;
  const float* scale;
  const float* shift;
  const float* res;
  NeuronParams p;
};

// One channel's row of L neurons over T steps: counts cr (steps count_step_stride apart) times
// a, the affine aff, the residual res (or null), spikes into out (steps step_stride apart).
// lif_forward_row is compiled for the wider vector units too (run_for_isa); its float arithmetic
// is the same on every path, so the spikes do not depend on the CPU.
template <typename CT>
void lif_counts(const FwdEpilogue& ep, int T, int L, const CT* cr, int64_t count_step_stride,
                float a, const ChannelAffine& aff, const float* res, int64_t step_stride,
                float* out) {
  run_for_isa(ep.isa, [&]() __attribute__((always_inline)) {
    auto zat = [cr, a, count_step_stride](int t, int i) {
      return static_cast<float>(cr[t * count_step_stride + i]) * a;
    };
    lif_forward_row(T, L, zat, aff, res, step_stride, ep.p, out);
  });
}

// lif_counts over a row of several channels' maps: lane i's current is cr[i] * a[i] and its
// epilogue aff's lane i (the same spikes as lif_counts over each channel's row).
template <typename CT>
void lif_counts_lanes(const FwdEpilogue& ep, int T, int L, const CT* cr,
                      int64_t count_step_stride, const float* a, const LaneAffine& aff,
                      const float* res, int64_t step_stride, float* out) {
  run_for_isa(ep.isa, [&]() __attribute__((always_inline)) {
    auto zat = [cr, a, count_step_stride](int t, int i) {
      return static_cast<float>(cr[t * count_step_stride + i]) * a[i];
    };
    lif_forward_row(T, L, zat, aff, res, step_stride, ep.p, out);
  });
}

// The inference output: 2x2 (stride 2) OR-pooled spikes when pool == 2 (a max of {0,1} spikes
// is their OR; rows/columns past 2*(Ho/2), 2*(Wo/2) are dropped, as max_pool2d does), and with
// packed != nullptr the spikes as pack_spikes words [T, N, Hq, Wq, Cow] (each tile writes the
// whole words of its own pixels, so no two threads write one word).
struct InferOut {
  int64_t pool = 1;
  uint32_t* packed = nullptr;
  int64_t Hq = 0, Wq = 0, Cow = 0;
  // The residual as pack_spikes words [T, N, Ho, Wo, Cow] (spikes added as 0. / 1.), read by the
  // onednn route's packed output (the caller unpacks it to floats for every other path).
  const uint32_t* res_words = nullptr;
  bool direct() const { return pool == 1 && packed == nullptr; }
};

// One tile: image n, output rows [oy0, oy1), L = (oy1 - oy0) * Wo neurons per channel, Lmax the
// channel stride of its count buffer.
struct TileRows {
  int64_t n, oy0, oy1;
  int L;
  int64_t Lmax;
};

// A tile's scratch for the pooled / packed output: sp the spikes of a group of channels (a word's
// with packed output), rl the residual of the channels a LIF row reads (null without a residual);
// tile_floats gives their size.
struct TileBufs {
  float* sp;
  float* rl;
};

// Channels whose whole tiles (L pixels) share a LIF row in infer_tile_out
// (forward_lanes_per_row), where the tile is whole (L == Lmax) and the caller has a LaneTable;
// else 1.
inline int64_t tile_lanes(bool have_lanes, int64_t L, int64_t Lmax) {
  return have_lanes && L == Lmax ? forward_lanes_per_row(L) : 1;
}

// The channels infer_tile_out stores at once: a word's 32 with packed output, else one row's.
inline int64_t tile_group(const InferOut& io, int64_t per) {
  return io.packed != nullptr ? 32 : per;
}

// Floats of sp and of rl for tiles of Lmax pixels (per: tile_lanes of a whole tile).
inline int64_t tile_floats(const InferOut& io, int64_t T, int64_t Lmax, int64_t per) {
  return io.direct() ? 0 : tile_group(io, per) * T * Lmax;
}

// One inference tile (counts loc [T][Co][Lmax]) into the pooled and/or packed output: per group
// of channels, the LIF over T into sp (the residual copied to rl in the same layout), then the 2x2
// OR and the store. A LIF row is one channel's tile (sp [group][T][Lmax]), or with lanes the
// whole tiles of tile_lanes channels (sp [T][group][Lmax]).
template <typename CT>
void infer_tile_out(const ConvShape& s, const InferOut& io, const TileRows& tr, const CT* loc,
                    const FwdEpilogue& ep, const ChannelAffine* aff, const LaneTable* lanes,
                    const TileBufs& buf, float* spikes) {
  const int64_t S = s.Ho * s.Wo, step_stride = s.N * s.Co * S;
  const int64_t n = tr.n, oy0 = tr.oy0, Lmax = tr.Lmax;
  const int L = tr.L;
  const int64_t q = io.pool, oq0 = oy0 / q;
  const PoolRows rows{s.T, s.N, s.Wo, io.Hq, io.Wq, n, oq0, (tr.oy1 - oy0) / q};
  const int64_t per = tile_lanes(lanes != nullptr, L, Lmax);
  const int64_t group = tile_group(io, per);
  // sp's channel and step strides
  const int64_t cstride = per > 1 ? Lmax : s.T * Lmax, tstride = per > 1 ? group * Lmax : Lmax;
  auto copy_res = [&](int64_t c, float* dst) {  // channel c's residual rows -> dst [T][tstride]
    const int64_t off = (n * s.Co + c) * S + oy0 * s.Wo;
    for (int64_t t = 0; t < s.T; ++t)
      std::memcpy(dst + t * tstride, ep.res + off + t * step_stride, L * sizeof(float));
  };
  for (int64_t c0 = 0; c0 < s.Co; c0 += group) {
    const int64_t c1 = std::min(s.Co, c0 + group);
    for (int64_t b0 = c0; b0 < c1; b0 += per) {
      const int64_t b1 = std::min(c1, b0 + per);
      float* spb = buf.sp + (b0 - c0) * cstride;
      float* rb = buf.rl != nullptr ? buf.rl + (per > 1 ? (b0 - c0) * Lmax : 0) : nullptr;
      if (rb != nullptr)
        for (int64_t c = b0; c < b1; ++c) copy_res(c, rb + (c - b0) * Lmax);
      if (per > 1) {
        lif_counts_lanes(ep, static_cast<int>(s.T), static_cast<int>((b1 - b0) * L),
                         loc + b0 * Lmax, s.Co * Lmax, lanes->alpha(b0), lanes->affine(b0), rb,
                         tstride, spb);
        continue;
      }
      for (int i0 = 0; i0 < L; i0 += kRowChunk) {
        const int len = std::min(kRowChunk, L - i0);
        lif_counts(ep, static_cast<int>(s.T), len, loc + b0 * Lmax + i0, s.Co * Lmax,
                   ep.alpha[b0], aff[b0], rb ? rb + i0 : nullptr, Lmax, spb + i0);
      }
    }
    if (io.packed == nullptr) {
      for (int64_t c = c0; c < c1; ++c) {
        const float* spc = buf.sp + (c - c0) * cstride;
        if (q == 2)
          pool_store<2>(rows, spc, tstride, s.Co, c, spikes);
        else
          pool_store<1>(rows, spc, tstride, s.Co, c, spikes);
      }
    } else if (q == 2) {
      pool_pack<2>(rows, buf.sp, cstride, static_cast<int>(c1 - c0), tstride, io.Cow, c0 / 32,
                   io.packed);
    } else {
      pool_pack<1>(rows, buf.sp, cstride, static_cast<int>(c1 - c0), tstride, io.Cow, c0 / 32,
                   io.packed);
    }
  }
}

// A shortcut conv whose current is the residual (bconv_lif_infer_shortcut): its geometry s
// (output [T*N, Co, Ho, Wo] as the layer's), Ci, planes, the block input as u8 spikes
// [T*N, Ci, H, W] ChannelsLast, and the per-channel (count * alpha) * scale + shift that
// bconv_affine_infer applies.
struct OnednnShortcut {
  ConvShape s;
  int64_t Ci;
  const uint32_t *mbits, *pbits;
  at::Tensor x_u8;
  const float *alpha, *scale, *shift;
};

// The inference forward with the counts from oneDNN's int8 convolution (bconv_onednn.cpp; x_u8:
// the spikes as u8 [T*N, Ci, H, W] ChannelsLast): the same epilogue, LIF, pool and store, the
// spikes bit for bit those of the bit kernels. With a shortcut (then ep.res is null), its
// current is computed chunk by chunk beside the conv's counts and read as the residual.
void infer_onednn(const ConvShape& s, const at::Tensor& x_u8, int64_t Ci, const uint32_t* mbits,
                  const uint32_t* pbits, const FwdEpilogue& ep, const InferOut& io,
                  float* spikes, const OnednnShortcut* shortcut = nullptr);

// bn_lif_infer's route for a channel-last current (bconv_onednn.cpp; CPUs with AVX-512): step t's
// current zt[t] is [N, Ho, Wo, Co] floats (a real-input conv's output in ChannelsLast; the same
// pointer every step where one current is expanded over T), its eval epilogue ep (alpha: ones)
// and LIF run per pixel across the channels, as infer_onednn's, the spike words then pooled and
// stored (io.packed), or unpacked into float spikes [T, N, Co, Hq, Wq] (io.packed null).
void lif_infer_channels_last(const ConvShape& s, const float* const* zt, const FwdEpilogue& ep,
                             const InferOut& io, float* spikes);

}  // namespace cpu
}  // namespace binslt
