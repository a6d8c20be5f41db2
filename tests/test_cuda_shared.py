"""Host-side checks of the maths the CUDA kernels share (csrc/include/binslt/cuda_shared.h and
lif.h), against binslt.reference.

The CUDA kernels cannot run without a GPU, but their per-element maths lives in
``__host__ __device__`` functions. A small C++ test extension (built once per module with
torch.utils.cpp_extension.load_inline, host compiler only) calls those functions over tensors, so
the same source the kernels use is compiled and compared here: the LIF recurrences over T and
their BPTT, the surrogates, bit packing and the int8 byte expansion of the tensor-core path, the
ternary word dot, the conv geometry, the BN/affine epilogue and the BN backward formula.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, tie_mask

from binslt.ops import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CPP = r"""
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <vector>

#include "binslt/checks.h"
#include "binslt/cuda_shared.h"

using namespace binslt;
using torch::Tensor;

static NeuronParams params(double tau, bool decay_input, double v_threshold, double v_reset,
                           bool soft, bool detach, int64_t surrogate, double sa) {
  return neuron_params(tau, decay_input, v_threshold, !soft, v_reset, detach, surrogate, sa);
}

// x: [T, K] float32 -> (spikes [T, K], H [T, K])
std::vector<Tensor> lif_forward(Tensor x, double tau, bool decay_input, double vth, double vr,
                                bool soft) {
  x = x.contiguous();
  const int T = x.size(0); const int64_t K = x.size(1);
  auto s = torch::empty_like(x), h = torch::empty_like(x);
  const float* xp = x.data_ptr<float>(); float* sp = s.data_ptr<float>(); float* hp = h.data_ptr<float>();
  const NeuronParams p = params(tau, decay_input, vth, vr, soft, false, 0, 2.0);
  for (int64_t k = 0; k < K; ++k)
    lif_forward_sequence(T, p, [&](int t) { return xp[t * K + k]; },
                         [&](int t, float hh, float ss) { hp[t * K + k] = hh; sp[t * K + k] = ss; });
  return {s, h};
}

// dL/dX [T, K] from dL/dS [T, K] and X [T, K] (H recomputed, as the kernels do)
Tensor lif_backward(Tensor gs, Tensor x, double tau, bool decay_input, double vth, double vr,
                    bool soft, bool detach, int64_t surrogate, double sa) {
  x = x.contiguous(); gs = gs.contiguous();
  const int T = x.size(0); const int64_t K = x.size(1);
  auto g = torch::empty_like(x);
  const float* xp = x.data_ptr<float>(); const float* gp = gs.data_ptr<float>();
  float* op = g.data_ptr<float>();
  const NeuronParams p = params(tau, decay_input, vth, vr, soft, detach, surrogate, sa);
  for (int64_t k = 0; k < K; ++k) {
    lif_forward_sequence(T, p, [&](int t) { return xp[t * K + k]; },
                         [&](int t, float hh, float) { op[t * K + k] = hh; });
    lif_backward_sequence(T, p, [&](int t) { return gp[t * K + k]; },
                          [&](int t) { return op[t * K + k]; },
                          [&](int t, float gx) { op[t * K + k] = gx; });
  }
  return g;
}

// g'(x) of surrogate `which`: chosen at run time (surrogate_grad) and as the compile-time copy
// (surrogate_grad_of through with_surrogate) -> (runtime, compile-time)
std::vector<Tensor> surrogate(Tensor x, int64_t which, double alpha) {
  x = x.contiguous();
  auto out = torch::empty_like(x), out_t = torch::empty_like(x);
  const NeuronParams p = params(2.0, true, 1.0, 0.0, false, false, which, alpha);
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    out.data_ptr<float>()[i] = surrogate_grad(xp[i], p);
    out_t.data_ptr<float>()[i] = with_surrogate(
        p.surrogate, [&](auto s) { return surrogate_grad_of<decltype(s)::value>(xp[i], p); });
  }
  return {out, out_t};
}

// bits: [R, C] float -> [R, ceil(C/32)] int32 through pack_word
Tensor pack_rows(Tensor bits) {
  bits = bits.contiguous();
  const int64_t R = bits.size(0); const int C = bits.size(1); const int Cw = words_for(C);
  auto out = torch::empty({R, Cw}, torch::kInt);
  const float* b = bits.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int cw = 0; cw < Cw; ++cw)
      out.data_ptr<int32_t>()[r * Cw + cw] = (int32_t)pack_word(
          [&](int c) { return b[r * C + c] != 0.f; }, cw * 32, std::min(32, C - cw * 32));
  return out;
}

