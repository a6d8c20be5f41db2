"""The compact surrogates: SpikingJelly's ``surrogate.Rect`` and ``surrogate.PiecewiseQuadratic``.

    rect (2):                g'(x) = alpha            where |x| <  0.5 / alpha (strict), else 0
    piecewise_quadratic (3): g'(x) = alpha - alpha^2 |x| where |x| <= 1 / alpha (non-strict), else 0

at x = H - v_threshold. Checks: binslt.reference against SpikingJelly's autograd functions bit for
bit in float32, the windows' edges and their float32 neighbours included, and against float64
maths; every backend's bn_lif_bwd and fused bconv_lif_bwd bit for bit against SpikingJelly's
backward formula where one step isolates g' (T = 1 and H = Z exactly), and within 1e-5 of the
reference over several steps; the LIF layer against SpikingJelly's LIFNode; the layers, the model
builder, the command line and binslt.convert take the new names. Triton runs under the
interpreter on the CPU (tiny grids) where no GPU is visible.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from helpers import (
    SJ_SURROGATES,
    _Heaviside,
    assert_close_rel,
    backend_device,
    sj_modules,
    sj_surrogate,
    triton_param,
)

import binslt
from binslt import ops
from binslt.ops import reference as ref
from binslt.ops.schemas import DEFAULT_SURROGATE_ALPHA, SURROGATES

sj_surrogate_mod, neuron, functional, layer = sj_modules("surrogate", "neuron", "functional",
                                                         "layer")

KINDS = ["rect", "piecewise_quadratic"]
#: alphas per surrogate: SpikingJelly's default 1 (exact edges), and alphas whose edges
#: 0.5/alpha, 1/alpha round in float32 (PiecewiseQuadratic at 0.7 and 7: a nonzero g' exactly on
#: the float32 edge, which only the non-strict inequality keeps)
ALPHAS = {"rect": [1.0, 0.7, 0.3, 3.0], "piecewise_quadratic": [1.0, 0.7, 0.3, 7.0]}
CASES = [pytest.param(k, a, id=f"{k}-{a:g}") for k in KINDS for a in ALPHAS[k]]

BACKENDS = [
    pytest.param("torch", id="reference"),
    pytest.param("cpu", id="cpu"),
    triton_param(),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def _edge(kind: str, alpha: float) -> float:
    """The window's half-width in float64."""
    return 0.5 / alpha if kind == "rect" else 1.0 / alpha


def _edge32(kind: str, alpha: float) -> np.float32:
    """The half-width as SpikingJelly's comparison sees it: the Python float rounded to the
    tensor's float32."""
    return np.float32(_edge(kind, alpha))


def _sj_backward(kind: str, grad: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """SpikingJelly's backward formula itself (surrogate.rect_backward /
    piecewise_quadratic_backward)."""
    fn = (sj_surrogate_mod.rect_backward if kind == "rect"
          else sj_surrogate_mod.piecewise_quadratic_backward)
    return fn(grad, x, alpha)[0]


def _probe32(kind: str, alpha: float, n_random: int = 200, seed: int = 0) -> torch.Tensor:
    """float32 points: both edges and their float32 neighbours on either side, 0 and -0, points
    inside, outside and far away."""
    e = _edge32(kind, alpha)
    near = [e, np.nextafter(e, np.float32(np.inf)), np.nextafter(e, np.float32(0)),
            np.nextafter(np.nextafter(e, np.float32(0)), np.float32(0))]
    pts = near + [-p for p in near] + [np.float32(v) for v in (0.0, -0.0, 1e-30, 50.0, -50.0)]
    g = torch.Generator().manual_seed(seed)
    rnd = (torch.rand(n_random, generator=g) * 4 - 2) * float(e)
    return torch.cat([torch.tensor(np.array(pts, dtype=np.float32)), rnd])


# ---------------------------------------------------------------------------------------------
# The names, the ids and SpikingJelly's defaults
# ---------------------------------------------------------------------------------------------


def test_names_ids_and_defaults_are_spikingjellys():
    assert SURROGATES == {"atan": 0, "sigmoid": 1, "rect": 2, "piecewise_quadratic": 3}
    for name, (cls_name, alpha) in SJ_SURROGATES.items():
        cls = getattr(sj_surrogate_mod, cls_name)
        assert inspect.signature(cls.__init__).parameters["alpha"].default == alpha, name
        assert DEFAULT_SURROGATE_ALPHA[name] == alpha, name


def test_unknown_surrogate_ids_are_refused():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"2 \(rect\) or 3 \(piecewise_quadratic\), got 4"):
        ref.surrogate_grad(x, 4, 1.0)
    z = torch.randn(1, 1, 2, 3)
    one, zero = torch.ones(2), torch.zeros(2)
    for backend_op in (ref.bn_lif_bwd_reference, torch.ops.binslt.bn_lif_bwd):
        with pytest.raises(ValueError, match=r"surrogate must be 0 \(atan\), 1 \(sigmoid\), 2 "
                                             r"\(rect\) or 3 \(piecewise_quadratic\), got 4"):
            backend_op(z, z, one, zero, zero, one, None, False, 1e-5, 2.0, True, 1.0, 0.0,
                       False, 4, 1.0)


