// Fused binary convolution + epilogue + multi-step LIF, forward (binslt::bconv_lif and the
// inference form binslt::bconv_lif_infer).
//
// Exact ternary counts by AND + popcount over packed channel-last words (binslt/bconv_popcount.h)
// or by summing the weight columns of the input spikes (binslt/bconv_event.h), per output tile
// (image n, a block of output rows, all T), then the epilogue and the LIF over T while the tile is
// in cache. With training BatchNorm the statistics need every count first: pass 1 stores the
// counts and exact integer sums, pass 2 runs the epilogue + LIF from the stored counts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "binslt/big_tensor.h"
#include "binslt/bconv_cpu.h"
#include "binslt/bconv_event.h"
#include "binslt/bconv_popcount.h"
#include "binslt/checks.h"
#include "binslt/cpu_algos.h"
#include "binslt/epilogue_cpu.h"
#include "binslt/infer_tile.h"
#include "binslt/lif.h"
#include "binslt/pack_cpu.h"
#include "binslt/transpose_cpu.h"

namespace binslt {
namespace cpu {

ConvShape check_conv_dims(const InputDims& in, const at::Tensor& w_mask, const at::Tensor& w_pos,
                          int64_t T, int64_t stride, int64_t padding, const char* op) {
  const int64_t B = in.B, H = in.H, W = in.W, Cw = in.Cw;
  const char* xname = in.name;
  check_cpu_tensor(w_mask, op, "w_mask", 4, at::kInt, "[Co, kh, kw, Cw] int32 from pack_weight");
  check_cpu_tensor(w_pos, op, "w_pos", 4, at::kInt, "[Co, kh, kw, Cw] int32 from pack_weight");
  check_weight_planes(op, w_mask, w_pos, xname, Cw);
  check_stride_padding(op, stride, padding);
  check_timesteps(op, T, B);
  ConvShape s;
  s.B = B;
  s.H = H;
  s.W = W;
  s.Cw = Cw;
  s.Co = w_mask.size(0);
  s.KH = w_mask.size(1);
  s.KW = w_mask.size(2);
  s.T = T;
  s.N = s.B / T;
  s.stride = stride;
  s.padding = padding;
  const OutHW o = check_out_hw(op, s.H, s.W, s.KH, s.KW, stride, padding);
  s.Ho = o.Ho;
  s.Wo = o.Wo;
  return s;
}

ConvShape check_conv(const at::Tensor& x_packed, const at::Tensor& w_mask,
                     const at::Tensor& w_pos, int64_t T, int64_t stride, int64_t padding,
                     const char* op) {
  check_cpu_tensor(x_packed, op, "x_packed", 4, at::kInt,
                   "[T*N, H, W, Cw] int32 from pack_spikes");
  return check_conv_dims({x_packed.size(0), x_packed.size(1), x_packed.size(2), x_packed.size(3),
                          "x_packed"},
                         w_mask, w_pos, T, stride, padding, op);
}

at::Tensor cpu_output_like(const at::Tensor& t, at::IntArrayRef shape, const char* op,
                           const char* name) {
  check_on_cpu(t, op, name);
  return output_like(t, shape, op, name);
}

namespace {

using RowFn = void (*)(const RowGeom&, int32_t*);
using EventFn = void (*)(const EventGeom&, int16_t*);

EventFn event_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return &row_counts_event_avx512;
    case Isa::kAvx2: return &row_counts_event_avx2;
    default: return &row_counts_event_base;
  }
}

RowFn row_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return &row_counts_avx512;
    case Isa::kAvx2: return &row_counts_avx2;
    case Isa::kPopcnt: return &row_counts_popcnt;
    default: return &row_counts_scalar;
  }
}

// Weight planes repacked for the vector kernels: [KH][KW][Cw][co_pad16], and neg = mask & ~pos
// in the original layout for the scalar kernels.
struct PackedW {
  int64_t co_pad16 = 16;
  std::vector<uint32_t> pos_r, neg_r, neg;
};

PackedW repack(const ConvShape& s, const uint32_t* mask, const uint32_t* pos) {
  PackedW planes;
  planes.co_pad16 = (s.Co + 15) / 16 * 16;
  const int64_t per = s.KH * s.KW * s.Cw;
  planes.neg.resize(s.Co * per);
  planes.pos_r.assign(per * planes.co_pad16, 0u);
  planes.neg_r.assign(per * planes.co_pad16, 0u);
  for (int64_t o = 0; o < s.Co; ++o)
    for (int64_t k = 0; k < per; ++k) {
      const uint32_t m = mask[o * per + k], p = pos[o * per + k] & m;
      planes.neg[o * per + k] = m & ~p;
      planes.pos_r[k * planes.co_pad16 + o] = p;
      planes.neg_r[k * planes.co_pad16 + o] = m & ~p;
    }
  return planes;
}

// The ternary weight sign(w)*M as int8 [KH][32*Cw][KW][co_pad64] (output channels innermost, zero
// padding), the table of the event kernel (see bconv_event.h for why kx sits inside ci).
// One table row: dst[o] = sign * mask bit j of output channel o (mrow/prow: [Co] words).
static inline __attribute__((always_inline)) void table_row_body(const uint32_t* mrow,
                                                                 const uint32_t* prow, int j,
                                                                 int64_t Co, int64_t co_pad64,
                                                                 int8_t* dst) {
  for (int64_t o = 0; o < Co; ++o) {
    const int m = static_cast<int>((mrow[o] >> j) & 1u);
    const int sg = static_cast<int>((prow[o] >> j) & 1u);
    dst[o] = static_cast<int8_t>(m * (2 * sg - 1));
  }
  for (int64_t o = Co; o < co_pad64; ++o) dst[o] = 0;
}
static void table_row_base(const uint32_t* mrow, const uint32_t* prow, int j, int64_t Co,
                           int64_t co_pad64, int8_t* dst) {
  table_row_body(mrow, prow, j, Co, co_pad64, dst);
}
__attribute__((target("avx2"))) static void table_row_avx2(const uint32_t* mrow,
                                                           const uint32_t* prow, int j,
                                                           int64_t Co, int64_t co_pad64,
                                                           int8_t* dst) {
  table_row_body(mrow, prow, j, Co, co_pad64, dst);
}
__attribute__((target("avx512f,avx512bw"))) static void table_row_avx512(
    const uint32_t* mrow, const uint32_t* prow, int j, int64_t Co, int64_t co_pad64, int8_t* dst) {
  table_row_body(mrow, prow, j, Co, co_pad64, dst);
}

