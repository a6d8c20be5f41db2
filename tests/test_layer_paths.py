"""The named paths of a spiking layer call (binslt.ops.layer.Path): the dispatcher's choice per
input kind, and every path against the float64 reference, including the integer bit-plane
path (exact counts) and the dropout paths (the input gain folded into the weight)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_spikes_equal

import binslt
from binslt import ops
from binslt.nn.layers import BinSpikeConv2d, BinSpikeLinear, _bn_scale_shift
from binslt.ops import Path
from binslt.ops import backend as B
from binslt.ops import reference as ref

NEURON = dict(decay=0.5, decay_input=False, v_threshold=1.0)


def _layer(kind="conv", *, bn_train=False, pool=1, input="spike", seed=0, backend="cpu"):
    torch.manual_seed(seed)
    if kind == "conv":
        m = BinSpikeConv2d(6, 8, 3, padding=1, bn=True, pool=pool, input=input, backend=backend,
                           **NEURON)
    else:
        m = BinSpikeLinear(40, 8, bn=True, input=input, backend=backend, **NEURON)
    g = torch.Generator().manual_seed(seed + 1)
    c = m.bn.running_mean.numel()
    m.bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
    m.bn.running_var.copy_(torch.rand(c, generator=g) * 0.05 + 0.01)
    m.train(bn_train)
    return m


def _input(kind, shape, seed=3, top=4):
    g = torch.Generator().manual_seed(seed)
    if kind == "spike":
        return (torch.rand(shape, generator=g) < 0.4).float()
    if kind == "spike-sum":
        return torch.randint(0, top + 1, shape, generator=g).float()
    return torch.rand(shape, generator=g) * 2


def _ref64(m, x, gain=1.0):
    """(spikes, H) in float64: conv(gain * x) with W_eff, the layer's epilogue, the LIF."""
    co = m.weight.shape[0]
    scale, shift, bn_train = _bn_scale_shift(m.bn, co, x)
    w = m.effective_weight().detach().double() * gain
    x64 = x.double()
    linear = w.dim() == 2
    if linear:
        x64, w = x64[..., None, None], w[:, :, None, None]
    T, n = x64.shape[:2]
    z = F.conv2d(x64.flatten(0, 1), w, padding=getattr(m, "padding", 0))
    z = z.view(T, n, *z.shape[1:])
    y, _, _ = ref.epilogue(z, scale.detach().double(), shift.detach().double(), None, bn_train,
                           m.bn.eps)
    nk = m.neuron
    s, h = ref.lif_multistep(y, tau=nk.tau, decay_input=nk.decay_input,
                             v_threshold=nk.v_threshold, v_reset=nk.v_reset, return_h=True)
    return (s.flatten(2), h.flatten(2)) if linear else (s, h)


# --- the dispatcher ----------------------------------------------------------------------------

# (backend, grad enabled, linear layer) -> {(input kind, dropout gain): the path taken}
CHOICES = {
    ("cpu", True, False): {("spike", 1.0): Path.SPIKE_TRAIN, ("spike", 2.0): Path.DROPOUT_TRAIN,
                           ("real", 1.0): Path.REAL, ("spike-sum", 1.0): Path.REAL},
    # spike-sum -> REAL_INFER: the CPU's default (measured)
    ("cpu", False, False): {("spike", 1.0): Path.SPIKE_INFER, ("real", 1.0): Path.REAL_INFER,
                            ("spike-sum", 1.0): Path.REAL_INFER},
    ("cpu", False, True): {("spike", 1.0): Path.SPIKE_INFER, ("spike", 2.0): Path.DROPOUT_INFER,
                           ("real", 1.0): Path.REAL},
    ("cuda", False, False): {("spike", 1.0): Path.SPIKE_INFER},
    ("triton", True, True): {("spike", 1.0): Path.SPIKE_TRAIN},
    # the torch backend runs its autograd reference, with or without grad
    ("torch", False, False): {("spike", 1.0): Path.SPIKE_TRAIN, ("spike", 2.0): Path.DROPOUT_TRAIN,
                              ("real", 1.0): Path.REAL, ("spike-sum", 1.0): Path.REAL},
}
CHOICE_CASES = [(be, grad, input, gain, linear, want)
                for (be, grad, linear), paths in CHOICES.items()
                for (input, gain), want in paths.items()]


