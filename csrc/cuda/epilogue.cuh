// Epilogue kernels shared by bn_lif.cu and bconv_lif.cu: per-channel BN statistics, the LIF
// forward over T, and the backward (LIF BPTT, BN/affine gradients). The current Z comes either
// from a float tensor (bn_lif) or from integer counts times alpha[c] (bconv_lif).
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE
// headers that a minimal CUDA toolkit lacks).
//
// Element layout everywhere: [T, N, C, S] contiguous (S = product of the spatial dims), so
// element (t, n, c, s) is at t*N*C*S + j with neuron j = (n*C + c)*S + s.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "binslt/checks.h"
#include "binslt/cuda_shared.h"
#include "binslt/lif.h"

namespace binslt {
namespace cuda {

constexpr int kEpiThreads = 256;

struct EpiGeom {
  int64_t T, N, C, S;
  __host__ __device__ int64_t neurons() const { return N * C * S; }
  __host__ __device__ int64_t per_channel() const { return T * N * S; }  // BN reduction size M
};

struct EpiArgs {
  const float* alpha;     // [C] or nullptr (float input)
  const float* scale;     // [C]
  const float* shift;     // [C]
  const float* mean;      // [C] (read when bn_train)
  const float* var;       // [C] (read when bn_train)
  const float* residual;  // [T, N, C, S] or nullptr
  bool bn_train;
  float eps;
};

inline int blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(b, 1 << 20)));  // grid-stride
}

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

template <typename In>
__device__ __forceinline__ float load_z(const In* in, int64_t i, float alpha) {
  if constexpr (std::is_same_v<In, float>) {
    return in[i];
  } else {
    return count_to_z(static_cast<int>(in[i]), alpha);
  }
}

