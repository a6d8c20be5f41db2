"""IF neurons (SpikingJelly 2.0's ``neuron.IFNode``, H[t] = V[t-1] + X[t]) on every backend.

The ops run IF as the LIF arithmetic with tau = +inf and decay_input = False (binslt._contract
check_tau). These tests hold it to SpikingJelly's IFNode in step mode 'm' bit for bit (spikes)
and to an independent float64 IF written here (h = v + x, no tau anywhere), through bn_lif (the
LIF module and real input), the fused conv + LIF training op and the packed inference op, for
both reset modes, detach_reset both ways and both surrogates.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_close_rel,
    assert_no_ties,
    assert_spikes_equal,
    backend_device,
    lif64,
    sj_modules,
    sj_surrogate,
    triton_param,
)

import binslt
from binslt import ops

# SpikingJelly is imported when a test first uses it (skipped where it is not installed).
functional, layer, neuron, surrogate = sj_modules("functional", "layer", "neuron", "surrogate")

BACKENDS = [
    pytest.param("torch", id="reference"),
    pytest.param("cpu", id="cpu"),
    triton_param(),  # CUDA tensors where a GPU is visible, else the interpreter on the CPU
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]
SURROGATES = [("atan", 2.0), ("sigmoid", 4.0), ("rect", 1.0), ("piecewise_quadratic", 1.0)]
RESETS = [pytest.param(0.0, id="hard"), pytest.param(None, id="soft")]


def _dev(backend: str) -> str:
    return backend_device(backend)


def _sj_if(v_reset, detach_reset, kind, alpha, v_threshold=1.0):
    fn = sj_surrogate(kind, alpha)
    return neuron.IFNode(v_threshold=v_threshold, v_reset=v_reset, surrogate_function=fn,
                         detach_reset=detach_reset, step_mode="m")


def if64(x, v_th, v_reset, detach_reset, kind, alpha):
    """IF in float64 with autograd, from SpikingJelly's definition: H = V + X. -> (S, H)."""
    return lif64(x, math.inf, False, v_th, v_reset, detach_reset, kind, alpha)