# ---------------------------------------------------------------------------------------------
# The reference against SpikingJelly and against float64 maths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,alpha", CASES)
def test_reference_matches_spikingjelly_bit_for_bit(kind, alpha):
    x = _probe32(kind, alpha)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    xs = x.clone().requires_grad_()
    ys = sj_surrogate(kind, alpha)(xs)
    (gs,) = torch.autograd.grad(ys, xs, grad)
    xo = x.clone().requires_grad_()
    yo = ref.spike_fn(xo, SURROGATES[kind], alpha)
    (go,) = torch.autograd.grad(yo, xo, grad)
    assert torch.equal(yo, ys.detach())  # Heaviside(x >= 0)
    assert torch.equal(go, gs)
    assert torch.equal(go, _sj_backward(kind, grad, x, alpha))
    # the edges: strict for Rect, non-strict for PiecewiseQuadratic
    e = float(_edge32(kind, alpha))
    inner = float(np.nextafter(np.float32(e), np.float32(0)))
    outer = float(np.nextafter(np.float32(e), np.float32(np.inf)))
    sg = ref.surrogate_grad(torch.tensor([e, -e, inner, -inner, outer, -outer]),
                            SURROGATES[kind], alpha)
    a32 = np.float32(alpha)
    if kind == "rect":
        assert sg.tolist() == [0.0, 0.0, a32, a32, 0.0, 0.0]
    else:
        on_edge = np.float32(np.float32(-(alpha ** 2)) * np.float32(e)) + a32
        assert sg.tolist()[:2] == [on_edge, on_edge] and sg.tolist()[4:] == [0.0, 0.0]
        assert sg[2] >= sg[0] and sg[2] < a32 * 1e-5


def test_piecewise_quadratic_edge_value_tells_the_inequality():
    """At alpha = 0.7 g' on the float32 edge is a nonzero float32 number: SpikingJelly's
    non-strict |x| <= 1/alpha keeps it, a strict one would give 0 (the test above would see it)."""
    e = float(_edge32("piecewise_quadratic", 0.7))
    (v,) = ref.surrogate_grad(torch.tensor([e]), 3, 0.7).tolist()
    assert v != 0.0
    assert v == _sj_backward("piecewise_quadratic", torch.ones(1), torch.tensor([e]), 0.7).item()


def _maths64(kind: str, x: float, alpha: float) -> float:
    """g'(x) in Python float64 arithmetic, SpikingJelly's inequalities."""
    if kind == "rect":
        return alpha if abs(x) < 0.5 / alpha else 0.0
    return -(alpha ** 2) * abs(x) + alpha if abs(x) <= 1.0 / alpha else 0.0


@pytest.mark.parametrize("kind,alpha", CASES)
def test_reference_matches_float64_maths(kind, alpha):
    e = _edge(kind, alpha)
    pts = [e, -e, math.nextafter(e, math.inf), math.nextafter(e, 0.0),
           -math.nextafter(e, 0.0), 0.0, 3 * e, 0.25 * e, 0.999 * e]
    pts += (torch.linspace(-2.5, 2.5, 301, dtype=torch.float64) * e).tolist()
    x64 = torch.tensor(pts, dtype=torch.float64)
    got = ref.surrogate_grad(x64, SURROGATES[kind], alpha)
    want = torch.tensor([_maths64(kind, p, alpha) for p in pts], dtype=torch.float64)
    assert torch.equal(got, want)  # same operations on float64, edges exactly
    if kind == "rect":  # strict: 0 on the edge, alpha just inside
        assert (got[0], got[1], got[3], got[4]) == (0.0, 0.0, alpha, alpha)
    else:  # non-strict: the formula on the edge, 0 just outside
        assert got[0] == -(alpha ** 2) * e + alpha and got[2] == 0.0
    # the test suite's independent float64 form (helpers._Heaviside: a (1 - a|x|)) agrees
    xh = x64.clone().requires_grad_()
    (gh,) = torch.autograd.grad(_Heaviside.apply(xh, kind, alpha), xh, torch.ones_like(x64))
    torch.testing.assert_close(gh, want, rtol=1e-12, atol=1e-12)
    # float32 against float64 off the edges: within float32 rounding
    x32 = _probe32(kind, alpha, n_random=2000, seed=3)
    off = ((x32.double().abs() - e).abs() > 1e-6 * e)
    g32 = ref.surrogate_grad(x32, SURROGATES[kind], alpha)
    w32 = ref.surrogate_grad(x32.double(), SURROGATES[kind], alpha)
    torch.testing.assert_close(g32[off].double(), w32[off], rtol=1e-6, atol=1e-6 * alpha)
    assert bool((g32[off] != 0).any()) and bool((g32[off] == 0).any())


