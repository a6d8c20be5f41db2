"""The Triton backend (binslt::<op>_triton) against binslt.reference.

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py before triton
is imported); the interpreter executes ~10 ms per program, so shapes are tiny and the kernels use
one large-block configuration there. With a GPU the same tests run on CUDA tensors (the ``cuda``
parameters, marked ``gpu``), plus a torch.compile test.

Checks: spikes equal to the reference outside a 1e-5 tie band (a neuron is dropped from its first
near-tie timestep on, judged on the float64 membrane potential), counts exact, BN statistics
close, and every gradient within 1e-5 (normwise relative) of a float64 evaluation of
binslt.reference.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, assert_no_ties, assert_spikes_equal

import binslt.ops as ops
from binslt.ops import reference as ref
from binslt.ops.check_cases import ConvCase, _conv_data, _to

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 (set when no GPU is present)")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]

_TRITON_LOAD_ERROR = ops.load_triton()  # registers binslt::<op>_triton
tri = torch.ops.binslt


def _no_triton_error():
    assert _TRITON_LOAD_ERROR == "", f"Triton ops failed to load: {_TRITON_LOAD_ERROR}"


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [1, 33, 64, 70])
def test_pack_unpack_spikes(device, c):
    _no_triton_error()
    x = (torch.rand(3, c, 5, 4) < 0.4).float()
    x[0, :, 0, 0] = 1  # a full word: bit 31 set (the sign bit of the int32)
    x = x.to(device)
    p = tri.pack_spikes_triton(x)
    assert p.dtype == torch.int32 and p.shape == (3, 5, 4, (c + 31) // 32)
    assert torch.equal(p.cpu(), ref.pack_spikes_reference(x.cpu()))
    u = tri.unpack_spikes_triton(p, c)
    assert u.dtype == torch.float32 and torch.equal(u.cpu(), x.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 33, 3, 3), (4, 32, 1, 1), (3, 70, 3, 3)])
def test_pack_weight(device, shape):
    _no_triton_error()
    w = torch.sign(torch.randn(shape)) * (torch.rand(shape) < 0.6) * 0.37
    w = w.to(device)
    m, p = tri.pack_weight_triton(w)
    rm, rp = ref.pack_weight_reference(w.cpu())
    assert torch.equal(m.cpu(), rm) and torch.equal(p.cpu(), rp)
    back = ref.unpack_weight_reference(m.cpu(), p.cpu(), shape[1])
    assert torch.equal(back, torch.sign(w.cpu()))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_errors(device):
    _no_triton_error()
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        tri.pack_spikes_triton(torch.zeros(2, 3, 4, device=device))
    with pytest.raises(ValueError, match="does not fit"):
        tri.unpack_spikes_triton(torch.zeros(1, 2, 2, 1, dtype=torch.int32, device=device), 33)
    xp = torch.zeros(4, 5, 5, 1, dtype=torch.int32, device=device)
    wm = torch.zeros(3, 3, 3, 2, dtype=torch.int32, device=device)
    v = torch.ones(3, device=device)
    with pytest.raises(ValueError, match="words per position"):
        tri.bconv_lif_triton(xp, wm, wm, v, v, v, None, 2, 1, 1, False, 1e-5, 2.0, True, 1.0, 0.0)
    wm = torch.zeros(3, 3, 3, 1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="divide"):
        tri.bconv_lif_triton(xp, wm, wm, v, v, v, None, 3, 1, 1, False, 1e-5, 2.0, True, 1.0, 0.0)
    with pytest.raises(ValueError, match="residual"):
        tri.bconv_lif_triton(xp, wm, wm, v, v, v, torch.zeros(2, 2, 3, 4, 4, device=device), 2, 1,
                             1, False, 1e-5, 2.0, True, 1.0, 0.0)
    with pytest.raises(ValueError, match="scale"):
        tri.bn_lif_triton(torch.zeros(2, 1, 3, device=device), torch.ones(2, device=device),
                          torch.ones(3, device=device), None, False, 1e-5, 2.0, True, 1.0, 0.0)


def test_cpu_tensors_without_interpreter_error():
    """Without TRITON_INTERPRET, CPU tensors get an actionable error, not a crash in Triton."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, binslt.ops\n"
            "binslt.ops.load_triton()\n"
            "try:\n"
            "    torch.ops.binslt.pack_spikes_triton(torch.zeros(1, 3, 2, 2))\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------