@pytest.mark.parametrize("be, grad, input, gain, linear, want", CHOICE_CASES)
def test_the_dispatcher_picks_the_path_of_each_input_kind(be, grad, input, gain, linear, want):
    with torch.set_grad_enabled(grad):
        assert ops.choose_path(be, input, gain, linear) is want


def test_a_backend_with_bit_planes_takes_them_for_spike_sums(monkeypatch):
    monkeypatch.setitem(B.CAPABILITIES, "cpu",
                        dataclasses.replace(B.CAPABILITIES["cpu"], bit_planes=True))
    with torch.no_grad():
        assert ops.choose_path("cpu", "spike-sum") is Path.SPIKE_SUM_BITS
        assert ops.choose_path("cpu", "spike-sum", linear=True) is Path.SPIKE_SUM_BITS
    assert ops.choose_path("cpu", "spike-sum") is Path.REAL  # autograd: the dense route


def test_bad_input_kind_and_backend_are_clear_errors():
    with pytest.raises(ValueError, match="input must be one of"):
        ops.choose_path("cpu", "ints")
    with pytest.raises(ValueError, match="a concrete backend is one of"):
        ops.capabilities("auto")
    with pytest.raises(ValueError, match="input must be one of"):
        BinSpikeConv2d(2, 2, 1, input="ints")


def test_weight_need_follows_the_path_and_the_backend():
    assert ops.weight_need(Path.SPIKE_INFER, "cpu") == "planes"
    assert ops.weight_need(Path.SPIKE_SUM_BITS, "triton") == "planes"
    assert ops.weight_need(Path.SPIKE_TRAIN, "cpu") == "w_eff+planes"
    assert ops.weight_need(Path.SPIKE_TRAIN, "torch") == "w_eff"
    assert ops.weight_need(Path.REAL, "cpu") == "w_eff"
    assert ops.PACK_VALIDATES == {be for be, c in ops.CAPABILITIES.items() if c.pack_validates}


# --- the capability table is the one place a backend's abilities are decided -------------------

#: binslt/ops modules that name backends for reasons other than their kernels' abilities:
#: backend.py (the table, auto's order, the device a backend needs), registry.py (the op table:
#: which implementation a backend's ops are), check.py (``binslt check``'s own --backend rules).
_NAMES_BACKENDS = {"backend.py", "registry.py", "check.py"}


def _backend_comparisons(path):
    """``(line, source)`` of each comparison of a backend variable (``backend``, ``be``,
    ``ctx.backend``, ...) with a backend's name ('torch', 'cpu', 'triton', 'cuda') in ``path``."""
    import ast

    names = set(ops.CAPABILITIES)

    def backendish(node):
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
        return name in ("be", "b") or name.endswith("backend")

    def named(node):
        if isinstance(node, ast.Constant):
            return node.value in names
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(map(named, node.elts))

    src = path.read_text()
    out = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(map(backendish, sides)) and any(map(named, sides)):
                out.append((node.lineno, ast.get_source_segment(src, node)))
    return out


def test_backend_abilities_are_read_from_the_capability_table_only():
    from pathlib import Path as FsPath

    root = FsPath(ops.__file__).parent
    found = {f.name: _backend_comparisons(f) for f in sorted(root.glob("*.py"))
             if f.name not in _NAMES_BACKENDS}
    assert found.get("autograd.py") == [] and found.get("layer.py") == []
    bad = {k: v for k, v in found.items() if v}
    assert not bad, f"decide by binslt.ops.CAPABILITIES, not by the backend's name: {bad}"
    # the scan finds what it looks for
    probe = _backend_comparisons(root / "registry.py")
    assert any('backend == "torch"' in src for _, src in probe), probe


