// binslt::bconv_lif and binslt::bconv_lif_bwd for CUDA tensors: the fused binary conv
// (spike bits x ternary weight bits) + epilogue (alpha, BN or affine, residual) + multi-step LIF.
// Semantics: binslt.reference.bconv_lif_reference / bconv_lif_bwd_reference.
//
// Forward paths:
// * wmma (sm_72+, chosen on sm_80+): implicit-im2col int8 tensor-core GEMM. Each K step unpacks
//   one packed word (32 input channels at one kernel offset) of the spikes into {0,1} int8 and of
//   the weights into {-1,0,+1} int8 in shared memory, and runs 16x16x16 int8 mma with int32
//   accumulators (exact). A block owns a 64-pixel x 64-channel tile for every t, so without
//   batch-stat BN the epilogue and the LIF recurrence run in-kernel, the membrane potential
//   carried in shared memory from one t to the next.
// * popc: one thread per output, AND + popcount over the packed words (any GPU).
// With bn_train both paths first write the counts, then per-channel statistics are reduced and
// a second kernel normalizes and runs the LIF (two passes).
//
// Backward: LIF BPTT from the saved integer counts (epilogue.cuh), then dW_eff (a masked sum over
// positions: the input is binary) and dX (a transposed conv with the ternary weights times
// alpha), both in float32 on CUDA cores with float64 accumulation across chunks.
#include <mma.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <tuple>

#include "api.h"
#include "epilogue.cuh"

namespace binslt {
namespace cuda {

namespace {

using at::Tensor;

// 0 = auto, 1 = wmma, 2 = popc
std::atomic<int> g_bconv_impl{0};

struct ConvGeom {
  int T, N, H, W, Cw, Co, kh, kw, stride, pad, Ho, Wo;
};

// ---------------------------------------------------------------------------------------------
// Forward: int8 tensor-core path
// ---------------------------------------------------------------------------------------------

constexpr int kBM = 64;  // output pixels per block tile (of one timestep)
constexpr int kBN = 64;  // output channels per block tile
constexpr int kWmmaThreads = 128;  // 4 warps as 2 x 2, each a 32 x 32 sub-tile

// Each 16-byte half of a word's 32-byte int8 expansion gets its own plane, so that every fragment
// pointer is 32-byte aligned as wmma requires.
struct __align__(128) WmmaSmem {
  union {
    struct {
      int8_t a[2][kBM][16];  // a[k / 16][pixel][k % 16]: spikes in {0, 1}
      int8_t b[2][kBN][16];  // b[k / 16][channel][k % 16]: weights in {-1, 0, 1}
    } ab;
    int c[kBN][kBM + 4];  // the int32 tile, column-major: c[channel][pixel]
  } u;
  float v[kBN][kBM];  // membrane potential V[t-1] of each tile element
};

// x: [T*N, H, W, Cw]; wm, wp: [Co, kh, kw, Cw]; counts, spikes: [T, N, Co, Ho, Wo]
// alpha, scale, shift: [Co]; residual: [T, N, Co, Ho, Wo] or nullptr. kLIF: run the affine
// epilogue + LIF and write spikes (otherwise counts only).
template <typename CountT, bool kLIF>
__global__ void __launch_bounds__(kWmmaThreads)
    bconv_wmma_kernel(const uint32_t* __restrict__ x, const uint32_t* __restrict__ wm,
                      const uint32_t* __restrict__ wp, const float* __restrict__ alpha,
                      const float* __restrict__ scale, const float* __restrict__ shift,
                      const float* __restrict__ residual, CountT* __restrict__ counts,
                      float* __restrict__ spikes, ConvGeom g, NeuronParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 720
  using namespace nvcuda;
  __shared__ WmmaSmem sm;
  const int tid = threadIdx.x;
  const int warp = tid >> 5, warp_m = warp & 1, warp_n = warp >> 1;
  const int HoWo = g.Ho * g.Wo;
  const int64_t M = static_cast<int64_t>(g.N) * HoWo;  // pixels per timestep
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * kBN;

  // Thread tid loads spike row (tid & 63) when tid < 64, weight column (tid & 63) otherwise, and
  // in the epilogue handles tile row (tid & 63), columns (tid >> 6) + 2k.
  const int row = tid & (kBM - 1);
  const int64_t m = m0 + row;
  const bool row_ok = m < M;
  int img = 0, pix = 0, ih0 = 0, iw0 = 0;
  if (row_ok) {
    img = static_cast<int>(m / HoWo);
    pix = static_cast<int>(m % HoWo);
    ih0 = (pix / g.Wo) * g.stride - g.pad;
    iw0 = (pix % g.Wo) * g.stride - g.pad;
  }
  const bool loads_a = tid < kBM;
  const int co_load = n0 + row;
  const bool co_load_ok = co_load < g.Co;

  if (kLIF) {
    for (int col = tid >> 6; col < kBN; col += 2) sm.v[col][row] = p.soft_reset ? 0.0f : p.v_reset;
  }
  const int kwcw = g.kw * g.Cw;
  const int ksteps = g.kh * kwcw;

  for (int t = 0; t < g.T; ++t) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0);
    const int64_t img_row0 = (static_cast<int64_t>(t) * g.N + img) * g.H;

