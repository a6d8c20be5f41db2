// Bit packing of spikes and ternary weights, channel-last, 32 channels per int32 word:
// channel c lives in word c / 32 at bit c % 32; unused high bits are zero.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>

#include "binslt/big_tensor.h"
#include "binslt/checks.h"
#include "binslt/lif.h"
#include "binslt/pack_cpu.h"

namespace binslt {
namespace cpu {

// x: [B, C, H, W] float (values exactly 0/1, else ValueError) -> [B, H, W, ceil(C/32)] int32
at::Tensor pack_spikes_cpu(const at::Tensor& x_in) {
  check_on_cpu(x_in, "pack_spikes", "x");
  TORCH_CHECK(x_in.dim() == 4, "binslt::pack_spikes: x must be [B, C, H, W] (flatten T and N "
              "into B), got shape ", shape_str(x_in));
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cw = words_for(static_cast<int>(C));
  at::Tensor out = empty_big({B, H, W, Cw}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  uint32_t* op = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const PackWordFn fn = pack_word_fn();
  const int64_t P = H * W;
  std::atomic<bool> bad{false};
  at::parallel_for(0, B * Cw, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 32 * P)),
                   [&](int64_t begin, int64_t end) {
    // A non-binary value ends the work (the call raises): a caller may pack a tensor only to
    // learn whether it is spikes (ConvLIF's residual), and a real one stops at its first word.
    for (int64_t bw = begin; bw < end && !bad.load(std::memory_order_relaxed); ++bw) {
      const int64_t b = bw / Cw, wd = bw % Cw;
      const int64_t nch = std::min<int64_t>(32, C - 32 * wd);
      if (fn(xp + (b * C + 32 * wd) * P, nch, P, P, Cw, op + b * P * Cw + wd))
        bad.store(true, std::memory_order_relaxed);
    }
  });
  TORCH_CHECK_VALUE(!bad.load(), "binslt::pack_spikes: ", kNotBinaryMsg);
  return out;
}

// counts int16 / int32 (any shape) -> (int8 copy clamped to [-128, 127], 0-d bool: every count
// in that range), one pass: blocks of 16K counts, each's min / max then its clamped copy while
// it is in cache (both loops vectorise; __restrict: the int8 stores could alias the counts).
template <typename T>
static bool narrow_counts(const T* __restrict src, int8_t* __restrict dst, int64_t n) {
  constexpr int64_t kBlock = 16384;
  std::atomic<bool> over{false};
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    T lo = 0, hi = 0;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const T* __restrict s = src + blk * kBlock;
      int8_t* __restrict d = dst + blk * kBlock;
      const int64_t len = std::min(kBlock, n - blk * kBlock);
      for (int64_t i = 0; i < len; ++i) {
        lo = std::min(lo, s[i]);
        hi = std::max(hi, s[i]);
      }
      for (int64_t i = 0; i < len; ++i)
        d[i] = static_cast<int8_t>(std::min<T>(std::max<T>(s[i], T(-128)), T(127)));
    }
    if (lo < T(-128) || hi > T(127)) over.store(true, std::memory_order_relaxed);
  });
  return !over.load();
}

std::tuple<at::Tensor, at::Tensor> narrow_int8_cpu(const at::Tensor& counts_in) {
  check_on_cpu(counts_in, "narrow_int8", "counts");
  TORCH_CHECK_VALUE(counts_in.scalar_type() == at::kShort || counts_in.scalar_type() == at::kInt,
                    "binslt::narrow_int8: counts must be int16 or int32, got ",
                    counts_in.scalar_type());
  const at::Tensor c = counts_in.contiguous();
  at::Tensor out = empty_big(c.sizes(), c.options().dtype(at::kChar));
  const bool fits =
      c.scalar_type() == at::kShort
          ? narrow_counts(c.data_ptr<int16_t>(), out.data_ptr<int8_t>(), c.numel())
          : narrow_counts(c.data_ptr<int32_t>(), out.data_ptr<int8_t>(), c.numel());
  return {out, at::scalar_tensor(fits, c.options().dtype(at::kBool))};
}