def _conv_lif_saves(backend, residual):
    torch.manual_seed(0)
    x = (torch.rand(2, 1, 3, 5, 5) < 0.4).float().requires_grad_()
    w = (torch.randint(-1, 2, (4, 3, 3, 3)) * 0.5).float().requires_grad_()
    scale = torch.rand(4) + 0.5
    shift = torch.randn(4) * 0.1
    res = None if residual is None else residual.clone().requires_grad_()
    out = ops.ConvLIF.apply(x, w, scale, shift, res, 1, 1, False, 1e-5, 2.0, True, 0.3, 0.0,
                            False, 0, 2.0, backend)
    (out[0] * torch.arange(out[0].numel()).view(out[0].shape)).sum().backward()
    grads = (x.grad, w.grad, None if res is None else res.grad)
    return out[7], out[8], grads


@pytest.mark.parametrize("ability", ["int8_counts", "residual_bits"])
def test_conv_lif_saves_as_the_capability_table_says(monkeypatch, ability):
    """The CPU's compact saves (int8 counts, a residual of spikes as bits) follow its row of
    the table; turned off, the layer saves the plain tensors and the gradients stay the same."""
    residual = (torch.rand(2, 1, 4, 5, 5) < 0.5).float()
    kept, res_saved, grads = _conv_lif_saves("cpu", residual)
    assert kept.dtype == torch.int8 and res_saved.dim() == 4  # packed words
    monkeypatch.setitem(B.CAPABILITIES, "cpu",
                        dataclasses.replace(B.CAPABILITIES["cpu"], **{ability: False}))
    kept2, res_saved2, grads2 = _conv_lif_saves("cpu", residual)
    if ability == "int8_counts":
        assert kept2.dtype != torch.int8 and torch.equal(kept2.long(), kept.long())
        assert res_saved2.dim() == 4
    else:
        assert kept2.dtype == torch.int8 and res_saved2.numel() == 0  # the residual as it came
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bn_lif_reads_an_expanded_current_as_the_capability_table_says(monkeypatch):
    from binslt.ops import autograd as A

    z = torch.randn(2, 3, 5).unsqueeze(0).expand(4, 2, 3, 5)  # [T, N, C, L], time stride 0
    assert A._bn_lif_current(z, "cpu") == (4, True, False)
    assert A._bn_lif_current(z, "triton") == (4, False, True)
    monkeypatch.setitem(B.CAPABILITIES, "cpu",
                        dataclasses.replace(B.CAPABILITIES["cpu"], strided_current=False))
    assert A._bn_lif_current(z, "cpu") == (4, False, True)


def test_training_pool_runs_as_the_capability_table_says(monkeypatch):
    """The CPU pools in training with binslt::spike_pool2 (its own kernel); with pool2_op off it
    takes torch's maxima and pack_spikes. Both give max_pool2d's spikes and the same bits."""
    from binslt.ops import autograd as A

    s = (torch.rand(3, 2, 40, 6, 7) < 0.3).float()
    calls = []
    real = torch.ops.binslt.spike_pool2
    monkeypatch.setattr(A.torch.ops.binslt, "spike_pool2", lambda t: calls.append(1) or real(t),
                        raising=False)
    y, bits = A._pool2_spikes(s, "cpu")
    assert calls == [1]
    monkeypatch.setitem(B.CAPABILITIES, "cpu",
                        dataclasses.replace(B.CAPABILITIES["cpu"], pool2_op=False))
    y2, bits2 = A._pool2_spikes(s, "cpu")
    assert calls == [1]
    want = torch.nn.functional.max_pool2d(s.flatten(0, 1), 2).view(3, 2, 40, 3, 3)
    assert torch.equal(y, want) and torch.equal(y2, want) and torch.equal(bits, bits2)
    assert torch.equal(bits, ops.pack_spikes(s.flatten(0, 1)))


