"""Core layer semantics: the reference against SpikingJelly 2.0.0 and float64 math."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import (
    CONV_GEOMS,
    assert_close_rel,
    assert_spikes_equal,
    biprop_weight64,
    layer64,
    sj_modules,
    sj_surrogate,
    stable_seed,
)

import binslt
from binslt.ops import reference as ref

# SpikingJelly is imported when a test first uses it (skipped where it is not installed).
functional, layer, neuron, surrogate = sj_modules("functional", "layer", "neuron", "surrogate")


def _sj_surrogate(kind, alpha):
    return sj_surrogate(kind, alpha)


def _random_config(rng: random.Random):
    kind = rng.choice(["atan", "sigmoid"])
    return dict(
        tau=rng.choice([2.0, rng.uniform(1.5, 4.0), 100.0]),
        decay_input=rng.choice([True, False]),
        v_threshold=rng.choice([1.0, rng.uniform(0.3, 1.5)]),
        v_reset=rng.choice([0.0, None, -0.2]),
        detach_reset=rng.choice([True, False]),
        surrogate=kind,
        surrogate_alpha=rng.choice([2.0, 4.0, rng.uniform(1.0, 5.0)]),
    )


def _sj_model(cin, cout, k, stride, padding, w_eff, bn, cfg, bn_affine=False):
    conv = layer.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False, step_mode="m")
    with torch.no_grad():
        conv.weight.copy_(w_eff)
    mods = [conv]
    if bn:
        mods.append(layer.BatchNorm2d(cout, affine=bn_affine, step_mode="m"))
    mods.append(neuron.LIFNode(tau=cfg["tau"], decay_input=cfg["decay_input"],
                               v_threshold=cfg["v_threshold"], v_reset=cfg["v_reset"],
                               surrogate_function=_sj_surrogate(cfg["surrogate"],
                                                                cfg["surrogate_alpha"]),
                               detach_reset=cfg["detach_reset"], step_mode="m"))
    return torch.nn.Sequential(*mods)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("shape", CONV_GEOMS)
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_spikes_match_spikingjelly(shape, bn, seed, backend):
    T, N, cin, cout, H, W, k, stride, padding = shape
    rng = random.Random(stable_seed((shape, bn, seed)))
    cfg = _random_config(rng)
    torch.manual_seed(seed)
    m = binslt.BinSpikeConv2d(cin, cout, k, stride, padding, prune_rate=rng.choice([0.0, 0.5, 0.9]),
                              bn=bn, backend=backend, **cfg)
    if not bn:  # without BN the input scale matters against the threshold: make neurons fire
        with torch.no_grad():
            m.weight.mul_(3.0)
    x = (torch.rand(T, N, cin, H, W) < 0.3).float()
    for train in (True, False):
        m.train(train)
        w_eff = m.effective_weight().detach()
        sj = _sj_model(cin, cout, k, stride, padding, w_eff, bn, cfg)
        if bn:
            sj[1].load_state_dict(m.bn.state_dict())
        sj.train(train)
        functional.reset_net(sj)
        with torch.no_grad():
            ours = m(x)
            theirs = sj(x)
        # H in float64 for the tie band (batch statistics, as the layer saw them)
        bn_now = bn and train
        scale = shift = None
        if bn and not train:
            inv = torch.rsqrt(m.bn.running_var.double() + m.bn.eps)
            scale, shift = inv, -m.bn.running_mean.double() * inv
        _, h = ref.conv_lif_reference(
            x.double(), w_eff.double(), stride=stride, padding=padding, scale=scale, shift=shift,
            bn_train=bn_now, return_h=True, surrogate=0 if cfg["surrogate"] == "atan" else 1,
            **{k2: v for k2, v in cfg.items() if k2 not in ("surrogate",)})
        assert ours.dtype == x.dtype and ours.shape == theirs.shape
        assert_spikes_equal(ours, theirs, h, cfg["v_threshold"])
        assert 0 < ours.sum() or theirs.sum() == 0


def test_lif_module_bit_exact_with_spikingjelly():
    torch.manual_seed(3)
    for cfg in [dict(tau=2.0, decay_input=True, v_reset=0.0, detach_reset=False),
                dict(tau=100.0, decay_input=False, v_reset=0.0, detach_reset=True),
                dict(tau=3.7, decay_input=True, v_reset=None, detach_reset=False)]:
        x = torch.randn(6, 3, 17, 5) * 1.5
        ours = binslt.LIF(surrogate="atan", surrogate_alpha=2.0, **cfg)(x)
        sj = neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m", **cfg)
        theirs = sj(x)
        assert torch.equal(ours, theirs), cfg


@pytest.mark.parametrize("kind,alpha", [("atan", 2.0), ("atan", 3.3), ("sigmoid", 4.0),
                                        ("sigmoid", 1.7), ("rect", 1.0), ("rect", 0.7),
                                        ("piecewise_quadratic", 1.0),
                                        ("piecewise_quadratic", 0.6)])
def test_lif_gradient_matches_spikingjelly(kind, alpha):
    torch.manual_seed(1)
    x = (torch.randn(5, 4, 11) * 1.2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(5, 4, 11)
    for v_reset, detach in [(0.0, False), (None, True), (0.0, True)]:
        ours = binslt.LIF(tau=2.5, surrogate=kind, surrogate_alpha=alpha, v_reset=v_reset,
                          detach_reset=detach)(x)
        sj = neuron.LIFNode(tau=2.5, surrogate_function=_sj_surrogate(kind, alpha),
                            v_reset=v_reset, detach_reset=detach, step_mode="m")
        theirs = sj(x2)
        (gx,) = torch.autograd.grad(ours, x, g)
        (gx2,) = torch.autograd.grad(theirs, x2, g)
        assert_close_rel(gx, gx2, 1e-6, f"LIF grad {kind} {v_reset} {detach}")


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("shape", CONV_GEOMS)
def test_gradients_match_float64(shape, bn):
    T, N, cin, cout, H, W, k, stride, padding = shape
    rng = random.Random(7 + len(shape) + bn)
    cfg = _random_config(rng)
    torch.manual_seed(11)
    m = binslt.BinSpikeConv2d(cin, cout, k, stride, padding, prune_rate=0.4, bn=bn,
                              backend="torch", **cfg).double()
    if not bn:
        with torch.no_grad():
            m.weight.mul_(3.0)
    x = (torch.rand(T, N, cin, H, W) < 0.3).double().requires_grad_()
    out = m(x)
    gout = torch.randn_like(out)
    (out * gout).sum().backward()

    # independent float64 reference
    w, s = m.weight.detach(), m.scores.detach()
    w_eff, mask, alpha = biprop_weight64(w, s, 0.4)
    w_eff = w_eff.requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    s2, _ = layer64(x2, w_eff, stride=stride, padding=padding, bn=bn, **cfg)
    (s2 * gout).sum().backward()
    assert torch.equal(out.detach(), s2.detach())
    assert_close_rel(x.grad, x2.grad, 1e-6, "input grad")
    expected_ds = w_eff.grad * w * torch.sign(s)
    assert_close_rel(m.scores.grad, expected_ds, 1e-6, "score grad")
    assert m.weight.grad is None  # w is frozen in search mode
    assert m.scores.grad.abs().sum() > 0


@pytest.mark.parametrize("numel", [1, 7, 10, 33, 1000, 3 * 3 * 64 * 64])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 0.7, 0.99])
def test_mask_size_and_gain(numel, p):
    torch.manual_seed(numel)
    s = torch.randn(numel)
    w = torch.randn(numel)
    m = ref.topk_mask(s, p)
    assert int(m.sum()) == numel - math.floor(p * numel)
    kept = s.abs()[m.bool()]
    if kept.numel() and kept.numel() < numel:
        assert kept.min() >= s.abs()[~m.bool()].max()
    alpha = ref.mean_abs_gain(w, m)
    assert torch.allclose(alpha, (w * m).abs().sum() / m.sum())


@pytest.mark.parametrize("p", [0.0, 0.1, 0.33, 0.5, 0.9, 0.999])
def test_mask_equals_stable_sort_rule_with_many_ties(p):
    s = torch.randint(-3, 4, (1000,)).float()  # heavy ties
    flat = s.abs()
    keep = flat.numel() - math.floor(p * flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices
    expected = torch.zeros(1000)
    expected[order[:keep]] = 1
    assert torch.equal(ref.topk_mask(s, p), expected)


def test_mask_ties_are_deterministic():
    s = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 2.0])
    m = ref.topk_mask(s, 0.5)  # keep 3: 2.0 then the first two |1.0|s by index
    assert m.tolist() == [1, 1, 0, 0, 0, 1]
    assert torch.equal(ref.topk_mask(s, 0.5), m)


def test_layer_mask_and_gain_rule():
    m = binslt.BinSpikeConv2d(16, 8, 3, prune_rate=0.3)
    w_eff = m.effective_weight()
    mask = (w_eff != 0)
    assert int(mask.sum()) == w_eff.numel() - math.floor(0.3 * w_eff.numel())
    alpha = (m.weight.abs() * mask).sum() / mask.sum()
    assert torch.allclose(w_eff[mask].abs(), alpha.expand(int(mask.sum())))
    assert torch.equal(torch.sign(w_eff[mask]), torch.sign(m.weight[mask]))


def test_alpha_has_no_gradient_path():
    """dL/ds = G * w * sign(s) exactly: alpha's dependence on the mask is not differentiated."""
    torch.manual_seed(2)
    w = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    s = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    w_eff = ref.masked_sign_weight(w, s, 0.5)
    (w_eff * g).sum().backward()
    assert torch.equal(s.grad, g * w * torch.sign(s.detach()))


