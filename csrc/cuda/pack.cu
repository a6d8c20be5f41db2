// binslt::pack_spikes, unpack_spikes and pack_weight for CUDA tensors. Packed words are
// channel-last, 32 channels per int32 word: channel c is bit c % 32 of word c / 32; unused high
// bits are zero. Semantics: binslt.reference.*_reference.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "epilogue.cuh"

namespace binslt {
namespace cuda {
namespace {

using at::Tensor;

// One thread per output word, index (b, cw, hw) with hw fastest so that reads of x coalesce.
// x: [B, C, HW]; out: [B, HW, Cw]
template <typename scalar_t>
__global__ void pack_spikes_kernel(const scalar_t* __restrict__ x, int64_t B, int64_t C,
                                   int64_t HW, int64_t Cw, uint32_t* __restrict__ out) {
  const int64_t total = B * Cw * HW;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hw = i % HW, cw = (i / HW) % Cw, b = i / (HW * Cw);
    const int64_t c0 = cw * 32;
    const int count = static_cast<int>(C - c0 < 32 ? C - c0 : 32);
    const scalar_t* xb = x + b * C * HW + hw;
    out[(b * HW + hw) * Cw + cw] = pack_word(
        [&](int c) { return xb[static_cast<int64_t>(c) * HW] != scalar_t(0); },
        static_cast<int>(c0), count);
  }
}

// packed: [B, HW, Cw] -> out: [B, C, HW] float32
__global__ void unpack_spikes_kernel(const uint32_t* __restrict__ packed, int64_t B, int64_t C,
                                     int64_t HW, int64_t Cw, float* __restrict__ out) {
  const int64_t total = B * C * HW;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hw = i % HW, c = (i / HW) % C, b = i / (HW * C);
    const uint32_t w = packed[(b * HW + hw) * Cw + word_of(static_cast<int>(c))];
    out[i] = (w & bit_of(static_cast<int>(c))) ? 1.0f : 0.0f;
  }
}

// weight: [Co, Ci, KK] (KK = kh*kw) -> mask, pos: [Co, KK, Cw]; one thread per word, index
// (co, cw, kk) with kk fastest.
template <typename scalar_t>
__global__ void pack_weight_kernel(const scalar_t* __restrict__ w, int64_t Co, int64_t Ci,
                                   int64_t KK, int64_t Cw, uint32_t* __restrict__ mask,
                                   uint32_t* __restrict__ pos) {
  const int64_t total = Co * Cw * KK;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t kk = i % KK, cw = (i / KK) % Cw, co = i / (KK * Cw);
    const int64_t c0 = cw * 32;
    const int count = static_cast<int>(Ci - c0 < 32 ? Ci - c0 : 32);
    const scalar_t* wb = w + co * Ci * KK + kk;
    const int64_t o = (co * KK + kk) * Cw + cw;
    mask[o] = pack_word([&](int c) { return wb[static_cast<int64_t>(c) * KK] != scalar_t(0); },
                        static_cast<int>(c0), count);
    pos[o] = pack_word([&](int c) { return wb[static_cast<int64_t>(c) * KK] > scalar_t(0); },
                       static_cast<int>(c0), count);
  }
}

uint32_t* words(Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>()); }

// x: [B, C, H, W] (any real dtype; nonzero = spike) -> [B, H, W, ceil(C/32)] int32
Tensor pack_spikes_cuda(const Tensor& x_in) {
  check_on_cuda(x_in, "pack_spikes", "x");
  TORCH_CHECK_VALUE(x_in.dim() == 4, "binslt::pack_spikes: x must have shape [B, C, H, W], got ",
                    x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cw = (C + 31) / 32;
  Tensor out = at::empty({B, H, W, Cw}, x.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(),
                             "binslt_pack_spikes", [&] {
                               pack_spikes_kernel<scalar_t>
                                   <<<blocks_for(out.numel(), 256), 256, 0,
                                      c10::cuda::getCurrentCUDAStream()>>>(
                                       x.data_ptr<scalar_t>(), B, C, H * W, Cw, words(out));
                             });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// packed: [B, H, W, Cw] int32 -> [B, channels, H, W] float32
Tensor unpack_spikes_cuda(const Tensor& packed_in, int64_t channels) {
  check_on_cuda(packed_in, "unpack_spikes", "packed");
  check_dtype(packed_in, "unpack_spikes", "packed", at::kInt);
  TORCH_CHECK_VALUE(packed_in.dim() == 4,
                    "binslt::unpack_spikes: packed must have shape [B, H, W, Cw], got ",
                    packed_in.sizes());
  const int64_t B = packed_in.size(0), H = packed_in.size(1), W = packed_in.size(2),
                Cw = packed_in.size(3);
  TORCH_CHECK_VALUE(channels >= 0 && channels <= 32 * Cw, "binslt::unpack_spikes: channels must be in [0, ",
                    32 * Cw, "] for ", Cw, " packed words, got ", channels);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const Tensor packed = packed_in.contiguous();
  Tensor out = at::empty({B, channels, H, W}, packed.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  unpack_spikes_kernel<<<blocks_for(out.numel(), 256), 256, 0,
                         c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()), B, channels, H * W, Cw,
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// weight: [Co, Ci, kh, kw] real -> (mask, pos) [Co, kh, kw, ceil(Ci/32)] int32
std::tuple<Tensor, Tensor> pack_weight_cuda(const Tensor& w_in) {
  check_on_cuda(w_in, "pack_weight", "weight");
  TORCH_CHECK_VALUE(w_in.dim() == 4, "binslt::pack_weight: weight must have shape [Co, Ci, kh, kw], got ",
                    w_in.sizes());
  const c10::cuda::CUDAGuard guard(w_in.device());
  const Tensor w = w_in.contiguous();
  const int64_t Co = w.size(0), Ci = w.size(1), kh = w.size(2), kw = w.size(3);
  const int64_t Cw = (Ci + 31) / 32;
  Tensor mask = at::empty({Co, kh, kw, Cw}, w.options().dtype(at::kInt));
  Tensor pos = at::empty({Co, kh, kw, Cw}, w.options().dtype(at::kInt));
  if (mask.numel() == 0) return {mask, pos};
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "binslt_pack_weight", [&] {
    pack_weight_kernel<scalar_t><<<blocks_for(mask.numel(), 256), 256, 0,
                                   c10::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), Co, Ci, kh * kw, Cw, words(mask), words(pos));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mask, pos};
}

}  // namespace
}  // namespace cuda
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CUDA, m) {
  m.impl("pack_spikes", &binslt::cuda::pack_spikes_cuda);
  m.impl("unpack_spikes", &binslt::cuda::unpack_spikes_cuda);
  m.impl("pack_weight", &binslt::cuda::pack_weight_cuda);
}
