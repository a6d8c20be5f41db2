// The training 2x2 spike max-pool: forward (binslt::spike_pool2: the pooled spikes and the
// unpooled ones packed, one pass over each image) and backward (binslt::spike_pool2_bwd).
//
// Backward: the gradient of each
// window goes to its first 1 in row-major order (a, b / c, d), or to a when all four are 0, read
// from the forward's packed spikes (one bit per spike saved); every other position, and the odd
// last row / column that no window covers, gets 0. binslt.reference.spike_pool2_bwd_reference
// is the same rule in torch ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>

#include "binslt/big_tensor.h"
#include "binslt/checks.h"
#include "binslt/pack_cpu.h"

namespace binslt {
namespace cpu {
namespace {

// One channel plane's 2x2 windows [H, W] -> [H/2, W/2]: the max of {0, 1} spikes (their OR).
inline void pool2_plane(const float* x, int64_t H, int64_t W, float* y) {
  const int64_t Hq = H / 2, Wq = W / 2;
  for (int64_t yo = 0; yo < Hq; ++yo) {
    const float* r0 = x + 2 * yo * W;
    const float* r1 = r0 + W;
    float* o = y + yo * Wq;
    for (int64_t xo = 0; xo < Wq; ++xo)
      o[xo] = std::max(std::max(r0[2 * xo], r0[2 * xo + 1]),
                       std::max(r1[2 * xo], r1[2 * xo + 1]));
  }
}

// x: [B, C, H, W] float32 spikes (exactly 0/1, else ValueError) -> (pooled [B, C, H/2, W/2]
// float32, packed [B, H, W, ceil(C/32)] int32 as pack_spikes). Each image is packed, then pooled
// from cache: one read of the spikes from memory instead of one per max and one for the packing.
std::tuple<at::Tensor, at::Tensor> spike_pool2_cpu(const at::Tensor& x_in) {
  const char* op = "binslt::spike_pool2";
  check_on_cpu(x_in, "spike_pool2", "spikes");
  TORCH_CHECK_VALUE(x_in.dim() == 4, op, ": spikes must be [B, C, H, W] (flatten T and N into "
                    "B), got shape ", shape_str(x_in));
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, op, ": spikes must be float32, got ",
                   x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(H >= 2 && W >= 2, op, ": a 2x2 pool needs maps of at least 2x2, got ", H,
                    "x", W);
  const int64_t Cw = words_for(static_cast<int>(C)), P = H * W;
  at::Tensor pooled = empty_big({B, C, H / 2, W / 2}, x.options());
  at::Tensor packed = empty_big({B, H, W, Cw}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  float* yp = pooled.data_ptr<float>();
  uint32_t* pp = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  const PackWordFn pack = pack_word_fn();
  const int64_t Pq = (H / 2) * (W / 2);
  std::atomic<bool> bad{false};
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    bool any = false;
    for (int64_t b = b0; b < b1; ++b) {
      const float* img = xp + b * C * P;
      for (int64_t wd = 0; wd < Cw; ++wd)
        any |= pack(img + 32 * wd * P, std::min<int64_t>(32, C - 32 * wd), P, P, Cw,
                    pp + b * P * Cw + wd);
      for (int64_t c = 0; c < C; ++c) pool2_plane(img + c * P, H, W, yp + (b * C + c) * Pq);
    }
    if (any) bad.store(true, std::memory_order_relaxed);
  });
  TORCH_CHECK_VALUE(!bad.load(), op, ": ", kNotBinaryMsg);
  return {pooled, packed};
}

// packed: [B, H, W, Cw] int32 (pack_spikes of the unpooled spikes); grad: [B, channels, H/2, W/2]
// float32 -> grad_x [B, channels, H, W] float32
at::Tensor spike_pool2_bwd_cpu(const at::Tensor& packed_in, const at::Tensor& grad_in,
                               int64_t channels) {
  const char* op = "binslt::spike_pool2_bwd";
  TORCH_CHECK_VALUE(packed_in.device().is_cpu() && grad_in.device().is_cpu(), op,
                    ": packed and grad must be on the CPU, got ", packed_in.device(), " and ",
                    grad_in.device());
  TORCH_CHECK_VALUE(packed_in.dim() == 4 && packed_in.scalar_type() == at::kInt, op,
                    ": packed must be [B, H, W, Cw] int32 (pack_spikes), got ",
                    packed_in.scalar_type(), " of shape ", packed_in.sizes());
  const int64_t B = packed_in.size(0), H = packed_in.size(1), W = packed_in.size(2),
                Cw = packed_in.size(3);
  TORCH_CHECK_VALUE(channels >= 1 && channels <= 32 * Cw, op, ": channels must be in [1, 32*Cw] "
                    "= [1, ", 32 * Cw, "], got ", channels);
  const int64_t Hq = H / 2, Wq = W / 2;
  TORCH_CHECK_VALUE(grad_in.dim() == 4 && grad_in.size(0) == B && grad_in.size(1) == channels &&
                        grad_in.size(2) == Hq && grad_in.size(3) == Wq,
                    op, ": grad must be [B, channels, H // 2, W // 2] = [", B, ", ", channels,
                    ", ", Hq, ", ", Wq, "], got ", grad_in.sizes());
  TORCH_CHECK_TYPE(grad_in.scalar_type() == at::kFloat, op, ": grad must be float32, got ",
                   grad_in.scalar_type());
  const at::Tensor packed = packed_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor gx = empty_big({B, channels, H, W}, grad.options());
  const uint32_t* pp = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  const float* gp = grad.data_ptr<float>();
  float* xp = gx.data_ptr<float>();
  const int64_t plane = H * W;
  at::parallel_for(0, B * channels, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, plane)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / channels, c = bc % channels;
      const int64_t word = c / 32;
      const uint32_t bit = uint32_t{1} << (c % 32);
      const uint32_t* img = pp + b * plane * Cw + word;  // (y, x) at img[(y * W + x) * Cw]
      const float* g = gp + bc * Hq * Wq;
      float* dst = xp + bc * plane;
      for (int64_t i = 0; i < plane; ++i) dst[i] = 0.0f;
      for (int64_t yo = 0; yo < Hq; ++yo) {
        const uint32_t* r0 = img + (2 * yo) * W * Cw;
        const uint32_t* r1 = r0 + W * Cw;
        float* d0 = dst + (2 * yo) * W;
        float* d1 = d0 + W;
        for (int64_t xo = 0; xo < Wq; ++xo) {
          const int64_t x0 = 2 * xo;
          const int64_t at = pool2_route(r0 + x0 * Cw, r1 + x0 * Cw, Cw, bit);
          (at < 2 ? d0 : d1)[x0 + (at & 1)] = g[yo * Wq + xo];
        }
      }
    }
  });
  return gx;
}

}  // namespace
}  // namespace cpu
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CPU, m) {
  m.impl("spike_pool2", &binslt::cpu::spike_pool2_cpu);
  m.impl("spike_pool2_bwd", &binslt::cpu::spike_pool2_bwd_cpu);
}