// words [B, P, Cw] -> out [B, channels, P] float32 (0/1), P pixels a plane.
void unpack_words_to_planes(const uint32_t* words, int64_t B, int64_t P, int64_t Cw,
                            int64_t channels, float* out) {
  at::parallel_for(0, B * channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / channels, c = bc % channels;
      const uint32_t bit = bit_of(static_cast<int>(c));
      const uint32_t* src = words + b * P * Cw + (c >> 5);
      float* dst = out + bc * P;
      for (int64_t i = 0; i < P; ++i) dst[i] = (src[i * Cw] & bit) ? 1.0f : 0.0f;
    }
  });
}

// packed: [B, H, W, Cw] int32 -> [B, channels, H, W] float32 (0/1)
at::Tensor unpack_spikes_cpu(const at::Tensor& packed_in, int64_t channels) {
  check_cpu_tensor(packed_in, "unpack_spikes", "packed", 4, at::kInt, "[B, H, W, Cw] int32");
  const at::Tensor packed = packed_in.contiguous();
  const int64_t B = packed.size(0), H = packed.size(1), W = packed.size(2), Cw = packed.size(3);
  TORCH_CHECK(channels >= 0 && channels <= 32 * Cw, "binslt::unpack_spikes: channels must be in "
              "[0, 32*Cw] = [0, ", 32 * Cw, "] for packed words of shape ", shape_str(packed),
              ", got ", channels);
  at::Tensor out = empty_big({B, channels, H, W}, packed.options().dtype(at::kFloat));
  unpack_words_to_planes(reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()), B,
                         H * W, Cw, channels, out.data_ptr<float>());
  return out;
}

// weight: [Co, Ci, kh, kw] float, ternary up to a gain -> (mask, pos) [Co, kh, kw, ceil(Ci/32)]
std::tuple<at::Tensor, at::Tensor> pack_weight_cpu(const at::Tensor& w_in) {
  check_on_cpu(w_in, "pack_weight", "weight");
  TORCH_CHECK(w_in.dim() == 4, "binslt::pack_weight: weight must be [Co, Ci, kh, kw], got shape ",
              shape_str(w_in));
  const at::Tensor w = w_in.to(at::kFloat).contiguous();
  const int64_t Co = w.size(0), Ci = w.size(1), KH = w.size(2), KW = w.size(3);
  const int64_t Cw = words_for(static_cast<int>(Ci));
  at::Tensor mask = at::zeros({Co, KH, KW, Cw}, w.options().dtype(at::kInt));
  at::Tensor pos = at::zeros({Co, KH, KW, Cw}, w.options().dtype(at::kInt));
  const float* wp = w.data_ptr<float>();
  uint32_t* mp = reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>());
  uint32_t* pp = reinterpret_cast<uint32_t*>(pos.data_ptr<int32_t>());
  at::parallel_for(0, Co, 4, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      for (int64_t c = 0; c < Ci; ++c)
        for (int64_t k = 0; k < KH * KW; ++k) {
          const float v = wp[(o * Ci + c) * KH * KW + k];
          const int64_t idx = (o * KH * KW + k) * Cw + (c >> 5);
          const uint32_t bit = bit_of(static_cast<int>(c));
          // Branch-free: the signs of a search step's W_eff are random, so branches mispredict.
          mp[idx] |= bit & (0u - static_cast<uint32_t>(v != 0.0f));
          pp[idx] |= bit & (0u - static_cast<uint32_t>(v > 0.0f));
        }
  });
  return {mask, pos};
}

}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("pack_spikes", &binslt::cpu::pack_spikes_cpu);
  m.impl("unpack_spikes", &binslt::cpu::unpack_spikes_cpu);
  m.impl("narrow_int8", &binslt::cpu::narrow_int8_cpu);
  m.impl("pack_weight", &binslt::cpu::pack_weight_cpu);
}
