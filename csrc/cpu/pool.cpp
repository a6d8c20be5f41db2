// Backward of the training 2x2 spike max-pool (binslt::spike_pool2_bwd): the gradient of each
// window goes to its first 1 in row-major order (a, b / c, d), or to a when all four are 0, read
// from the forward's packed spikes (one bit per spike saved); every other position, and the odd
// last row / column that no window covers, gets 0. binslt.reference.spike_pool2_bwd_reference
// is the same rule in torch ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "binslt/checks.h"
#include "binslt/pack_cpu.h"

namespace binslt {
namespace cpu {
namespace {

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
  at::Tensor gx = at::empty({B, channels, H, W}, grad.options());
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
  m.impl("spike_pool2_bwd", &binslt::cpu::spike_pool2_bwd_cpu);
}
