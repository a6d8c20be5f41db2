"""Public modules: validation, modes, backends and op registration."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel

import binslt
from binslt.ops import reference as ref


def _spikes(*shape, p=0.3):
    return (torch.rand(*shape) < p).float()


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.rand(2, 4, 6, 6).round(), "rank 5"),
    (lambda: _spikes(2, 1, 3, 6, 6), "4 channels"),
    (lambda: torch.rand(2, 1, 4, 6, 6), "binary spikes"),
    (lambda: (torch.rand(2, 1, 4, 6, 6) < 0.5).int(), "floating-point"),
    (lambda: torch.full((2, 1, 4, 6, 6), float("nan")), "binary spikes"),
    (lambda: _spikes(2, 1, 4, 1, 1), "smaller than the kernel"),
    (lambda: _spikes(0, 2, 4, 6, 6), r"at least one time step T at dim 0 of \[T, N, C, H, W\]"),
])
def test_conv_rejects_bad_input(bad, match):
    m = binslt.BinSpikeConv2d(4, 3, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        m(bad())


def test_real_input_rejects_nan_and_bad_residual():
    m = binslt.BinSpikeConv2d(3, 4, 3, padding=1, input="real")
    x = torch.randn(2, 1, 3, 5, 5)
    x[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m(x)
    with pytest.raises(ValueError, match="residual must have shape"):
        m(torch.randn(2, 1, 3, 5, 5), residual=torch.randn(2, 1, 4, 4, 4))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("grad", [True, False])
def test_nonfinite_residual_is_rejected(value, grad):
    """The residual check (one aminmax pass) catches NaN, +inf and -inf anywhere, with and
    without autograd (the no-grad inference path too)."""
    m = binslt.BinSpikeConv2d(4, 3, 3, padding=1).eval()
    x = _spikes(2, 1, 4, 5, 5)
    r = torch.zeros(2, 1, 3, 5, 5)
    r[1, 0, 2, 4, 3] = float(value)
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="residual contains NaN or inf"):
        m(x, residual=r)
    r[1, 0, 2, 4, 3] = 1e30  # large but finite is accepted
    with torch.set_grad_enabled(grad):
        m(x, residual=r)


def test_frozen_1x1_layer_gives_contiguous_output():
    """A frozen 1x1 BinConv2d (a ResNet shortcut) unpacks its weight with standard strides, so its
    convolution output is NCHW-contiguous (a channels-last one cost every later layer a copy)."""
    torch.manual_seed(0)
    m = binslt.BinConv2d(8, 16, 1, stride=2)
    binslt.models.set_mode(m, "frozen")
    w = m.effective_weight()
    assert w.stride() == (8, 1, 1, 1)
    with torch.no_grad():
        y = m(_spikes(2, 3, 8, 6, 6))
    assert y.shape == (2, 3, 16, 3, 3) and y.is_contiguous()


def test_pointwise_conv_products_match_float64():
    """The 1x1 training conv's matrix products (binary._PointwiseConv: a ResNet shortcut) against
    torch.autograd.gradcheck in float64: stride 1, 2 and 3 over even and odd maps."""
    from binslt.nn.binary import _PointwiseConv

    g = torch.Generator().manual_seed(3)
    for stride, h, w in ((1, 4, 3), (2, 5, 6), (2, 4, 4), (3, 7, 5)):
        x = torch.rand(2, 3, h, w, generator=g, dtype=torch.float64).requires_grad_()
        wt = torch.randn(4, 3, 1, 1, generator=g, dtype=torch.float64).requires_grad_()
        y = _PointwiseConv.apply(x, wt, stride)
        assert torch.allclose(y, torch.nn.functional.conv2d(x, wt, stride=stride), atol=1e-12)
        assert torch.autograd.gradcheck(lambda a, b, s=stride: _PointwiseConv.apply(a, b, s),
                                        (x, wt))


@pytest.mark.parametrize("stride,hw,binary,bn", [(1, 5, True, True), (2, 7, True, True),
                                                 (2, 6, False, False), (3, 8, True, False)])
def test_bin_conv_1x1_training_matches_float_conv(stride, hw, binary, bn, monkeypatch):
    """BinConv2d with a 1x1 kernel in training (spikes saved as bits, the conv as matrix
    products) gives the output, input gradient and score gradient of the same layer run through
    F.conv2d, within float32 rounding; its output against float64 too."""
    from binslt.nn import binary

    torch.manual_seed(stride * 10 + hw)
    x = torch.rand(3, 2, 5, hw, hw)
    x = (x < 0.4).float() if binary else x
    runs = []
    for conv in (binary._conv, lambda a, b, s, p: torch.nn.functional.conv2d(a, b, stride=s,
                                                                            padding=p)):
        monkeypatch.setattr(binary, "_conv", conv)
        torch.manual_seed(1)
        m = binslt.BinConv2d(5, 7, 1, stride=stride, bn=bn).train()
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        runs.append((y.detach(), xi.grad, m.scores.grad, m.effective_weight().detach()))
    (y0, gx0, gs0, w), (y1, gx1, gs1, _) = runs
    for a, b, what in ((y0, y1, "output"), (gx0, gx1, "input gradient"),
                       (gs0, gs1, "score gradient")):
        assert_close_rel(a, b, 1e-5, what)
    if not bn:
        y64 = torch.nn.functional.conv2d(x.flatten(0, 1).double(), w.double(), stride=stride)
        assert torch.allclose(y0.flatten(0, 1).double(), y64, rtol=1e-6, atol=1e-6)


def test_device_mismatch_is_reported():
    m = binslt.BinSpikeConv2d(4, 3, 3)
    with pytest.raises(ValueError, match="layer's weights are on"):
        m(torch.zeros(2, 1, 4, 6, 6, device="meta"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prune_rate=1.0), "prune_rate"),
    (dict(prune_rate=-0.1), "prune_rate"),
    (dict(surrogate="relu"), "surrogate"),
    (dict(input="image"), "input"),
    (dict(backend="gpu"), "backend"),
    (dict(tau=0.5), "tau"),
])
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        binslt.BinSpikeConv2d(4, 3, 3, **kwargs)


# ----------------------------------------------------------------- torch.nn.Conv2d's options


@pytest.mark.parametrize("cls", [binslt.BinSpikeConv2d, binslt.BinConv2d])
def test_convs_take_torch_conv2d_options_at_their_one_value(cls):
    """dilation=1, groups=1, bias=False, padding_mode='zeros', padding='same' / 'valid' as
    torch.nn.Conv2d spells them: the same layer as the int padding (same parameters, same
    output), the output shape torch's own conv gives."""
    x = _spikes(2, 3, 4, 7, 7)
    for k, padding, as_int in [(3, "same", 1), (5, "same", 2), (1, "same", 0), (3, "valid", 0)]:
        torch.manual_seed(0)
        a = cls(4, 6, k, 1, padding, 1, 1, False, "zeros", bn=True)
        torch.manual_seed(0)
        b = cls(4, 6, k, padding=as_int, bn=True)
        assert a.padding == as_int
        ya, yb = a(x), b(x)
        assert torch.equal(ya, yb)
        want = torch.nn.Conv2d(4, 6, k, padding=padding)(x[0]).shape[-2:]
        assert ya.shape[-2:] == want, (k, padding)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dilation=2), "dilation=1 only"),
    (dict(dilation=(1, 2)), "dilation must be an int or a square pair"),
    (dict(groups=2), "groups=1 only"),
    (dict(bias=True), r"no bias \(bias=False only\)"),
    (dict(padding_mode="reflect"), "padding_mode='zeros' only"),
    (dict(padding="same", stride=2), "needs stride=1"),
    (dict(padding="full"), "'same' or 'valid'"),
])
@pytest.mark.parametrize("cls", [binslt.BinSpikeConv2d, binslt.BinConv2d])
def test_convs_refuse_the_torch_options_they_do_not_compute(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(4, 3, 3, **kwargs)
    with pytest.raises(ValueError, match="even kernel_size=2"):
        cls(4, 3, 2, padding="same")


@pytest.mark.parametrize("cls", [binslt.BinSpikeLinear, binslt.BinLinear])
def test_linears_take_bias_false_only(cls):
    assert cls(4, 3, False).out_features == 3
    with pytest.raises(ValueError, match="no bias"):
        cls(4, 3, bias=True)


# ----------------------------------------------------- SpikingJelly surrogate objects


@pytest.mark.parametrize("kind,alpha", [("atan", 3.0), ("sigmoid", 2.5), ("rect", 0.7),
                                        ("piecewise_quadratic", 1.3)])
def test_layers_take_spikingjelly_surrogate_objects(kind, alpha):
    """``surrogate=surrogate.Rect(alpha=0.7)`` is ``surrogate='rect', surrogate_alpha=0.7``, and
    the LIF built from it gives SpikingJelly's LIFNode's spikes and gradient with that object."""
    from helpers import sj_modules, sj_surrogate

    (neuron,) = sj_modules("neuron")
    obj = sj_surrogate(kind, alpha)
    lif = binslt.LIF(tau=2.5, surrogate=obj, v_reset=None)
    assert (lif.neuron.surrogate, lif.neuron.surrogate_alpha) == (kind, alpha)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 3, 14, generator=g) * 1.2 + 0.3).requires_grad_()
    gy = torch.randn(x.shape, generator=g)
    ours = lif(x)
    xs = x.detach().clone().requires_grad_()
    theirs = neuron.LIFNode(tau=2.5, surrogate_function=obj, v_reset=None, step_mode="m")(xs)
    assert torch.equal(ours.detach(), theirs.detach())
    (go,) = torch.autograd.grad(ours, x, gy)
    (gt,) = torch.autograd.grad(theirs, xs, gy)
    assert_close_rel(go, gt, 1e-6, kind)

    for cls, args in [(binslt.BinSpikeConv2d, (4, 6, 3)), (binslt.BinSpikeLinear, (4, 6))]:
        torch.manual_seed(0)
        a = cls(*args, surrogate=obj, bn=True)
        torch.manual_seed(0)
        b = cls(*args, surrogate=kind, surrogate_alpha=alpha, bn=True)
        assert a.neuron.kwargs() == b.neuron.kwargs()
        assert cls(*args, surrogate=obj, surrogate_alpha=alpha).neuron.surrogate_alpha == alpha


