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

// Word cw of n channels read stride elements apart from base (channel c at base[c * stride]):
// bit c - 32 cw set where keep(value).
template <typename scalar_t, typename Keep>
__device__ __forceinline__ uint32_t pack_strided(const scalar_t* base, int64_t stride, int64_t n,
                                                 int64_t cw, Keep keep) {
  const int64_t c0 = cw * 32;
  const int count = static_cast<int>(n - c0 < 32 ? n - c0 : 32);
  return pack_word([&](int c) { return keep(base[static_cast<int64_t>(c) * stride]); },
                   static_cast<int>(c0), count);
}

// One thread per output word, index (b, cw, hw) with hw fastest so that reads of x coalesce.
// x: [B, C, HW]; out: [B, HW, Cw]
template <typename scalar_t>
__global__ void pack_spikes_kernel(const scalar_t* __restrict__ x, int64_t B, int64_t C,
                                   int64_t HW, int64_t Cw, uint32_t* __restrict__ out) {
  const int64_t total = B * Cw * HW;
  grid_stride(total, [&](int64_t i) {
    const int64_t hw = i % HW, cw = (i / HW) % Cw, b = i / (HW * Cw);
    out[(b * HW + hw) * Cw + cw] = pack_strided(x + b * C * HW + hw, HW, C, cw,
                                                [](scalar_t v) { return v != scalar_t(0); });
  });
}

// packed: [B, HW, Cw] -> out: [B, C, HW] float32
__global__ void unpack_spikes_kernel(const uint32_t* __restrict__ packed, int64_t B, int64_t C,
                                     int64_t HW, int64_t Cw, float* __restrict__ out) {
  const int64_t total = B * C * HW;
  grid_stride(total, [&](int64_t i) {
    const int64_t hw = i % HW, c = (i / HW) % C, b = i / (HW * C);
    const uint32_t w = packed[(b * HW + hw) * Cw + word_of(static_cast<int>(c))];
    out[i] = (w & bit_of(static_cast<int>(c))) ? 1.0f : 0.0f;
  });
}

// weight: [Co, Ci, KK] (KK = kh*kw) -> mask, pos: [Co, KK, Cw]; one thread per word, index
// (co, cw, kk) with kk fastest.
template <typename scalar_t>
__global__ void pack_weight_kernel(const scalar_t* __restrict__ w, int64_t Co, int64_t Ci,
                                   int64_t KK, int64_t Cw, uint32_t* __restrict__ mask,
                                   uint32_t* __restrict__ pos) {
  const int64_t total = Co * Cw * KK;
  grid_stride(total, [&](int64_t i) {
    const int64_t kk = i % KK, cw = (i / KK) % Cw, co = i / (KK * Cw);
    const scalar_t* wb = w + co * Ci * KK + kk;
    const int64_t o = (co * KK + kk) * Cw + cw;
    mask[o] = pack_strided(wb, KK, Ci, cw, [](scalar_t v) { return v != scalar_t(0); });
    pos[o] = pack_strided(wb, KK, Ci, cw, [](scalar_t v) { return v > scalar_t(0); });
  });
}

uint32_t* words(Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>()); }

// The entry checks of a 4-d CUDA input: name must be on a CUDA device with the given shape.
void check_cuda_4d(const Tensor& t, const char* op, const char* name, const char* shape) {
  check_on_cuda(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 4, "binslt::", op, ": ", name, " must have shape ", shape,
                    ", got ", t.sizes());
}

// x: [B, C, H, W] (any real dtype; nonzero = spike) -> [B, H, W, ceil(C/32)] int32
Tensor pack_spikes_cuda(const Tensor& x_in) {
  check_cuda_4d(x_in, "pack_spikes", "x", "[B, C, H, W]");
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
  check_cuda_4d(packed_in, "unpack_spikes", "packed", "[B, H, W, Cw]");
  check_dtype(packed_in, "unpack_spikes", "packed", at::kInt);
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
  check_cuda_4d(w_in, "pack_weight", "weight", "[Co, Ci, kh, kw]");
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