at::Tensor event_table(const ConvShape& s, const uint32_t* mask, const uint32_t* pos,
                       int64_t co_pad64) {
  const Isa isa = active_isa();
  auto row = isa == Isa::kAvx512 ? &table_row_avx512
             : isa == Isa::kAvx2 ? &table_row_avx2
                                 : &table_row_base;
  const int64_t Ci = 32 * s.Cw, K = s.KH * s.KW;
  // The planes as [K][Cw][Co], so that a table row reads its Co words contiguously.
  std::vector<uint32_t> mask_t(K * s.Cw * s.Co), pos_t(K * s.Cw * s.Co);
  for (int64_t o = 0; o < s.Co; ++o)
    for (int64_t kq = 0; kq < K * s.Cw; ++kq) {
      mask_t[kq * s.Co + o] = mask[o * K * s.Cw + kq];
      pos_t[kq * s.Co + o] = pos[o * K * s.Cw + kq];
    }
  at::Tensor weight_table = at::empty({K * Ci * co_pad64}, at::TensorOptions().dtype(at::kChar));
  int8_t* w = weight_table.data_ptr<int8_t>();
  // Every byte written once, branch-free (this runs on every forward): row (ky, ci, kx).
  at::parallel_for(0, s.KH * Ci * s.KW, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ky = r / (Ci * s.KW), ci = (r / s.KW) % Ci, kx = r % s.KW;
      const int64_t kq = (ky * s.KW + kx) * s.Cw + (ci >> 5);
      const int j = static_cast<int>(ci & 31);
      row(mask_t.data() + kq * s.Co, pos_t.data() + kq * s.Co, j, s.Co, co_pad64, w + r * co_pad64);
    }
  });
  return weight_table;
}

template <typename ST>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void transpose_store_avx512(
    const ST* tile, int64_t stride, int64_t Wo, int64_t Co, int16_t* dst, int64_t S) {
  transpose_store_body(tile, stride, Wo, Co, dst, S);
}
template <typename ST>
__attribute__((target("avx2"))) void transpose_store_avx2(const ST* tile, int64_t stride,
                                                          int64_t Wo, int64_t Co, int16_t* dst,
                                                          int64_t S) {
  transpose_store_body(tile, stride, Wo, Co, dst, S);
}

// One output row of counts: tile [Wo][ostride] (channel-last) -> dst [c][ox] (c stride S), and
// with sums != nullptr the exact per-channel sums of the counts and of their squares.
template <typename ST, typename CT>
inline void store_counts(Isa isa, const ST* tile, int64_t ostride, int64_t Wo, int64_t Co,
                         CT* dst, int64_t S, int64_t* sums) {
  if constexpr (std::is_same_v<CT, int16_t>) {
    if (isa == Isa::kAvx512)
      transpose_store_avx512(tile, ostride, Wo, Co, dst, S);
    else if (isa == Isa::kAvx2)
      transpose_store_avx2(tile, ostride, Wo, Co, dst, S);
    else
      transpose_store_body(tile, ostride, Wo, Co, dst, S);
  } else {
    for (int64_t ox = 0; ox < Wo; ++ox)
      for (int64_t c = 0; c < Co; ++c) dst[c * S + ox] = static_cast<CT>(tile[ox * ostride + c]);
  }
  if (sums == nullptr) return;
  for (int64_t ox = 0; ox < Wo; ++ox) {
    const ST* src = tile + ox * ostride;
    for (int64_t c = 0; c < Co; ++c) {
      const int64_t v = src[c];
      sums[2 * c] += v;
      sums[2 * c + 1] += v * v;
    }
  }
}

// The input: packed and padded words (xpad, [T*N, Hp, Wp, Cw]), or float spikes xf
// [T*N, C, H, W] (inference only; xpad undefined), which each tile packs itself, into a
// per-thread padded image, for the input rows it reads (non-binary values set *bad).
struct FloatInput {
  bool on = false;  // x may be null for an empty input
  const float* x = nullptr;
  int64_t C = 0;
  std::atomic<bool>* bad = nullptr;
};

// Everything the bit kernels' forward reads and writes, set up by run_bit_kernels for the plan
// ("dense": the repacked planes; "event": the int8 weight table). infer (eval epilogue only,
// counts unused): each tile's counts live in a per-thread buffer [T][Co][R*Wo] and never reach
// memory (no 2-byte-per-neuron write and read back). bn_train: the counts and their exact sums
// first, the epilogue after (bn_train_epilogue).
template <typename CT>
struct FwdTask {
  const ConvShape* s;
  const uint32_t* xp;  // [T*N, Hp, Wp, Cw] padded packed input (null with float input)
  FloatInput xf;
  bool event;
  const PackedW* planes;
  const uint32_t* pos_masked;
  const int8_t* weight_table;
  int64_t co_pad64;
  FwdEpilogue ep;
  bool bn_train, infer;
  CT* counts;    // [T, N, Co, Ho, Wo] (null when infer)
  float* spikes;
  InferOut io;
  int64_t R;     // output rows per tile
};