// words: [R, Cw] int32 -> [R, 32*Cw] int8 through spike_bytes (the A-tile expansion)
Tensor spike_bytes_rows(Tensor words) {
  words = words.contiguous();
  auto out = torch::empty({words.size(0), words.size(1) * 32}, torch::kChar);
  const uint32_t* w = (const uint32_t*)words.data_ptr<int32_t>();
  uint32_t* o = (uint32_t*)out.data_ptr<int8_t>();
  for (int64_t i = 0; i < words.numel(); ++i)
    for (int q = 0; q < 8; ++q) o[i * 8 + q] = spike_bytes(w[i], q);
  return out;
}

// mask, pos: [R, Cw] int32 -> [R, 32*Cw] int8 in {-1, 0, 1} through ternary_bytes (B tile)
Tensor ternary_bytes_rows(Tensor mask, Tensor pos) {
  mask = mask.contiguous(); pos = pos.contiguous();
  auto out = torch::empty({mask.size(0), mask.size(1) * 32}, torch::kChar);
  const uint32_t* m = (const uint32_t*)mask.data_ptr<int32_t>();
  const uint32_t* p = (const uint32_t*)pos.data_ptr<int32_t>();
  uint32_t* o = (uint32_t*)out.data_ptr<int8_t>();
  for (int64_t i = 0; i < mask.numel(); ++i)
    for (int q = 0; q < 8; ++q) o[i * 8 + q] = ternary_bytes(m[i], p[i], q);
  return out;
}

// x: [R, Cw], mask, pos: [Cw] int32 -> [R] int64: sum over words of ternary_dot (popc path) and
// of the int8 byte products (tensor-core path)
std::vector<Tensor> ternary_dots(Tensor x, Tensor mask, Tensor pos) {
  x = x.contiguous();
  const int64_t R = x.size(0), Cw = x.size(1);
  auto d1 = torch::empty({R}, torch::kLong), d2 = torch::empty({R}, torch::kLong);
  const uint32_t* xp = (const uint32_t*)x.data_ptr<int32_t>();
  const uint32_t* m = (const uint32_t*)mask.data_ptr<int32_t>();
  const uint32_t* p = (const uint32_t*)pos.data_ptr<int32_t>();
  for (int64_t r = 0; r < R; ++r) {
    int64_t a = 0, b = 0;
    for (int64_t c = 0; c < Cw; ++c) {
      const uint32_t xw = xp[r * Cw + c];
      a += ternary_dot(xw, m[c], p[c]);
      for (int q = 0; q < 8; ++q) {
        const uint32_t xb = spike_bytes(xw, q), wb = ternary_bytes(m[c], p[c], q);
        for (int i = 0; i < 4; ++i) b += (int8_t)(xb >> (8 * i)) * (int8_t)(wb >> (8 * i));
      }
    }
    d1.data_ptr<int64_t>()[r] = a; d2.data_ptr<int64_t>()[r] = b;
  }
  return {d1, d2};
}

int64_t conv_out(int64_t in, int64_t k, int64_t s, int64_t p) { return binslt::out_size(in, k, s, p); }

// z: [T, N, C, S] float32 -> X = epilogue(z) (+ residual), as lif_forward_kernel computes it
Tensor epilogue(Tensor z, Tensor scale, Tensor shift, Tensor mean, Tensor var,
                c10::optional<Tensor> residual, bool bn_train, double eps) {
  z = z.contiguous();
  const int64_t TN = z.size(0) * z.size(1), C = z.size(2), S = z.numel() / (TN * C);
  auto out = torch::empty_like(z);
  for (int64_t i = 0; i < z.numel(); ++i) {
    const int64_t c = (i / S) % C;
    const float invstd = bn_train ? bn_invstd(var.data_ptr<float>()[c], (float)eps) : 1.f;
    float x = epilogue_apply(z.data_ptr<float>()[i], scale.data_ptr<float>()[c],
                             shift.data_ptr<float>()[c], mean.data_ptr<float>()[c], invstd, bn_train);
    if (residual) x = add_rn(x, residual->contiguous().data_ptr<float>()[i]);
    out.data_ptr<float>()[i] = x;
  }
  return out;
}