// f(i) for every i < total: the grid's threads stride over the range (any grid size covers it).
template <typename F>
__device__ __forceinline__ void grid_stride(int64_t total, F f) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    f(i);
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sums a and b over the block (blockDim.x == kEpiThreads); the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double sa[kEpiThreads / 32], sb[kEpiThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kEpiThreads / 32 ? sa[lane] : 0.0;
    b = lane < kEpiThreads / 32 ? sb[lane] : 0.0;
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

// The epilogue constants of channel c: the count gain, the affine and the batch statistics.
struct ChannelEpi {
  float al, sc, sh, mean, invstd;
};
__device__ __forceinline__ ChannelEpi channel_epi(const EpiArgs& a, int64_t c) {
  ChannelEpi e;
  e.al = a.alpha != nullptr ? a.alpha[c] : 1.0f;
  e.sc = a.scale[c];
  e.sh = a.shift[c];
  e.mean = a.bn_train ? a.mean[c] : 0.0f;
  e.invstd = a.bn_train ? bn_invstd(a.var[c], a.eps) : 1.0f;
  return e;
}

// X[t] of neuron j: epilogue of Z plus the residual.
template <typename In>
__device__ __forceinline__ float epilogue_x(const In* in, const EpiArgs& a, int64_t i,
                                            const ChannelEpi& e) {
  float x = epilogue_apply(load_z(in, i, e.al), e.sc, e.sh, e.mean, e.invstd, a.bn_train);
  if (a.residual != nullptr) x = add_rn(x, a.residual[i]);
  return x;
}

// One block's part of two float64 sums over the elements i of channel c = blockIdx.x (grid
// (C, G)): add(i, s1, s2) for every element of its stride, then part[c][blockIdx.y] = (s1, s2).
template <typename Add>
__device__ __forceinline__ void channel_partial_sums(const EpiGeom& g, Add add,
                                                     double* __restrict__ part) {
  const int64_t c = blockIdx.x;
  const int G = gridDim.y;
  const int64_t m = g.per_channel();
  double s1 = 0.0, s2 = 0.0;
  for (int64_t k = static_cast<int64_t>(blockIdx.y) * kEpiThreads + threadIdx.x; k < m;
       k += static_cast<int64_t>(G) * kEpiThreads) {
    const int64_t tn = k / g.S, s = k % g.S;
    add((tn * g.C + c) * g.S + s, s1, s2);
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    part[(c * G + blockIdx.y) * 2 + 0] = s1;
    part[(c * G + blockIdx.y) * 2 + 1] = s2;
  }
}

// The G block parts of channel c's two sums, added in order.
__device__ __forceinline__ void channel_total_sums(const double* __restrict__ part, int64_t c,
                                                   int G, double& s1, double& s2) {
  s1 = 0.0;
  s2 = 0.0;
  for (int k = 0; k < G; ++k) {
    s1 += part[(c * G + k) * 2 + 0];
    s2 += part[(c * G + k) * 2 + 1];
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Partial per-channel sums of Z and Z^2 in float64. Grid (C, G); part: [C, G, 2].
template <typename In>
__global__ void __launch_bounds__(kEpiThreads)
    channel_stats_partial_kernel(const In* __restrict__ in, const float* __restrict__ alpha,
                                 EpiGeom g, double* __restrict__ part) {
  const float al = alpha != nullptr ? alpha[blockIdx.x] : 1.0f;
  channel_partial_sums(
      g,
      [&](int64_t i, double& s1, double& s2) {
        const double z = load_z(in, i, al);
        s1 += z;
        s2 += z * z;
      },
      part);
}

// mean and biased var per channel from the partial sums.
static __global__ void channel_stats_finalize_kernel(const double* __restrict__ part, int64_t C, int G,
                                              int64_t m, float* __restrict__ mean,
                                              float* __restrict__ var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s1, s2;
  channel_total_sums(part, c, G, s1, s2);
  const double mu = s1 / static_cast<double>(m);
  const double v = s2 / static_cast<double>(m) - mu * mu;
  mean[c] = static_cast<float>(mu);
  var[c] = static_cast<float>(v > 0.0 ? v : 0.0);
}

// One thread per neuron: epilogue + LIF over T. spikes: [T, N, C, S].
template <typename In>
__global__ void __launch_bounds__(kEpiThreads)
    lif_forward_kernel(const In* __restrict__ in, EpiArgs a, EpiGeom g, NeuronParams p,
                       float* __restrict__ spikes) {
  const int64_t nn = g.neurons();
  grid_stride(nn, [&](int64_t j) {
    const ChannelEpi e = channel_epi(a, (j / g.S) % g.C);
    lif_forward_sequence(
        static_cast<int>(g.T), p,
        [&](int t) { return epilogue_x(in, a, j + t * nn, e); },
        [&](int t, float, float s) { spikes[j + t * nn] = s; });
  });
}

// One thread per neuron: recompute H over T (stored in g_cur), then BPTT writing dL/dX into
// g_cur. gs: dL/dS [T, N, C, S].
template <typename In>
__global__ void __launch_bounds__(kEpiThreads)
    lif_backward_kernel(const float* __restrict__ gs, const In* __restrict__ in, EpiArgs a,
                        EpiGeom g, NeuronParams p, float* __restrict__ g_cur) {
  const int64_t nn = g.neurons();
  const int T = static_cast<int>(g.T);
  grid_stride(nn, [&](int64_t j) {
    const ChannelEpi e = channel_epi(a, (j / g.S) % g.C);
    lif_forward_sequence(
        T, p, [&](int t) { return epilogue_x(in, a, j + t * nn, e); },
        [&](int t, float h, float) { g_cur[j + t * nn] = h; });
    lif_backward_sequence(
        T, p, [&](int t) { return gs[j + t * nn]; }, [&](int t) { return g_cur[j + t * nn]; },
        [&](int t, float gx) { g_cur[j + t * nn] = gx; });
  });
}

// Partial per-channel sums of gy and gy * xhat (bn_train) or gy * z (affine), in float64.
template <typename In>
__global__ void __launch_bounds__(kEpiThreads)
    affine_grad_partial_kernel(const float* __restrict__ g_cur, const In* __restrict__ in,
                               EpiArgs a, EpiGeom g, double* __restrict__ part) {
  const int64_t c = blockIdx.x;
  const float al = a.alpha != nullptr ? a.alpha[c] : 1.0f;
  const double mean = a.bn_train ? static_cast<double>(a.mean[c]) : 0.0;
  const double invstd =
      a.bn_train ? 1.0 / sqrt(static_cast<double>(a.var[c]) + static_cast<double>(a.eps))
                 : 1.0;
  channel_partial_sums(
      g,
      [&](int64_t i, double& s1, double& s2) {
        const double gy = g_cur[i];
        const double z = load_z(in, i, al);
        s1 += gy;
        s2 += gy * (a.bn_train ? (z - mean) * invstd : z);
      },
      part);
}

// grad_shift = sum gy, grad_scale = sum gy * (xhat or z); coef = the per-channel means.
static __global__ void affine_grad_finalize_kernel(const double* __restrict__ part, int64_t C, int G,
                                            int64_t m, float* __restrict__ g_scale,
                                            float* __restrict__ g_shift, double* __restrict__ coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s1, s2;
  channel_total_sums(part, c, G, s1, s2);
  g_shift[c] = static_cast<float>(s1);
  g_scale[c] = static_cast<float>(s2);
  coef[2 * c + 0] = s1 / static_cast<double>(m);
  coef[2 * c + 1] = s2 / static_cast<double>(m);
}

// dL/dZ elementwise. g_z: [T, N, C, S].
template <typename In>
__global__ void __launch_bounds__(kEpiThreads)
    input_grad_kernel(const float* __restrict__ g_cur, const In* __restrict__ in, EpiArgs a,
                      EpiGeom g, const double* __restrict__ coef, float* __restrict__ g_z) {
  const int64_t total = g.T * g.neurons();
  grid_stride(total, [&](int64_t i) {
    const int64_t c = (i / g.S) % g.C;
    if (a.bn_train) {
      const float al = a.alpha != nullptr ? a.alpha[c] : 1.0f;
      const double invstd =
          1.0 / sqrt(static_cast<double>(a.var[c]) + static_cast<double>(a.eps));
      const double xhat = (static_cast<double>(load_z(in, i, al)) - a.mean[c]) * invstd;
      g_z[i] = static_cast<float>(
          bn_train_input_grad(g_cur[i], xhat, a.scale[c], invstd, coef[2 * c], coef[2 * c + 1]));
    } else {
      g_z[i] = mul_rn(g_cur[i], a.scale[c]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

inline int reduction_splits(const EpiGeom& g) {
  const int64_t m = g.per_channel();
  const int64_t want = (m + kEpiThreads * 4 - 1) / (kEpiThreads * 4);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, 64)));
}

// Batch statistics of Z per channel into mean, var ([C] float32).
template <typename In>
void launch_channel_stats(const In* in, const float* alpha, const EpiGeom& g, at::Tensor& mean,
                          at::Tensor& var) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int G = reduction_splits(g);
  TORCH_CHECK(g.C <= INT32_MAX, "binslt: too many channels");
  auto part = at::empty({g.C * G * 2}, mean.options().dtype(at::kDouble));
  channel_stats_partial_kernel<In><<<dim3(static_cast<unsigned>(g.C), G), kEpiThreads, 0,
                                     stream>>>(in, alpha, g, part.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  channel_stats_finalize_kernel<<<blocks_for(g.C, 128), 128, 0, stream>>>(
      part.data_ptr<double>(), g.C, G, g.per_channel(), mean.data_ptr<float>(),
      var.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename In>
void launch_lif_forward(const In* in, const EpiArgs& a, const EpiGeom& g, const NeuronParams& p,
                        float* spikes) {
  if (g.neurons() == 0 || g.T == 0) return;
  lif_forward_kernel<In><<<blocks_for(g.neurons(), kEpiThreads), kEpiThreads, 0,
                           c10::cuda::getCurrentCUDAStream()>>>(in, a, g, p, spikes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The epilogue + LIF backward: fills g_z, g_cur ([T, N, C, S]) and g_scale, g_shift ([C]).
template <typename In>
void launch_epilogue_backward(const float* gs, const In* in, const EpiArgs& a, const EpiGeom& g,
                              const NeuronParams& p, at::Tensor& g_z, at::Tensor& g_cur,
                              at::Tensor& g_scale, at::Tensor& g_shift) {
  if (g.neurons() == 0 || g.T == 0) {
    g_scale.zero_();
    g_shift.zero_();
    return;
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  lif_backward_kernel<In><<<blocks_for(g.neurons(), kEpiThreads), kEpiThreads, 0, stream>>>(
      gs, in, a, g, p, g_cur.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int G = reduction_splits(g);
  auto part = at::empty({g.C * G * 2}, g_cur.options().dtype(at::kDouble));
  auto coef = at::empty({g.C * 2}, g_cur.options().dtype(at::kDouble));
  affine_grad_partial_kernel<In><<<dim3(static_cast<unsigned>(g.C), G), kEpiThreads, 0,
                                   stream>>>(g_cur.data_ptr<float>(), in, a, g,
                                             part.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  affine_grad_finalize_kernel<<<blocks_for(g.C, 128), 128, 0, stream>>>(
      part.data_ptr<double>(), g.C, G, g.per_channel(), g_scale.data_ptr<float>(),
      g_shift.data_ptr<float>(), coef.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  input_grad_kernel<In><<<blocks_for(g.T * g.neurons(), kEpiThreads), kEpiThreads, 0, stream>>>(
      g_cur.data_ptr<float>(), in, a, g, coef.data_ptr<double>(), g_z.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace binslt
