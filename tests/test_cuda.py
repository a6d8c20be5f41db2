"""The CUDA kernels (binslt._C_cuda) against binslt.reference, on CUDA tensors.

Every op of binslt/_schemas.py is run through the dispatcher on CUDA tensors and compared with the
pure-torch reference: packed words and counts exactly, spikes exactly outside a 1e-5 tie band
around the threshold, gradients within 1e-5 (normwise relative) of a float64 reference. The fused
forward is checked on both of its kernels (int8 tensor cores 'wmma' and 'popc').

Tests that need a GPU are marked ``gpu`` and skip where none is visible (conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel, assert_spikes_equal, tie_mask

from binslt import ops
from binslt.ops import library as _ext
from binslt.ops import reference as ref

CUDA_BUILT = _ext.backends()["cuda"]["built"]
needs_ext = pytest.mark.skipif(not CUDA_BUILT, reason="binslt._C_cuda is not built here")
gpu = pytest.mark.gpu

NEURONS = [  # tau, decay_input, v_threshold, v_reset (None = soft)
    (2.0, True, 1.0, 0.0),
    (100.0, False, 1.0, 0.0),
    (1.5, True, 0.5, None),
]


def _cuda_mod():
    return _ext.module("cuda")


@pytest.fixture
def impl(request):
    """Force the bconv_lif forward kernel for one test, then restore 'auto'."""
    mod = _cuda_mod()
    mod.set_bconv_impl(request.param)
    yield request.param
    mod.set_bconv_impl("auto")


# ---------------------------------------------------------------------------------------------
# Runs without a GPU: the module imports and reports its build
# ---------------------------------------------------------------------------------------------


@needs_ext
def test_extension_imports_without_device_and_reports_build():
    mod = _cuda_mod()
    info = mod.build_info()
    assert info.startswith("cuda "), info
    assert mod.get_bconv_impl() == "auto"
    with pytest.raises(ValueError, match="bconv impl"):
        mod.set_bconv_impl("tensorcore")
    for name in ("pack_spikes", "unpack_spikes", "pack_weight", "bconv_lif", "bconv_lif_bwd",
                 "bn_lif", "bn_lif_bwd"):
        dump = torch._C._dispatch_dump(f"binslt::{name}")
        assert "csrc/cuda/" in dump, f"no compiled CUDA kernel registered for binslt::{name}"


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


@gpu
@needs_ext
@pytest.mark.parametrize("c", [1, 33, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_unpack_spikes(c, dtype):
    x = (torch.rand(3, c, 5, 7) < 0.3).to(dtype)
    packed = torch.ops.binslt.pack_spikes(x.cuda())
    want = ref.pack_spikes_reference(x)
    assert packed.dtype == torch.int32 and torch.equal(packed.cpu(), want)
    back = torch.ops.binslt.unpack_spikes(packed, c)
    assert torch.equal(back.cpu(), x.float())
    with pytest.raises(ValueError, match="channels"):
        torch.ops.binslt.unpack_spikes(packed, 32 * packed.shape[-1] + 1)


@gpu
@needs_ext
@pytest.mark.parametrize("ci", [3, 32, 45])
def test_pack_weight(ci):
    w = torch.randint(-1, 2, (6, ci, 3, 3)).float() * 0.37
    mask, pos = torch.ops.binslt.pack_weight(w.cuda())
    m_ref, p_ref = ref.pack_weight_reference(w)
    assert torch.equal(mask.cpu(), m_ref) and torch.equal(pos.cpu(), p_ref)


# ---------------------------------------------------------------------------------------------
# bn_lif
# ---------------------------------------------------------------------------------------------


def _h64(z, scale, shift, res, bn_train, eps, tau, decay_input, vth, v_reset):
    x, _, _ = ref.epilogue(z.double(), scale.double(), shift.double(),
                           None if res is None else res.double(), bn_train, eps)
    _, h = ref.lif_multistep(x, tau=tau, decay_input=decay_input, v_threshold=vth,
                             v_reset=v_reset, return_h=True)
    return h


def _untie(res, h_of, vth):
    """Shift the residual of neurons whose float64 H comes within the tie band of the threshold
    (where float32 kernels and a float64 reference may legitimately disagree on a spike), so that
    gradients can be compared everywhere. The residual is added after BN: statistics are kept."""
    for _ in range(20):
        bad = ~tie_mask(h_of(res), vth).all(0, keepdim=True).expand_as(res)
        if not bool(bad.any()):
            return res
        res = res + bad * 7e-3
    raise AssertionError("could not move the data out of the tie band")


@gpu
@needs_ext
@pytest.mark.parametrize("shape", [(4, 2, 5, 6, 7), (1, 3, 33), (3, 1, 4, 9)])
@pytest.mark.parametrize("bn_train", [False, True])
@pytest.mark.parametrize("with_res", [False, True])
@pytest.mark.parametrize("tau,decay_input,vth,v_reset", NEURONS)
def test_bn_lif_forward(shape, bn_train, with_res, tau, decay_input, vth, v_reset):
    c = shape[2]
    z = torch.randn(shape) * 2 + 0.5
    scale, shift = torch.rand(c) + 0.5, torch.randn(c) * 0.3 + 0.5
    res = torch.randn(shape) * 0.5 if with_res else None
    args = (bn_train, 1e-5, tau, decay_input, vth, v_reset)
    s, mean, var = torch.ops.binslt.bn_lif(z.cuda(), scale.cuda(), shift.cuda(),
                                           None if res is None else res.cuda(), *args)
    s_ref, m_ref, v_ref = ref.bn_lif_reference(z, scale, shift, res, *args)
    h = _h64(z, scale, shift, res, bn_train, 1e-5, tau, decay_input, vth, v_reset)
    assert_spikes_equal(s.cpu(), s_ref, h, vth)
    torch.testing.assert_close(mean.cpu(), m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.cpu(), v_ref, rtol=1e-5, atol=1e-6)


@gpu
@needs_ext
@pytest.mark.parametrize("bn_train", [False, True])
@pytest.mark.parametrize("tau,decay_input,vth,v_reset", NEURONS)
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("surrogate,alpha", [(0, 2.0), (1, 4.0), (2, 0.7), (3, 0.6)])
def test_bn_lif_backward(bn_train, tau, decay_input, vth, v_reset, detach_reset, surrogate,
                         alpha):
    shape = (4, 3, 6, 5, 5)
    c = shape[2]
    z = torch.randn(shape) * 2 + 0.5
    scale, shift = torch.rand(c) + 0.5, torch.randn(c) * 0.3 + 0.5
    res = _untie(torch.randn(shape) * 0.5,
                 lambda r: _h64(z, scale, shift, r, bn_train, 1e-5, tau, decay_input, vth, v_reset),
                 vth)
    gs = torch.randn(shape)
    _, mean, var = ref.bn_lif_reference(z, scale, shift, res, bn_train, 1e-5, tau, decay_input,
                                        vth, v_reset)
    cfg = (bn_train, 1e-5, tau, decay_input, vth, v_reset, detach_reset, surrogate, alpha)
    got = torch.ops.binslt.bn_lif_bwd(gs.cuda(), z.cuda(), scale.cuda(), shift.cuda(),
                                      mean.cuda(), var.cuda(), res.cuda(), *cfg)
    want = ref.bn_lif_bwd_reference(gs.double(), z.double(), scale.double(), shift.double(), mean,
                                    var, res.double(), *cfg)
    for name, g, w in zip(["grad_z", "grad_current", "grad_scale", "grad_shift"], got, want):
        assert g.shape == w.shape, name
        assert_close_rel(g.cpu(), w, 1e-5, name)
    got2 = torch.ops.binslt.bn_lif_bwd(gs.cuda(), z.cuda(), scale.cuda(), shift.cuda(),
                                       mean.cuda(), var.cuda(), res.cuda(), *cfg, False)
    assert got2[1].shape == (0,)
    for i in (0, 2, 3):
        assert torch.equal(got2[i], got[i])


# ---------------------------------------------------------------------------------------------
# bconv_lif
# ---------------------------------------------------------------------------------------------


def _conv_case(T, N, ci, co, hw, k, density=0.3, keep=0.6):
    x = (torch.rand(T * N, ci, hw, hw) < density).float()
    w = torch.randint(-1, 2, (co, ci, k, k)).float() * (torch.rand(co, ci, k, k) < keep)
    x_packed = ref.pack_spikes_reference(x)
    w_mask, w_pos = ref.pack_weight_reference(w)
    return x, w, x_packed, w_mask, w_pos


CONV_CASES = [  # T, N, ci, co, hw, k, stride, padding
    (4, 2, 33, 70, 9, 3, 1, 1),
    (1, 1, 5, 3, 7, 3, 2, 1),
    (2, 3, 64, 64, 8, 1, 1, 0),
    (3, 2, 40, 17, 6, 5, 2, 2),
]


@gpu
@needs_ext
@pytest.mark.parametrize("impl", ["wmma", "popc"], indirect=True)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bn_train", [False, True])
@pytest.mark.parametrize("with_res", [False, True])
@pytest.mark.parametrize("tau,decay_input,vth,v_reset", NEURONS[:2])
def test_bconv_lif_forward(impl, case, bn_train, with_res, tau, decay_input, vth, v_reset):
    T, N, ci, co, hw, k, stride, padding = case
    x, w, xp, wm, wp = _conv_case(T, N, ci, co, hw, k)
    alpha = torch.rand(co) * 0.2 + 0.05
    scale, shift = torch.rand(co) + 0.5, torch.randn(co) * 0.3
    ho = (hw + 2 * padding - k) // stride + 1
    res = torch.randn(T, N, co, ho, ho) * 0.5 if with_res else None
    args = (T, stride, padding, bn_train, 1e-5, tau, decay_input, vth, v_reset)
    s, counts, mean, var = torch.ops.binslt.bconv_lif(
        xp.cuda(), wm.cuda(), wp.cuda(), alpha.cuda(), scale.cuda(), shift.cuda(),
        None if res is None else res.cuda(), *args)
    s_ref, c_ref, m_ref, v_ref = ref.bconv_lif_reference(xp, wm, wp, alpha, scale, shift, res,
                                                         *args)
    assert counts.dtype == c_ref.dtype == torch.int16
    assert torch.equal(counts.cpu(), c_ref)
    z = c_ref.double() * alpha.double().view(1, 1, -1, 1, 1)
    h = _h64(z, scale, shift, res, bn_train, 1e-5, tau, decay_input, vth, v_reset)
    assert_spikes_equal(s.cpu(), s_ref, h, vth)
    torch.testing.assert_close(mean.cpu(), m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.cpu(), v_ref, rtol=1e-5, atol=1e-6)
    if not bn_train:  # inference form: this device's bconv_lif without the counts
        inf = torch.ops.binslt.bconv_lif_infer(
            x.view(T, N, *x.shape[1:]).cuda(), wm.cuda(), wp.cuda(), alpha.cuda(), scale.cuda(),
            shift.cuda(), None if res is None else res.cuda(), stride, padding, tau, decay_input,
            vth, v_reset)
        assert torch.equal(inf, s)


@gpu
@needs_ext
@pytest.mark.parametrize("impl", ["wmma", "popc"], indirect=True)
def test_bconv_lif_int32_counts(impl):
    # 32 * Cw * kh * kw > 32767 -> int32 counts
    x, w, xp, wm, wp = _conv_case(1, 1, 3650, 5, 3, 3, density=0.5, keep=1.0)
    co = 5
    alpha, scale, shift = torch.full((co,), 0.01), torch.ones(co), torch.zeros(co)
    args = (1, 1, 1, False, 1e-5, 2.0, True, 1.0, 0.0)
    s, counts, _, _ = torch.ops.binslt.bconv_lif(xp.cuda(), wm.cuda(), wp.cuda(), alpha.cuda(),
                                                 scale.cuda(), shift.cuda(), None, *args)
    _, c_ref, _, _ = ref.bconv_lif_reference(xp, wm, wp, alpha, scale, shift, None, *args)
    assert counts.dtype == torch.int32 == c_ref.dtype
    assert torch.equal(counts.cpu(), c_ref)


@gpu
@needs_ext
@pytest.mark.parametrize("impl", ["wmma", "popc"], indirect=True)
def test_bconv_lif_bad_input_errors(impl):
    _, _, xp, wm, wp = _conv_case(2, 1, 33, 4, 5, 3)
    v = torch.ones(4, device="cuda")
    with pytest.raises(ValueError, match="divide"):
        torch.ops.binslt.bconv_lif(xp.cuda(), wm.cuda(), wp.cuda(), v, v, v, None, 3, 1, 1,
                                   False, 1e-5, 2.0, True, 1.0, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        torch.ops.binslt.bconv_lif(xp.cuda(), wm.cuda(), wp.cuda(), v[:3], v, v, None, 2, 1, 1,
                                   False, 1e-5, 2.0, True, 1.0, 0.0)
    with pytest.raises(TypeError, match="x_packed"):
        torch.ops.binslt.bconv_lif(xp.cuda().float(), wm.cuda(), wp.cuda(), v, v, v, None, 2, 1,
                                   1, False, 1e-5, 2.0, True, 1.0, 0.0)


def _bwd_reference64(gs, counts, x, w, alpha, scale, shift, mean, var, res, stride, padding,
                     cfg, need_grad_x):
    """bconv_lif_bwd in float64: the reference epilogue backward, then float64 convs."""
    z = counts.double() * alpha.double().view(1, 1, -1, 1, 1)
    g_z, g_cur, g_sc, g_sh = ref.bn_lif_bwd_reference(
        gs.double(), z, scale.double(), shift.double(), mean, var,
        None if res is None else res.double(), *cfg)
    T = counts.shape[0]
    gz = g_z.flatten(0, 1)
    w_eff = w.double() * alpha.double().view(-1, 1, 1, 1)
    g_w = torch.nn.grad.conv2d_weight(x.double(), w.shape, gz, stride=stride, padding=padding)
    g_x = None
    if need_grad_x:
        g_x = torch.nn.grad.conv2d_input(x.shape, w_eff, gz, stride=stride, padding=padding)
        g_x = g_x.view(T, -1, *g_x.shape[1:])
    return g_x, g_w, g_cur, g_sc, g_sh


@gpu
@needs_ext
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bn_train", [False, True])
@pytest.mark.parametrize("tau,decay_input,vth,v_reset", NEURONS)
@pytest.mark.parametrize("detach_reset,surrogate,alpha_sg", [(False, 0, 2.0), (True, 1, 4.0),
                                                            (False, 2, 0.7), (True, 3, 0.6)])
def test_bconv_lif_backward(case, bn_train, tau, decay_input, vth, v_reset, detach_reset,
                            surrogate, alpha_sg):
    T, N, ci, co, hw, k, stride, padding = case
    x, w, xp, wm, wp = _conv_case(T, N, ci, co, hw, k)
    alpha = torch.rand(co) * 0.2 + 0.05
    scale, shift = torch.rand(co) + 0.5, torch.randn(co) * 0.3 + 0.3
    ho = (hw + 2 * padding - k) // stride + 1
    fwd = (T, stride, padding, bn_train, 1e-5, tau, decay_input, vth, v_reset)
    counts = ref.bconv_lif_reference(xp, wm, wp, alpha, scale, shift, None, *fwd)[1]
    z = counts.double() * alpha.double().view(1, 1, -1, 1, 1)
    res = _untie(torch.randn(T, N, co, ho, ho) * 0.5,
                 lambda r: _h64(z, scale, shift, r, bn_train, 1e-5, tau, decay_input, vth, v_reset),
                 vth)
    _, counts, mean, var = ref.bconv_lif_reference(xp, wm, wp, alpha, scale, shift, res, *fwd)
    gs = torch.randn(counts.shape)
    cfg = (bn_train, 1e-5, tau, decay_input, vth, v_reset, detach_reset, surrogate, alpha_sg)
    got = torch.ops.binslt.bconv_lif_bwd(
        gs.cuda(), counts.cuda(), xp.cuda(), wm.cuda(), wp.cuda(), alpha.cuda(), scale.cuda(),
        shift.cuda(), mean.cuda(), var.cuda(), res.cuda(), ci, stride, padding, *cfg, True)
    want = _bwd_reference64(gs, counts, x, w, alpha, scale, shift, mean, var, res, stride,
                            padding, cfg, True)
    for name, g, wt in zip(["grad_x", "grad_weight", "grad_current", "grad_scale", "grad_shift"],
                           got, want):
        assert g.shape == wt.shape, name
        assert_close_rel(g.cpu(), wt, 1e-5, name)
    no_x = torch.ops.binslt.bconv_lif_bwd(
        gs.cuda(), counts.cuda(), xp.cuda(), wm.cuda(), wp.cuda(), alpha.cuda(), scale.cuda(),
        shift.cuda(), mean.cuda(), var.cuda(), res.cuda(), ci, stride, padding, *cfg, False)
    assert no_x[0].numel() == 0
    assert torch.equal(no_x[1], got[1])
    no_cur = torch.ops.binslt.bconv_lif_bwd(
        gs.cuda(), counts.cuda(), xp.cuda(), wm.cuda(), wp.cuda(), alpha.cuda(), scale.cuda(),
        shift.cuda(), mean.cuda(), var.cuda(), res.cuda(), ci, stride, padding, *cfg, True, False)
    assert no_cur[2].numel() == 0
    assert torch.equal(no_cur[1], got[1])
    for i in (0, 3, 4):  # (reductions may run in another order: close, not equal)
        assert_close_rel(no_cur[i].cpu(), got[i].cpu(), 1e-6, f"output {i}")


# ---------------------------------------------------------------------------------------------
# Through the layer API and the op machinery
# ---------------------------------------------------------------------------------------------


@gpu
@needs_ext
@pytest.mark.parametrize("bn_train", [False, True])
def test_conv_lif_autograd_cuda_matches_float64(bn_train):
    T, N, ci, co, hw = 4, 2, 20, 12, 8
    x = (torch.rand(T, N, ci, hw, hw) < 0.3).float()
    w_eff = torch.randint(-1, 2, (co, ci, 3, 3)).float() * 0.15
    scale, shift = torch.rand(co) + 0.5, torch.randn(co) * 0.2 + 0.3
    kw = dict(stride=1, padding=1, bn_train=bn_train, tau=2.0, decay_input=True, v_threshold=1.0,
              v_reset=0.0, detach_reset=True, surrogate="atan", surrogate_alpha=2.0)
    kw64 = dict(kw, surrogate=0)

    def h_of(r):
        return ref.conv_lif_reference(x.double(), w_eff.double(), scale=scale.double(),
                                      shift=shift.double(), residual=r.double(), return_h=True,
                                      **kw64)[1]

    res = _untie(torch.randn(T, N, co, hw, hw) * 0.3, h_of, 1.0)
    xc = x.cuda().requires_grad_(True)
    wc = w_eff.cuda().requires_grad_(True)
    s, _, _ = ops.conv_lif(xc, wc, scale.cuda(), shift.cuda(), res.cuda(), backend="cuda", **kw)
    g = torch.randn(s.shape)
    s.backward(g.cuda())
    x64 = x.double().requires_grad_(True)
    w64 = w_eff.double().requires_grad_(True)
    s64, h64 = ref.conv_lif_reference(x64, w64, scale=scale.double(), shift=shift.double(),
                                      residual=res.double(), return_h=True, **kw64)
    s64.backward(g.double())
    assert_spikes_equal(s.detach().cpu(), s64.detach(), h64.detach(), 1.0)
    assert_close_rel(xc.grad.cpu(), x64.grad, 1e-5, "dL/dx")
    assert_close_rel(wc.grad.cpu(), w64.grad, 1e-5, "dL/dW_eff")


@gpu
@needs_ext
def test_opcheck_cuda_ops():
    _, _, xp, wm, wp = _conv_case(2, 1, 33, 4, 5, 3)
    v = torch.ones(4, device="cuda")
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.binslt.pack_spikes.default,
                          ((torch.rand(2, 33, 4, 4, device="cuda") < 0.5).float(),),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.binslt.bconv_lif.default,
                          (xp.cuda(), wm.cuda(), wp.cuda(), v * 0.1, v, v * 0.0, None, 2, 1, 1,
                           True, 1e-5, 2.0, True, 1.0, 0.0), test_utils=utils)
    z = torch.randn(2, 3, 4, 5, device="cuda")
    torch.library.opcheck(torch.ops.binslt.bn_lif.default,
                          (z, v, v * 0.0, None, False, 1e-5, 2.0, True, 1.0, None),
                          test_utils=utils)
