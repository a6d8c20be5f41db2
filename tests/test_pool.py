"""Fused spike max-pooling (BinSpikeConv2d(pool=2)) and packed chaining between binslt layers.

The unfused reference is the layer followed by ``SpikeMaxPool2d(2)`` (torch's max_pool2d on float
spikes). A max of {0,1} spikes is their OR, so the pooled spikes, the logits and the gradients
(routed to the first maximal element of each window, as torch's max_pool2d backward does) must
agree exactly with it on every backend.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, backend_device, cpu_isas, stable_seed, triton_param
from torch import nn

import binslt
import binslt.nn.models as M
import binslt.ops as ops
from binslt.nn.layers import BinSpikeConv2d, SpikeMaxPool2d
from binslt.ops import contract as C
from binslt.ops import reference as ref

BACKENDS = [
    pytest.param("cpu", id="cpu"),
    triton_param(),  # CUDA tensors where a GPU is visible, else the interpreter on the CPU
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def _dev(backend: str) -> str:
    return backend_device(backend)


# ---------------------------------------------------------------------------------------------
# The op: bconv_lif_infer(pool, packed_out, packed input)
# ---------------------------------------------------------------------------------------------


def _op_case(gen, T=2, n=2, ci=5, co=7, h=7, w=6, rate=0.4, k=3, stride=1, padding=1,
             residual=False):
    x = (torch.rand(T, n, ci, h, w, generator=gen) < rate).float()
    wt = torch.sign(torch.randn(co, ci, k, k, generator=gen)) * (
        torch.rand(co, ci, k, k, generator=gen) < 0.7)
    wm, wp = ref.pack_weight_reference(wt)
    alpha = torch.rand(co, generator=gen) + 0.5
    scale = torch.rand(co, generator=gen) + 0.5
    shift = torch.randn(co, generator=gen) * 0.3
    ho, wo = C.out_hw(h, w, k, k, stride, padding)
    res = torch.randn(T, n, co, ho, wo, generator=gen) if residual else None
    return x, wm, wp, alpha, scale, shift, res


def _infer(backend, x, wm, wp, alpha, scale, shift, res, stride=1, padding=1, pool=1,
           packed_out=False):
    dev = _dev(backend)
    args = [t.to(dev) if isinstance(t, torch.Tensor) else t
            for t in (x, wm, wp, alpha, scale, shift, res)]
    fn = ops.get_op("bconv_lif_infer", backend)
    return fn(*args, stride, padding, 2.0, False, 1.0, 0.0, pool, packed_out).cpu()


# Shapes: odd output sizes (the last row / column is dropped by the pool), a wide row (a pooled
# tile of two rows is longer than one LIF chunk), strides, sparse input (the event kernel) and
# dense input (the popcount kernel), with and without a residual.
OP_CASES = [
    dict(),
    dict(h=5, w=9, residual=True),
    dict(rate=0.05, residual=True),
    dict(rate=0.9),
    dict(h=4, w=300, ci=3, co=3),
    dict(h=9, w=8, stride=2, padding=1),
    dict(ci=40, co=33, h=6, w=6, rate=0.2),
    # short maps, many channels: the LIF rows hold several channels' tiles (two rows of 16 per
    # word of 32 channels, a last word of 6)
    dict(ci=20, co=70, h=4, w=4, rate=0.3, residual=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OP_CASES, ids=[str(i) for i in range(len(OP_CASES))])
def test_infer_op_pooled_and_packed_equal_max_pool_of_its_spikes(backend, case):
    if backend != "cpu" and case.get("w") == 300:
        # The wide row is for the CPU tiles' LIF chunks; Triton's pixel tiles (32 pixels under
        # the interpreter) see a row spanning three programs at 70 columns already, at a
        # quarter of the interpreter's time.
        case = {**case, "w": 70}
    _check_infer_case(backend, case)


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("conv", ["dense", "event"])
@pytest.mark.parametrize("case", [OP_CASES[1], OP_CASES[2], OP_CASES[6]], ids=["1", "2", "6"])
def test_cpu_infer_op_pooled_and_packed_on_every_isa(isa, conv, case):
    """The CPU tiles' pooled / packed store and event lists (one per ISA) on both algorithms."""
    with ops.cpu_algorithms(isa=isa, conv=conv):
        _check_infer_case("cpu", case)