// One thread's tiles: their scratch and the three stages of a tile (pack the float input's rows,
// the counts, the epilogue + LIF).
template <typename CT>
class TileWorker {
 public:
  // lanes: the eval epilogue per lane (LaneTable) where a tile is short, or null.
  TileWorker(const FwdTask<CT>& task, int64_t* sums, const LaneTable* lanes)
      : t_(task), s_(*task.s), isa_(task.ep.isa), sums_(sums), lanes_(lanes) {
    const ConvShape& s = s_;
    Hp_ = s.H + 2 * s.padding;
    Wp_ = s.W + 2 * s.padding;
    Lmax_ = t_.R * s.Wo;
    ostride_ = t_.event ? t_.co_pad64 : t_.planes->co_pad16;
    loc_.resize(t_.infer ? s.T * s.Co * Lmax_ : 0);
    const int64_t per = tile_lanes(lanes_ != nullptr, Lmax_, Lmax_);
    sp_.resize(tile_floats(t_.io, s.T, Lmax_, per));
    rl_.resize(t_.io.direct() || t_.ep.res == nullptr
                   ? 0
                   : (per > 1 ? tile_group(t_.io, per) : 1) * s.T * Lmax_);
    pimg_.assign(t_.xf.on ? Hp_ * Wp_ * s.Cw : 0, 0u);
    prow_.resize(t_.xf.on ? std::min(s.H, (t_.R - 1) * s.stride + s.KH) * s.W * s.Cw : 0);
    tmp_.resize(t_.event ? 0 : s.Wo * ostride_);
    tmp16_.resize(t_.event ? s.Wo * ostride_ : 0);
    acc8_.resize(t_.event ? s.Wo * 256 : 0);
    pending_.resize(t_.event ? s.Wo : 0);
    eg_.acc8 = acc8_.data();
    eg_.pending = pending_.data();
    eg_.weight_table = t_.weight_table;
    eg_.Wp = static_cast<int>(Wp_);
    eg_.Wo = static_cast<int>(s.Wo);
    eg_.stride = static_cast<int>(s.stride);
    eg_.KH = static_cast<int>(s.KH);
    eg_.KW = static_cast<int>(s.KW);
    eg_.Ci = static_cast<int>(32 * s.Cw);
    eg_.co_pad64 = static_cast<int>(t_.co_pad64);
    g_.Wp = static_cast<int>(Wp_);
    g_.Cw = static_cast<int>(s.Cw);
    g_.Wo = static_cast<int>(s.Wo);
    g_.stride = static_cast<int>(s.stride);
    g_.KH = static_cast<int>(s.KH);
    g_.KW = static_cast<int>(s.KW);
    g_.Co = static_cast<int>(s.Co);
    if (!t_.event) {
      g_.co_pad16 = static_cast<int>(t_.planes->co_pad16);
      g_.wpos_r = t_.planes->pos_r.data();
      g_.wneg_r = t_.planes->neg_r.data();
      g_.wpos = t_.pos_masked;
      g_.wneg = t_.planes->neg.data();
    }
    dense_row_ = row_fn(isa_);
    event_row_ = event_fn(isa_);
  }

  // The counts of tile (n, [oy0, oy1)) for every step: into the per-thread buffer (infer) or
  // the counts tensor, with their sums under bn_train.
  void counts(int64_t n, int64_t oy0, int64_t oy1) {
    const ConvShape& s = s_;
    const int64_t S = s.Ho * s.Wo;
    for (int64_t t = 0; t < s.T; ++t) {
      const int64_t b = t * s.N + n;
      const int64_t r0 = oy0 * s.stride;  // padded input rows [r0, r1) feed this tile
      const int64_t r1 = (oy1 - 1) * s.stride + s.KH;
      g_.img = t_.xf.on ? pack_rows(b, r0, r1) : t_.xp + b * Hp_ * Wp_ * s.Cw;
      if (t_.event) {
        ev_.build(g_.img + r0 * Wp_ * s.Cw, static_cast<int>(r1 - r0), static_cast<int>(Wp_),
                  static_cast<int>(s.Cw), static_cast<int>(s.KW * t_.co_pad64),
                  static_cast<int>(t_.co_pad64), isa_ == Isa::kAvx512, isa_ == Isa::kAvx2);
        eg_.start = ev_.start.data();
        eg_.off = ev_.off.data();
      }
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        CT* crow = t_.infer ? loc_.data() + t * s.Co * Lmax_ + (oy - oy0) * s.Wo
                            : t_.counts + (b * s.Co) * S + oy * s.Wo;
        const int64_t channel_stride = t_.infer ? Lmax_ : S;
        if (t_.event) {
          eg_.iy0 = static_cast<int>(oy * s.stride - r0);
          event_row_(eg_, tmp16_.data());
          store_counts(isa_, tmp16_.data(), ostride_, s.Wo, s.Co, crow, channel_stride, sums_);
        } else {
          g_.iy0 = static_cast<int>(oy * s.stride);
          dense_row_(g_, tmp_.data());
          store_counts(isa_, tmp_.data(), ostride_, s.Wo, s.Co, crow, channel_stride, sums_);
        }
      }
    }
  }

  // Epilogue + LIF over T for the tile, while its counts are in cache.
  void epilogue(int64_t n, int64_t oy0, int64_t oy1, const ChannelAffine* aff) {
    const ConvShape& s = s_;
    const int64_t S = s.Ho * s.Wo, step_stride = s.N * s.Co * S;
    const int L = static_cast<int>((oy1 - oy0) * s.Wo);
    if (t_.infer && !t_.io.direct()) {
      infer_tile_out(s, t_.io, TileRows{n, oy0, oy1, L, Lmax_}, loc_.data(), t_.ep, aff, lanes_,
                     TileBufs{sp_.data(), rl_.empty() ? nullptr : rl_.data()}, t_.spikes);
      return;
    }
    const float* res = t_.ep.res;
    // A whole image's short maps: the maps of per consecutive channels in one LIF row (their
    // counts, residual and spikes lie side by side; the lane table's maps are Lmax_ long).
    const int64_t per = L == S ? tile_lanes(lanes_ != nullptr, L, Lmax_) : 1;
    if (per > 1) {
      for (int64_t c0 = 0; c0 < s.Co; c0 += per) {
        const int64_t c1 = std::min(s.Co, c0 + per), off = (n * s.Co + c0) * S;
        const CT* cr = t_.infer ? loc_.data() + c0 * Lmax_ : t_.counts + off;
        lif_counts_lanes(t_.ep, static_cast<int>(s.T), static_cast<int>((c1 - c0) * L), cr,
                         t_.infer ? s.Co * Lmax_ : step_stride, lanes_->alpha(c0),
                         lanes_->affine(c0), res ? res + off : nullptr, step_stride,
                         t_.spikes + off);
      }
      return;
    }
    // in chunks of kRowChunk neurons, the LIF row's buffer (a row wider than it is one tile)
    for (int64_t c = 0; c < s.Co; ++c)
      for (int i0 = 0; i0 < L; i0 += kRowChunk) {
        const int64_t off = (n * s.Co + c) * S + oy0 * s.Wo + i0;
        const CT* cr = t_.infer ? loc_.data() + c * Lmax_ + i0 : t_.counts + off;
        lif_counts(t_.ep, static_cast<int>(s.T), std::min(kRowChunk, L - i0), cr,
                   t_.infer ? s.Co * Lmax_ : step_stride, t_.ep.alpha[c], aff[c],
                   res ? res + off : nullptr, step_stride, t_.spikes + off);
      }
  }

  bool bad() const { return bad_; }

 private:
  // Float input: image b's padded rows [r0, r1) packed into this thread's margined image
  // (margins stay zero): one strided pack per word, then row copies.
  const uint32_t* pack_rows(int64_t b, int64_t r0, int64_t r1) {
    const ConvShape& s = s_;
    const FloatInput& xf = t_.xf;
    const int64_t plane = s.H * s.W;
    const int64_t h0 = std::max<int64_t>(0, r0 - s.padding);
    const int64_t h1 = std::min<int64_t>(s.H, r1 - s.padding);
    if (h1 > h0) {
      const PackWordFn pack_fn = pack_word_fn();
      const float* xb = xf.x + (b * xf.C) * plane + h0 * s.W;
      for (int64_t wd = 0; wd < s.Cw; ++wd)
        bad_ |= pack_fn(xb + 32 * wd * plane, std::min<int64_t>(32, xf.C - 32 * wd), plane,
                        (h1 - h0) * s.W, s.Cw, prow_.data() + wd);
      for (int64_t h = h0; h < h1; ++h)
        std::memcpy(pimg_.data() + ((h + s.padding) * Wp_ + s.padding) * s.Cw,
                    prow_.data() + (h - h0) * s.W * s.Cw, s.W * s.Cw * sizeof(uint32_t));
    }
    return pimg_.data();
  }

  const FwdTask<CT>& t_;
  const ConvShape& s_;
  Isa isa_;
  int64_t* sums_;
  const LaneTable* lanes_;
  int64_t Hp_ = 0, Wp_ = 0, Lmax_ = 0, ostride_ = 0;
  std::vector<CT> loc_;
  std::vector<float> sp_, rl_;
  std::vector<uint32_t> pimg_, prow_;
  std::vector<int32_t> tmp_;
  std::vector<int16_t> tmp16_;
  std::vector<int8_t> acc8_;
  std::vector<int> pending_;
  EventList ev_;
  EventGeom eg_;
  RowGeom g_;
  RowFn dense_row_ = nullptr;
  EventFn event_row_ = nullptr;
  bool bad_ = false;
};