def test_spikingjelly_surrogate_objects_binslt_cannot_run_are_refused():
    from helpers import sj_modules

    (surrogate,) = sj_modules("surrogate")
    with pytest.raises(ValueError, match="disagrees with the surrogate object's alpha=4.0"):
        binslt.LIF(surrogate=surrogate.ATan(alpha=4.0), surrogate_alpha=2.0)
    with pytest.raises(ValueError, match="non-spiking mode"):
        binslt.BinSpikeConv2d(4, 3, 3, surrogate=surrogate.ATan(spiking=False))
    with pytest.raises(ValueError, match="SoftSign has no binslt kernel"):
        binslt.BinSpikeLinear(4, 3, surrogate=surrogate.SoftSign())
    with pytest.raises(ValueError, match="or a SpikingJelly surrogate object"):
        binslt.LIF(surrogate=torch.nn.ReLU())


def test_linear_rejects_bad_input():
    m = binslt.BinSpikeLinear(5, 3)
    with pytest.raises(ValueError, match="rank 3"):
        m(_spikes(2, 5))
    with pytest.raises(ValueError, match="binary spikes"):
        m(torch.rand(2, 1, 5) + 0.1)
    with pytest.raises(ValueError, match="at least one time step"):
        m(_spikes(0, 2, 5))