# ---------------------------------------------------------------------------------------------
# Every backend: one step isolates g' (T = 1, v_threshold = 0, V[-1] = 0, decay_input=False,
# eval affine scale 1 shift 0: H = X = Z exactly, dL/dX = dL/dS * g'(Z))
# ---------------------------------------------------------------------------------------------


def _bn_lif_bwd_op(backend: str):
    if backend == "torch":
        return ref.bn_lif_bwd_reference
    if backend == "triton":
        assert ops.load_triton() == ""
        return torch.ops.binslt.bn_lif_bwd_triton
    return torch.ops.binslt.bn_lif_bwd


def _bconv_lif_ops(backend: str):
    if backend == "torch":
        return ref.bconv_lif_reference, ref.bconv_lif_bwd_reference
    if backend == "triton":
        assert ops.load_triton() == ""
        return torch.ops.binslt.bconv_lif_triton, torch.ops.binslt.bconv_lif_bwd_triton
    return torch.ops.binslt.bconv_lif, torch.ops.binslt.bconv_lif_bwd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,alpha", CASES)
def test_bn_lif_bwd_one_step_is_spikingjellys_formula(backend, kind, alpha):
    dev = backend_device(backend)
    x = _probe32(kind, alpha, n_random=51)  # 13 fixed points + 51: [1, 1, 4, 16]
    z = x.view(1, 1, 4, -1)  # [T, N, C, S]
    c = z.shape[2]
    gs = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    one, zero = torch.ones(c), torch.zeros(c)
    args = [t.to(dev) for t in (gs, z, one, zero, zero, one)]
    g_z, g_cur, g_sc, g_sh = _bn_lif_bwd_op(backend)(
        *args, None, False, 1e-5, 2.0, False, 0.0, 0.0, False, SURROGATES[kind], alpha)
    want = _sj_backward(kind, gs, z, alpha)
    assert torch.equal(g_cur.cpu(), want)
    assert torch.equal(g_z.cpu(), want)
    assert bool((want != 0).any()) and bool((want == 0).any())


def _conv_data(kind: str, alpha: float, T: int, seed: int):
    """A 1x1 binary conv over 3 input channels (counts in -3..3, mostly -1, 0, 1) with per-channel
    scales at the window's edge and its float32 neighbours, so that Z = count * scale lands
    exactly on, just inside and just outside the window."""
    e = _edge32(kind, alpha)
    scales = [e, np.nextafter(e, np.float32(0)), np.nextafter(e, np.float32(np.inf)),
              np.float32(0.37 * float(e))]
    g = torch.Generator().manual_seed(seed)
    ci, co, hw = 3, len(scales), 6
    x = (torch.rand(T, 1, ci, hw, hw, generator=g) < 0.5).float()
    w = torch.randint(-1, 2, (co, ci, 1, 1), generator=g).float()
    w[:, 0] = 1.0  # every output channel has a nonzero weight
    scale_c = torch.tensor(np.array(scales, dtype=np.float32))
    xp = ref.pack_spikes_reference(x.flatten(0, 1))
    wm, wp = ref.pack_weight_reference(w)
    gs = torch.randn(T, 1, co, hw, hw, generator=g)
    return xp, wm, wp, scale_c, gs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,alpha", CASES)