// Output rows per tile: a tile is image n, R output rows, all T and all channels.
inline int64_t tile_rows(const ConvShape& s, int64_t pool) {
  const int64_t nthreads = at::get_num_threads();
  int64_t R = std::max<int64_t>(1, std::min<int64_t>(s.Ho, kRowChunk / s.Wo));
  while (R > 1 && s.N * ((s.Ho + R - 1) / R) < 4 * nthreads) R = (R + 1) / 2;
  // A pooled tile holds whole row pairs (the LIF runs in chunks of kRowChunk neurons).
  if (pool > 1) R = (R + pool - 1) / pool * pool;
  return R;
}

// The eval epilogue of each channel: z * scale + shift (no batch statistics).
inline std::vector<ChannelAffine> eval_affine(const FwdEpilogue& ep, int64_t Co) {
  std::vector<ChannelAffine> aff(Co);
  for (int64_t c = 0; c < Co; ++c)
    aff[c] = ChannelAffine{0.0f, 1.0f, ep.scale[c], ep.shift[c], false};
  return aff;
}

// The epilogue (affine aff per channel) + LIF from the stored counts, Z = alpha * count: rows of
// several channels' maps where the maps are short, else each channel's rows.
template <typename CT>
void stored_counts_lif(const FwdTask<CT>& task, const std::vector<ChannelAffine>& aff) {
  const ConvShape& s = *task.s;
  const FwdEpilogue& ep = task.ep;
  const int64_t S = s.Ho * s.Wo, step_stride = s.N * s.Co * S;
  const int64_t per = row_block_channels(forward_lanes_per_row(S), s.Co);
  if (per > 1) {  // short maps: the maps of per consecutive channels in one row
    const LaneTable lanes(ep.alpha, aff.data(), s.Co, S);
    const int64_t blocks = (s.Co + per - 1) / per;
    at::parallel_for(0, blocks * s.N, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t c0 = it / s.N * per, n = it % s.N;
        const int64_t c1 = std::min(s.Co, c0 + per), off = (n * s.Co + c0) * S;
        lif_counts_lanes(ep, static_cast<int>(s.T), static_cast<int>((c1 - c0) * S),
                         task.counts + off, step_stride, lanes.alpha(c0), lanes.affine(c0),
                         ep.res ? ep.res + off : nullptr, step_stride, task.spikes + off);
      }
    });
    return;
  }
  const int64_t chunks = (S + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, s.N * s.Co * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t nc = it / chunks, s0 = (it % chunks) * kRowChunk;
      const int64_t c = nc % s.Co;
      const int L = static_cast<int>(std::min<int64_t>(kRowChunk, S - s0));
      const int64_t off = nc * S + s0;
      lif_counts(ep, static_cast<int>(s.T), L, task.counts + off, step_stride, ep.alpha[c],
                 aff[c], ep.res ? ep.res + off : nullptr, step_stride, task.spikes + off);
    }
  });
}

// bn_train's second pass: exact per-channel statistics of the integer counts (sums: one
// [Co][2] block per thread), then the epilogue + LIF from the stored counts.
template <typename CT>
void bn_train_epilogue(const FwdTask<CT>& task, const std::vector<int64_t>& sums, double bn_eps,
                       float* mean_out, float* var_out) {
  const ConvShape& s = *task.s;
  const FwdEpilogue& ep = task.ep;
  const int64_t S = s.Ho * s.Wo;
  const int64_t nthreads = static_cast<int64_t>(sums.size()) / std::max<int64_t>(1, 2 * s.Co);
  const int64_t M = s.T * s.N * S;
  std::vector<ChannelAffine> aff(s.Co);
  for (int64_t c = 0; c < s.Co; ++c) {
    __int128 sm = 0, sq = 0;
    for (int64_t th = 0; th < nthreads; ++th) {
      sm += sums[(th * s.Co + c) * 2];
      sq += sums[(th * s.Co + c) * 2 + 1];
    }
    const double mc = static_cast<double>(sm) / static_cast<double>(M);
    const double vc = static_cast<double>(sq * M - sm * sm) / (static_cast<double>(M) * M);
    const double a = ep.alpha[c];
    mean_out[c] = static_cast<float>(a * mc);
    var_out[c] = static_cast<float>(a * a * vc);
    aff[c] = ChannelAffine{mean_out[c], invstd_of(var_out[c], bn_eps), ep.scale[c], ep.shift[c],
                           true};
  }
  if (M > 0) check_batch_stats("bconv_lif", mean_out, var_out, s.Co);
  stored_counts_lif(task, aff);
}