    for (int ks = 0; ks < ksteps; ++ks) {
      const int ky = ks / kwcw, rem = ks % kwcw, kx = rem / g.Cw, cw = rem % g.Cw;
      __syncthreads();  // the previous step's fragments (or the C tile) are consumed
      if (loads_a) {
        uint32_t word = 0;
        const int ih = ih0 + ky, iw = iw0 + kx;
        if (row_ok && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
          word = x[((img_row0 + ih) * g.W + iw) * g.Cw + cw];
        }
        *reinterpret_cast<uint4*>(&sm.u.ab.a[0][row][0]) = make_uint4(
            spike_bytes(word, 0), spike_bytes(word, 1), spike_bytes(word, 2), spike_bytes(word, 3));
        *reinterpret_cast<uint4*>(&sm.u.ab.a[1][row][0]) = make_uint4(
            spike_bytes(word, 4), spike_bytes(word, 5), spike_bytes(word, 6), spike_bytes(word, 7));
      } else {
        uint32_t mk = 0, ps = 0;
        if (co_load_ok) {
          const int64_t wi = ((static_cast<int64_t>(co_load) * g.kh + ky) * g.kw + kx) * g.Cw + cw;
          mk = wm[wi];
          ps = wp[wi];
        }
        *reinterpret_cast<uint4*>(&sm.u.ab.b[0][row][0]) =
            make_uint4(ternary_bytes(mk, ps, 0), ternary_bytes(mk, ps, 1),
                       ternary_bytes(mk, ps, 2), ternary_bytes(mk, ps, 3));
        *reinterpret_cast<uint4*>(&sm.u.ab.b[1][row][0]) =
            make_uint4(ternary_bytes(mk, ps, 4), ternary_bytes(mk, ps, 5),
                       ternary_bytes(mk, ps, 6), ternary_bytes(mk, ps, 7));
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(fa[i], reinterpret_cast<const signed char*>(
                                            &sm.u.ab.a[kk][warp_m * 32 + i * 16][0]), 16);
          wmma::load_matrix_sync(fb[i], reinterpret_cast<const signed char*>(
                                            &sm.u.ab.b[kk][warp_n * 32 + i * 16][0]), 16);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    __syncthreads();  // every warp is done with the A/B planes before C overwrites them
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&sm.u.c[warp_n * 32 + j * 16][warp_m * 32 + i * 16], acc[i][j],
                                kBM + 4, wmma::mem_col_major);
    __syncthreads();
    if (row_ok) {
      for (int col = tid >> 6; col < kBN; col += 2) {
        const int co = n0 + col;
        if (co >= g.Co) break;
        const int cnt = sm.u.c[col][row];
        const int64_t o = ((static_cast<int64_t>(t) * g.N + img) * g.Co + co) * HoWo + pix;
        counts[o] = static_cast<CountT>(cnt);
        if (kLIF) {
          float xin = epilogue_apply(count_to_z(cnt, alpha[co]), scale[co], shift[co], 0.0f, 1.0f,
                                     false);
          if (residual != nullptr) xin = add_rn(xin, residual[o]);
          const float h = lif_charge(sm.v[col][row], xin, p);
          const float s = lif_fire(h, p);
          sm.v[col][row] = lif_reset(h, s, p);
          spikes[o] = s;
        }
      }
    }
  }
#else
  __trap();  // built for an architecture without int8 wmma: the host never launches this
#endif
}

// ---------------------------------------------------------------------------------------------
// Forward: popcount path (any GPU)
// ---------------------------------------------------------------------------------------------

// One thread per output (b, co, ho, wo), wo fastest. counts: [T*N, Co, Ho, Wo]
template <typename CountT>
__global__ void bconv_popc_kernel(const uint32_t* __restrict__ x, const uint32_t* __restrict__ wm,
                                  const uint32_t* __restrict__ wp, CountT* __restrict__ counts,
                                  ConvGeom g) {
  const int64_t total = static_cast<int64_t>(g.T) * g.N * g.Co * g.Ho * g.Wo;
  grid_stride(total, [&](int64_t i) {
    const int wo = static_cast<int>(i % g.Wo);
    const int ho = static_cast<int>((i / g.Wo) % g.Ho);
    const int co = static_cast<int>((i / (static_cast<int64_t>(g.Wo) * g.Ho)) % g.Co);
    const int64_t b = i / (static_cast<int64_t>(g.Wo) * g.Ho * g.Co);
    int acc = 0;
    for (int ky = 0; ky < g.kh; ++ky) {
      const int ih = ho * g.stride - g.pad + ky;
      if (ih < 0 || ih >= g.H) continue;
      for (int kx = 0; kx < g.kw; ++kx) {
        const int iw = wo * g.stride - g.pad + kx;
        if (iw < 0 || iw >= g.W) continue;
        const uint32_t* xp = x + ((b * g.H + ih) * g.W + iw) * g.Cw;
        const int64_t wo_ = ((static_cast<int64_t>(co) * g.kh + ky) * g.kw + kx) * g.Cw;
        for (int cw = 0; cw < g.Cw; ++cw) acc += ternary_dot(xp[cw], wm[wo_ + cw], wp[wo_ + cw]);
      }
    }
    counts[i] = static_cast<CountT>(acc);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward: weight and input gradients
// ---------------------------------------------------------------------------------------------

constexpr int kGwCo = 32, kGwP = 64, kGwThreads = 256;

// dL/dW_eff[co, ci, ky, kx] = sum over (b, ho, wo) of gz[b, co, ho, wo] * x[b, ci, ih, iw].
// Block: 32 output channels x one packed word (32 input channels) at one kernel offset (ky, kx);
// thread: one output channel x 4 input channels. gz: [B, Co, Ho*Wo]; gw: [Co, Ci, kh, kw].
__global__ void __launch_bounds__(kGwThreads)
    grad_weight_kernel(const float* __restrict__ gz, const uint32_t* __restrict__ x,
                       float* __restrict__ gw, ConvGeom g, int Ci) {
  __shared__ float gs[kGwCo][kGwP + 1];
  __shared__ uint32_t xs[kGwP];
  const int tid = threadIdx.x;
  const int co0 = blockIdx.x * kGwCo, cw = blockIdx.y;
  const int ky = blockIdx.z / g.kw, kx = blockIdx.z % g.kw;
  const int co_l = tid >> 3, cb = (tid & 7) * 4;
  const int HoWo = g.Ho * g.Wo;
  const int64_t P = static_cast<int64_t>(g.T) * g.N * HoWo;
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t p0 = 0; p0 < P; p0 += kGwP) {
    __syncthreads();
    for (int e = tid; e < kGwCo * kGwP; e += kGwThreads) {
      const int cl = e / kGwP, pl = e % kGwP;
      const int64_t pp = p0 + pl;
      const int co = co0 + cl;
      float v = 0.0f;
      if (pp < P && co < g.Co) v = gz[((pp / HoWo) * g.Co + co) * HoWo + pp % HoWo];
      gs[cl][pl] = v;
    }
    if (tid < kGwP) {
      const int64_t pp = p0 + tid;
      uint32_t word = 0;
      if (pp < P) {
        const int64_t b = pp / HoWo;
        const int pix = static_cast<int>(pp % HoWo);
        const int ih = (pix / g.Wo) * g.stride - g.pad + ky;
        const int iw = (pix % g.Wo) * g.stride - g.pad + kx;
        if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) word = x[((b * g.H + ih) * g.W + iw) * g.Cw + cw];
      }
      xs[tid] = word;
    }
    __syncthreads();
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int pl = 0; pl < kGwP; ++pl) {
      const float gv = gs[co_l][pl];
      const uint32_t bits = xs[pl] >> cb;
#pragma unroll
      for (int j = 0; j < 4; ++j) part[j] += ((bits >> j) & 1u) ? gv : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] += part[j];
  }
  const int co = co0 + co_l;
  if (co >= g.Co) return;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int ci = cw * 32 + cb + j;
    if (ci < Ci) gw[((static_cast<int64_t>(co) * Ci + ci) * g.kh + ky) * g.kw + kx] = static_cast<float>(acc[j]);
  }
}

// dL/dx[b, ci, ih, iw] = sum over (co, ky, kx) with ih = ho*stride - pad + ky (same for w) of
// gz[b, co, ho, wo] * W_eff[co, ci, ky, kx], W_eff = alpha[co] * (+-1 or 0). One thread per
// output, iw fastest. gx: [B, Ci, H, W].
__global__ void grad_input_kernel(const float* __restrict__ gz, const uint32_t* __restrict__ wm,
                                  const uint32_t* __restrict__ wp, const float* __restrict__ alpha,
                                  float* __restrict__ gx, ConvGeom g, int Ci) {
  const int HoWo = g.Ho * g.Wo;
  const int64_t total = static_cast<int64_t>(g.T) * g.N * Ci * g.H * g.W;
  grid_stride(total, [&](int64_t i) {
    const int iw = static_cast<int>(i % g.W);
    const int ih = static_cast<int>((i / g.W) % g.H);
    const int ci = static_cast<int>((i / (static_cast<int64_t>(g.W) * g.H)) % Ci);
    const int64_t b = i / (static_cast<int64_t>(g.W) * g.H * Ci);
    const int cw = word_of(ci);
    const uint32_t bit = bit_of(ci);
    double acc = 0.0;
    for (int ky = 0; ky < g.kh; ++ky) {
      const int hn = ih + g.pad - ky;
      if (hn < 0 || hn % g.stride != 0 || hn / g.stride >= g.Ho) continue;
      const int ho = hn / g.stride;
      for (int kx = 0; kx < g.kw; ++kx) {
        const int wn = iw + g.pad - kx;
        if (wn < 0 || wn % g.stride != 0 || wn / g.stride >= g.Wo) continue;
        const int wo = wn / g.stride;
        const float* gzp = gz + b * g.Co * HoWo + ho * g.Wo + wo;
        float part = 0.0f;
        for (int co = 0; co < g.Co; ++co) {
          const int64_t wi = ((static_cast<int64_t>(co) * g.kh + ky) * g.kw + kx) * g.Cw + cw;
          if (wm[wi] & bit) {
            const float w = (wp[wi] & bit) ? alpha[co] : -alpha[co];
            part += gzp[static_cast<int64_t>(co) * HoWo] * w;
          }
        }
        acc += part;
      }
    }
    gx[i] = static_cast<float>(acc);
  });
}

// ---------------------------------------------------------------------------------------------
// Host entry points
// ---------------------------------------------------------------------------------------------

const uint32_t* cwords(const Tensor& t) {
  return reinterpret_cast<const uint32_t*>(t.data_ptr<int32_t>());
}

// Checks the packed conv operands and returns the geometry.
// x_packed: [T*N, H, W, Cw] int32; w_mask, w_pos: [Co, kh, kw, Cw] int32
ConvGeom conv_geom(const Tensor& x_packed, const Tensor& w_mask, const Tensor& w_pos, int64_t T,
                   int64_t stride, int64_t padding, const char* op) {
  check_on_cuda(x_packed, op, "x_packed");
  check_dtype(x_packed, op, "x_packed", at::kInt);
  check_same_device(w_mask, x_packed, op, "w_mask");
  check_same_device(w_pos, x_packed, op, "w_pos");
  check_dtype(w_mask, op, "w_mask", at::kInt);
  check_dtype(w_pos, op, "w_pos", at::kInt);
  TORCH_CHECK_VALUE(x_packed.dim() == 4, "binslt::", op,
                    ": x_packed must have shape [T*N, H, W, Cw] (pack_spikes output), got ",
                    x_packed.sizes());
  check_weight_planes(op, w_mask, w_pos, "x_packed", x_packed.size(3));
  check_stride_padding(op, stride, padding);
  check_timesteps(op, T, x_packed.size(0));
  const OutHW o = check_out_hw(op, x_packed.size(1), x_packed.size(2), w_mask.size(1),
                               w_mask.size(2), stride, padding);
  ConvGeom g;
  g.T = static_cast<int>(T);
  g.N = static_cast<int>(x_packed.size(0) / T);
  g.H = static_cast<int>(x_packed.size(1));
  g.W = static_cast<int>(x_packed.size(2));
  g.Cw = static_cast<int>(x_packed.size(3));
  g.Co = static_cast<int>(w_mask.size(0));
  g.kh = static_cast<int>(w_mask.size(1));
  g.kw = static_cast<int>(w_mask.size(2));
  g.stride = static_cast<int>(stride);
  g.pad = static_cast<int>(padding);
  g.Ho = static_cast<int>(o.Ho);
  g.Wo = static_cast<int>(o.Wo);
  return g;
}

bool use_wmma(const Tensor& t) {
  const int impl = g_bconv_impl.load();
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, t.device().index()));
  const bool has_int8_mma = major >= 8;
  if (impl == 1) {
    TORCH_CHECK(major * 10 + minor >= 72, "binslt: the 'wmma' bconv kernel needs int8 tensor "
                "cores (sm_72+), this GPU is sm_", major, minor);
    return true;
  }
  if (impl == 2) return false;
  return has_int8_mma;
}