@pytest.mark.parametrize("c", [1, 5, 31, 32, 33, 63, 64, 65, 100, 129])
def test_pack_unpack_identity(c):
    x = (torch.rand(3, c, 4, 5) < 0.4).float()
    p = ref.pack_spikes_reference(x)
    assert p.dtype == torch.int32 and p.shape == (3, 4, 5, (c + 31) // 32)
    assert torch.equal(ref.unpack_spikes_reference(p, c), x)
    w = torch.randn(6, c, 3, 3) * (torch.rand(6, c, 3, 3) < 0.5)
    wm, wp = ref.pack_weight_reference(w)
    back = ref.unpack_weight_reference(wm, wp, c)
    assert torch.equal(back, torch.sign(w))
    # through the dispatcher (whatever kernel serves CPU)
    assert torch.equal(binslt.ops.unpack_spikes(binslt.ops.pack_spikes(x), c), x)


def test_pack_bit_layout():
    x = torch.zeros(1, 40, 1, 1)
    x[0, [0, 5, 31, 32, 39]] = 1
    p = ref.pack_spikes_reference(x)[0, 0, 0]
    assert p[0].item() == (1 | (1 << 5) | -(1 << 31))  # bit 31 set -> negative int32
    assert p[1].item() == (1 | (1 << 7))


def test_linear_matches_spikingjelly():
    torch.manual_seed(5)
    cfg = dict(tau=100.0, decay_input=False, v_threshold=1.0, v_reset=0.0, detach_reset=True)
    m = binslt.BinSpikeLinear(37, 9, prune_rate=0.5, bn=True, **cfg)
    x = (torch.rand(4, 6, 37) < 0.3).float()
    fc = layer.Linear(37, 9, bias=False, step_mode="m")
    with torch.no_grad():
        fc.weight.copy_(m.effective_weight())
    sj = torch.nn.Sequential(fc, layer.BatchNorm1d(9, affine=False, step_mode="m"),
                             neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m",
                                            **cfg))
    with torch.no_grad():
        ours, theirs = m(x), sj(x)
    z = torch.nn.functional.linear(x.double(), m.effective_weight().double())
    xin, _, _ = ref.epilogue(z, torch.ones(9, dtype=torch.float64),
                             torch.zeros(9, dtype=torch.float64), None, True, 1e-5)
    _, h = ref.lif_multistep(xin, return_h=True, **cfg)
    assert_spikes_equal(ours, theirs, h, 1.0)
    assert torch.allclose(m.bn.running_mean, sj[1].running_mean, atol=1e-5)
    assert torch.allclose(m.bn.running_var, sj[1].running_var, atol=1e-4)