# Fused binary conv + LIF
# ----------------------------------------------------------------------------------------------

# (stride, padding, v_reset, surrogate, bn_train, residual, decay_input, detach_reset, tau)
CASES = [
    (1, 1, 0.0, 0, False, False, True, False, 2.0),
    (2, 0, None, 1, True, True, False, True, 1 / (1 - 0.99)),
    (2, 1, 0.0, 1, True, False, True, True, 2.0),
    (1, 0, None, 0, False, True, False, False, 3.0),
    (2, 1, -0.2, 0, False, True, True, False, 1.5),
    (1, 1, 0.0, 2, True, True, False, False, 2.0),
    (2, 0, None, 3, False, False, True, False, 3.0),
]
CASE_IDS = ["s1p1-hard-atan-eval", "s2p0-soft-sig-train-res", "s2p1-hard-sig-train",
            "s1p0-soft-atan-eval-res", "s2p1-hardneg-atan-eval-res", "s1p1-hard-rect-train-res",
            "s2p0-soft-pq-eval"]
#: the alpha of each surrogate id in these tests (Rect / PiecewiseQuadratic: not SpikingJelly's
#: default 1, so that the windows' edges 0.5/alpha and 1/alpha are inexact in float32)
S_ALPHA = (2.0, 4.0, 0.7, 0.6)

T, N, CI, CO, HW = 2, 1, 33, 5, 5
GEOM = (T, N, CI, CO, HW, HW, 3)  # (T, N, C_in, C_out, H, W, kernel)


def _make_layer(device, stride, padding, residual, geom=GEOM, *, neuron=(2.0, True, 1.0, 0.0),
                bn_train=True, seed=1):
    """One conv layer's data, as ``binslt check`` builds it (``check_cases._conv_data``: input
    spikes at rate 0.35, sparse signed weights, the epilogue's scale and shift, the residual and
    the upstream gradient; the shift redrawn until the float64 H of ``neuron`` (tau,
    decay_input, v_threshold, v_reset) has no near-tie), on ``device``. With ``seed`` 1 each
    case of CASES and ODD fires 10% to 79% of its neurons (the least: s2p0-soft-pq-eval, whose
    input-decaying tau-3 neuron needs a current above 1.8 to fire by its second step)."""
    case = ConvCase("test", geom, stride, padding, neuron, bn_train, residual, 0, False)
    return _to(_conv_data(case, seed), device)


def _h64(z64, scale, shift, res, bn_train, eps, tau, decay_input, v_th, v_reset):
    """Float64 membrane potential H (for the tie band) from a float64 current."""
    x, _, _ = ref.epilogue(z64, scale.double().cpu(), shift.double().cpu(),
                           None if res is None else res.double().cpu(), bn_train, eps)
    _, h = ref.lif_multistep(x, tau=tau, decay_input=decay_input, v_threshold=v_th,
                             v_reset=v_reset, return_h=True)
    return h