def test_unknown_backend_context_rejected():
    with pytest.raises(ValueError, match="backend"):
        with binslt.use_backend("fast"):
            pass


# ----------------------------------------------------------------------------- modes


def test_finetune_mode_trains_weights_with_fixed_mask():
    torch.manual_seed(0)
    m = binslt.BinSpikeConv2d(6, 4, 3, padding=1, prune_rate=0.5, backend="torch")
    mask_before = (m.effective_weight() != 0)
    m.mode = "finetune"
    assert m.weight.requires_grad and not m.scores.requires_grad
    x = _spikes(2, 2, 6, 5, 5)
    (m(x) * torch.randn(2, 2, 4, 5, 5)).sum().backward()
    assert m.weight.grad is not None and m.scores.grad is None
    # straight-through: dL/dw = dL/dW_eff * M, so pruned weights get exactly zero gradient
    assert torch.all(m.weight.grad[~mask_before] == 0)
    with torch.no_grad():
        m.scores.copy_(torch.randn_like(m.scores))  # scores no longer matter
    assert torch.equal(m.effective_weight() != 0, mask_before)


def test_frozen_mode_matches_search_output_and_roundtrips_state_dict():
    torch.manual_seed(1)
    m = binslt.BinSpikeConv2d(33, 5, 3, padding=1, prune_rate=0.6, bn=True).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    x = _spikes(2, 2, 33, 6, 6)
    with torch.no_grad():
        before = m(x)
        w_before = m.effective_weight().clone()
    m.mode = "frozen"
    with torch.no_grad():
        after = m(x)
    assert torch.equal(before, after)
    assert torch.allclose(m.effective_weight(), w_before, rtol=1e-6, atol=0)
    sd = m.state_dict()
    m2 = binslt.BinSpikeConv2d(33, 5, 3, padding=1, prune_rate=0.6, bn=True).eval()
    m2.load_state_dict(sd)
    assert m2.mode == "frozen"
    with torch.no_grad():
        assert torch.equal(m2(x), before)
    with pytest.raises(RuntimeError, match="frozen"):
        m.mode = "search"


