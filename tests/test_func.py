"""torch.func over binslt layers: the autograd Functions in the ``setup_context`` form,
``grad`` over a layer's scores equal to autograd's, ``vmap`` over inputs (folded into the
kernels' batch where exact, once per entry elsewhere) and per-sample gradients, and the clear
error where vmap cannot go (a BatchNorm's running statistics)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch.func import functional_call, grad, vmap

import binslt
from binslt.nn import models
from binslt.ops import autograd as A
from binslt.ops import reference as ref
from binslt.ops import weights as W

FUNCTIONS = [A.ConvLIF, A.BNLIF, A.SpikePool, W._MaskedSignSearchPacked, ref._SpikeFn,
             ref._ApproxSign, ref._MaskedSignSearch, ref._MaskedSignFinetune]
BACKENDS = ["cpu", "torch"]


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_autograd_functions_use_setup_context(fn):
    assert "ctx" not in inspect.signature(fn.forward).parameters
    assert "setup_context" in fn.__dict__
    assert fn.generate_vmap_rule


def test_autograd_functions_bind_arguments_without_rebuilding_the_signature(monkeypatch):
    """``apply`` binds each call's arguments to ``forward``'s signature: binslt's Functions carry
    it (``binslt.ops.function.Function``), so no call rebuilds it (``inspect`` counted), and the
    carried signature has the function's own parameters and defaults (read from its code)."""
    from binslt.ops.function import Function

    assert all(issubclass(fn, Function) for fn in FUNCTIONS)
    for fn in FUNCTIONS:
        f = fn.__dict__["forward"].__func__
        code = f.__code__
        assert tuple(f.__signature__.parameters) == code.co_varnames[:code.co_argcount]
        assert tuple(p.default for p in f.__signature__.parameters.values()
                     if p.default is not p.empty) == (f.__defaults__ or ())
    built = []
    real = inspect._signature_from_function
    monkeypatch.setattr(inspect, "_signature_from_function",
                        lambda *a, **k: built.append(a[1]) or real(*a, **k))
    for backend in BACKENDS:
        for layer, x in _layers(backend).values():
            layer(x).sum().backward()
    assert built == []


def _spikes(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) > 0.5).float()


def _layers(backend):
    """Layers covering the autograd Functions: a spike conv with 2x2 pooling and training BN
    (ConvLIF, the fused pool on the CPU / SpikePool), a real-input conv (BNLIF) and a spike
    linear layer."""
    torch.manual_seed(0)
    return {
        "conv_pool_bn": (binslt.BinSpikeConv2d(3, 4, 3, padding=1, pool=2, bn=True,
                                               backend=backend), _spikes(2, 3, 3, 6, 6)),
        "real_conv": (binslt.BinSpikeConv2d(2, 4, 3, padding=1, input="real",
                                            backend=backend),
                      torch.randn(2, 3, 2, 5, 5)),
        "linear": (binslt.BinSpikeLinear(40, 6, backend=backend), _spikes(2, 5, 40)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["conv_pool_bn", "real_conv", "linear"])
def test_func_grad_over_scores_matches_autograd(backend, name):
    layer, x = _layers(backend)[name]
    params = {k: v.detach() for k, v in layer.named_parameters()}
    buffers = {k: v.clone() for k, v in layer.named_buffers()}

    def loss(scores):
        state = {**params, **{k: v.clone() for k, v in buffers.items()}, "scores": scores}
        out = functional_call(layer, state, (x,))
        return (out * torch.linspace(0, 1, out.numel()).view_as(out)).sum()

    g = grad(loss)(params["scores"])
    loss(layer.scores).backward()
    assert torch.equal(g, layer.scores.grad)
    assert bool(g.abs().sum() > 0)


def test_func_grad_over_a_networks_scores_matches_autograd():
    torch.manual_seed(0)
    net = models.build("conv4", "binwslt", num_classes=10, in_channels=1, input_size=8,
                       timesteps=2)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    scores = {k: v.detach() for k, v in net.named_parameters() if k.endswith("scores")}
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}

    def loss(s):  # (BN updates its running statistics: a copy made inside the transform)
        state = {**params, **{k: v.clone() for k, v in buffers.items()}, **s}
        return torch.nn.functional.cross_entropy(functional_call(net, state, (x,)), y)

    g = grad(loss)(scores)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    for k, p in net.named_parameters():
        if k in scores:
            assert torch.equal(g[k], p.grad), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", [True, False], ids=["autograd_on", "no_grad"])
def test_vmap_over_inputs_of_an_eval_layer(backend, grad_mode):
    """Eval BN: the vmapped inputs fold into the kernels' batch (no warning about a missing
    batching rule); the result is the per-entry loop's."""
    torch.manual_seed(0)
    layer = binslt.BinSpikeConv2d(2, 4, 3, padding=1, bn=True, backend=backend)
    layer.bn.running_var.fill_(0.02)  # so that the layer fires
    layer.eval()
    xb = _spikes(3, 2, 2, 2, 6, 6)
    with torch.set_grad_enabled(grad_mode), warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "we have not yet implemented the batching rule"
        got = vmap(layer)(xb)
        want = torch.stack([layer(xi) for xi in xb])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert bool(want.any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_a_training_layer_runs_each_entry_with_its_own_batch_statistics(backend):
    torch.manual_seed(0)
    layer = binslt.BinSpikeConv2d(2, 4, 3, padding=1, bn=True, backend=backend).train()
    layer.bn.track_running_stats = False  # batch statistics, no running ones to update
    xb = _spikes(3, 2, 2, 2, 6, 6)
    got = vmap(layer)(xb)
    want = torch.stack([layer(xi) for xi in xb])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_score_gradients_with_vmap_of_grad(backend):
    torch.manual_seed(0)
    layer = binslt.BinSpikeConv2d(2, 4, 3, padding=1, backend=backend)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    xb = _spikes(3, 2, 2, 2, 6, 6)

    def loss(scores, x):
        return functional_call(layer, {**params, "scores": scores}, (x,)).sum()

    got = vmap(grad(loss), in_dims=(None, 0))(params["scores"], xb)
    want = torch.stack([grad(loss)(params["scores"], xi) for xi in xb])
    # the kernels are exact; the reference's batched conv may round differently
    atol = 0 if backend == "cpu" else 1e-5
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert bool(want.abs().sum() > 0)


def test_vmap_cannot_update_batchnorm_running_statistics():
    layer = binslt.BinSpikeConv2d(2, 4, 3, padding=1, bn=True).train()
    with pytest.raises(NotImplementedError, match="running statistics.*model.eval()"):
        vmap(layer)(_spikes(3, 2, 2, 2, 6, 6))


def test_vmap_rules_of_the_ops_match_a_loop():
    """pack_spikes / bconv_lif fold the vmapped dim; topk_mask runs once per entry."""
    x = _spikes(4, 6, 40, 3, 3)
    got = vmap(torch.ops.binslt.pack_spikes)(x)
    assert torch.equal(got, torch.stack([torch.ops.binslt.pack_spikes(xi) for xi in x]))
    s = torch.randn(3, 5, 7)
    got = vmap(lambda t: torch.ops.binslt.topk_mask(t, 12))(s)
    assert torch.equal(got, torch.stack([torch.ops.binslt.topk_mask(t, 12) for t in s]))