def _check_bconv_case(device, case, geom=GEOM, check_rate=True):
    stride, padding, v_reset, surrogate, bn_train, residual, decay_input, detach, tau = case
    t, ci = geom[0], geom[2]
    eps, v_th, s_alpha = 1e-5, 1.0, S_ALPHA[surrogate]
    d = _make_layer(device, stride, padding, residual, geom,
                    neuron=(tau, decay_input, v_th, v_reset), bn_train=bn_train)
    fwd_args = (d["xp"], d["wm"], d["wp"], d["alpha"], d["scale"], d["shift"], d["res"], t, stride,
                padding, bn_train, eps, tau, decay_input, v_th, v_reset)
    spikes, counts, mean, var = tri.bconv_lif_triton(*fwd_args)
    r_spikes, r_counts, r_mean, r_var = ref.bconv_lif_reference(
        *[a.cpu() if torch.is_tensor(a) else a for a in fwd_args])

    assert counts.dtype == r_counts.dtype and torch.equal(counts.cpu(), r_counts)
    z64 = r_counts.double() * d["alpha"].double().cpu().view(1, 1, -1, 1, 1)
    h = _h64(z64, d["scale"], d["shift"], d["res"], bn_train, eps, tau, decay_input, v_th,
             v_reset)
    assert_spikes_equal(spikes.cpu(), r_spikes, h, v_th)
    if check_rate:
        assert 0.05 < r_spikes.mean().item() < 0.95, "test data should make neurons fire sometimes"
    torch.testing.assert_close(mean.cpu(), r_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.cpu(), r_var, rtol=1e-5, atol=1e-6)
    if not bn_train:  # the inference form (no counts written) fuses the same LIF
        x5 = d["x"]  # [T, N, C, H, W]
        inf = tri.bconv_lif_infer_triton(x5, *fwd_args[1:7], *fwd_args[8:10], *fwd_args[12:])
        assert torch.equal(inf, spikes)

    # Backward against binslt.reference in float64 (same counts; H never near the threshold).
    assert_no_ties(h, v_th)
    bwd_args = (d["gs"], counts, d["xp"], d["wm"], d["wp"], d["alpha"], d["scale"], d["shift"],
                mean, var, d["res"], ci, stride, padding, bn_train, eps, tau, decay_input, v_th,
                v_reset, detach, surrogate, s_alpha)
    g_x, g_w, g_cur, g_sc, g_sh = tri.bconv_lif_bwd_triton(*bwd_args, True)
    res64 = None if d["res"] is None else d["res"].double().cpu()
    e_gz, e_cur, e_sc, e_sh = ref.bn_lif_bwd_reference(
        d["gs"].double().cpu(), z64, d["scale"].double().cpu(), d["shift"].double().cpu(),
        mean.cpu(), var.cpu(), res64, bn_train, eps, tau, decay_input, v_th, v_reset, detach,
        surrogate, s_alpha)
    x64 = d["x"].double().cpu().flatten(0, 1)
    w64 = d["w_eff"].double().cpu()
    gz = e_gz.flatten(0, 1)
    e_gw = torch.nn.grad.conv2d_weight(x64, w64.shape, gz, stride=stride, padding=padding)
    e_gx = torch.nn.grad.conv2d_input(x64.shape, w64, gz, stride=stride, padding=padding)
    assert g_x.shape == d["x"].shape and g_w.shape == w64.shape
    for name, a, e in (("grad_current", g_cur, e_cur), ("grad_scale", g_sc, e_sc),
                       ("grad_shift", g_sh, e_sh), ("grad_weight", g_w, e_gw),
                       ("grad_x", g_x, e_gx.view_as(d["x"]))):
        assert a.dtype == torch.float32
        assert_close_rel(a.cpu(), e, 1e-5, name)
    # need_grad_x=False returns the documented empty tensor
    assert tri.bconv_lif_bwd_triton(*bwd_args, False)[0].shape == (0,)
    # need_grad_current=False: grad_current empty, the rest unchanged
    no_cur = tri.bconv_lif_bwd_triton(*bwd_args, True, False)
    assert no_cur[2].shape == (0,)
    for a, b in zip(no_cur[:2] + no_cur[3:], (g_x, g_w, g_sc, g_sh)):
        assert torch.equal(a.view_as(b), b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bconv_lif_forward_and_backward(device, case):
    _no_triton_error()
    _check_bconv_case(device, case)


ODD = [
    # T=1, N=2, C=70 (3 words) -> 3, non-square 7x6, 3x3, pad 1
    ((1, 2, 70, 3, 7, 6, 3), (1, 1, 0.0, 0, True, True, True, False, 2.0)),
    # 1x1 kernel, stride 2, C_out=17 (several channel tiles in the interpreter config)
    ((3, 1, 5, 17, 4, 6, 1), (2, 0, None, 1, False, False, False, True, 2.0)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geom,case", ODD, ids=["T1-N2-C70-7x6", "k1-s2-Co17"])
def test_bconv_lif_odd_shapes(device, geom, case):
    _no_triton_error()
    _check_bconv_case(device, case, geom)


@pytest.mark.parametrize("device", DEVICES)
def test_bconv_lif_int32_counts(device):
    """K = 32 * Cw * kh * kw > 32767 switches the saved counts to int32."""
    _no_triton_error()
    geom = (1, 1, 3680, 2, 3, 3, 3)  # Cw = 115, K = 33120
    _check_bconv_case(device, (1, 0, 0.0, 0, False, False, True, False, 2.0), geom,
                      check_rate=False)


# ----------------------------------------------------------------------------------------------
# BN + LIF over a real current (first layer, linear layers)
# ----------------------------------------------------------------------------------------------

BN_CASES = [
    ((2, 3, 4, 3, 5), 0.0, 0, True, False, True, False),
    ((3, 2, 6), None, 1, False, True, False, True),
    ((2, 2, 3, 7), 0.0, 1, True, True, True, True),
    ((2, 3, 4, 5), 0.0, 2, True, True, False, False),
    ((3, 2, 6), None, 3, False, False, True, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BN_CASES, ids=["5d-hard-atan-train", "linear-soft-sig-eval-res",
                                                "4d-hard-sig-train-res", "4d-hard-rect-train-res",
                                                "linear-soft-pq-eval"])
def test_bn_lif_forward_and_backward(device, case):
    _no_triton_error()
    shape, v_reset, surrogate, bn_train, residual, decay_input, detach = case
    c = shape[2]
    g = torch.Generator().manual_seed(1)
    z = 1.2 * torch.randn(shape, generator=g) + 0.5
    scale = 0.7 + 0.6 * torch.rand(c, generator=g)
    shift = 0.5 + 0.3 * torch.randn(c, generator=g)
    res = 0.3 * torch.randn(shape, generator=g) if residual else None
    gs = torch.randn(shape, generator=g)
    eps, tau, v_th, s_alpha = 1e-5, 2.0, 1.0, S_ALPHA[surrogate]
    dv = lambda t: None if t is None else t.to(device)  # noqa: E731
    spikes, mean, var = tri.bn_lif_triton(dv(z), dv(scale), dv(shift), dv(res), bn_train, eps,
                                          tau, decay_input, v_th, v_reset)
    r_spikes, r_mean, r_var = ref.bn_lif_reference(z, scale, shift, res, bn_train, eps, tau,
                                                   decay_input, v_th, v_reset)
    h = _h64(z.double(), scale, shift, res, bn_train, eps, tau, decay_input, v_th, v_reset)
    assert_spikes_equal(spikes.cpu(), r_spikes, h, v_th)
    torch.testing.assert_close(mean.cpu(), r_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.cpu(), r_var, rtol=1e-5, atol=1e-6)

    assert_no_ties(h, v_th)
    got = tri.bn_lif_bwd_triton(dv(gs), dv(z), dv(scale), dv(shift), mean, var, dv(res),
                                bn_train, eps, tau, decay_input, v_th, v_reset, detach, surrogate,
                                s_alpha)
    exp = ref.bn_lif_bwd_reference(gs.double(), z.double(), scale.double(), shift.double(),
                                   mean, var, None if res is None else res.double(), bn_train,
                                   eps, tau, decay_input, v_th, v_reset, detach, surrogate,
                                   s_alpha)
    for name, a, e in zip(("grad_z", "grad_current", "grad_scale", "grad_shift"), got, exp):
        assert a.shape == e.shape
        assert_close_rel(a.cpu(), e, 1e-5, name)
    # need_grad_current=False: grad_current empty, the rest unchanged
    got2 = tri.bn_lif_bwd_triton(dv(gs), dv(z), dv(scale), dv(shift), mean, var, dv(res),
                                 bn_train, eps, tau, decay_input, v_th, v_reset, detach,
                                 surrogate, s_alpha, False)
    assert got2[1].shape == (0,)
    for i in (0, 2, 3):
        assert torch.equal(got2[i].cpu(), got[i].cpu())


# ----------------------------------------------------------------------------------------------
# End to end: BinSpikeConv2d(backend='triton') against backend='torch'
# ----------------------------------------------------------------------------------------------


def _check_against_torch_layer(lt, lr, xt, xr, st, sr, h, v_th):
    """The Triton layer ``lt`` against the float64 copy ``lr`` of its torch twin, on the same
    input (``xt``, ``xr`` its float64 copy) with outputs ``st``, ``sr``: spikes equal outside
    the tie band of the reference's H (no near-tie in it, so the backward compares too), and
    the input and score gradients of a random upstream gradient equal to 1e-5."""
    assert_spikes_equal(st.detach().cpu(), sr.detach().cpu(), h, v_th)
    assert_no_ties(h, v_th)
    g = torch.randn(st.shape).to(st.device)
    st.backward(g)
    sr.backward(g.double())
    assert_close_rel(xt.grad.cpu(), xr.grad.cpu(), 1e-5, "grad_x")
    assert_close_rel(lt.scores.grad.cpu(), lr.scores.grad.cpu(), 1e-5, "grad_scores")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bn", [False, True])
def test_layer_triton_vs_torch(device, bn):
    _no_triton_error()
    from binslt.nn.layers import BinSpikeConv2d

    kw = dict(stride=2, padding=1, prune_rate=0.4, tau=2.0, v_threshold=0.5, bn=bn,
              surrogate="sigmoid", detach_reset=True)
    torch.manual_seed(3)
    lt = BinSpikeConv2d(CI, CO, 3, backend="triton", **kw).to(device)
    torch.manual_seed(3)
    lr = BinSpikeConv2d(CI, CO, 3, backend="torch", **kw).to(device)
    lr.load_state_dict(lt.state_dict())
    x = (torch.rand(T, N, CI, HW, HW) < 0.4).float().to(device)
    xt = x.clone().requires_grad_(True)
    xr = x.double().requires_grad_(True)
    st = lt(xt)
    sr = lr.double()(xr)
    # H of the float64 reference layer for the tie band
    with torch.no_grad():
        w = lr.effective_weight().double()
        z = F.conv2d(xr.detach().flatten(0, 1), w, stride=2, padding=1)
        z = z.view(T, N, *z.shape[1:])
        c = z.shape[2]
        one, zero = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        h = _h64(z.cpu(), one, zero, None, bn, lr.bn.eps if bn else 1e-5, 2.0, True, 0.5, 0.0)
    _check_against_torch_layer(lt, lr, xt, xr, st, sr, h, 0.5)
    if bn:
        torch.testing.assert_close(lt.bn.running_mean.cpu(), lr.bn.running_mean.float().cpu(),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lt.bn.running_var.cpu(), lr.bn.running_var.float().cpu(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inp", ["spike", "real"])
def test_linear_triton_vs_torch(device, inp):
    """BinSpikeLinear: spike input runs bconv_lif as a 1x1 conv, real input runs bn_lif."""
    _no_triton_error()
    from binslt.nn.layers import BinSpikeLinear

    kw = dict(prune_rate=0.5, tau=2.0, v_threshold=0.3, bn=True, input=inp, v_reset=None)
    torch.manual_seed(4)
    lt = BinSpikeLinear(40, 7, backend="triton", **kw).to(device)
    lr = BinSpikeLinear(40, 7, backend="torch", **kw).to(device)
    lr.load_state_dict(lt.state_dict())
    x = (torch.rand(3, 4, 40) < 0.4).float() if inp == "spike" else torch.randn(3, 4, 40)
    x = x.to(device)
    xt, xr = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    st, sr = lt(xt), lr.double()(xr)
    with torch.no_grad():
        z = (xr.detach() @ lr.effective_weight().double().t()).cpu()
        one = torch.ones(7, dtype=torch.float64)
        h = _h64(z, one, 0 * one, None, True, 1e-5, 2.0, True, 0.3, None)
    _check_against_torch_layer(lt, lr, xt, xr, st, sr, h, 0.3)


# ----------------------------------------------------------------------------------------------
# GPU only: fake kernels / torch.compile over the triton ops
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_compile_bconv_lif_triton_gpu():
    d = _make_layer("cuda", 1, 1, True)

    def f(xp, wm, wp, alpha, scale, shift, res):
        return tri.bconv_lif_triton(xp, wm, wp, alpha, scale, shift, res, T, 1, 1, True, 1e-5,
                                    2.0, True, 1.0, 0.0)

    args = (d["xp"], d["wm"], d["wp"], d["alpha"], d["scale"], d["shift"], d["res"])
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True)(*args)
    assert torch.equal(eager[1], compiled[1])
    assert torch.equal(eager[0], compiled[0])


def _op_samples(device):
    """One sample argument tuple per binslt::<op>_triton."""
    d = _make_layer(device, 2, 1, True)
    x = (torch.rand(4, 33, 5, 5) < 0.3).float().to(device)
    z = torch.randn(2, 1, 3, 4).to(device)
    c3 = torch.ones(3, device=device)
    spikes, counts, mean, var = tri.bconv_lif_triton(
        d["xp"], d["wm"], d["wp"], d["alpha"], d["scale"], d["shift"], d["res"], T, 2, 1, True,
        1e-5, 2.0, True, 1.0, 0.0)
    _, zmean, zvar = tri.bn_lif_triton(z, c3, 0 * c3, None, True, 1e-5, 2.0, False, 1.0, None)
    return {
        "pack_spikes": (x,),
        "unpack_spikes": (d["xp"], CI),
        "pack_weight": (d["w_eff"],),
        "bconv_lif": (d["xp"], d["wm"], d["wp"], d["alpha"], d["scale"], d["shift"], d["res"], T,
                      2, 1, True, 1e-5, 2.0, True, 1.0, 0.0),
        "bconv_lif_infer": (d["x"], d["wm"], d["wp"], d["alpha"], d["scale"], d["shift"],
                            d["res"], 2, 1, 2.0, True, 1.0, 0.0),
        "bconv_lif_bwd": (d["gs"], counts, d["xp"], d["wm"], d["wp"], d["alpha"], d["scale"],
                          d["shift"], mean, var, d["res"], CI, 2, 1, True, 1e-5, 2.0, True, 1.0,
                          0.0, False, 1, 4.0, True),
        "bn_lif": (z, c3, 0 * c3, None, True, 1e-5, 2.0, False, 1.0, None),
        "bn_lif_bwd": (torch.randn_like(z), z, c3, 0 * c3, zmean, zvar, None, True, 1e-5, 2.0,
                       False, 1.0, None, True, 0, 2.0),
    }


def test_triton_ops_registered_with_the_declared_schemas():
    """Every binslt::<op>_triton has exactly its binslt._schemas row (int stays int, not SymInt),
    also on torch versions whose triton_op ignores an explicit schema."""
    _no_triton_error()
    from binslt.ops.schemas import SCHEMAS

    for name, schema in SCHEMAS.items():
        got = str(getattr(tri, name + "_triton").default._schema)
        assert got == f"binslt::{name}_triton{schema[len(name):]}", name


@pytest.mark.skipif(not INTERPRET, reason="the interpreter path is what this checks")
def test_opcheck_triton_ops_interpreter():
    """Schema, fake kernel (the triton_op body with kernel launches skipped on fake tensors) and
    autograd registration on CPU; AOT tracing must refuse clearly rather than drop the kernels."""
    _no_triton_error()
    from binslt.ops.schemas import SCHEMAS

    samples = _op_samples("cpu")
    assert set(samples) == set(SCHEMAS)
    for name, args in samples.items():
        torch.library.opcheck(getattr(tri, name + "_triton"), args,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_autograd_registration"))
    with pytest.raises(Exception, match="not supported under TRITON_INTERPRET=1"):
        torch.library.opcheck(tri.bn_lif_triton, samples["bn_lif"],
                              test_utils=("test_aot_dispatch_dynamic",))


@pytest.mark.gpu
def test_opcheck_triton_ops_gpu():
    for name, args in _op_samples("cuda").items():
        torch.library.opcheck(getattr(tri, name + "_triton"), args)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_gpu():
    """Every kernel (first autotune config, 1x1 conv specialization) gets through Triton's CUDA
    pipeline down to a ptxas cubin for sm_90, so GPU-only compile errors show up on CPU CI."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "binslt.kernels.aot_check", "--arch", "90", "--kernel",
                          "1", "--fresh-cache"], env=env, cwd=root, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "0 failure(s)" in out.stdout
    assert "wgmma" in out.stdout  # the int8 conv reaches Hopper tensor cores
    n_ok = out.stdout.count("\nOK   ")
    assert f"time all            n={n_ok:<3} " in out.stdout  # every compile is in the summary
    assert "\nwall " in out.stdout


def test_aot_check_timing_summary():
    """aot_check's closing lines: per kernel, then over all compiles, count and min/median/max/total
    seconds, then the wall time."""
    from binslt.kernels.aot_check import _summary

    lines = _summary({"bconv_fwd": [3.0, 1.0, 2.0, 10.0], "pack_bits": [0.5]}, 20.04)
    assert lines == [
        "time bconv_fwd      n=4   min=1.0s median=2.5s max=10.0s total=16.0s",
        "time pack_bits      n=1   min=0.5s median=0.5s max=0.5s total=0.5s",
        "time all            n=5   min=0.5s median=2.0s max=10.0s total=16.5s",
        "wall 20.0s",
    ]
    assert _summary({}, 1.0) == ["wall 1.0s"]