def test_bad_mode_rejected():
    m = binslt.BinSpikeLinear(4, 2)
    with pytest.raises(ValueError, match="mode"):
        m.mode = "train"


def test_weight_can_be_copied_into():
    m = binslt.BinSpikeConv2d(2, 2, 1, prune_rate=0.0)
    w = torch.tensor([[1.0, -2.0], [-3.0, 4.0]]).view(2, 2, 1, 1)
    with torch.no_grad():
        m.weight.copy_(w)
    assert torch.equal(m.effective_weight(), torch.sign(w) * 2.5)


# ----------------------------------------------------------------------------- backends / ops


def test_backends_report():
    b = binslt.backends()
    assert set(b) == {"torch", "cpu", "triton", "cuda"}
    for v in b.values():
        assert set(v) == {"built", "usable", "reason"}
        assert isinstance(v["reason"], str) and v["reason"]
    assert b["torch"]["usable"]


def test_use_backend_overrides_auto():
    m = binslt.BinSpikeConv2d(4, 3, 3, padding=1, backend="auto")
    x = _spikes(2, 1, 4, 5, 5)
    with binslt.use_backend("torch"):
        a = m(x)
        assert binslt.ops.resolve_backend("auto", x.device) == "torch"
    b = m(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("make, shape", [
    (lambda: binslt.BinSpikeConv2d(4, 3, 3, padding=1, bn=True), (2, 1, 4, 5, 5)),
    (lambda: binslt.BinSpikeConv2d(4, 3, 3, padding=1, bn=True, input="real"), (2, 1, 4, 5, 5)),
    (lambda: binslt.BinSpikeLinear(5, 3, bn=True), (2, 3, 5)),
])
def test_layer_call_resolves_its_backend_once(monkeypatch, make, shape, grad):
    """One layer call: the backend is resolved once (the ops call gets it), whatever the path
    (autograd, packed inference, real input), and the BN running statistics move once."""
    m = make()
    calls = []
    real = binslt.ops.backend.resolve_backend
    monkeypatch.setattr(binslt.ops.backend, "resolve_backend",
                        lambda b, d: calls.append(b) or real(b, d))
    x = _spikes(*shape) if m.input == "spike" else torch.rand(*shape)
    m.packed_weight()  # the packing cache is filled outside the counted call
    calls.clear()
    before = m.bn.num_batches_tracked.item()
    with torch.set_grad_enabled(grad):
        m(x)
    assert calls == ["auto"]
    assert m.bn.num_batches_tracked.item() == before + 1


def test_ops_reach_the_dispatcher_and_pass_opcheck():
    x = _spikes(6, 33, 4, 5)
    packed = torch.ops.binslt.pack_spikes(x)
    assert torch.equal(packed, ref.pack_spikes_reference(x))
    torch.library.opcheck(torch.ops.binslt.pack_spikes.default, (x,))
    torch.library.opcheck(torch.ops.binslt.unpack_spikes.default, (packed, 33))
    z = torch.randn(3, 2, 4, 5)
    one = torch.ones(4)
    torch.library.opcheck(torch.ops.binslt.bn_lif.default,
                          (z, one, torch.zeros(4), None, True, 1e-5, 2.0, True, 1.0, 0.0))


def test_lif_module_shapes_and_errors():
    lif = binslt.LIF(decay=0.9)
    x = torch.randn(3, 2, 5)
    assert lif(x).shape == x.shape
    with pytest.raises(ValueError, match="multi-step"):
        lif(torch.randn(5))
    with pytest.raises(ValueError, match="NaN"):
        lif(torch.tensor([[float("nan")], [0.0]]))


def test_spike_maxpool():
    pool = binslt.SpikeMaxPool2d(2)
    x = _spikes(2, 3, 4, 6, 6)
    y = pool(x)
    assert y.shape == (2, 3, 4, 3, 3)
    assert torch.equal(y, torch.nn.functional.max_pool2d(x.flatten(0, 1), 2).view(2, 3, 4, 3, 3))


def test_sign_activation_approxsign_backward():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0], requires_grad=True)
    y = binslt.SignActivation()(x)
    assert y.tolist() == [-1, -1, 1, 1, 1]
    y.sum().backward()
    assert torch.allclose(x.grad, 2 * (1 - x.detach().clamp(-1, 1).abs()))