def test_fused_conv_lif_bwd_one_step_is_spikingjellys_formula(backend, kind, alpha):
    dev = backend_device(backend)
    xp, wm, wp, alpha_c, gs = _conv_data(kind, alpha, 1, seed=5)
    co = alpha_c.numel()
    one, zero = torch.ones(co), torch.zeros(co)
    fwd, bwd = _bconv_lif_ops(backend)
    d = [t.to(dev) for t in (xp, wm, wp, alpha_c, one, zero, gs)]
    neuron_args = (2.0, False, 0.0, 0.0)  # tau, decay_input, v_threshold, v_reset
    spikes, counts, mean, var = fwd(*d[:6], None, 1, 1, 0, False, 1e-5, *neuron_args)
    g_x, g_w, g_cur, g_sc, g_sh = bwd(d[6], counts, *d[:6], mean, var, None, 3, 1, 0, False,
                                      1e-5, *neuron_args, False, SURROGATES[kind], alpha, True)
    z = counts.cpu().float().view(gs.shape) * alpha_c.view(1, 1, -1, 1, 1)
    want = _sj_backward(kind, gs, z, alpha)
    assert torch.equal(g_cur.cpu(), want)
    # the edge and both neighbours are hit, inside and outside the window
    on = z.abs() == torch.tensor(float(_edge32(kind, alpha)))
    assert bool(on.any())
    assert bool((want[on] == 0).all()) if kind == "rect" else True
    assert bool((want != 0).any()) and bool((want == 0).any())


# ---------------------------------------------------------------------------------------------
# Every backend over several steps against the float32 reference
# ---------------------------------------------------------------------------------------------

MULTI = [  # kind, alpha, v_reset, detach_reset, decay_input
    ("rect", 1.0, 0.0, False, True),
    ("rect", 0.7, None, False, False),
    ("piecewise_quadratic", 1.0, None, True, True),
    ("piecewise_quadratic", 0.7, 0.0, False, False),
]


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "torch"])
@pytest.mark.parametrize("kind,alpha,v_reset,detach,decay_input", MULTI)
def test_bn_lif_bwd_over_steps_matches_reference(backend, kind, alpha, v_reset, detach,
                                                 decay_input):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(7)
    shape = (4, 2, 3, 5, 4)
    z = torch.randn(shape, generator=g) * 1.2 + 0.6
    scale = 0.7 + 0.6 * torch.rand(3, generator=g)
    shift = 0.3 * torch.randn(3, generator=g)
    res = 0.3 * torch.randn(shape, generator=g)
    gs = torch.randn(shape, generator=g)
    mean, var = torch.zeros(3), torch.ones(3)
    cfg = (False, 1e-5, 1.5, decay_input, 0.8, v_reset, detach, SURROGATES[kind], alpha)
    got = _bn_lif_bwd_op(backend)(*[t.to(dev) for t in (gs, z, scale, shift, mean, var, res)],
                                  *cfg)
    want = ref.bn_lif_bwd_reference(gs, z, scale, shift, mean, var, res, *cfg)
    for name, a, b in zip(("grad_z", "grad_current", "grad_scale", "grad_shift"), got, want):
        assert_close_rel(a.cpu(), b, 1e-5, f"{name} ({backend})")
    # the same window decisions: the forward H is bit-identical on every backend
    assert torch.equal(got[1].cpu() == 0, want[1] == 0)
    assert 0.05 < float((want[1] == 0).float().mean()) < 0.95


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "torch"])
@pytest.mark.parametrize("kind,alpha,v_reset,detach,decay_input", MULTI)
def test_fused_conv_lif_bwd_over_steps_matches_reference(backend, kind, alpha, v_reset, detach,
                                                         decay_input):
    dev = backend_device(backend)
    T = 3
    xp, wm, wp, alpha_c, gs = _conv_data(kind, alpha, T, seed=9)
    co = alpha_c.numel()
    alpha_c = alpha_c * 2.5
    g = torch.Generator().manual_seed(4)
    scale, shift = 0.8 + 0.4 * torch.rand(co, generator=g), 0.4 * torch.rand(co, generator=g)
    fwd, bwd = _bconv_lif_ops(backend)
    neuron_args = (1.5, decay_input, 0.6, v_reset)
    rfwd, rbwd = _bconv_lif_ops("torch")
    outs = []
    for f, b, dv in ((fwd, bwd, dev), (rfwd, rbwd, "cpu")):
        d = [t.to(dv) for t in (xp, wm, wp, alpha_c, scale, shift, gs)]
        spikes, counts, mean, var = f(*d[:6], None, T, 1, 0, False, 1e-5, *neuron_args)
        outs.append((spikes.cpu(), b(d[6], counts, *d[:6], mean, var, None, 3, 1, 0, False,
                                     1e-5, *neuron_args, detach, SURROGATES[kind], alpha, True)))
    (s_got, got), (s_want, want) = outs
    assert torch.equal(s_got, s_want)
    for name, a, b in zip(("grad_x", "grad_weight", "grad_current", "grad_scale", "grad_shift"),
                          got, want):
        assert_close_rel(a.cpu(), b, 1e-5, f"{name} ({backend})")
    assert torch.equal(got[2].cpu() == 0, want[2] == 0)
    assert 0.05 < float((want[2] == 0).float().mean()) < 0.95