EpiGeom epi_geom_of(const ConvGeom& g) {
  EpiGeom e;
  e.T = g.T;
  e.N = g.N;
  e.C = g.Co;
  e.S = static_cast<int64_t>(g.Ho) * g.Wo;
  return e;
}

// The checked per-channel vectors (float32) and residual of the conv ops; they own the memory
// that the EpiArgs built from them point to.
struct ConvInputs {
  Tensor alpha, scale, shift, mean, var, residual;
};

ConvInputs check_conv_inputs(const ConvGeom& g, const Tensor& ref, const Tensor& alpha,
                             const Tensor& scale, const Tensor& shift, const Tensor* mean,
                             const Tensor* var, const std::optional<Tensor>& residual,
                             const char* op) {
  ConvInputs in;
  in.alpha = cuda_channel_vec(alpha, ref, op, "alpha", g.Co);
  in.scale = cuda_channel_vec(scale, ref, op, "scale", g.Co);
  in.shift = cuda_channel_vec(shift, ref, op, "shift", g.Co);
  if (mean != nullptr) in.mean = cuda_channel_vec(*mean, ref, op, "mean", g.Co);
  if (var != nullptr) in.var = cuda_channel_vec(*var, ref, op, "var", g.Co);
  if (residual.has_value()) {
    check_same_device(*residual, ref, op, "residual");
    in.residual = output_like(*residual, {g.T, g.N, g.Co, g.Ho, g.Wo}, op, "residual");
  }
  return in;
}