def test_no_grad_packed_path_follows_score_updates():
    """Eval calls reuse the cached packing, which an in-place score update must invalidate."""
    torch.manual_seed(4)
    m = binslt.BinSpikeConv2d(33, 6, 3, padding=1, prune_rate=0.5, bn=True).eval()
    x = _spikes(2, 2, 33, 6, 6)
    opt = torch.optim.SGD([m.scores], lr=10.0)
    for _ in range(2):
        with torch.no_grad():
            fast = m(x)
            with binslt.use_backend("torch"):
                slow = m(x)
        assert torch.equal(fast, slow)
        m.train()
        m(x).sum().backward()
        opt.step()
        opt.zero_grad()
        m.eval()
    w_before = m.effective_weight().detach().clone()
    with torch.no_grad():
        m.scores.copy_(-m.scores.flip(0))
    assert not torch.equal(m.effective_weight(), w_before)
    with torch.no_grad():
        fast = m(x)
        with binslt.use_backend("torch"):
            slow = m(x)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("affine", [False, True])
def test_eval_bn_affine_cache_follows_updates(affine):
    """Eval calls fold the BatchNorm into an affine on every call: in-place changes of a running
    statistic or of the BN parameters (also through ``.data``, which version counters do not
    see) and a state_dict load all reach the output."""
    torch.manual_seed(6)
    m = binslt.BinSpikeConv2d(8, 5, 3, padding=1, bn=True, bn_affine=affine, tau=100.0,
                              decay_input=False).eval()
    x = _spikes(3, 2, 8, 5, 5, p=0.4)

    def expected():
        bn = m.bn
        w = bn.weight if affine else torch.ones(5)
        b = bn.bias if affine else torch.zeros(5)
        scale = w / torch.sqrt(bn.running_var + bn.eps)
        with binslt.use_backend("torch"), torch.no_grad():
            return ref.conv_lif_reference(
                x, m.effective_weight(), padding=1, scale=scale.detach(),
                shift=(b - bn.running_mean * scale).detach(), tau=100.0, decay_input=False)

    updates = [lambda bn: bn.running_mean.add_(0.3), lambda bn: bn.running_var.mul_(0.25)]
    if affine:
        updates += [lambda bn: bn.weight.data.mul_(-1.5), lambda bn: bn.bias.add_(0.4)]
    with torch.no_grad():
        first = m(x)
        assert torch.equal(first, expected())
        for upd in updates:
            upd(m.bn)
            out = m(x)
            assert torch.equal(out, expected())
        state = {k: v.clone() for k, v in m.state_dict().items()}
        state["bn.running_mean"] = torch.full((5,), -0.2)
        m.load_state_dict(state)
        assert torch.equal(m(x), expected())
        assert not torch.equal(m(x), first)