// The tiles of the bit kernels (dense or event), in parallel; then bn_train's second pass.
template <typename CT>
void forward_tiles(const FwdTask<CT>& task, double bn_eps, float* mean_out, float* var_out) {
  const ConvShape& s = *task.s;
  TORCH_INTERNAL_ASSERT(!(task.infer && task.bn_train),
                        "bconv_lif: inference needs the eval epilogue");
  TORCH_INTERNAL_ASSERT(!(task.xf.on && !task.infer),
                        "bconv_lif: float input is for inference only");
  const int64_t nthreads = at::get_num_threads();
  const int64_t row_blocks = (s.Ho + task.R - 1) / task.R;
  std::vector<int64_t> sums(task.bn_train ? nthreads * s.Co * 2 : 0, 0);
  const std::vector<ChannelAffine> aff = eval_affine(task.ep, s.Co);
  // The eval epilogue per lane where whole tiles are short (rows of several channels' tiles).
  const int64_t Lmax = task.R * s.Wo;
  const LaneTable lanes(task.ep.alpha, aff.data(),
                        task.bn_train || forward_lanes_per_row(Lmax) == 1 ? 0 : s.Co, Lmax);
  at::parallel_for(0, s.N * row_blocks, 1, [&](int64_t i0, int64_t i1) {
    TileWorker<CT> w(task, task.bn_train ? sums.data() + at::get_thread_num() * s.Co * 2
                                         : nullptr,
                     lanes.empty() ? nullptr : &lanes);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n = it / row_blocks, oy0 = (it % row_blocks) * task.R;
      const int64_t oy1 = std::min(s.Ho, oy0 + task.R);
      w.counts(n, oy0, oy1);
      if (!task.bn_train) w.epilogue(n, oy0, oy1, aff.data());
    }
    if (w.bad()) task.xf.bad->store(true, std::memory_order_relaxed);
  });
  if (task.bn_train) bn_train_epilogue(task, sums, bn_eps, mean_out, var_out);
}

// The training forward with the counts from oneDNN's int8 convolution (plan forward=onednn):
// a chunk of images at a time (OnednnConv::chunk_images, as the inference route's), its T
// steps' convs (OnednnConv::steps) give the counts as channel-last float32 (the integers
// exactly); each image's rows go through int32 into the counts tensor as the bit kernels store
// theirs (store_counts: the channel-first counts and, under bn_train, their exact per-channel
// sums), then the second pass from the stored counts. Counts, statistics and spikes are the bit
// kernels' bit for bit.
template <typename CT>
void onednn_train_forward(const FwdTask<CT>& task, const at::Tensor& x_u8, const uint32_t* mbits,
                          const uint32_t* pbits, double bn_eps, float* mean_out, float* var_out) {
  const ConvShape& s = *task.s;
  const int64_t S = s.Ho * s.Wo;
  const int64_t nthreads = at::get_num_threads();
  std::vector<int64_t> sums(task.bn_train ? nthreads * s.Co * 2 : 0, 0);
  const int64_t nb = OnednnConv::chunk_images(s.N, s.T * S * s.Co);
  const OnednnConv conv(s, x_u8.size(1), mbits, pbits, OnednnConv::call_images(s.T, s.N, nb),
                        /*cached=*/false);
  std::vector<at::Tensor> z(s.T);
  for (int64_t n0 = 0; n0 < s.N; n0 += nb) {
    const int64_t n1 = std::min(s.N, n0 + nb), m = n1 - n0;
    conv.steps(x_u8, s.T, s.N, n0, m, z);
    at::parallel_for(0, s.T * m, 1, [&](int64_t j0, int64_t j1) {
      std::vector<int32_t> row(s.Wo * s.Co);
      int64_t* sm = task.bn_train ? sums.data() + at::get_thread_num() * s.Co * 2 : nullptr;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / m, i = j % m;
        const float* src = z[t].data_ptr<float>() + i * S * s.Co;
        CT* dst = task.counts + (t * s.N + n0 + i) * s.Co * S;
        for (int64_t oy = 0; oy < s.Ho; ++oy) {
          const float* r = src + oy * s.Wo * s.Co;
          for (int64_t k = 0; k < s.Wo * s.Co; ++k) row[k] = static_cast<int32_t>(r[k]);
          store_counts(task.ep.isa, row.data(), s.Co, s.Wo, s.Co, dst + oy * s.Wo, S, sm);
        }
      }
    });
  }
  if (task.bn_train) {
    bn_train_epilogue(task, sums, bn_eps, mean_out, var_out);
    return;
  }
  stored_counts_lif(task, eval_affine(task.ep, s.Co));
}

}  // namespace

// The checked per-channel vectors (contiguous float32), residual and neuron settings of both ops.
struct ForwardArgs {
  at::Tensor alpha, scale, shift;
  std::optional<at::Tensor> res;
  NeuronParams p;
  bool bn_train = false;
  double bn_eps = 1e-5;
};

static ForwardArgs check_forward_args(const char* op, const ConvShape& s,
                                      const at::Tensor& alpha, const at::Tensor& scale,
                                      const at::Tensor& shift,
                                      const std::optional<at::Tensor>& residual,
                                      const NeuronParams& p) {
  ForwardArgs a;
  a.p = p;
  a.alpha = cpu_channel_vec(alpha, op, "alpha", s.Co);
  a.scale = cpu_channel_vec(scale, op, "scale", s.Co);
  a.shift = cpu_channel_vec(shift, op, "shift", s.Co);
  if (residual.has_value())
    a.res = cpu_output_like(*residual, {s.T, s.N, s.Co, s.Ho, s.Wo}, op, "residual");
  return a;
}

// The inference output's form: pool (1 or 2), packed words or floats, and the residual as
// packed words (the onednn route's packed output reads them so) or as a shortcut conv's current
// (the onednn route computes it beside its own counts).
struct InferForm {
  int64_t pool = 1;
  bool packed_out = false;
  const uint32_t* res_words = nullptr;
  const OnednnShortcut* shortcut = nullptr;
};