# ---------------------------------------------------------------------------------------------
# The layers, the model builder, the command line, binslt.convert
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,alpha", [("rect", 1.0), ("rect", 0.7),
                                        ("piecewise_quadratic", 1.0),
                                        ("piecewise_quadratic", 0.7)])
def test_lif_layer_matches_spikingjelly(backend, kind, alpha):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 14, generator=g) * 1.2 + 0.3
    gy = torch.randn(x.shape, generator=g)
    for v_reset, detach in [(0.0, False), (None, True), (None, False)]:
        xo = x.clone().to(dev).requires_grad_()
        ours = binslt.LIF(tau=2.5, surrogate=kind, surrogate_alpha=alpha, v_reset=v_reset,
                          detach_reset=detach, backend=backend)(xo)
        xs = x.clone().requires_grad_()
        sj = neuron.LIFNode(tau=2.5, surrogate_function=sj_surrogate(kind, alpha),
                            v_reset=v_reset, detach_reset=detach, step_mode="m")
        theirs = sj(xs)
        assert torch.equal(ours.detach().cpu(), theirs.detach())
        (go,) = torch.autograd.grad(ours, xo, gy.to(dev))
        (gt,) = torch.autograd.grad(theirs, xs, gy)
        assert_close_rel(go.cpu(), gt, 1e-6, f"{kind} {v_reset} {detach}")
        assert bool((gt == 0).any()) and bool((gt != 0).any())


def test_layers_models_and_cli_take_the_names():
    from binslt import cli
    from binslt.nn import models
    from binslt.training import loop as train

    for kind in KINDS:
        m = binslt.BinSpikeConv2d(3, 4, 3, 1, 1, surrogate=kind, surrogate_alpha=0.7,
                                  backend="torch")
        assert (m.neuron.surrogate, m.neuron.surrogate_alpha) == (kind, 0.7)
        assert m.neuron.kwargs()["surrogate"] == kind
        net = models.build("conv4", "binwslt", num_classes=10, in_channels=1, input_size=8,
                           surrogate=kind)
        assert net.build_config["surrogate"] == kind
        args = cli.build_parser().parse_args(["search", "--surrogate", kind,
                                              "--surrogate-alpha", "0.5"])
        cfg = cli.make_config(cli.DEFAULTS, cli.explicit_options(args), method="binwslt")
        assert (cfg.surrogate, cfg.surrogate_alpha) == (kind, 0.5)
        assert train.build_model(cfg, 10, 1, 8).build_config["surrogate"] == kind
    with pytest.raises(ValueError, match="surrogate must be one of"):
        binslt.LIF(surrogate="rectangle")


@pytest.mark.parametrize("kind,alpha", [("rect", 0.7), ("piecewise_quadratic", 1.3)])
def test_convert_maps_spikingjelly_surrogates(kind, alpha):
    from binslt.interop.convert import convert

    torch.manual_seed(0)
    nkw = dict(tau=2.0, surrogate_function=sj_surrogate(kind, alpha), detach_reset=True)
    net = torch.nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8),
        neuron.LIFNode(**nkw),
        layer.Flatten(), layer.Linear(8 * 6 * 6, 4, bias=False), neuron.LIFNode(**nkw))
    functional.set_step_mode(net, "m")
    conv, report = convert(net, prune_rate=0.3, backend="torch")
    first = conv[0]
    assert isinstance(first, binslt.BinSpikeConv2d)
    assert (first.neuron.surrogate, first.neuron.surrogate_alpha) == (kind, alpha)
    assert not report.skipped
    out = conv(torch.rand(2, 3, 2, 6, 6))
    out.sum().backward()
    assert first.scores.grad is not None
    # non-spiking mode stays unsupported, and says so
    nkw["surrogate_function"] = getattr(sj_surrogate_mod, SJ_SURROGATES[kind][0])(
        alpha=alpha, spiking=False)
    net2 = torch.nn.Sequential(layer.Conv2d(2, 8, 3, padding=1, bias=False),
                               neuron.LIFNode(**nkw))
    functional.set_step_mode(net2, "m")
    _, report2 = convert(net2, prune_rate=0.3, backend="torch", strict=False)
    assert any("non-spiking" in s["reason"] for s in report2.skipped)