def _untied_current(shape, v_th, v_reset, seed, scale=0.9):
    """A random current whose float64 IF run has no H within the tie band of the threshold."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(64):
        x = (torch.randn(shape, generator=g) * scale + 0.3).float()
        _, h = if64(x.double(), v_th, v_reset, True, "atan", 2.0)
        if not bool(((h - v_th).abs() < 1e-5).any()):
            return x
    raise AssertionError("could not build a tie-free current")


# ---------------------------------------------------------------------------------------------
# bn_lif: the IF module (binslt.LIF(neuron="if"))
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_reset", RESETS)
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("kind, alpha", SURROGATES)
def test_if_module_matches_spikingjelly(backend, v_reset, detach_reset, kind, alpha):
    dev = _dev(backend)
    x = _untied_current((5, 3, 2, 7), 1.0, v_reset, seed=11)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    xo = x.clone().to(dev).requires_grad_()
    ours = binslt.LIF(neuron="if", v_reset=v_reset, detach_reset=detach_reset, surrogate=kind,
                      surrogate_alpha=alpha, backend=backend)(xo)
    xs = x.clone().requires_grad_()
    theirs = _sj_if(v_reset, detach_reset, kind, alpha)(xs)
    assert torch.equal(ours.detach().cpu(), theirs.detach())  # bit for bit
    assert 0 < theirs.sum() < theirs.numel()
    (gx,) = torch.autograd.grad(ours, xo, g.to(dev))
    (gs,) = torch.autograd.grad(theirs, xs, g)
    assert_close_rel(gx.cpu(), gs, 1e-6, f"IF grad vs SpikingJelly ({backend})")
    x64 = x.double().requires_grad_()
    s64, h64 = if64(x64, 1.0, v_reset, detach_reset, kind, alpha)
    assert_no_ties(h64, 1.0)
    assert torch.equal(ours.detach().cpu().double(), s64.detach())
    (g64,) = torch.autograd.grad(s64, x64, g.double())
    assert_close_rel(gx.cpu(), g64, 1e-5, f"IF grad vs float64 ({backend})")
    assert gx.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_if_module_bit_exact_on_a_long_sequence(backend):
    """Many steps of integration with no leak: the membrane keeps every input (soft reset keeps
    the remainder), so float32 rounding has the longest history to differ on."""
    x = torch.rand(32, 2, 300, generator=torch.Generator().manual_seed(5)) * 0.4
    for v_reset in (0.0, None, -0.25):
        ours = binslt.LIF(neuron="if", v_reset=v_reset, v_threshold=0.7, backend=backend)(
            x.to(_dev(backend)))
        theirs = _sj_if(v_reset, False, "sigmoid", 4.0, v_threshold=0.7)(x)
        assert torch.equal(ours.cpu(), theirs), v_reset
        assert theirs.sum() > 0


def test_if_is_not_lif_at_the_paper_decay():
    """IF is not LIF with lambda = 0.99: the data tells them apart (the test is not vacuous)."""
    x = torch.rand(32, 2, 300, generator=torch.Generator().manual_seed(5)) * 0.4
    lif = binslt.LIF(decay=0.99, decay_input=False, backend="torch")(x)
    assert not torch.equal(lif, binslt.LIF(neuron="if", backend="torch")(x))


# ---------------------------------------------------------------------------------------------
# The fused conv + IF training op, the inference op, real input (bn_lif): BinSpikeConv2d/Linear
# ---------------------------------------------------------------------------------------------


def _sj_conv_if(m: binslt.BinSpikeConv2d, v_reset, detach_reset, kind, alpha):
    conv = layer.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                        padding=m.padding, bias=False, step_mode="m")
    with torch.no_grad():
        conv.weight.copy_(m.effective_weight().detach().cpu())
    mods = [conv]
    if m.bn is not None:
        bn = layer.BatchNorm2d(m.out_channels, affine=False, step_mode="m")
        bn.load_state_dict(m.bn.state_dict())
        mods.append(bn)
    mods.append(_sj_if(v_reset, detach_reset, kind, alpha))
    return torch.nn.Sequential(*mods)


def _conv_if64(x, w_eff, m, bn_train, v_reset, detach_reset, kind, alpha):
    T, n = x.shape[:2]
    z = F.conv2d(x.flatten(0, 1), w_eff, stride=m.stride, padding=m.padding)
    if m.bn is not None:
        if bn_train:
            mu = z.mean(dim=(0, 2, 3), keepdim=True)
            var = ((z - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
            z = (z - mu) / torch.sqrt(var + m.bn.eps)
        else:
            mu = m.bn.running_mean.double().view(1, -1, 1, 1)
            var = m.bn.running_var.double().view(1, -1, 1, 1)
            z = (z - mu) / torch.sqrt(var + m.bn.eps)
    return if64(z.view(T, n, *z.shape[1:]), 1.0, v_reset, detach_reset, kind, alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("v_reset", RESETS)
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("kind, alpha", SURROGATES)
def test_conv_if_training_op(backend, bn, v_reset, detach_reset, kind, alpha):
    """The fused conv + IF op (autograd on): spikes as SpikingJelly's conv (+BN) + IFNode, and
    the input and score gradients as float64 maths."""
    dev = _dev(backend)
    torch.manual_seed(4)
    m = binslt.BinSpikeConv2d(5, 4, 3, 1, 1, prune_rate=0.4, bn=bn, neuron="if",
                              v_reset=v_reset, detach_reset=detach_reset, surrogate=kind,
                              surrogate_alpha=alpha, backend=backend)
    if not bn:
        with torch.no_grad():
            m.weight.mul_(2.0)
    g = torch.Generator().manual_seed(9)
    x = (torch.rand(3, 2, 5, 4, 4, generator=g) < 0.35).float()
    sj = _sj_conv_if(m, v_reset, detach_reset, kind, alpha)
    w_eff = m.effective_weight().detach().double().requires_grad_()
    m = m.to(dev)
    xo = x.clone().to(dev).requires_grad_()
    out = m(xo)
    functional.reset_net(sj)
    with torch.no_grad():
        theirs = sj(x)
    x64 = x.double().requires_grad_()
    s64, h64 = _conv_if64(x64, w_eff, m, True, v_reset, detach_reset, kind, alpha)
    assert_spikes_equal(out.detach().cpu(), theirs, h64, 1.0)
    assert_spikes_equal(out.detach().cpu(), s64.detach(), h64, 1.0)
    assert 0 < theirs.sum() < theirs.numel()
    gout = torch.randn(out.shape, generator=g)
    (out * gout.to(dev)).sum().backward()
    (s64 * gout.double()).sum().backward()
    assert_no_ties(h64, 1.0)
    assert_close_rel(xo.grad.cpu(), x64.grad, 1e-5, "IF conv input grad")
    w = m.weight.detach().cpu().double()
    s = m.scores.detach().cpu().double()
    assert_close_rel(m.scores.grad.cpu(), w_eff.grad * w * torch.sign(s), 1e-5,
                     "IF conv score grad")
    assert m.scores.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("v_reset", RESETS)
def test_conv_if_inference_op(backend, bn, v_reset):
    """Without autograd (packed inference on the kernel backends), in eval and in train mode."""
    dev = _dev(backend)
    torch.manual_seed(6)
    m = binslt.BinSpikeConv2d(33, 6, 3, 2, 1, prune_rate=0.5, bn=bn, neuron="if",
                              v_reset=v_reset, backend=backend)
    if bn:
        with torch.no_grad():
            m.bn.running_mean.uniform_(-0.5, 0.5)
            m.bn.running_var.uniform_(0.5, 2.0)
    else:
        with torch.no_grad():
            m.weight.mul_(2.0)
    x = (torch.rand(4, 2, 33, 7, 7, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    for train in (False, True):
        m.train(train)
        sj = _sj_conv_if(m, v_reset, False, "atan", 2.0)
        sj.train(train)
        functional.reset_net(sj)
        with torch.no_grad():
            ours = m.to(dev)(x.to(dev)).cpu()
            theirs = sj(x)
            _, h64 = _conv_if64(x.double(), m.effective_weight().detach().cpu().double(),
                                m.cpu(), train and bn, v_reset, False, "atan", 2.0)
        assert_spikes_equal(ours, theirs, h64, 1.0)
        assert 0 < theirs.sum() < theirs.numel()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_reset", RESETS)
def test_linear_and_real_input_if(backend, v_reset):
    """BinSpikeLinear (spikes in) and a real-input first conv (dense conv, then bn_lif)."""
    dev = _dev(backend)
    torch.manual_seed(2)
    lin = binslt.BinSpikeLinear(40, 9, prune_rate=0.3, neuron="if", v_reset=v_reset,
                                backend=backend)
    with torch.no_grad():
        lin.weight.mul_(2.0)
    x = (torch.rand(4, 3, 40, generator=torch.Generator().manual_seed(3)) < 0.3).float()
    fc = layer.Linear(40, 9, bias=False, step_mode="m")
    with torch.no_grad():
        fc.weight.copy_(lin.effective_weight().detach())
    sj = torch.nn.Sequential(fc, _sj_if(v_reset, False, "atan", 2.0))
    with torch.no_grad():
        z64 = F.linear(x.double(), lin.effective_weight().detach().double())
        _, h64 = if64(z64, 1.0, v_reset, False, "atan", 2.0)
        theirs = sj(x)
        ours = lin.to(dev)(x.to(dev)).cpu()
    assert_spikes_equal(ours, theirs, h64, 1.0)
    assert theirs.sum() > 0

    first = binslt.BinSpikeConv2d(3, 5, 3, 1, 1, prune_rate=0.3, input="real", neuron="if",
                                  v_reset=v_reset, backend=backend)
    img = torch.rand(1, 2, 3, 6, 6, generator=torch.Generator().manual_seed(4)).repeat(4, 1, 1, 1,
                                                                                          1)
    sj = _sj_conv_if(first, v_reset, False, "atan", 2.0)
    functional.reset_net(sj)
    with torch.no_grad():
        theirs = sj(img)
        ours = first.to(dev)(img.to(dev)).cpu()
        _, h64 = _conv_if64(img.double(), first.effective_weight().detach().cpu().double(),
                            first.cpu(), False, v_reset, False, "atan", 2.0)
    assert_spikes_equal(ours, theirs, h64, 1.0)
    assert theirs.sum() > 0


def test_bn_lif_op_with_tau_inf_is_if():
    """The op contract route: bn_lif with tau=inf and decay_input=False is IFNode exactly."""
    x = _untied_current((6, 2, 3, 5), 1.0, None, seed=3)
    one = torch.ones(3)
    for backend in ("torch", "cpu"):
        s, _, _ = ops.bn_lif(x, one, torch.zeros(3), None, tau=float("inf"), decay_input=False,
                             v_reset=None, backend=backend)
        assert torch.equal(s, _sj_if(None, False, "atan", 2.0)(x)), backend


# ---------------------------------------------------------------------------------------------
# The modules and the models
# ---------------------------------------------------------------------------------------------


def test_if_modules_repr_and_settings():
    m = binslt.BinSpikeConv2d(4, 3, 3, neuron="if", v_reset=None)
    assert "neuron=IF" in repr(m) and "tau=" not in repr(m)
    assert m.neuron.kwargs()["tau"] == float("inf") and m.neuron.kwargs()["decay_input"] is False
    rec = m.neuron.record()
    assert rec["neuron"] == "if" and "tau" not in rec and "decay_input" not in rec
    lif = binslt.BinSpikeLinear(4, 3)
    assert "neuron=IF" not in repr(lif) and lif.neuron.record()["neuron"] == "lif"
    lif.neuron.load_record(rec)  # a ticket's IF record turns a layer's settings into IF
    assert lif.neuron.neuron == "if" and lif.neuron.tau == float("inf")
    assert lif.neuron.v_reset is None
    with pytest.raises(KeyError):
        lif.neuron.load_record({"neuron": "lif", "v_threshold": 1.0})  # a LIF record needs tau


@pytest.mark.parametrize("variant", ["snn", "binwslt"])
@pytest.mark.parametrize("arch", ["conv4", "resnet19"])
def test_models_build_if(arch, variant):
    from binslt.nn import models as M

    m = M.build(arch, variant, num_classes=10, in_channels=1, input_size=8, timesteps=2,
                neuron="if", backend="torch")
    neurons = [mod.neuron for mod in m.modules() if isinstance(getattr(mod, "neuron", None),
                                                                binslt.nn.layers.NeuronConfig)]
    assert neurons and all(n.neuron == "if" and n.tau == float("inf") for n in neurons)
    assert m.build_config["neuron"] == "if" and m.build_config["tau"] is None
    import json

    again = M.build(**json.loads(json.dumps(m.build_config)))  # the saved config rebuilds it
    again.load_state_dict(m.state_dict())
    m.eval()
    again.eval()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(x), again(x))


# ---------------------------------------------------------------------------------------------
# The command line, results.json and the ticket: IF end to end, strict JSON everywhere
# ---------------------------------------------------------------------------------------------


def _strict_json(text: str):
    """json.loads that refuses Infinity / NaN, which are not JSON."""
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return __import__("json").loads(text, parse_constant=bad)


def test_cli_search_with_if_neurons(tmp_path):
    from binslt import cli
    from binslt.io import tickets

    out = tmp_path / "if-run"
    assert cli.main(["search", "--neuron", "if", "--train-subset", "64", "--test-subset", "32",
                     "--batch-size", "32", "--epochs", "1", "-T", "2", "--no-progress",
                     "--out", str(out)]) == 0
    res = _strict_json((out / "results.json").read_text())
    assert res["config"]["neuron"] == "if"
    assert res["config"]["decay"] is None and res["config"]["tau"] is None
    from safetensors import safe_open

    with safe_open(str(out / "ticket.safetensors"), "pt") as f:
        raw = f.metadata()  # the file's own strings
    layers = _strict_json(raw["layers"])
    assert any(rec.get("neuron", {}).get("neuron") == "if" for rec in layers.values())
    for v in raw.values():
        if v[:1] in "[{":
            _strict_json(v)
    m = tickets.load_ticket(out / "ticket.safetensors")
    spiking = [x for x in m.modules() if isinstance(x, (binslt.BinSpikeConv2d,
                                                         binslt.BinSpikeLinear))]
    assert spiking and all(x.neuron.neuron == "if" and x.neuron.tau == float("inf")
                           for x in spiking)


def test_cli_if_refuses_leak_options(capsys):
    from binslt import cli

    p = cli.build_parser()  # --decay is kept (and replaces the default tau), --tau likewise
    assert cli.explicit_options(p.parse_args(["search", "--decay", "0.9"])) == dict(
        decay=0.9, tau=None)
    assert cli.explicit_options(p.parse_args(["search", "--tau", "3"])) == dict(
        tau=3.0, decay=None)
    assert cli.explicit_options(p.parse_args(["search", "--neuron", "if"])) == dict(
        neuron="if", decay=None, tau=None)

    assert cli.main(["search", "--neuron", "if", "--decay", "0.9"]) == 2
    assert "--neuron if has no leak (H = V + X): drop --decay, --tau and --decay-input" in (
        capsys.readouterr().err)
    assert cli.main(["search", "--neuron", "if", "--decay-input"]) == 2
    assert "--neuron if has no leak" in capsys.readouterr().err