// The outputs of both ops: spikes (or packed words), counts (undefined when infer), mean, var.
using FwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The body of both ops, executing the plan. x: x_packed [T*N, H, W, Cw] int32, or with xf.on
// the float spikes (inference only); s and args were checked by the caller. w_mask, w_pos:
// [Co, kh, kw, Cw] int32 -> spikes [T, N, Co, Ho, Wo] float32, counts [T, N, Co, Ho, Wo]
// int16/int32 (undefined when infer), mean, var [Co]
static FwdOut bconv_lif_run(const ConvShape& s, const ForwardPlan& plan, const at::Tensor& x,
                            const FloatInput& xf, const std::array<at::Tensor, 2>& planes_in,
                            const ForwardArgs& args, const InferForm* infer) {
  const std::vector<int64_t> oshape{s.T, s.N, s.Co, s.Ho, s.Wo};
  const at::Tensor w_mask = planes_in[0].contiguous(), w_pos = planes_in[1].contiguous();
  const uint32_t* mbits = reinterpret_cast<const uint32_t*>(w_mask.data_ptr<int32_t>());
  const uint32_t* pbits = reinterpret_cast<const uint32_t*>(w_pos.data_ptr<int32_t>());
  const auto opts = x.options();
  const InferForm form = infer != nullptr ? *infer : InferForm{};
  InferOut io;
  io.pool = form.pool;
  io.Hq = s.Ho / form.pool;
  io.Wq = s.Wo / form.pool;
  io.Cow = words_for(static_cast<int>(s.Co));
  io.res_words = form.res_words;
  at::Tensor spikes;
  if (form.packed_out) {
    spikes = empty_big({s.T, s.N, io.Hq, io.Wq, io.Cow}, opts.dtype(at::kInt));
    io.packed = reinterpret_cast<uint32_t*>(spikes.data_ptr<int32_t>());
  } else {
    spikes = empty_big(form.pool == 1 ? oshape
                                      : std::vector<int64_t>{s.T, s.N, s.Co, io.Hq, io.Wq},
                       opts.dtype(at::kFloat));
  }
  float* spikes_f = form.packed_out ? nullptr : spikes.data_ptr<float>();
  const FwdEpilogue ep{plan.isa, args.alpha.data_ptr<float>(), args.scale.data_ptr<float>(),
                       args.shift.data_ptr<float>(),
                       args.res ? args.res->data_ptr<float>() : nullptr, args.p};
  if (plan.conv == FwdPlan::kOnednn && infer != nullptr) {
    if (spikes.numel() == 0) return {spikes, at::Tensor(), at::Tensor(), at::Tensor()};
    bool bad = false;
    const at::Tensor x_u8 = xf.on ? spikes_u8_from_float(xf.x, s.B, xf.C, s.H, s.W, opts, &bad)
                                  : spikes_u8_from_packed(x.contiguous());
    if (bad) {
      xf.bad->store(true, std::memory_order_relaxed);
      return {spikes, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    infer_onednn(s, x_u8, xf.on ? xf.C : 32 * s.Cw, mbits, pbits, ep, io, spikes_f,
                 form.shortcut);
    return {spikes, at::Tensor(), at::Tensor(), at::Tensor()};
  }
  const at::ScalarType count_type = counts_dtype(s.Cw, s.KH, s.KW);
  const bool is_infer = infer != nullptr;
  // the training forward (no input channels: the bit kernels' zero counts)
  if (plan.conv == FwdPlan::kOnednn && spikes.numel() > 0 && s.Cw > 0) {
    at::Tensor counts = at::empty(oshape, opts.dtype(count_type));
    at::Tensor mean = at::zeros({s.Co}, opts.dtype(at::kFloat));
    at::Tensor var = at::zeros({s.Co}, opts.dtype(at::kFloat));
    const at::Tensor x_u8 = spikes_u8_from_packed(x.contiguous());
    auto run = [&](auto* counts_ptr) {
      using CT = std::remove_pointer_t<decltype(counts_ptr)>;
      FwdTask<CT> task{};
      task.s = &s;
      task.ep = ep;
      task.bn_train = args.bn_train;
      task.counts = counts_ptr;
      task.spikes = spikes_f;
      task.io = io;
      onednn_train_forward(task, x_u8, mbits, pbits, args.bn_eps, mean.data_ptr<float>(),
                           var.data_ptr<float>());
    };
    if (count_type == at::kShort)
      run(counts.data_ptr<int16_t>());
    else
      run(counts.data_ptr<int32_t>());
    return {spikes, counts, mean, var};
  }
  at::Tensor xpad;
  if (!xf.on)
    xpad = s.padding > 0 ? at::constant_pad_nd(x, {0, 0, s.padding, s.padding, s.padding,
                                                   s.padding}, 0).contiguous()
                         : x.contiguous();
  const bool event = plan.conv == FwdPlan::kEvent;
  const int64_t co_pad64 = (s.Co + 63) / 64 * 64;
  PackedW planes;
  std::vector<uint32_t> pos_masked;
  at::Tensor weight_table;
  if (event) {
    weight_table = event_table(s, mbits, pbits, co_pad64);
  } else {
    planes = repack(s, mbits, pbits);
    pos_masked.resize(w_pos.numel());
    for (size_t i = 0; i < pos_masked.size(); ++i) pos_masked[i] = mbits[i] & pbits[i];
  }
  at::Tensor counts;
  // at::empty, not empty_big: the training step narrows these counts to int8 and drops them
  // within the forward, and a cached block of theirs would sit beside the activations at the
  // step's memory peak
  if (!is_infer) counts = at::empty(oshape, opts.dtype(count_type));
  at::Tensor mean = at::zeros({s.Co}, opts.dtype(at::kFloat));
  at::Tensor var = at::zeros({s.Co}, opts.dtype(at::kFloat));
  auto run = [&](auto* counts_ptr) {
    using CT = std::remove_pointer_t<decltype(counts_ptr)>;
    const FwdTask<CT> task{&s,
                           xf.on ? nullptr
                                 : reinterpret_cast<const uint32_t*>(xpad.data_ptr<int32_t>()),
                           xf,
                           event,
                           &planes,
                           pos_masked.data(),
                           event ? weight_table.data_ptr<int8_t>() : nullptr,
                           co_pad64,
                           ep,
                           args.bn_train,
                           is_infer,
                           counts_ptr,
                           spikes_f,
                           io,
                           tile_rows(s, io.pool)};
    forward_tiles(task, args.bn_eps, mean.data_ptr<float>(), var.data_ptr<float>());
  };
  if (count_type == at::kShort)
    run(is_infer ? static_cast<int16_t*>(nullptr) : counts.data_ptr<int16_t>());
  else
    run(is_infer ? static_cast<int32_t*>(nullptr) : counts.data_ptr<int32_t>());
  return {spikes, counts, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bconv_lif_cpu(
    const at::Tensor& x_packed, const at::Tensor& w_mask, const at::Tensor& w_pos,
    const at::Tensor& alpha, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& residual, int64_t T, int64_t stride, int64_t padding,
    bool bn_train, double bn_eps, double tau, bool decay_input, double v_threshold,
    std::optional<double> v_reset) {
  const char* op = "bconv_lif";
  const PlanLog log(op);
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset);
  check_bn_eps(op, bn_eps);
  const ConvShape s = check_conv(x_packed, w_mask, w_pos, T, stride, padding, op);
  ForwardArgs args = check_forward_args(op, s, alpha, scale, shift, residual, p);
  args.bn_train = bn_train;
  args.bn_eps = bn_eps;
  ForwardQuery q{s, 32 * s.Cw, false, LazyValue([&x_packed] { return packed_rate(x_packed); })};
  q.op = op;
  q.variant = c10::str(bn_train ? "bn_train" : "bn_eval", residual.has_value() ? " residual" : "");
  ForwardPlan plan = plan_forward(q);
  auto run = [&](const ForwardPlan& pl) {
    return bconv_lif_run(s, pl, x_packed, FloatInput{}, {w_mask, w_pos}, args, nullptr);
  };
  FwdOut out = run_forward_plan(plan, run);
  log.emit(conv_shapes(s, 32 * s.Cw), plan.describe());
  return out;
}

// bconv_lif_infer's arguments (the neuron's checked into p).
struct InferCall {
  const at::Tensor &x_in, &w_mask, &w_pos, &alpha, &scale, &shift;
  int64_t stride, padding, pool;
  bool packed_out;
  NeuronParams p;
};

// bconv_lif_infer_shortcut's shortcut conv: its input (the block's: float spikes
// [T, N, C, H, W] or packed words [T, N, H, W, Cw]), planes, per-channel affine and geometry.
struct ShortcutCall {
  const at::Tensor &x, &w_mask, &w_pos, &alpha, &scale, &shift;
  int64_t stride, padding;
};

// The shortcut's operands for the onednn route: its geometry checked against the layer's
// output (T*N images of Co channels, Ho x Wo); its input as u8 spikes (x_u8) is made where that
// route runs (shortcut_u8).
struct ShortcutOperands {
  OnednnShortcut sc;
  at::Tensor alpha, scale, shift, w_mask, w_pos;
};

static ShortcutOperands shortcut_operands(const char* op, const ShortcutCall& c,
                                          const ConvShape& s) {
  check_on_cpu(c.x, op, "block_x");
  const bool packed = check_infer_input(op, c.x);
  const int64_t C = packed ? 0 : c.x.size(2);
  const int64_t H = packed ? c.x.size(2) : c.x.size(3), W = packed ? c.x.size(3) : c.x.size(4);
  const int64_t Cw = packed ? c.x.size(4) : words_for(static_cast<int>(C));
  TORCH_CHECK_VALUE(c.x.size(0) == s.T && c.x.size(1) == s.N, "binslt::", op, ": block_x must "
                    "have the layer input's T, N = ", s.T, ", ", s.N, ", got shape ",
                    shape_str(c.x));
  ShortcutOperands o{};
  o.sc.s = check_conv_dims({s.B, H, W, Cw, "block_x"}, c.w_mask, c.w_pos, s.T, c.stride,
                           c.padding, op);
  TORCH_CHECK_VALUE(o.sc.s.Co == s.Co && o.sc.s.Ho == s.Ho && o.sc.s.Wo == s.Wo, "binslt::", op,
                    ": the shortcut's output [", o.sc.s.Co, ", ", o.sc.s.Ho, ", ", o.sc.s.Wo,
                    "] (channels, height, width) must be the layer's [", s.Co, ", ", s.Ho, ", ",
                    s.Wo, "]");
  o.sc.Ci = packed ? 32 * Cw : C;
  o.alpha = cpu_channel_vec(c.alpha, op, "sc_alpha", s.Co);
  o.scale = cpu_channel_vec(c.scale, op, "sc_scale", s.Co);
  o.shift = cpu_channel_vec(c.shift, op, "sc_shift", s.Co);
  o.w_mask = c.w_mask.contiguous();
  o.w_pos = c.w_pos.contiguous();
  o.sc.mbits = reinterpret_cast<const uint32_t*>(o.w_mask.data_ptr<int32_t>());
  o.sc.pbits = reinterpret_cast<const uint32_t*>(o.w_pos.data_ptr<int32_t>());
  o.sc.alpha = o.alpha.data_ptr<float>();
  o.sc.scale = o.scale.data_ptr<float>();
  o.sc.shift = o.shift.data_ptr<float>();
  return o;
}

// The shortcut's input as the onednn route reads it: u8 spikes [T*N, Ci, H, W] ChannelsLast.
static at::Tensor shortcut_u8(const char* op, const at::Tensor& x, const ConvShape& s) {
  if (x.scalar_type() == at::kInt)
    return spikes_u8_from_packed(x.reshape({s.B, x.size(2), x.size(3), x.size(4)}));
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  bool bad = false;
  at::Tensor u8 = spikes_u8_from_float(xf.data_ptr<float>(), s.B, x.size(2), x.size(3),
                                       x.size(4), xf.options(), &bad);
  TORCH_CHECK_VALUE(!bad, "binslt::", op, ": block_x ", kNotBinaryMsg);
  return u8;
}

// The body of bconv_lif_infer and bconv_lif_infer_shortcut: the plan, then its run, with the
// residual as given (a float current or packed spikes) or a shortcut conv's current (computed
// by the onednn route beside its own counts; by bconv_affine_infer for the other routes).
static at::Tensor infer_entry(const char* op, const InferCall& c,
                              const std::optional<at::Tensor>& residual,
                              const ShortcutCall* shortcut) {
  const PlanLog log(op);
  const at::Tensor& x_in = c.x_in;
  check_on_cpu(x_in, op, "x");
  const bool packed_in = check_infer_input(op, x_in);
  const int64_t T = x_in.size(0), N = x_in.size(1);
  const int64_t H = packed_in ? x_in.size(2) : x_in.size(3);
  const int64_t W = packed_in ? x_in.size(3) : x_in.size(4);
  const int64_t C = packed_in ? 0 : x_in.size(2);
  const int64_t Cw = packed_in ? x_in.size(4) : words_for(static_cast<int>(C));
  const ConvShape s = check_conv_dims({T * N, H, W, Cw, "x"}, c.w_mask, c.w_pos, T, c.stride,
                                      c.padding, op);
  const int64_t Ci = packed_in ? 32 * Cw : C;
  const at::Tensor x = packed_in ? x_in.reshape({T * N, H, W, Cw})
                                 : x_in.to(at::kFloat).contiguous();
  std::atomic<bool> bad{false};
  const FloatInput xf = packed_in ? FloatInput{}
                                  : FloatInput{true, x.data_ptr<float>(), C, &bad};
  ForwardQuery q{s, Ci, true, LazyValue([&] {
                   return packed_in ? packed_rate(x) : sampled_rate(xf.x, s.B * C * s.H * s.W);
                 })};
  q.op = op;
  q.packed_out = c.packed_out;
  q.variant = c10::str(packed_in ? "packed_in" : c10::toString(x_in.scalar_type()),
                       x_in.is_contiguous() ? "" : " strided", " pool=", c.pool,
                       c.packed_out ? " packed_out" : "",
                       shortcut != nullptr                     ? " residual=shortcut"
                       : !residual.has_value()                 ? ""
                       : residual->scalar_type() == at::kInt ? " residual=packed"
                                                              : " residual");
  ForwardPlan plan = plan_forward(q);
  std::optional<ShortcutOperands> sc;
  if (shortcut != nullptr) sc = shortcut_operands(op, *shortcut, s);
  // A residual of spikes may come packed: pack_spikes words [T, N, Ho, Wo, ceil(Co/32)] int32,
  // read as such by the onednn route's packed output, unpacked to 0. / 1. floats for the rest.
  auto run = [&](const ForwardPlan& pl) {
    std::optional<at::Tensor> res = residual;
    at::Tensor res_words;
    const OnednnShortcut* fused = nullptr;
    if (sc.has_value() && pl.conv == FwdPlan::kOnednn) {
      if (!sc->sc.x_u8.defined()) sc->sc.x_u8 = shortcut_u8(op, shortcut->x, s);
      fused = &sc->sc;
    } else if (sc.has_value()) {
      const ShortcutCall& k = *shortcut;
      const at::Tensor bx = k.x.scalar_type() == at::kInt ? k.x.flatten(0, 1)
                                                          : k.x.flatten(0, 1).to(at::kFloat);
      try {  // the op checks its input (binary spikes) on every route; its errors name block_x
        res = bconv_affine_infer_cpu(bx, k.w_mask, k.w_pos, k.alpha, k.scale, k.shift, k.stride,
                                     k.padding)
                  .view({T, N, s.Co, s.Ho, s.Wo});
      } catch (const c10::ValueError& e) {
        TORCH_CHECK_VALUE(false, "binslt::", op, ": block_x: ", e.what_without_backtrace());
      }
    } else if (residual.has_value() && residual->scalar_type() == at::kInt) {
      const int64_t Cow = words_for(static_cast<int>(s.Co));
      check_on_cpu(*residual, op, "residual");
      TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({T, N, s.Ho, s.Wo, Cow}),
                        "binslt::", op, ": a packed residual must be spike words [T, N, Ho, Wo, "
                        "ceil(Co/32)] = ", at::IntArrayRef({T, N, s.Ho, s.Wo, Cow}),
                        ", got shape ", shape_str(*residual));
      if (c.packed_out && pl.conv == FwdPlan::kOnednn) {
        res_words = residual->contiguous();
        res = std::nullopt;
      } else {
        res = unpack_spikes_cpu(residual->reshape({T * N, s.Ho, s.Wo, Cow}), s.Co)
                  .view({T, N, s.Co, s.Ho, s.Wo});
      }
    }
    const ForwardArgs args = check_forward_args(op, s, c.alpha, c.scale, c.shift, res, c.p);
    check_pool(op, c.pool, s.Ho, s.Wo);
    const InferForm form{c.pool, c.packed_out,
                         res_words.defined()
                             ? reinterpret_cast<const uint32_t*>(res_words.data_ptr<int32_t>())
                             : nullptr,
                         fused};
    return std::get<0>(bconv_lif_run(s, pl, x, xf, {c.w_mask, c.w_pos}, args, &form));
  };
  at::Tensor spikes = run_forward_plan(plan, run);
  TORCH_CHECK_VALUE(!bad.load(), "binslt::", op, ": ", kNotBinaryMsg);
  log.emit(conv_shapes(s, Ci) + c10::str(" pool=", c.pool, c.packed_out ? " packed_out" : ""),
           plan.describe());
  return spikes;
}

// Inference (eval epilogue, no backward) straight from float spikes x [T, N, C, H, W]: each
// tile packs the input rows it reads (no packed copy of the input, no second pass over it); or
// from packed words x [T, N, H, W, Cw] int32 (a previous layer's packed_out). pool = 2 ORs
// 2x2 windows of the output spikes in the tile; packed_out returns pack_spikes words
// [T, N, Ho', Wo', ceil(Co/32)] int32 instead of float spikes.
at::Tensor bconv_lif_infer_cpu(const at::Tensor& x_in, const at::Tensor& w_mask,
                               const at::Tensor& w_pos, const at::Tensor& alpha,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const std::optional<at::Tensor>& residual, int64_t stride,
                               int64_t padding, double tau, bool decay_input, double v_threshold,
                               std::optional<double> v_reset, int64_t pool, bool packed_out) {
  const char* op = "bconv_lif_infer";
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset);
  return infer_entry(op, {x_in, w_mask, w_pos, alpha, scale, shift, stride, padding, pool,
                          packed_out, p},
                     residual, nullptr);
}

// bconv_lif_infer with the residual a shortcut conv's current, bconv_affine_infer(block_x,
// sc_*): the onednn route computes it a chunk of images at a time beside its own counts, so the
// shortcut's float map [T, N, Co, Ho, Wo] is never written whole (a ResNet block's 1x1
// shortcut in eval: 64 MiB at 128 channels of 32x32, N=32, T=4).
at::Tensor bconv_lif_infer_shortcut_cpu(
    const at::Tensor& x_in, const at::Tensor& w_mask, const at::Tensor& w_pos,
    const at::Tensor& alpha, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& block_x, const at::Tensor& sc_mask, const at::Tensor& sc_pos,
    const at::Tensor& sc_alpha, const at::Tensor& sc_scale, const at::Tensor& sc_shift,
    int64_t sc_stride, int64_t sc_padding, int64_t stride, int64_t padding, double tau,
    bool decay_input, double v_threshold, std::optional<double> v_reset, int64_t pool,
    bool packed_out) {
  const char* op = "bconv_lif_infer_shortcut";
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset);
  const ShortcutCall sc{block_x, sc_mask, sc_pos, sc_alpha, sc_scale, sc_shift, sc_stride,
                        sc_padding};
  return infer_entry(op, {x_in, w_mask, w_pos, alpha, scale, shift, stride, padding, pool,
                          packed_out, p},
                     std::nullopt, &sc);
}

}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("bconv_lif", &binslt::cpu::bconv_lif_cpu);
  m.impl("bconv_lif_infer", &binslt::cpu::bconv_lif_infer_cpu);
  m.impl("bconv_lif_infer_shortcut", &binslt::cpu::bconv_lif_infer_shortcut_cpu);
}
