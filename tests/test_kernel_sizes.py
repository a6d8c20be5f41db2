"""The kernel sizes and strides of SpikingJelly's zoo beyond 3x3: a 7x7 stride-2 stem on real
images (ResNet's ``conv1``) and 1x1 stride-2 convs on spikes (the downsample shortcut, here as a
fused spiking layer as in SEW ResNet), with and without BN and a residual current.

Each backend's BinSpikeConv2d is held to an independent float64 layer (helpers.layer64): spikes
equal outside the tie band, gradients of the input, the scores and the residual within 1e-5
(normwise), BN running statistics. Backends: the reference ('torch'), the C++ CPU kernels,
Triton under the interpreter (smallest shapes) and, with a GPU, CUDA and Triton.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close_rel, assert_no_ties, assert_spikes_equal, layer64, stable_seed

from binslt import BinSpikeConv2d

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: (backend, device) of every backend; tests/test_zoo.py runs its zoo-block search step on these
BACKENDS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interpreter", marks=pytest.mark.skipif(
        not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", id="triton-gpu", marks=pytest.mark.gpu),
]

# (name, C_in, C_out, kernel, stride, padding, input kind, H=W); the smallest shapes that still
# give the kernels several output positions per row and a partial last tile
GEOMETRIES = {
    "stem7x7s2": (3, 5, 7, 2, 3, "real", 9),
    "shortcut1x1s2": (6, 7, 1, 2, 0, "spike", 7),
}
NEURON = dict(tau=2.0, decay_input=True, v_threshold=0.5, v_reset=0.0, detach_reset=True,
              surrogate="atan", surrogate_alpha=2.0)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("bn", [False, True], ids=["nobn", "bn"])
@pytest.mark.parametrize("geom", sorted(GEOMETRIES))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernel_size_and_stride_exact(backend, device, geom, bn, residual):
    ci, co, k, stride, pad, kind, hw = GEOMETRIES[geom]
    T, n = 3, 2
    torch.manual_seed(stable_seed((geom, bn, residual)))
    layer = BinSpikeConv2d(ci, co, k, stride, pad, prune_rate=0.4, bn=bn, input=kind,
                           backend=backend, **NEURON).to(device)
    if kind == "real":
        x = torch.rand(T, n, ci, hw, hw) * 2
    else:
        x = (torch.rand(T, n, ci, hw, hw) < 0.4).float()
    ho = (hw + 2 * pad - k) // stride + 1
    r = torch.randn(T, n, co, ho, ho) * 0.5 if residual else None
    w_eff = layer.effective_weight().detach().double().cpu()
    if not bn:  # no BN before the neuron: scale the current into the firing range
        layer.weight.data.mul_(4.0)
        layer.train()  # drops the packing cache after the .data write
        w_eff = layer.effective_weight().detach().double().cpu()
    x64 = x.double().requires_grad_(True)
    r64 = r.double().requires_grad_(True) if residual else None
    s64, h64 = layer64(x64, w_eff, stride=stride, padding=pad, bn=bn, residual=r64, **NEURON)
    assert_no_ties(h64.detach(), NEURON["v_threshold"])
    xd = x.to(device).requires_grad_(True)
    rd = r.to(device).requires_grad_(True) if residual else None
    s = layer(xd, residual=rd)
    assert_spikes_equal(s.detach().cpu(), s64.detach().float(), h64.detach(),
                        NEURON["v_threshold"])
    assert 0.02 < float(s.detach().mean()) < 0.98, f"fires at rate {float(s.detach().mean()):.3f}"
    g = torch.randn(s.shape)
    s.backward(g.to(device))
    s64.backward(g.double())
    assert_close_rel(xd.grad.cpu(), x64.grad, 1e-5, "grad_x")
    if residual:
        assert_close_rel(rd.grad.cpu(), r64.grad, 1e-5, "grad_residual")
    # the scores' gradient: dL/dW_eff * w * sign(s) (biprop's straight-through rule)
    w64 = w_eff.clone().requires_grad_(True)
    s64b, _ = layer64(x.double(), w64, stride=stride, padding=pad, bn=bn,
                      residual=r.double() if residual else None, **NEURON)
    s64b.backward(g.double())
    w = layer.weight.detach().double().cpu()
    expected = w64.grad * w * torch.sign(layer.scores.detach().double().cpu())
    assert_close_rel(layer.scores.grad.cpu(), expected, 1e-5, "grad_scores")
    if bn:
        z = torch.nn.functional.conv2d(x.double().flatten(0, 1), w_eff, stride=stride,
                                       padding=pad)
        mean = z.mean(dim=(0, 2, 3))
        var = z.var(dim=(0, 2, 3), unbiased=True)
        torch.testing.assert_close(layer.bn.running_mean.cpu().double(), 0.1 * mean,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.bn.running_var.cpu().double(), 0.9 + 0.1 * var,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("geom", sorted(GEOMETRIES))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernel_size_and_stride_eval_and_frozen(backend, device, geom):
    """Eval mode (BN folded) and the frozen, bit-packed inference path agree with the float64
    layer too."""
    ci, co, k, stride, pad, kind, hw = GEOMETRIES[geom]
    torch.manual_seed(stable_seed(("eval", geom)))
    layer = BinSpikeConv2d(ci, co, k, stride, pad, prune_rate=0.3, bn=True, bn_affine=True,
                           input=kind, backend=backend, **NEURON).to(device)
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.2, 0.4)
        layer.bn.running_mean.uniform_(-0.5, 0.5)
        layer.bn.running_var.uniform_(0.5, 2.0)
    layer.eval()
    x = (torch.rand(3, 2, ci, hw, hw) * 2 if kind == "real"
         else (torch.rand(3, 2, ci, hw, hw) < 0.4).float())
    bn = layer.bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().cpu()
    shift = (bn.bias.detach().double().cpu() - bn.running_mean.double().cpu() * scale)
    w_eff = layer.effective_weight().detach().double().cpu()
    z = torch.nn.functional.conv2d(x.double().flatten(0, 1), w_eff, stride=stride, padding=pad)
    z = z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    from helpers import lif64

    s64, h64 = lif64(z.view(3, 2, *z.shape[1:]), NEURON["tau"], NEURON["decay_input"],
                     NEURON["v_threshold"], NEURON["v_reset"], True, "atan", 2.0)
    with torch.no_grad():
        s = layer(x.to(device))
    assert_spikes_equal(s.cpu(), s64.float(), h64, NEURON["v_threshold"])
    assert 0.02 < float(s.mean()) < 0.98
    layer.mode = "frozen"
    with torch.no_grad():
        s_frozen = layer(x.to(device))
    assert_spikes_equal(s_frozen.cpu(), s64.float(), h64, NEURON["v_threshold"])