def _check_infer_case(backend, case):
    gen = torch.Generator().manual_seed(stable_seed(sorted(case.items())))
    cfg = {k: case[k] for k in ("stride", "padding") if k in case}
    x, wm, wp, alpha, scale, shift, res = _op_case(gen, **case)
    co = wm.shape[0]
    full = ref.bconv_lif_infer_reference(x, wm, wp, alpha, scale, shift, res,
                                         cfg.get("stride", 1), cfg.get("padding", 1), 2.0, False,
                                         1.0, 0.0)
    want = F.max_pool2d(full.flatten(0, 1), 2).view(*full.shape[:3], full.shape[3] // 2,
                                                    full.shape[4] // 2)
    assert 0 < want.mean() < 1
    op_args = (x, wm, wp, alpha, scale, shift, res)
    assert torch.equal(_infer(backend, *op_args, **cfg), full)  # pool=1 unchanged
    pooled = _infer(backend, *op_args, **cfg, pool=2)
    assert pooled.dtype == torch.float32 and torch.equal(pooled, want)
    words = _infer(backend, *op_args, **cfg, pool=2, packed_out=True)
    assert words.dtype == torch.int32 and words.shape == (*want.shape[:2], *want.shape[3:],
                                                          C.channel_words(co))
    assert torch.equal(words, ref.pack_spikes_reference(want.flatten(0, 1)).view(words.shape))
    words1 = _infer(backend, *op_args, **cfg, packed_out=True)
    assert torch.equal(ref.unpack_spikes_reference(words1.flatten(0, 1), co).view(full.shape),
                       full)
    # packed words in: the same spikes as the float spikes they pack
    xp = ref.pack_spikes_reference(x.flatten(0, 1)).view(x.shape[0], x.shape[1],
                                                         *x.shape[3:], -1)
    assert torch.equal(_infer(backend, xp, *op_args[1:], **cfg, pool=2), want)
    assert torch.equal(_infer(backend, xp, *op_args[1:], **cfg, pool=2, packed_out=True), words)


@pytest.mark.parametrize("backend", [pytest.param("torch", id="reference")] + BACKENDS)
def test_infer_op_pool_errors(backend):
    gen = torch.Generator().manual_seed(3)
    x, wm, wp, alpha, scale, shift, res = _op_case(gen, h=1, w=4)
    with pytest.raises(ValueError, match=r"pool=2 needs a conv output of at least 2x2, got 1x4"):
        _infer(backend, x, wm, wp, alpha, scale, shift, res, pool=2)
    x, wm, wp, alpha, scale, shift, res = _op_case(gen)
    with pytest.raises(ValueError, match=r"pool must be 1 or 2, got 3"):
        _infer(backend, x, wm, wp, alpha, scale, shift, res, pool=3)
    with pytest.raises(TypeError, match="floating-point spikes .* or packed int32 words, got"):
        _infer(backend, x.long(), wm, wp, alpha, scale, shift, res)


# ---------------------------------------------------------------------------------------------
# The training pool: one bit per spike saved, torch's gradient routing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_pool_routes_gradient_as_max_pool2d(backend):
    """Every window pattern of 2x2 binary spikes (all 16, ties included), odd sizes: the same
    values and the same input gradient as torch's max_pool2d, and only packed bits saved."""
    dev = _dev(backend)
    pats = torch.tensor([[(p >> b) & 1 for b in range(4)] for p in range(16)], dtype=torch.float32)
    win = pats.view(16, 2, 2)
    img = torch.zeros(4, 9, 9)  # 4x4 windows of 2x2 plus an odd last row / column
    base = win.view(4, 4, 2, 2).permute(0, 2, 1, 3).reshape(8, 8)
    for c in range(4):  # each channel holds the 16 windows in another order
        img[c, :8, :8] = base.roll(2 * c, dims=c % 2)
    img[:, 8, :] = 1.0
    img[:, :, 8] = 1.0
    s = img.view(1, 1, 4, 9, 9).repeat(2, 3, 1, 1, 1).to(dev)
    g = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0)).to(dev)
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    ya = ops._spike_pool(backend, a, 2)
    yb = F.max_pool2d(b.flatten(0, 1), 2).view(2, 3, 4, 4, 4)
    assert torch.equal(ya, yb)
    assert ya.grad_fn.name() == "SpikePoolBackward"
    saved = ya.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].dtype == torch.int32  # the packed spikes, 1 bit each
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (2, 3), (5, 2), (32, 32)])
def test_spike_pool2_op_equals_max_pool2d_and_pack(kernel, hw):
    """binslt::spike_pool2 (the C++ kernel and the reference): torch's max_pool2d of the spikes
    and their bits as pack_spikes packs them, over one, two and three channel words and odd
    sizes (the last row / column no window covers is left out); bits checked one by one."""
    h, w = hw
    gen = torch.Generator().manual_seed(h * 10 + w)
    for c in (5, 40, 70):
        s = (torch.rand(3, c, h, w, generator=gen) < 0.3).float()
        s[0, :3] = 0.0  # all-zero windows
        s[1, -2:] = 1.0
        fn = torch.ops.binslt.spike_pool2 if kernel == "cpu" else ref.spike_pool2_reference
        pooled, packed = fn(s)
        assert pooled.dtype == torch.float32 and packed.dtype == torch.int32
        assert torch.equal(pooled, F.max_pool2d(s, 2))
        words = packed.to(torch.int64) & 0xFFFFFFFF
        bits = torch.stack([(words[..., ch // 32] >> (ch % 32)) & 1 for ch in range(c)], 1)
        assert packed.shape == (3, h, w, (c + 31) // 32)
        assert torch.equal(bits.float(), s)
        assert torch.equal(packed, torch.ops.binslt.pack_spikes(s))


@pytest.mark.parametrize("x, err, match", [
    (torch.full((2, 3, 4, 4), 0.5), ValueError, "must be binary spikes"),
    (torch.full((2, 3, 4, 4), float("nan")), ValueError, "must be binary spikes"),
    (torch.zeros(2, 3, 4), ValueError, r"\[B, C, H, W\]"),
    (torch.zeros(2, 3, 1, 4), ValueError, "at least 2x2"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.float64), TypeError, "float32"),
])
@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_spike_pool2_op_errors(x, err, match, kernel):
    fn = torch.ops.binslt.spike_pool2 if kernel == "cpu" else ref.spike_pool2_reference
    with pytest.raises(err, match=match):
        fn(x)


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (2, 3), (5, 2)])
def test_spike_pool2_bwd_op_equals_max_pool2d_backward(kernel, hw):
    """binslt::spike_pool2_bwd (the C++ kernel and the reference) gives torch's max_pool2d input
    gradient for random spikes over two channel words, and odd sizes."""
    h, w = hw
    gen = torch.Generator().manual_seed(h * 10 + w)
    s = (torch.rand(3, 40, h, w, generator=gen) < 0.3).float()
    s[0, :5] = 0.0  # all-zero windows: the gradient goes to each window's first position
    g = torch.randn(3, 40, h // 2, w // 2, generator=gen)
    packed = torch.ops.binslt.pack_spikes(s)
    fn = torch.ops.binslt.spike_pool2_bwd if kernel == "cpu" else ref.spike_pool2_bwd_reference
    got = fn(packed, g, 40)
    x = s.clone().requires_grad_(True)
    F.max_pool2d(x, 2).backward(g)
    assert got.shape == s.shape and got.dtype == torch.float32
    assert torch.equal(got, x.grad)


@pytest.mark.parametrize("args, err, match", [
    (lambda p, g: (p, g[:, :, :1], 40), ValueError, r"grad must be \[B, channels, H // 2"),
    (lambda p, g: (p, g.double(), 40), TypeError, "grad must be float32"),
    (lambda p, g: (p, g, 65), ValueError, r"channels must be in \[1, 32\*Cw\]"),
    (lambda p, g: (p.float(), g, 40), ValueError, r"packed must be \[B, H, W, Cw\] int32"),
])
def test_spike_pool2_bwd_op_errors(args, err, match):
    packed = torch.zeros(2, 4, 4, 2, dtype=torch.int32)
    g = torch.zeros(2, 40, 2, 2)
    with pytest.raises(err, match=match):
        torch.ops.binslt.spike_pool2_bwd(*args(packed, g))


# (T, n, ci, co, h, w, k, stride, padding, bn_train, residual, v_reset): odd output sizes, a row
# longer than one LIF chunk (256 pixels), two words of output channels, stride 2, a residual
# (grad_current asked for), hard and soft reset
POOL2_BWD_CASES = [
    (2, 2, 5, 7, 8, 8, 3, 1, 1, True, False, 0.0),
    (3, 1, 4, 6, 9, 7, 3, 1, 1, False, True, None),
    (2, 1, 3, 4, 3, 300, 3, 1, 1, True, False, 0.0),
    (1, 2, 6, 40, 6, 5, 3, 1, 1, True, True, 0.0),
    (2, 2, 5, 3, 11, 9, 3, 2, 1, False, False, None),
    # short maps, many channels: the LIF/BN rows hold the maps of several channels
    (2, 3, 16, 70, 8, 8, 3, 1, 1, True, True, 0.0),
    (3, 2, 12, 130, 4, 4, 3, 1, 1, False, False, None),
]


@pytest.mark.parametrize("case", POOL2_BWD_CASES, ids=[str(i) for i in range(len(POOL2_BWD_CASES))])
def test_bconv_lif_bwd_pool2_op_equals_pool_backward_then_bwd(case):
    """binslt::bconv_lif_bwd_pool2 (the C++ kernel, which routes the pooled gradient inside the
    LIF backward, and the reference) equals bconv_lif_bwd of spike_pool2_bwd's unpooled gradient:
    the CPU kernel bit for bit, the reference within float rounding."""
    T, n, ci, co, h, w, k, stride, padding, bn_train, residual, v_reset = case
    gen = torch.Generator().manual_seed(stable_seed(case))
    x, wm, wp, alpha, scale, shift, res = _op_case(gen, T, n, ci, co, h, w, 0.4, k, stride,
                                                   padding, residual)
    xp = torch.ops.binslt.pack_spikes(x.flatten(0, 1))
    fwd = torch.ops.binslt.bconv_lif(xp, wm, wp, alpha, scale, shift, res, T, stride, padding,
                                     bn_train, 1e-5, 3.0, False, 1.0, v_reset)
    spikes = fwd[0]
    assert 0 < spikes.mean() < 1
    spikes_packed = torch.ops.binslt.pack_spikes(spikes.flatten(0, 1))
    ho, wo = spikes.shape[3:]
    g = torch.randn(T, n, co, ho // 2, wo // 2, generator=gen)
    tail = (fwd[1], xp, wm, wp, alpha, scale, shift, fwd[2], fwd[3], res, ci, stride, padding,
            bn_train, 1e-5, 3.0, False, 1.0, v_reset, True, 0, 2.0, True, residual)
    full = torch.ops.binslt.spike_pool2_bwd(spikes_packed, g.flatten(0, 1), co)
    want = torch.ops.binslt.bconv_lif_bwd(full.view(spikes.shape), *tail)
    got = torch.ops.binslt.bconv_lif_bwd_pool2(g, spikes_packed, *tail)
    got_ref = ref.bconv_lif_bwd_pool2_reference(g, spikes_packed, *tail)
    for a, b, r in zip(got, want, got_ref):
        assert a.shape == b.shape == r.shape
        assert torch.equal(a, b)
        torch.testing.assert_close(r, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
@pytest.mark.parametrize("bad, match", [
    (lambda g, p: (g[..., :1], p), r"grad_pooled must (be|have)"),
    (lambda g, p: (g, p[:, :, :1]), r"pool_packed must be the unpooled spikes packed|packed must be"),
])
def test_bconv_lif_bwd_pool2_op_errors(kernel, bad, match):
    gen = torch.Generator().manual_seed(0)
    x, wm, wp, alpha, scale, shift, _ = _op_case(gen, 1, 2, 3, 4, 6, 6)
    xp = torch.ops.binslt.pack_spikes(x.flatten(0, 1))
    fwd = torch.ops.binslt.bconv_lif(xp, wm, wp, alpha, scale, shift, None, 1, 1, 1, True, 1e-5,
                                     2.0, False, 1.0, 0.0)
    g = torch.zeros(1, 2, 4, 3, 3)
    p = torch.ops.binslt.pack_spikes(fwd[0].flatten(0, 1))
    gg, pp = bad(g, p)
    fn = (torch.ops.binslt.bconv_lif_bwd_pool2 if kernel == "cpu"
          else ref.bconv_lif_bwd_pool2_reference)
    with pytest.raises((ValueError, RuntimeError), match=match):
        fn(gg, pp, fwd[1], xp, wm, wp, alpha, scale, shift, fwd[2], fwd[3], None, 3, 1, 1, True,
           1e-5, 2.0, False, 1.0, 0.0, True, 0, 2.0, True)


# ---------------------------------------------------------------------------------------------
# The op: bn_lif_infer (a real-input conv's no-grad path: epilogue + LIF + pool + pack)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool, packed_out", [(1, False), (2, False), (1, True), (2, True)])
@pytest.mark.parametrize("shape", [(4, 3, 40, 7, 9), (2, 2, 5, 4, 4), (1, 2, 33, 3, 2)])
@pytest.mark.parametrize("neuron", ["lif", "lif-soft", "if"])
def test_bn_lif_infer_op_equals_bn_lif_pooled_and_packed(pool, packed_out, shape, neuron):
    """binslt::bn_lif_infer (C++) is bn_lif's eval-epilogue spikes, max-pooled by torch's
    max_pool2d and packed by pack_spikes, bit for bit: for a current expanded over T (stride 0,
    read in place) and a contiguous one, each also with its steps in ChannelsLast (the per-pixel
    route with AVX-512, a contiguous copy on the other ISAs); odd sizes and two channel words.
    The reference agrees."""
    T, n, c, h, w = shape
    gen = torch.Generator().manual_seed(T * 100 + c + pool)
    tau, decay_input, v_reset = {"lif": (2.0, True, 0.0), "lif-soft": (1.5, False, None),
                                 "if": (float("inf"), False, 0.0)}[neuron]
    scale = torch.rand(c, generator=gen) + 0.5
    shift = torch.randn(c, generator=gen) * 0.3
    once = (torch.randn(1, n, c, h, w, generator=gen) * 1.5).expand(T, n, c, h, w)
    for z in (once, torch.randn(T, n, c, h, w, generator=gen) * 1.5):
        s = torch.ops.binslt.bn_lif(z.contiguous(), scale, shift, None, False, 1e-5, tau,
                                    decay_input, 1.0, v_reset)[0]
        assert 0 < float(s.mean()) < 1
        want = ref.infer_output(s, pool, packed_out, torch.ops.binslt.pack_spikes)
        got = ref.bn_lif_infer_reference(z, scale, shift, tau, decay_input, 1.0, v_reset, pool,
                                         packed_out)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
        for zin, isa in itertools.product((z, _steps_channels_last(z)), cpu_isas()):
            with ops.cpu_algorithms(isa=isa):
                got = torch.ops.binslt.bn_lif_infer(zin, scale, shift, tau, decay_input, 1.0,
                                                    v_reset, pool, packed_out)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want), (isa, zin.stride())


def test_bn_lif_ops_read_any_layout_of_an_expanded_current():
    """bn_lif and bn_lif_bwd over a current expanded over T whose step is channels-last (read
    from one contiguous copy of the step) give what the contiguous current gives, bit for bit;
    the reference agrees on the forward."""
    gen = torch.Generator().manual_seed(11)
    z0 = torch.randn(3, 40, 5, 6, generator=gen) * 1.5
    scale, shift = torch.rand(40, generator=gen) + 0.5, torch.randn(40, generator=gen) * 0.3
    gs = torch.randn(4, 3, 40, 5, 6, generator=gen)
    outs = []
    for z in (z0.expand(4, *z0.shape).contiguous(), _steps_channels_last(z0.expand(4, *z0.shape))):
        s, mean, var = torch.ops.binslt.bn_lif(z, scale, shift, None, True, 1e-5, 2.0, False, 1.0,
                                               0.0)
        bwd = torch.ops.binslt.bn_lif_bwd(gs, z, scale, shift, mean, var, None, True, 1e-5, 2.0,
                                          False, 1.0, 0.0, True, 0, 2.0)
        outs.append((s, mean, var, *bwd))
    want = ref.bn_lif_reference(z0.expand(4, *z0.shape), scale, shift, None, True, 1e-5, 2.0,
                                False, 1.0, 0.0)[0]
    assert 0 < float(want.mean()) < 1 and torch.equal(outs[0][0], want)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _steps_channels_last(z: torch.Tensor) -> torch.Tensor:
    """z [T, N, C, H, W] with every step in ChannelsLast, expanded over T where z is."""
    if z.stride(0) == 0:
        return z[0].contiguous(memory_format=torch.channels_last).expand(z.shape)
    cl = z.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert cl[0].is_contiguous(memory_format=torch.channels_last) and not cl[0].is_contiguous()
    return cl


@pytest.mark.parametrize("z, pool, err, match", [
    (torch.zeros(2, 1, 3, 4), 1, ValueError, r"z must be \[T, N, C, H, W\]"),
    (torch.zeros(2, 1, 3, 4, 4, dtype=torch.float64), 1, TypeError, "z must be float32"),
    (torch.zeros(2, 1, 3, 4, 4), 3, ValueError, "pool must be 1 or 2"),
    (torch.zeros(2, 1, 3, 1, 4), 2, ValueError, "pool=2 needs a conv output of at least 2x2"),
])
def test_bn_lif_infer_op_errors(z, pool, err, match):
    with pytest.raises(err, match=match):
        torch.ops.binslt.bn_lif_infer(z, torch.ones(3), torch.zeros(3), 2.0, True, 1.0, 0.0,
                                      pool, False)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.binslt.bn_lif_infer(torch.zeros(2, 1, 3, 4, 4), torch.ones(2), torch.zeros(3),
                                      2.0, True, 1.0, 0.0, 1, False)


def test_real_input_layer_no_grad_path_equals_autograd_path():
    """A real-input BinSpikeConv2d under no_grad (bn_lif_infer on the CPU; with BN in training
    mode the bn_lif path) gives the spikes of its autograd forward, pooled and not, and its
    packed words are pack_spikes of them."""
    torch.manual_seed(3)
    for pool in (1, 2):
        layer = BinSpikeConv2d(3, 40, 3, padding=1, input="real", pool=pool, decay=0.9,
                               v_threshold=0.1)
        img = torch.randn(2, 3, 8, 6) * 3
        x = img.unsqueeze(0).expand(4, *img.shape)
        for train in (True, False):
            layer.train(train)
            want = layer(x)
            with torch.no_grad():
                got = layer(x)
                words = layer.forward_packed(x, packed_out=True)
            assert torch.equal(got, want)
            assert 0 < float(want.detach().mean()) < 1
            flat = torch.ops.binslt.pack_spikes(want.detach().flatten(0, 1))
            assert torch.equal(words, flat.view(4, 2, *flat.shape[1:]))


def _float64_layer(layer: BinSpikeConv2d) -> BinSpikeConv2d:
    return copy.deepcopy(layer).double().to(torch.float64)


def _pair(seed, mode, bn, **kw):
    torch.manual_seed(seed)
    fused = BinSpikeConv2d(6, 8, 3, 1, 1, bn=bn, pool=2, decay=0.9, decay_input=False,
                           detach_reset=True, **kw)
    plain = copy.deepcopy(fused)
    plain.pool = 1
    if mode != "search":
        fused.mode = mode
        plain.mode = mode
    return fused, nn.Sequential(plain, SpikeMaxPool2d(2))


@pytest.mark.parametrize("mode", ["search", "finetune", "frozen"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pooled_layer_equals_layer_plus_spike_max_pool(backend, mode):
    """Spikes, input gradient and score / weight gradients of BinSpikeConv2d(pool=2) equal those
    of the layer followed by SpikeMaxPool2d(2) on the same backend (the same spikes are pooled
    and the gradient takes the same route), and the float64 reference within 1e-5."""
    dev = _dev(backend)
    fused, pair = _pair(1, mode, bn=True, backend=backend)
    fused, pair = fused.to(dev), pair.to(dev)
    ref64 = copy.deepcopy(pair).double()
    ref64[0].backend = "torch"
    x = (torch.rand(3, 2, 6, 7, 9, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    x = x.to(dev)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    outs = [fused(xs[0]), pair(xs[1]), ref64(xs[2].double())]
    assert outs[0].shape == (3, 2, 8, 3, 4)
    assert torch.equal(outs[0], outs[1])
    assert 0 < outs[0].mean() < 1
    g = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(3)).to(dev)
    for o, gg in zip(outs, (g, g, g.double())):
        o.backward(gg)
    assert torch.equal(xs[0].grad, xs[1].grad)
    lay = [fused, pair[0], ref64[0]]
    for name in ("scores", "weight"):
        grads = [getattr(m, name).grad for m in lay]
        if grads[0] is None:
            assert all(gr is None for gr in grads)
            continue
        assert torch.equal(grads[0], grads[1])
        assert_close_rel(grads[0], grads[2], 1e-5, f"{name} gradient vs float64")
    assert_close_rel(xs[0].grad, xs[2].grad, 1e-5, "input gradient vs float64")
    # BN running statistics count the unpooled neurons
    assert torch.equal(fused.bn.running_var, pair[0].bn.running_var)
    # eval, no grad: the fused inference kernel
    fused.eval()
    pair.eval()
    with torch.no_grad():
        assert torch.equal(fused(x), pair(x))


def test_pooled_layer_real_input_and_residual():
    torch.manual_seed(4)
    fused, pair = _pair(4, "search", bn=True, input="real")
    x = torch.randn(2, 3, 6, 6, 6)
    assert torch.equal(fused(x), pair(x))
    fused2, pair2 = _pair(5, "search", bn=False)
    xs = (torch.rand(2, 3, 6, 6, 6) < 0.4).float()
    r = torch.randn(2, 3, 8, 6, 6)
    assert torch.equal(fused2(xs, residual=r), pair2[1](pair2[0](xs, residual=r)))
    with torch.no_grad():
        fused2.eval()
        pair2.eval()
        assert torch.equal(fused2(xs, residual=r), pair2[1](pair2[0](xs, residual=r)))


def test_pool_option_errors():
    with pytest.raises(ValueError, match="pool must be 1 .* or 2"):
        BinSpikeConv2d(2, 2, 3, pool=3)
    layer = BinSpikeConv2d(2, 2, 3, padding=1, pool=2)
    with pytest.raises(ValueError, match="pool=2 needs a conv output of at least 2x2, got 1x3"):
        layer(torch.zeros(1, 1, 2, 1, 3))
    assert "pool=2" in repr(layer)


# ---------------------------------------------------------------------------------------------
# Networks: fused pools and packed chaining against the unfused layout
# ---------------------------------------------------------------------------------------------


def _unfused(model: M.BinSLTNet) -> M.BinSLTNet:
    """The same network in the layout before fusing: conv (pool=1) + SpikeMaxPool2d(2)."""
    old = copy.deepcopy(model)
    for i, m in enumerate(old.features):
        if isinstance(m, nn.Sequential) and len(m) == 1 and getattr(m[0], "pool", 1) > 1:
            m[0].pool = 1
            old.features[i] = nn.Sequential(m[0], SpikeMaxPool2d(2))
    return old


# Conv-4's layout with fewer channels (40 and 72: two and three 32-bit channel words, as 64 and
# 128 are), for the Triton interpreter, whose time follows the channels of every program.
_NARROW_CONV4 = [M.Conv(40), M.Conv(40), M.Pool(), M.Conv(72), M.Conv(72), M.Pool(), M.FC(24),
                 M.FC(24)]


def _small(arch, backend="cpu", seed=0):
    torch.manual_seed(seed)
    specs = dict(M.SPECS)
    if backend == "triton" and arch == "conv4":
        specs["conv4"] = _NARROW_CONV4
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "SPECS", specs)
        m = M.build(arch, "binwslt", in_channels=2, input_size=8, timesteps=2, num_classes=5,
                    backend=backend)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = None
    return m


@pytest.mark.parametrize("arch", ["conv4", "vgg11", "resnet19"])
def test_models_use_the_fused_pool_and_keep_their_keys(arch):
    m = _small(arch)
    old = _unfused(m)
    assert list(m.state_dict()) == list(old.state_dict())
    fused = [x for x in m.modules() if isinstance(x, BinSpikeConv2d) and x.pool == 2]
    assert len(fused) == {"conv4": 2, "vgg11": 3, "resnet19": 0}[arch]
    assert not any(isinstance(x, SpikeMaxPool2d) for x in m.modules())
    assert M.layer_macs(m) == M.layer_macs(old)


# The Triton interpreter is slow: Conv-4 (narrowed, see _NARROW_CONV4) covers its path, in search (the
# fused training pool, forward and backward) and frozen (the inference op) modes; finetune runs
# the same kernels as search, only the parameter that receives dW differs (on the torch side).
NETWORK_CASES = [pytest.param(be.values[0], arch, mode, marks=be.marks,
                              id=f"{be.id}-{arch}-{mode}")
                 for be in BACKENDS for arch in ("conv4", "vgg11", "resnet19")
                 for mode in ("search", "finetune", "frozen")
                 if be.id != "triton" or (arch == "conv4" and mode != "finetune")]


@pytest.mark.parametrize("backend,arch,mode", NETWORK_CASES)
def test_network_equals_unfused_layout(backend, arch, mode):
    """Logits of training-mode and eval forwards (eval without grad: fused pools and packed
    chaining) equal the unfused network's; score / weight gradients agree exactly with it, and
    within 1e-5 of the float64 reference."""
    dev = _dev(backend)
    m = _small(arch, backend).to(dev)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1)).to(dev)
    m.train()
    with torch.no_grad():
        m(x)  # BN statistics of one batch, so that every layer fires
    M.set_mode(m, mode)
    old = _unfused(m)
    r64 = M.set_backend(copy.deepcopy(old), "torch").double().cpu()
    m.train()
    old.train()
    r64.train()
    ya, yb, yr = m(x), old(x), r64(x.cpu().double())
    assert torch.equal(ya, yb)
    if not ya.requires_grad:  # frozen: nothing to train (non-affine BN)
        assert mode == "frozen"
        yr = None
    else:
        ya.square().sum().backward()
        yb.square().sum().backward()
        yr.square().sum().backward()
    # The float64 comparison needs the same spikes in float32 and float64 (no neuron within
    # the tie band anywhere in the net). ResNet-19's 17 spiking layers at this setting flip
    # spikes between float32 and float64 on the torch backend too (it has no pool: the fused
    # and unfused nets are the same there), so it is compared against the unfused net only.
    untied = yr is not None and (ya.detach().cpu().double() - yr.detach()).abs().max() < 1e-4
    assert untied or arch == "resnet19" or mode == "frozen"
    pa, pb, pr = (dict(mm.named_parameters()) for mm in (m, old, r64))
    compared = 0
    for k, p in pa.items():
        if p.grad is None:
            assert pb[k].grad is None
            continue
        assert torch.equal(p.grad, pb[k].grad), k
        if untied and k.endswith(("scores", "weight")) and p.grad.abs().sum() > 0:
            assert_close_rel(p.grad.cpu(), pr[k].grad, 1e-5, k)
            compared += 1
    assert compared > 0 or not untied
    m.eval()
    old.eval()
    with torch.no_grad():
        want = old(x)
        assert torch.equal(m(x), want)
        assert bool((want != 0).any())


def test_eval_chains_packed_spikes(monkeypatch):
    """No-grad eval of Conv-4 passes packed words between its spike convs: each layer after the
    first spike conv gets int32 words, and the logits are those of the float-spike path."""
    m = _small("conv4")
    x = torch.randn(4, 2, 8, 8)
    m.train()
    with torch.no_grad():
        m(x)
    m.eval()
    seen = []
    orig = BinSpikeConv2d.forward_packed

    def spy(self, h, packed_out=True, residual=None):
        seen.append((h.dtype, packed_out))
        return orig(self, h, packed_out, residual)

    monkeypatch.setattr(BinSpikeConv2d, "forward_packed", spy)
    with torch.no_grad():
        got = m(x)
    # the real-input first conv emits words too (binslt::bn_lif_infer), the last one floats
    assert seen == [(torch.float32, True), (torch.int32, True), (torch.int32, True),
                    (torch.int32, False)]
    monkeypatch.setattr(BinSpikeConv2d, "forward_packed", orig)
    with torch.no_grad():
        want = m.classifier(m.features(x.unsqueeze(0).expand(2, *x.shape)))
    assert torch.equal(got, want)
    # a hook on a layer keeps that layer on the float path (the hook sees float spikes)
    h = m.features[2].register_forward_hook(lambda mod, i, o: None)
    monkeypatch.setattr(BinSpikeConv2d, "forward_packed", spy)
    seen.clear()
    with torch.no_grad():
        assert torch.equal(m(x), want)
    h.remove()
    # features.2 is hooked: features.0 -> features.1 is the only chained pair left
    assert seen == [(torch.float32, True), (torch.int32, False)]


def test_packed_chaining_needs_no_grad_kernel_path():
    layer = BinSpikeConv2d(3, 4, 3, padding=1)
    x = (torch.rand(2, 1, 3, 4, 4) < 0.5).float()
    with pytest.raises(ValueError, match="packed spikes out a no-grad conv"):
        layer.forward_packed(x)
    first = BinSpikeConv2d(3, 4, 3, padding=1, input="real")
    with torch.no_grad(), pytest.raises(ValueError, match="packed spikes in need the no-grad "
                                                          "spike-input path"):
        first.forward_packed(torch.zeros(2, 1, 4, 4, 1, dtype=torch.int32))
    with torch.no_grad(), pytest.raises(ValueError, match=r"expects packed spikes \[T, N, H, W, "
                                                          r"1\] int32"):
        layer.forward_packed(torch.zeros(2, 1, 4, 4, 2, dtype=torch.int32))


def test_old_ticket_with_separate_pool_module_loads_and_agrees(tmp_path):
    """A ticket exported from the unfused layout (conv + SpikeMaxPool2d) loads into today's
    network (fused pools) and gives the same logits; so does an old checkpoint's state dict."""
    from binslt.io.tickets import export_ticket, load_ticket

    m = _small("vgg11")
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 2, 8, 8))
    m.eval()
    old = _unfused(m)
    export_ticket(old, tmp_path / "old.safetensors")
    new = load_ticket(tmp_path / "old.safetensors")
    assert any(isinstance(x, BinSpikeConv2d) and x.pool == 2 for x in new.modules())
    x = torch.randn(5, 2, 8, 8)
    with torch.no_grad():
        want = M.set_mode(copy.deepcopy(old), "frozen")(x)
        assert torch.equal(new(x), want)
    fresh = _small("vgg11", seed=9)
    fresh.load_state_dict(old.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), old(x))


def test_nir_exports_fused_pool_as_conv_plus_pool():
    pytest.importorskip("nir")
    from binslt.interop import nir as bnir

    m = _small("conv4")
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 2, 8, 8))
    m.eval()
    for form in ("threshold", "lif"):
        a, b = bnir.to_nir(m, maxpool=form), bnir.to_nir(_unfused(m), maxpool=form)
        assert sorted(a.nodes) == sorted(b.nodes) and sorted(a.edges) == sorted(b.edges)
        assert "features.1.1" in a.nodes and "features.3.1" in a.nodes
        for k in a.nodes:
            assert type(a.nodes[k]) is type(b.nodes[k]), k
            assert a.nodes[k].metadata == b.nodes[k].metadata, k


def test_binslt_exports_pool_option():
    assert binslt.BinSpikeConv2d(2, 2, 3, padding=1, pool=2).pool == 2