EpiArgs conv_epi_args(const ConvInputs& in, bool bn_train, double bn_eps) {
  EpiArgs a{};
  a.alpha = in.alpha.data_ptr<float>();
  a.scale = in.scale.data_ptr<float>();
  a.shift = in.shift.data_ptr<float>();
  a.mean = in.mean.defined() ? in.mean.data_ptr<float>() : nullptr;
  a.var = in.var.defined() ? in.var.data_ptr<float>() : nullptr;
  a.residual = in.residual.defined() ? in.residual.data_ptr<float>() : nullptr;
  a.bn_train = bn_train;
  a.eps = static_cast<float>(bn_eps);
  return a;
}

// -> spikes [T, N, Co, Ho, Wo] float32, counts (int16, or int32 when 32*Cw*kh*kw > 32767),
//    mean, var [Co] float32 (zeros unless bn_train)
std::tuple<Tensor, Tensor, Tensor, Tensor> bconv_lif_cuda(
    const Tensor& x_in, const Tensor& wm_in, const Tensor& wp_in, const Tensor& alpha_in,
    const Tensor& scale_in, const Tensor& shift_in, const std::optional<Tensor>& residual,
    int64_t T, int64_t stride, int64_t padding, bool bn_train, double bn_eps, double tau,
    bool decay_input, double v_threshold, std::optional<double> v_reset) {
  const char* op = "bconv_lif";
  const ConvGeom g = conv_geom(x_in, wm_in, wp_in, T, stride, padding, op);
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset);
  check_bn_eps(op, bn_eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const ConvInputs in = check_conv_inputs(g, x_in, alpha_in, scale_in, shift_in, nullptr,
                                          nullptr, residual, op);
  const Tensor x = x_in.contiguous(), wm = wm_in.contiguous(), wp = wp_in.contiguous();
  EpiArgs a = conv_epi_args(in, bn_train, bn_eps);
  const auto fopt = x.options().dtype(at::kFloat);
  Tensor counts = at::empty({g.T, g.N, g.Co, g.Ho, g.Wo},
                            x.options().dtype(counts_dtype(g.Cw, g.kh, g.kw)));
  Tensor spikes = at::empty({g.T, g.N, g.Co, g.Ho, g.Wo}, fopt);
  Tensor mean = at::zeros({g.Co}, fopt), var = at::zeros({g.Co}, fopt);
  if (spikes.numel() == 0) return {spikes, counts, mean, var};
  const EpiGeom eg = epi_geom_of(g);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool wmma = use_wmma(x);

  auto run = [&](auto* cnt) {
    using CountT = std::remove_pointer_t<decltype(cnt)>;
    const dim3 grid(static_cast<unsigned>((static_cast<int64_t>(g.N) * g.Ho * g.Wo + kBM - 1) / kBM),
                    static_cast<unsigned>((g.Co + kBN - 1) / kBN));
    if (wmma && !bn_train) {  // one pass: conv + epilogue + LIF
      bconv_wmma_kernel<CountT, true><<<grid, kWmmaThreads, 0, stream>>>(
          cwords(x), cwords(wm), cwords(wp), a.alpha, a.scale, a.shift, a.residual, cnt,
          spikes.data_ptr<float>(), g, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if (wmma) {
      bconv_wmma_kernel<CountT, false><<<grid, kWmmaThreads, 0, stream>>>(
          cwords(x), cwords(wm), cwords(wp), a.alpha, a.scale, a.shift, a.residual, cnt, nullptr,
          g, p);
    } else {
      bconv_popc_kernel<CountT><<<blocks_for(counts.numel(), 256), 256, 0, stream>>>(
          cwords(x), cwords(wm), cwords(wp), cnt, g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (bn_train) {
      launch_channel_stats<CountT>(cnt, a.alpha, eg, mean, var);
      a.mean = mean.data_ptr<float>();
      a.var = var.data_ptr<float>();
    }
    launch_lif_forward<CountT>(cnt, a, eg, p, spikes.data_ptr<float>());
  };
  if (counts.scalar_type() == at::kShort) {
    run(reinterpret_cast<int16_t*>(counts.data_ptr<int16_t>()));
  } else {
    run(counts.data_ptr<int32_t>());
  }
  return {spikes, counts, mean, var};
}

// -> grad_x [T, N, Ci, H, W] (empty [0] unless need_grad_x), grad_weight [Co, Ci, kh, kw],
//    grad_current [T, N, Co, Ho, Wo] (computed, but returned empty [0] unless
//    need_grad_current), grad_scale [Co], grad_shift [Co]; all float32
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bconv_lif_bwd_cuda(
    const Tensor& grad_spikes_in, const Tensor& counts_in, const Tensor& x_in,
    const Tensor& wm_in, const Tensor& wp_in, const Tensor& alpha_in, const Tensor& scale_in,
    const Tensor& shift_in, const Tensor& mean_in, const Tensor& var_in,
    const std::optional<Tensor>& residual, int64_t in_channels, int64_t stride, int64_t padding,
    bool bn_train, double bn_eps, double tau, bool decay_input, double v_threshold,
    std::optional<double> v_reset, bool detach_reset, int64_t surrogate, double surrogate_alpha,
    bool need_grad_x, bool need_grad_current) {
  const char* op = "bconv_lif_bwd";
  check_on_cuda(counts_in, op, "counts");
  TORCH_CHECK_VALUE(counts_in.dim() == 5, "binslt::bconv_lif_bwd: counts must have shape "
                    "[T, N, Co, Ho, Wo] (bconv_lif output), got ", counts_in.sizes());
  TORCH_CHECK_TYPE(counts_in.scalar_type() == at::kShort || counts_in.scalar_type() == at::kInt,
                   "binslt::bconv_lif_bwd: counts must be int16 or int32 (bconv_lif output), got ",
                   counts_in.scalar_type());
  const ConvGeom g =
      conv_geom(x_in, wm_in, wp_in, counts_in.size(0), stride, padding, op);
  const std::vector<int64_t> out_shape{g.T, g.N, g.Co, g.Ho, g.Wo};
  TORCH_CHECK_VALUE(counts_in.sizes() == c10::IntArrayRef(out_shape),
                    "binslt::bconv_lif_bwd: counts must have shape ", c10::IntArrayRef(out_shape),
                    " for these inputs, got ", counts_in.sizes());
  TORCH_CHECK_VALUE(in_channels >= 1 && in_channels <= 32LL * g.Cw,
                    "binslt::bconv_lif_bwd: in_channels must be in [1, 32*Cw] = [1, ",
                    32LL * g.Cw, "], got ", in_channels);
  const NeuronParams p = checked_neuron(op, tau, decay_input, v_threshold, v_reset, detach_reset,
                                        surrogate, surrogate_alpha);
  check_bn_eps(op, bn_eps);
  check_same_device(grad_spikes_in, counts_in, op, "grad_spikes");
  const Tensor gs = output_like(grad_spikes_in, out_shape, op, "grad_spikes");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const ConvInputs in = check_conv_inputs(g, counts_in, alpha_in, scale_in, shift_in, &mean_in,
                                          &var_in, residual, op);
  const Tensor x = x_in.contiguous(), wm = wm_in.contiguous(), wp = wp_in.contiguous();
  const Tensor counts = counts_in.contiguous();
  const EpiArgs a = conv_epi_args(in, bn_train, bn_eps);
  const int Ci = static_cast<int>(in_channels);
  const auto fopt = x.options().dtype(at::kFloat);
  Tensor g_z = at::empty(out_shape, fopt), g_cur = at::empty(out_shape, fopt);
  Tensor g_scale = at::empty({g.Co}, fopt), g_shift = at::empty({g.Co}, fopt);
  Tensor g_w = at::zeros({g.Co, Ci, g.kh, g.kw}, fopt);
  Tensor g_x = need_grad_x ? at::zeros({g.T, g.N, Ci, g.H, g.W}, fopt) : at::empty({0}, fopt);
  const EpiGeom eg = epi_geom_of(g);
  if (counts.scalar_type() == at::kShort) {
    launch_epilogue_backward<int16_t>(gs.data_ptr<float>(), counts.data_ptr<int16_t>(), a, eg, p,
                                      g_z, g_cur, g_scale, g_shift);
  } else {
    launch_epilogue_backward<int32_t>(gs.data_ptr<float>(), counts.data_ptr<int32_t>(), a, eg, p,
                                      g_z, g_cur, g_scale, g_shift);
  }
  if (!need_grad_current) g_cur = at::empty({0}, fopt);
  if (g_z.numel() == 0) return {g_x, g_w, g_cur, g_scale, g_shift};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 gw_grid(static_cast<unsigned>((g.Co + kGwCo - 1) / kGwCo),
                     static_cast<unsigned>(g.Cw), static_cast<unsigned>(g.kh * g.kw));
  TORCH_CHECK(g.Cw <= 65535 && g.kh * g.kw <= 65535, "binslt::bconv_lif_bwd: too many input "
              "channels or kernel taps for one launch");
  grad_weight_kernel<<<gw_grid, kGwThreads, 0, stream>>>(g_z.data_ptr<float>(), cwords(x),
                                                          g_w.data_ptr<float>(), g, Ci);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (need_grad_x && g_x.numel() > 0) {
    grad_input_kernel<<<blocks_for(g_x.numel(), 256), 256, 0, stream>>>(
        g_z.data_ptr<float>(), cwords(wm), cwords(wp), a.alpha, g_x.data_ptr<float>(), g, Ci);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {g_x, g_w, g_cur, g_scale, g_shift};
}

#define BINSLT_STR2(...) #__VA_ARGS__
#define BINSLT_STR(...) BINSLT_STR2(__VA_ARGS__)

}  // namespace

void set_bconv_impl(const std::string& impl) {
  if (impl == "auto") {
    g_bconv_impl = 0;
  } else if (impl == "wmma") {
    g_bconv_impl = 1;
  } else if (impl == "popc") {
    g_bconv_impl = 2;
  } else {
    TORCH_CHECK_VALUE(false, "binslt: bconv impl must be 'auto', 'wmma' or 'popc', got '", impl,
                      "'");
  }
}

std::string get_bconv_impl() {
  static const char* names[] = {"auto", "wmma", "popc"};
  return names[g_bconv_impl.load()];
}

std::string build_info() {
  std::string s = "cuda " + std::to_string(CUDART_VERSION / 1000) + "." +
                  std::to_string((CUDART_VERSION % 1000) / 10);
#if defined(__CUDA_ARCH_LIST__)
  s += ", archs " BINSLT_STR(__CUDA_ARCH_LIST__);
#endif
  return s;
}

}  // namespace cuda
}  // namespace binslt

TORCH_LIBRARY_IMPL(binslt, CUDA, m) {
  m.impl("bconv_lif", &binslt::cuda::bconv_lif_cuda);
  m.impl("bconv_lif_bwd", &binslt::cuda::bconv_lif_bwd_cuda);
}