# --- every path against the float64 reference ---------------------------------------------------

def _run(m, path, x, gain=1.0, backend="cpu", packed_out=False):
    """One call of ``path`` with the values the layer would make."""
    co = m.weight.shape[0]
    scale, shift, bn_train = _bn_scale_shift(m.bn, co, x)
    epi = ops.Epilogue(scale, shift, bn_train, m.bn.eps)
    linear = m.weight.dim() == 2
    geo = ops.Geometry(linear, getattr(m, "stride", 1), getattr(m, "padding", 0),
                       getattr(m, "pool", 1), packed_out)
    w = m._weights(ops.weight_need(path, backend), gain)
    return ops.run_path(path, backend, x, w, epi, m.neuron.params, geo)


SPIKE_SHAPES = {"conv": (3, 2, 6, 5, 5), "linear": (3, 5, 40)}


PATH_CASES = [
    (Path.SPIKE_TRAIN, "spike", True, 1.0),
    (Path.SPIKE_INFER, "spike", False, 1.0),
    (Path.DROPOUT_TRAIN, "spike", True, 2.0),
    (Path.DROPOUT_INFER, "spike", False, 1.0 / 0.75),
    (Path.REAL, "real", True, 1.0),
    (Path.REAL_INFER, "real", False, 1.0),  # a conv's (a linear layer's no-grad real input
    (Path.SPIKE_SUM_BITS, "spike-sum", False, 1.0),  # runs Path.REAL, the dispatcher's choice)
]


@pytest.mark.parametrize("kind, path, input, grad, gain", [
    (kind, *case) for kind in ("conv", "linear") for case in PATH_CASES
    if not (kind == "linear" and case[0] is Path.REAL_INFER)])