def test_real_input_first_layer_matches_spikingjelly():
    torch.manual_seed(6)
    cfg = dict(tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0, detach_reset=False)
    m = binslt.BinSpikeConv2d(3, 8, 3, padding=1, bn=True, input="real", **cfg)
    img = torch.randn(2, 3, 8, 8)
    x = img.unsqueeze(0).repeat(4, 1, 1, 1, 1)
    sj = _sj_model(3, 8, 3, 1, 1, m.effective_weight().detach(), True,
                   dict(cfg, surrogate="atan", surrogate_alpha=2.0))
    with torch.no_grad():
        ours, theirs = m(x), sj(x)
    _, h = ref.conv_lif_reference(x.double(), m.effective_weight().detach().double(), padding=1,
                                  bn_train=True, return_h=True, **cfg)
    assert_spikes_equal(ours, theirs, h, 1.0)


def test_residual_current_is_added_before_the_neuron():
    torch.manual_seed(8)
    m = binslt.BinSpikeConv2d(8, 8, 3, padding=1, backend="torch", v_reset=None)
    x = (torch.rand(3, 2, 8, 5, 5) < 0.3).float()
    r = torch.randn(3, 2, 8, 5, 5)
    out = m(x, residual=r)
    exp, _ = layer64(x.double(), m.effective_weight().detach().double(), stride=1, padding=1,
                     bn=False, residual=r.double(), tau=2.0, decay_input=True, v_threshold=1.0,
                     v_reset=None, detach_reset=False, surrogate="atan", surrogate_alpha=2.0)
    assert torch.equal(out.double(), exp)


def test_decay_parameterisation():
    m = binslt.BinSpikeConv2d(4, 4, 3, decay=0.99)
    assert m.neuron.tau == pytest.approx(100.0)
    with pytest.raises(ValueError, match="decay"):
        binslt.BinSpikeConv2d(4, 4, 3, decay=1.0)


def test_reset_net_works_on_mixed_models():
    net = torch.nn.Sequential(binslt.BinSpikeConv2d(2, 4, 3, padding=1),
                              layer.Conv2d(4, 4, 1, step_mode="m"),
                              neuron.LIFNode(step_mode="m"))
    x = (torch.rand(2, 1, 2, 5, 5) < 0.5).float()
    a = net(x)
    functional.reset_net(net)
    b = net(x)
    assert torch.equal(a, b)