def test_frozen_weight_cache_follows_the_planes():
    """A frozen layer's no-grad calls keep its unpacked W_eff: an in-place change of a bit plane
    or of the gain, a state_dict load, and train()/eval() after a .data write all reach the
    output, which is the dense product with the planes unpacked afresh each time."""
    torch.manual_seed(8)
    m = binslt.BinLinear(40, 6).eval()
    m.mode = "frozen"
    x = torch.randn(5, 40)

    def expected():
        w = ref.unpack_weight_reference(m.w_mask_bits, m.w_pos_bits, 40, m.alpha)
        return x @ w.view(6, 40).T

    with torch.no_grad():
        first = m(x)
        assert torch.equal(first, expected())
        assert m._frozen_weight() is m._frozen_weight()  # kept between calls
        m.w_pos_bits.bitwise_xor_(0b1011)  # flip some signs
        assert not torch.equal(m(x), first) and torch.equal(m(x), expected())
        m.alpha.mul_(2.0)
        assert torch.equal(m(x), expected())
        state = {k: v.clone() for k, v in m.state_dict().items()}
        state["w_mask_bits"] = torch.zeros_like(state["w_mask_bits"])
        m.load_state_dict(state)
        assert torch.equal(m(x), torch.zeros(5, 6))
        m.w_mask_bits.data.fill_(-1)  # every weight kept; invisible to the version counter
        m.eval()
        assert torch.equal(m(x), expected()) and bool(m(x).abs().sum() > 0)
    w = m._frozen_weight()  # grad mode: unpacked afresh
    assert w is not m._frozen_weight()
    big = binslt.BinLinear(512, 256).eval()  # past _FROZEN_WEIGHT_KEEP: unpacked per call
    big.mode = "frozen"
    with torch.no_grad():
        assert big._frozen_weight() is not big._frozen_weight()
        assert torch.equal(big._frozen_weight(), big.effective_weight())


def test_packed_cache_dropped_by_train_eval_after_data_write():
    """A write through .data is invisible to the version counters that key the no-grad packing
    cache; train()/eval() drop the cache, so the next call sees the new scores."""
    torch.manual_seed(7)
    m = binslt.BinSpikeConv2d(8, 5, 3, padding=1, bn=True, tau=100.0, decay_input=False).eval()
    m.bn.running_var.fill_(1e-4)  # a strong drive, so that the outputs depend on the mask
    x = _spikes(4, 2, 8, 5, 5, p=0.5)
    with torch.no_grad():
        before = m(x)
        m.scores.data.copy_(m.scores.data.flip(0))  # another mask, same version counter
        m.eval()
        planes = m.packed_weight()
        fresh = m._pack_effective_weight()
        assert all(torch.equal(a, b) for a, b in zip(planes, fresh))
        fast = m(x)
        with binslt.use_backend("torch"):
            slow = m(x)
    assert torch.equal(fast, slow) and not torch.equal(fast, before)