@pytest.mark.parametrize("bn_train", [False, True])
def test_each_path_matches_the_float64_reference(kind, path, input, grad, gain, bn_train):
    m = _layer(kind, bn_train=bn_train, input=input)
    x = _input(input, SPIKE_SHAPES[kind])
    with torch.set_grad_enabled(grad):
        s, mean, var = _run(m, path, x, gain)
    s_ref, h = _ref64(m, x, gain)
    assert s.dtype == torch.float32 and s.shape == s_ref.shape
    assert_spikes_equal(s, s_ref, h, m.neuron.v_threshold)
    assert 0 < float(s_ref.mean()) < 1  # the case fires, but not everywhere
    if bn_train:  # the batch statistics of the current (biased variance)
        z = F.conv2d(x.double().flatten(0, 1) if kind == "conv" else x.double().flatten(0, 1)[
            ..., None, None], (m.effective_weight().detach().double() * gain).view(
            8, -1, *([3, 3] if kind == "conv" else [1, 1])), padding=1 if kind == "conv" else 0)
        assert torch.allclose(mean.double(), z.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        assert torch.allclose(var.double(), z.var((0, 2, 3), unbiased=False), rtol=1e-4,
                              atol=1e-6)


@pytest.mark.parametrize("path, input", [(Path.SPIKE_TRAIN, "spike"),
                                         (Path.DROPOUT_TRAIN, "spike"), (Path.REAL, "real")])
def test_the_training_paths_match_the_torch_backend_and_its_gradients(path, input):
    m = _layer("conv", bn_train=True, input=input)
    x = _input(input, SPIKE_SHAPES["conv"])
    gain = 2.0 if path is Path.DROPOUT_TRAIN else 1.0
    up = torch.randn(3, 2, 8, 5, 5, generator=torch.Generator().manual_seed(7))
    grads = []
    for be in ("cpu", "torch"):
        m.scores.grad = None
        s, _, _ = _run(m, path, x, gain, backend=be)
        (s * up).sum().backward()
        grads.append((s.detach(), m.scores.grad.clone()))
    (s_cpu, g_cpu), (s_t, g_t) = grads
    s_ref, h = _ref64(m, x, gain)
    assert_spikes_equal(s_cpu, s_ref, h, 1.0)
    assert_spikes_equal(s_t, s_ref, h, 1.0)
    assert torch.allclose(g_cpu, g_t, rtol=1e-3, atol=1e-4)


def test_the_dropout_paths_are_the_spike_paths_on_gain_times_the_weight():
    """conv(gain * x): the dropout path on 0/1 spikes gives the spikes of the real-input path on
    the scaled input (a gain that is a power of two keeps both exact: the same spikes)."""
    m = _layer("conv", input="spike")
    x = _input("spike", SPIKE_SHAPES["conv"])
    with torch.no_grad():
        d_inf = _run(m, Path.DROPOUT_INFER, x, 2.0)[0]
        real = _run(m, Path.REAL_INFER, 2.0 * x)[0]
    d_tr = _run(m, Path.DROPOUT_TRAIN, x, 2.0)[0]
    assert torch.equal(d_inf, real) and torch.equal(d_tr.detach(), real)
    with pytest.raises(ValueError, match="dropout paths"):
        _run(m, Path.SPIKE_INFER, x, 2.0)


def test_the_layer_runs_the_dropout_path_through_spike_dropout_gain():
    m = _layer("conv", bn_train=True)
    x = _input("spike", SPIKE_SHAPES["conv"])
    m.input_gain = 2.0
    s = m(x)
    s_ref, h = _ref64(m, x, 2.0)
    assert_spikes_equal(s, s_ref, h, 1.0)


# --- the integer bit-plane path ------------------------------------------------------------------

def _ternary_gain(m):
    w_mask, w_pos, gain = m.packed_weight()
    w = m.effective_weight().detach()
    return torch.sign(w), gain


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("top", [1, 4, 7, 12])
def test_bit_plane_current_is_the_exact_conv_rounded_once(backend, top):
    """sum_b 2^b conv(bit_b(x)) with exact integer counts, times the gain once: the float64
    conv of the integers with the ternary weight, times the gain, rounded to float32 once."""
    m = _layer("conv")
    x = _input("spike-sum", SPIKE_SHAPES["conv"], top=top)
    t, gain = _ternary_gain(m)
    with torch.no_grad():
        z = ops.bit_plane_current(backend, x, m.packed_weight(), 1, 1)
    z64 = F.conv2d(x.double().flatten(0, 1), t.double(), padding=1).view(3, 2, 8, 5, 5)
    want = (z64 * gain.double().view(1, 1, -1, 1, 1)).float()
    assert z.dtype == torch.float32 and torch.equal(z, want)


@pytest.mark.parametrize("kind, pool, packed_out", [  # (pool and packed words out: a conv's)
    ("conv", 1, False), ("conv", 2, False), ("conv", 2, True), ("linear", 1, False)])
def test_bit_planes_equal_the_real_input_route_on_integers_0_to_4(kind, pool, packed_out):
    """Integer input 0..4 with a power-of-two gain (frozen layer, alpha = 0.25): the real-input
    conv is exact too, so the bit-plane path gives its spikes bit for bit."""
    m = _layer(kind, input="spike-sum")
    m.mode = "frozen"
    m.alpha.fill_(0.25)
    x = _input("spike-sum", SPIKE_SHAPES[kind], top=4)
    if kind == "conv":
        m.pool = pool
    real_path = Path.REAL_INFER if kind == "conv" else Path.REAL
    with torch.no_grad():
        bits = _run(m, Path.SPIKE_SUM_BITS, x, packed_out=packed_out)[0]
        real = _run(m, real_path, x, packed_out=packed_out)[0]
    assert bits.dtype == real.dtype and torch.equal(bits, real)
    if not packed_out:
        assert 0 < float(real.mean()) < 1


def test_a_spike_sum_layer_gives_the_same_spikes_by_either_path(monkeypatch):
    """``input='spike-sum'``: the CPU's default (the real-input route) and the bit-plane path
    (where the capability table names it) agree; grad mode too."""
    m = _layer("conv", input="spike-sum")
    m.mode = "frozen"
    m.alpha.fill_(0.5)
    x = _input("spike-sum", SPIKE_SHAPES["conv"], top=4)
    with torch.no_grad():
        default = m(x)
    monkeypatch.setitem(B.CAPABILITIES, "cpu",
                        dataclasses.replace(B.CAPABILITIES["cpu"], bit_planes=True))
    calls = []
    real_bits = ops.layer._PATHS[Path.SPIKE_SUM_BITS]
    monkeypatch.setitem(ops.layer._PATHS, Path.SPIKE_SUM_BITS,
                        lambda *a: calls.append(1) or real_bits(*a))
    with torch.no_grad():
        bits = m(x)
    assert calls == [1] and torch.equal(default, bits)
    assert torch.equal(m(x), default)


@pytest.mark.parametrize("bad, what", [(-1.0, "negative"), (1.5, "fraction"),
                                       (float("nan"), "NaN")])
def test_bit_planes_refuse_values_that_are_not_spike_sums(bad, what):
    m = _layer("conv", input="spike-sum")
    x = _input("spike-sum", SPIKE_SHAPES["conv"])
    x[0, 0, 0, 0, 0] = bad
    with torch.no_grad(), pytest.raises(ValueError, match="must hold sums of spikes"):
        _run(m, Path.SPIKE_SUM_BITS, x)


def test_packed_words_need_a_no_grad_spike_path():
    m = _layer("conv", input="spike-sum")
    words = ops.pack_spikes(_input("spike", (6, 6, 5, 5))).view(3, 2, 5, 5, 1)
    with torch.no_grad(), pytest.raises(ValueError, match="packed spikes in need"):
        _run(m, Path.SPIKE_SUM_BITS, words)


# --- the values a call reads ---------------------------------------------------------------------

def test_a_call_reads_plain_values_not_the_module():
    """The ops take a Weights value: W_eff alone (packed where a no-grad path needs planes)
    gives the spikes the module's cached planes give."""
    m = _layer("conv")
    x = _input("spike", SPIKE_SHAPES["conv"])
    scale, shift, _ = _bn_scale_shift(m.bn, 8, x)
    epi = ops.Epilogue(scale, shift)
    geo = ops.Geometry(stride=1, padding=1)
    with torch.no_grad():
        w_only = ops.Weights(w_eff=m.effective_weight().detach())
        a = ops.spiking_layer(x, w_only, epi, m.neuron.params, geometry=geo, backend="cpu")[0]
        b = ops.spiking_layer(x, ops.Weights(planes=m.packed_weight()), epi, m.neuron.params,
                              geometry=geo, backend="cpu")[0]
    assert torch.equal(a, b) and torch.equal(a, m(x).detach())
    with pytest.raises(ValueError, match="needs W_eff"):
        ops.spiking_layer(x, ops.Weights(planes=m.packed_weight()), epi, m.neuron.params,
                          geometry=geo, input="real", backend="cpu")


def test_neuron_params_are_one_frozen_value():
    p = ops.NeuronParams(tau=4, decay_input=0, v_threshold=1, v_reset=None, surrogate="sigmoid")
    assert (p.tau, p.decay_input, p.v_threshold) == (4.0, False, 1.0)
    assert p.op_args() == (4.0, False, 1.0, None, False, 1, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.tau = 2.0
    with pytest.raises(ValueError, match="surrogate must be one of"):
        ops.NeuronParams(surrogate="relu")
    layer = binslt.BinSpikeConv2d(2, 2, 1, tau=3.0)
    first = layer.neuron.params
    assert isinstance(first, ops.NeuronParams) and layer.neuron.params is first  # made once
    layer.neuron.v_threshold = 0.5  # a settings write makes a new value
    assert layer.neuron.params.v_threshold == 0.5 and first.v_threshold == 1.0
    assert layer.neuron.kwargs()["surrogate"] == "atan"