// The bn_lif_bwd algorithm of the CUDA kernels (epilogue.cuh) on the host: LIF BPTT per neuron,
// per-channel sums in float64, then the BN / affine input gradient.
std::vector<Tensor> bn_lif_bwd(Tensor gs, Tensor z, Tensor scale, Tensor shift, Tensor mean,
                               Tensor var, c10::optional<Tensor> residual, bool bn_train,
                               double eps, double tau, bool decay_input, double vth, double vr,
                               bool soft, bool detach, int64_t surrogate, double sa) {
  z = z.contiguous(); gs = gs.contiguous();
  const int T = z.size(0);
  const int64_t N = z.size(1), C = z.size(2), S = z.numel() / (T * N * C), NN = N * C * S;
  const NeuronParams p = params(tau, decay_input, vth, vr, soft, detach, surrogate, sa);
  Tensor x = epilogue(z, scale, shift, mean, var, residual, bn_train, eps);
  Tensor g_cur = lif_backward(gs.view({T, NN}), x.view({T, NN}), tau, decay_input, vth, vr, soft,
                              detach, surrogate, sa).view(z.sizes());
  std::vector<double> s1(C, 0.0), s2(C, 0.0);
  const float* zp = z.data_ptr<float>(); const float* gp = g_cur.data_ptr<float>();
  auto invstd = [&](int64_t c) { return 1.0 / std::sqrt((double)var.data_ptr<float>()[c] + (double)(float)eps); };
  for (int64_t i = 0; i < z.numel(); ++i) {
    const int64_t c = (i / S) % C;
    const double zz = zp[i];
    s1[c] += gp[i];
    s2[c] += gp[i] * (bn_train ? (zz - mean.data_ptr<float>()[c]) * invstd(c) : zz);
  }
  const double M = (double)(T * N * S);
  auto g_z = torch::empty_like(z), g_sc = torch::empty({C}), g_sh = torch::empty({C});
  for (int64_t c = 0; c < C; ++c) { g_sh.data_ptr<float>()[c] = (float)s1[c]; g_sc.data_ptr<float>()[c] = (float)s2[c]; }
  for (int64_t i = 0; i < z.numel(); ++i) {
    const int64_t c = (i / S) % C;
    const float sc = scale.data_ptr<float>()[c];
    if (bn_train) {
      const double xhat = ((double)zp[i] - mean.data_ptr<float>()[c]) * invstd(c);
      g_z.data_ptr<float>()[i] = (float)bn_train_input_grad(gp[i], xhat, sc, invstd(c), s1[c] / M, s2[c] / M);
    } else {
      g_z.data_ptr<float>()[i] = mul_rn(gp[i], sc);
    }
  }
  return {g_z, g_cur, g_sc, g_sh};
}
"""

_FUNCS = ["lif_forward", "lif_backward", "surrogate", "pack_rows", "spike_bytes_rows",
          "ternary_bytes_rows", "ternary_dots", "conv_out", "epilogue", "bn_lif_bwd"]


@pytest.fixture(scope="module")
def ext():
    from torch.utils.cpp_extension import load_inline

    build = tempfile.mkdtemp(prefix="binslt_cuda_shared_")
    try:
        yield load_inline(
            name="binslt_cuda_shared_test", cpp_sources=[_CPP], functions=_FUNCS,
            extra_include_paths=[os.path.join(ROOT, "csrc", "include")],
            extra_cflags=["-O1"], build_directory=build, verbose=False)
    finally:
        shutil.rmtree(build, ignore_errors=True)


NEURONS = [  # tau, decay_input, v_threshold, v_reset (None = soft)
    (2.0, True, 1.0, 0.0),
    (100.0, False, 1.0, 0.0),
    (1.5, True, 0.5, None),
    (3.0, False, 1.0, -0.25),
]


def _vr(v_reset):
    return (0.0, True) if v_reset is None else (float(v_reset), False)


@pytest.mark.parametrize("surrogate,alpha", [(0, 2.0), (1, 4.0), (0, 0.7), (1, 1.3), (2, 1.0),
                                             (2, 0.7), (3, 1.0), (3, 0.6)])
def test_surrogate_matches_reference(ext, surrogate, alpha):
    x = torch.linspace(-3, 3, 1001)
    got, got_t = ext.surrogate(x, surrogate, alpha)
    assert torch.equal(got, got_t)  # the compile-time copy is the same function
    if surrogate >= 2:
        # Rect / PiecewiseQuadratic: SpikingJelly's float32 expressions, bit for bit (the
        # reference writes them as SpikingJelly does; tests/test_surrogates.py checks that)
        assert torch.equal(got, ref.surrogate_grad(x, surrogate, alpha))
    want = ref.surrogate_grad(x.double(), surrogate, alpha)
    if surrogate >= 2:  # the windows' edges in float32 and float64 may differ by one element
        edge = 0.5 / alpha if surrogate == 2 else 1.0 / alpha
        keep = ((x.double().abs() - edge).abs() > 1e-6)
        got, want = got[keep], want[keep]
    # float32 sigmoid' = (1 - s) * s * alpha loses relative accuracy in the tails (1 - s cancels),
    # so the error is bounded relative to the peak value alpha / 4 (alpha / 2 for atan)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6 * alpha)


@pytest.mark.parametrize("tau,decay_input,vth,v_reset", NEURONS)
def test_lif_forward_sequence_matches_reference(ext, tau, decay_input, vth, v_reset):
    x = torch.randn(6, 3000) * 1.5 + 0.4
    vr, soft = _vr(v_reset)
    s, h = ext.lif_forward(x, tau, decay_input, vth, vr, soft)
    s_ref, h_ref = ref.lif_multistep(x, tau=tau, decay_input=decay_input, v_threshold=vth,
                                     v_reset=v_reset, return_h=True)
    # same float32 operation order as the reference: bit-identical
    assert torch.equal(h, h_ref)
    assert torch.equal(s, s_ref)
    assert 0.05 < s.mean().item() < 0.95  # both outcomes exercised


@pytest.mark.parametrize("tau,decay_input,vth,v_reset", NEURONS)
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("surrogate,alpha", [(0, 2.0), (1, 4.0), (2, 1.0), (3, 0.6)])
def test_lif_backward_sequence_matches_float64_autograd(ext, tau, decay_input, vth, v_reset,
                                                        detach_reset, surrogate, alpha):
    x = torch.randn(5, 2000) * 1.5 + 0.4
    gs = torch.randn(5, 2000)
    vr, soft = _vr(v_reset)
    got = ext.lif_backward(gs, x, tau, decay_input, vth, vr, soft, detach_reset, surrogate, alpha)
    x64 = x.double().requires_grad_(True)
    s64, h64 = ref.lif_multistep(x64, tau=tau, decay_input=decay_input, v_threshold=vth,
                                 v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate,
                                 surrogate_alpha=alpha, return_h=True)
    (want,) = torch.autograd.grad(s64, x64, gs.double())
    ok = tie_mask(h64.detach(), vth)  # neurons never within the tie band
    if surrogate >= 2:  # nor within it of a window's edge (g' jumps there)
        edge = 0.5 / alpha if surrogate == 2 else 1.0 / alpha
        ok &= tie_mask(h64.detach(), vth - edge) & tie_mask(h64.detach(), vth + edge)
    ok = ok.all(0)
    assert ok.float().mean() > 0.9
    assert_close_rel(got[:, ok], want[:, ok], 1e-5, "dL/dX")


@pytest.mark.parametrize("c", [1, 31, 32, 33, 70])
def test_pack_and_byte_expansion_match_reference(ext, c):
    bits = (torch.rand(40, c) < 0.4).float()
    words = ext.pack_rows(bits)
    assert torch.equal(words, ref._pack_bits_last(bits))
    # spike bytes: bit k of the row -> byte k (the A tile of the int8 tensor-core path)
    expanded = ext.spike_bytes_rows(words)
    assert torch.equal(expanded[:, :c].float(), bits)
    assert not expanded[:, c:].any()


@pytest.mark.parametrize("c", [5, 32, 45, 96])
def test_ternary_bytes_and_dot_match_reference(ext, c):
    w = torch.randint(-1, 2, (7, c)).float()
    mask, pos = ref._pack_bits_last(w != 0), ref._pack_bits_last(w > 0)
    tb = ext.ternary_bytes_rows(mask, pos)
    assert torch.equal(tb[:, :c].float(), w)
    assert not tb[:, c:].any()
    x = (torch.rand(50, c) < 0.5).float()
    xw = ref._pack_bits_last(x)
    for r in range(w.shape[0]):
        popc, mma = ext.ternary_dots(xw, mask[r].contiguous(), pos[r].contiguous())
        want = (x.double() @ w[r].double()).long()
        assert torch.equal(popc, want)
        assert torch.equal(mma, want)


@pytest.mark.parametrize("h,k,s,p", [(7, 3, 1, 1), (8, 3, 2, 1), (5, 5, 1, 0), (9, 1, 3, 0),
                                     (4, 3, 2, 2)])
def test_conv_out_size_matches_torch(ext, h, k, s, p):
    out = F.conv2d(torch.zeros(1, 1, h, h), torch.zeros(1, 1, k, k), stride=s, padding=p)
    assert ext.conv_out(h, k, s, p) == out.shape[-1]


@pytest.mark.parametrize("h,k,s,p", [(2, 5, 2, 0), (3, 5, 1, 0), (1, 4, 3, 1), (2, 3, 2, 0)])
def test_conv_out_size_floors_like_python(ext, h, k, s, p):
    # binslt::out_size is the contract's (h + 2p - k) // s + 1 with floor division, so a kernel
    # larger than the padded input gives a size < 1 that the size check rejects.
    want = (h + 2 * p - k) // s + 1
    assert ext.conv_out(h, k, s, p) == want
    assert (want >= 1) == (h + 2 * p >= k)


@pytest.mark.parametrize("bn_train", [False, True])
@pytest.mark.parametrize("with_res", [False, True])
def test_epilogue_matches_reference(ext, bn_train, with_res):
    z = torch.randn(3, 2, 5, 4, 3) * 4 + 1
    scale, shift = torch.rand(5) + 0.5, torch.randn(5)
    res = torch.randn_like(z) if with_res else None
    x_ref, mean, var = ref.epilogue(z, scale, shift, res, bn_train, 1e-5)
    got = ext.epilogue(z, scale, shift, mean, var, res, bn_train, 1e-5)
    if bn_train:  # 1/sqrt vs torch.rsqrt may differ in the last bit
        torch.testing.assert_close(got, x_ref, rtol=2e-6, atol=2e-6)
    else:
        assert torch.equal(got, x_ref)


@pytest.mark.parametrize("bn_train", [False, True])
@pytest.mark.parametrize("tau,decay_input,vth,v_reset", NEURONS[:3])
@pytest.mark.parametrize("surrogate", [0, 1, 2, 3])
def test_bn_lif_bwd_algorithm_matches_float64_reference(ext, bn_train, tau, decay_input, vth,
                                                        v_reset, surrogate):
    T, N, C, S = 4, 3, 6, 25
    z = torch.randn(T, N, C, S) * 2 + 0.5
    scale, shift = torch.rand(C) + 0.5, torch.randn(C) * 0.3 + 0.5
    res = torch.randn_like(z) * 0.5
    gs = torch.randn_like(z)
    alpha = (2.0, 4.0, 1.0, 0.6)[surrogate]
    _, mean, var = ref.epilogue(z, scale, shift, res, bn_train, 1e-5)
    vr, soft = _vr(v_reset)
    got = ext.bn_lif_bwd(gs, z, scale, shift, mean, var, res, bn_train, 1e-5, tau, decay_input,
                         vth, vr, soft, False, surrogate, alpha)
    want = ref.bn_lif_bwd_reference(gs.double(), z.double(), scale.double(), shift.double(),
                                    mean, var, res.double(), bn_train, 1e-5, tau, decay_input,
                                    vth, v_reset, False, surrogate, alpha)
    x64, _, _ = ref.epilogue(z.double(), scale.double(), shift.double(), res.double(), bn_train,
                             1e-5)
    _, h64 = ref.lif_multistep(x64, tau=tau, decay_input=decay_input, v_threshold=vth,
                               v_reset=v_reset, return_h=True)
    ok = tie_mask(h64, vth)
    assert bool(ok.all()), "a neuron came within the tie band; pick another seed"
    for name, g, w in zip(["grad_z", "grad_current", "grad_scale", "grad_shift"], got, want):
        assert_close_rel(g, w, 1e-5, name)
    assert not math.isnan(got[0].sum().item())
