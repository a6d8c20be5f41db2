"""The CPU kernels' "onednn" conv: bconv_lif_infer's counts from oneDNN's int8 convolution.

The counts are integers either way, so every output must equal the bit kernels' ("dense") bit
for bit, and the reference's: packed or float input, pooled, packed or float output, residual,
strides, kernel sizes, channel counts off the word size, several chunks of images, and a weight
cache that must never hand back another layer's weights. The plan takes the route on a CPU with
AMX-INT8; forced, it runs on AVX-512 VNNI as well. Elsewhere these tests cannot run, and forcing
the route must fail with a clear error.
"""

from __future__ import annotations

import pytest
import torch
from helpers import onednn_runs, onednn_supported, small_resnet19_eval, stable_seed

import binslt.ops as ops
from binslt.ops import contract as C
from binslt.ops import reference as ref

pytestmark = pytest.mark.skipif(not __import__("binslt").backends()["cpu"]["usable"],
                                reason="binslt._C (the C++ CPU kernels) is not built")

needs_amx = pytest.mark.skipif(not onednn_supported(),
                               reason="no AMX-INT8 on this CPU (or no oneDNN in this PyTorch)")
needs_int8 = pytest.mark.skipif(not onednn_runs(), reason="neither AMX-INT8 nor AVX-512 VNNI on "
                                "this CPU (or no oneDNN in this PyTorch)")

OP = torch.ops.binslt.bconv_lif_infer
OPS = torch.ops.binslt
NEURON = (2.0, False, 1.0, 0.0)  # tau, decay_input, v_threshold, v_reset


def _case(seed, T=2, n=3, ci=64, co=48, h=8, w=8, k=3, stride=1, rate=0.3, residual=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T, n, ci, h, w, generator=g) < rate).float()
    wt = torch.sign(torch.randn(co, ci, k, k, generator=g)) * (
        torch.rand(co, ci, k, k, generator=g) < 0.6)
    wm, wp = ref.pack_weight_reference(wt)
    alpha = torch.rand(co, generator=g) + 0.5
    # currents around the threshold, so the layer fires at a moderate rate
    scale = (torch.rand(co, generator=g) + 0.5) / (alpha * (ci * k * k * rate * 0.6) ** 0.5)
    shift = torch.randn(co, generator=g) * 0.3 + 0.6
    ho, wo = C.out_hw(h, w, k, k, stride, k // 2)
    res = torch.randn(T, n, co, ho, wo, generator=g) * 0.5 if residual else None
    return x, wm, wp, alpha, scale, shift, res


def _packed(x):
    return ref.pack_spikes_reference(x.flatten(0, 1)).view(x.shape[0], x.shape[1], *x.shape[3:],
                                                            -1)


def _run(algo, x, wm, wp, alpha, scale, shift, res, stride, padding, pool, packed_out):
    with ops.cpu_algorithms(conv=algo):
        return OP(x, wm, wp, alpha, scale, shift, res, stride, padding, *NEURON, pool, packed_out)


CASES = [
    dict(),
    dict(residual=True),
    dict(ci=40, co=33, h=9, w=7, residual=True),  # channels off the word size, odd maps
    dict(ci=96, co=70, h=10, w=10, stride=2),
    dict(k=1, stride=2, ci=64, co=128, h=8, w=8),  # a ResNet 1x1 downsampling shortcut
    dict(k=7, stride=2, ci=32, co=64, h=15, w=15),  # a 7x7 stride-2 stem over spikes
    dict(rate=0.05, residual=True),
    dict(rate=0.9),
]


@needs_int8
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_onednn_infer_equals_bit_kernels_and_reference(case):
    x, wm, wp, alpha, scale, shift, res = _case(stable_seed(sorted(case.items())), **case)
    k, stride = case.get("k", 3), case.get("stride", 1)
    ops_args = (wm, wp, alpha, scale, shift, res, stride, k // 2)
    full = ref.bconv_lif_infer_reference(x, *ops_args, *NEURON)
    assert 0.02 < float(full.mean()) < 0.98
    for xin in (x, _packed(x)):
        for pool in (1, 2):
            if pool == 2 and full.shape[3] < 2:
                continue
            for packed_out in (False, True):
                want = _run("dense", xin, *ops_args, pool, packed_out)
                got = _run("onednn", xin, *ops_args, pool, packed_out)
                assert got.dtype == want.dtype and torch.equal(got, want), (pool, packed_out)
        assert torch.equal(_run("onednn", xin, *ops_args, 1, False), full)


@needs_int8
@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("v_reset", [0.0, -0.25, None], ids=["hard0", "hard-0.25", "soft"])
@pytest.mark.parametrize("residual", [False, True])
def test_onednn_output_in_every_neuron_mode(decay_input, v_reset, residual):
    """The onednn route's epilogue (the neuron modes are compile-time forms there; a float
    output is its words unpacked) gives the reference's spikes for decay_input on and off, hard
    and soft reset, with and without a residual, channels off the vector width (33: two full
    vectors and one lane), packed and float, unpooled and pooled (an odd map: 9x7)."""
    x, wm, wp, alpha, scale, shift, res = _case(
        stable_seed([decay_input, str(v_reset), residual]), T=3, ci=40, co=33, h=9, w=7,
        residual=residual)
    neuron = (2.0, decay_input, 1.0, v_reset)
    args = (wm, wp, alpha, scale, shift, res, 1, 1)
    full = ref.bconv_lif_infer_reference(x, *args, *neuron)
    assert 0.02 < float(full.mean()) < 0.98
    want = ref.pack_spikes_reference(full.flatten(0, 1)).view(*full.shape[:2], *full.shape[3:],
                                                              -1)
    pooled = ref.bconv_lif_infer_reference(x, *args, *neuron, pool=2)
    for xin in (x, _packed(x)):
        with ops.cpu_algorithms(conv="onednn"):
            assert torch.equal(OP(xin, *args, *neuron, 1, True), want)
            assert torch.equal(OP(xin, *args, *neuron, 1, False), full)
            assert torch.equal(OP(xin, *args, *neuron, 2, False), pooled)


@needs_int8
@pytest.mark.parametrize("ci, co", [(512, 512), (520, 500)])
def test_onednn_conv_of_a_large_weight_in_input_channel_parts(ci, co):
    """A weight past OnednnConv's part size (2 MiB of int8: 512->512 3x3) is convolved in input
    channel parts whose counts are summed: the reference's spikes, float and packed, with parts
    of unequal length where the channels are not a multiple of the part (520 channels, packed
    to 544)."""
    x, wm, wp, alpha, scale, shift, res = _case(23 + ci, T=2, n=2, ci=ci, co=co, h=4, w=4,
                                                residual=True)
    assert co * 32 * wm.shape[-1] * 9 > 2 << 20
    args = (wm, wp, alpha, scale, shift, res, 1, 1)
    full = ref.bconv_lif_infer_reference(x, *args, *NEURON)
    assert 0.02 < float(full.mean()) < 0.98
    for xin in (x, _packed(x)):
        assert torch.equal(_run("onednn", xin, *args, 1, False), full)
        assert torch.equal(_run("onednn", xin, *args, 2, False),
                           ref.bconv_lif_infer_reference(x, *args, *NEURON, pool=2))


@needs_int8
def test_onednn_infer_over_several_chunks_of_images():
    # 4 * 64 * 64 * 128 floats of counts an image: 8 MiB, so each image is a chunk of its own
    x, wm, wp, alpha, scale, shift, res = _case(11, T=4, n=3, ci=32, co=128, h=64, w=64,
                                                residual=True)
    args = (wm, wp, alpha, scale, shift, res, 1, 1)
    for pool, packed_out in ((1, False), (2, True)):
        assert torch.equal(_run("onednn", _packed(x), *args, pool, packed_out),
                           _run("dense", _packed(x), *args, pool, packed_out))


@needs_int8
@pytest.mark.parametrize("n,h", [(3, 64), (1, 64), (3, 8)])
@pytest.mark.parametrize("bn_train", [False, True])
def test_onednn_training_forward_over_one_and_several_chunks_of_images(n, h, bn_train):
    """The training forward's oneDNN counts, a call a step or one over all steps' images. At
    64x64, 4 * 64 * 64 * 128 floats an image (8 MiB): with n=3 each image is a chunk of its own
    (a call a step); with n=1, and at 8x8, the chunk is the batch (one call over every step's
    images). Spikes, counts and statistics equal the bit kernels' and the counts the
    reference's."""
    x, wm, wp, alpha, scale, shift, res = _case(12, T=4, n=n, ci=32, co=128, h=h, w=h,
                                                residual=True)
    xp = ref.pack_spikes_reference(x.flatten(0, 1))
    args = (xp, wm, wp, alpha, scale, shift, res, 4, 1, 1, bn_train, 1e-5, *NEURON)
    outs = {}
    for algo in ("onednn", "dense"):
        with ops.cpu_algorithms(conv=algo):
            outs[algo] = OPS.bconv_lif(*args)
    for got, want in zip(outs["onednn"], outs["dense"]):
        assert torch.equal(got, want)
    assert 0.02 < float(outs["dense"][0].mean()) < 0.98
    want = ref.bconv_count_reference(xp, wm, wp, 1, 1)
    assert torch.equal(outs["onednn"][1].flatten(0, 1).float(), want)


@needs_int8
def test_onednn_weight_cache_never_serves_other_weights():
    x, wm, wp, alpha, scale, shift, _ = _case(3)
    args = (alpha, scale, shift, None, 1, 1, 1, False)
    first = _run("onednn", x, wm, wp, *args)
    assert torch.equal(first, _run("dense", x, wm, wp, *args))
    # same shape, other weights: one flipped sign, then one weight pruned, in place
    wp2 = wp.clone()
    wp2[0, 1, 1, 0] ^= 1
    assert torch.equal(_run("onednn", x, wm, wp2, *args), _run("dense", x, wm, wp2, *args))
    wm[5, 0, 2, 1] &= ~(1 << 3)
    assert torch.equal(_run("onednn", x, wm, wp, *args), _run("dense", x, wm, wp, *args))
    # more layers than the cache holds, then the first again
    for s in range(70):
        xs, wms, wps, *_ = _case(100 + s, co=16 + s)
        _run("onednn", xs, wms, wps, torch.ones(16 + s), torch.ones(16 + s),
             torch.zeros(16 + s), None, 1, 1, 1, False)
    assert torch.equal(_run("onednn", x, wm, wp, *args), _run("dense", x, wm, wp, *args))


@needs_int8
def test_onednn_infer_rejects_non_binary_float_input():
    x, wm, wp, alpha, scale, shift, _ = _case(5)
    x[1, 2, 40, 3, 4] = 0.5
    with pytest.raises(ValueError, match="binary spikes"):
        _run("onednn", x, wm, wp, alpha, scale, shift, None, 1, 1, 1, False)
    x[1, 2, 40, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="binary spikes"):
        _run("onednn", x, wm, wp, alpha, scale, shift, None, 1, 1, 1, True)


@needs_int8
def test_onednn_ticket_eval_equals_bit_kernels():
    """A whole network's eval (packed chaining, pooled layers, residual blocks) is the same with
    the route forced on and off."""
    from binslt.nn import models as M

    for arch in ("vgg11", "resnet19"):
        torch.manual_seed(0)
        net = M.build(arch, "binwslt", num_classes=10, in_channels=3, input_size=16, timesteps=2,
                      prune_rate=0.5, bn=True, bn_affine=False, backend="cpu").eval()
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            with ops.cpu_algorithms(conv="onednn"):
                a = net(x)
            with ops.cpu_algorithms(conv="dense"):
                b = net(x)
        assert torch.equal(a, b), arch


@pytest.mark.skipif(onednn_runs(), reason="this CPU runs the onednn conv")
def test_forcing_onednn_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a CPU with AMX-INT8 or AVX-512 VNNI"):
        with ops.cpu_algorithms(conv="onednn"):
            pass


ALGOS = ["dense", "event"] + (["onednn"] if onednn_runs() else [])


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", [dict(residual=True), dict(ci=40, co=33, h=9, w=7,
                                                            residual=True)], ids=["64", "33"])
def test_infer_takes_a_packed_spike_residual(algo, case):
    """A residual of spikes as pack_spikes words (an identity shortcut's packed input) gives the
    spikes of the same residual as 0. / 1. floats, on every algorithm and output form."""
    x, wm, wp, alpha, scale, shift, _ = _case(stable_seed(sorted(case.items())), **case)
    T, n = x.shape[:2]
    ho, wo = x.shape[3], x.shape[4]
    g = torch.Generator().manual_seed(9)
    rs = (torch.rand(T, n, wm.shape[0], ho, wo, generator=g) < 0.4).float()
    words = _packed(rs)
    for pool in (1, 2):
        for packed_out in (False, True):
            args = (alpha, scale, shift)
            want = _run(algo, _packed(x), wm, wp, *args, rs, 1, 1, pool, packed_out)
            got = _run(algo, _packed(x), wm, wp, *args, words, 1, 1, pool, packed_out)
            assert torch.equal(got, want), (pool, packed_out)
    with pytest.raises(ValueError, match=r"packed residual must be spike words"):
        _run(algo, _packed(x), wm, wp, alpha, scale, shift, words[:, :, :-1], 1, 1, 1, True)


def test_resnet_eval_chains_packed_spikes_through_its_blocks(monkeypatch):
    """ResNet-19's no-grad forward passes packed words through its residual blocks (identity
    shortcuts as packed residuals, 1x1 shortcuts computed inside conv2's op from the block's
    packed input): the same logits as the module-by-module forward (the shortcut's float map
    added as a residual), and no float spike map between two blocks."""
    from binslt.nn import models as M

    net = small_resnet19_eval("cpu")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        whole = net.classifier(net.features(x.unsqueeze(0).expand(2, *x.shape)))
    seen, real_get = [], ops.get_op

    def spy(name, be):
        op = real_get(name, be)

        def call(*args):
            res = args[6]  # the residual, or the shortcut's block input
            seen.append((name, args[0].dtype, None if res is None else res.dtype))
            return op(*args)

        return call if name in ("bconv_lif_infer", "bconv_lif_infer_shortcut") else op

    monkeypatch.setattr(ops.layer, "get_op", spy)
    with torch.no_grad():
        chained = net(x)
    assert torch.equal(chained, whole)
    blocks = [m for m in net.modules() if isinstance(m, M.ResidualBlock)]
    assert len(seen) == 2 * len(blocks) == 16  # every spike-input conv, each with packed input
    assert all(xd == torch.int32 for _, xd, _ in seen)
    identity = sum(b.shortcut is None for b in blocks)
    assert identity == 5 and sum(rd == torch.int32 for n, _, rd in seen
                                 if n == "bconv_lif_infer") == identity
    fused = [rd for n, _, rd in seen if n == "bconv_lif_infer_shortcut"]
    if onednn_supported():  # the three 1x1 shortcuts inside conv2's op, from the packed input
        assert fused == [torch.int32] * 3
    else:  # BinConv2d's float conv on the unpacked spikes, its current conv2's residual
        assert fused == [] and sum(rd == torch.float32 for _, _, rd in seen) == 3


@pytest.mark.parametrize("stride", [1, 2])
def test_shortcut_op_equals_the_shortcut_current_as_residual(stride):
    """bconv_lif_infer_shortcut gives the spikes of bconv_lif_infer with the shortcut's
    bconv_affine_infer current as the residual, bit for bit, on every route (onednn computes
    the shortcut chunk by chunk itself; the others take its float map), for float and packed
    inputs, packed and float, pooled and unpooled output; and the reference's spikes."""
    T, n, ci, co, h = 2, 3, 40, 33, 10
    ho = (h - 1) // stride + 1
    g = torch.Generator().manual_seed(17 + stride)
    bx = (torch.rand(T, n, ci, h, h, generator=g) < 0.3).float()
    x = (torch.rand(T, n, co, ho, ho, generator=g) < 0.3).float()
    wm, wp = ops.pack_weight(torch.randint(-1, 2, (co, co, 3, 3), generator=g).float())
    sm, sp = ops.pack_weight(torch.randint(-1, 2, (co, ci, 1, 1), generator=g).float())
    conv = (wm, wp, torch.rand(co, generator=g) + 0.5, torch.rand(co, generator=g) * 0.2,
            torch.randn(co, generator=g) * 0.3)
    sc = (sm, sp, torch.rand(co, generator=g) + 0.5, torch.rand(co, generator=g) * 0.2,
          torch.randn(co, generator=g) * 0.3)
    neuron = (2.0, False, 1.0, 0.0)
    current = ref.bconv_affine_infer_reference(bx.flatten(0, 1), *sc, stride, 0).view(
        T, n, co, ho, ho)
    algos = ["dense", "event"] + (["onednn"] if onednn_runs() else [])
    for pool, packed_out in ((1, True), (1, False), (2, False), (2, True)):
        want = ref.bconv_lif_infer_reference(x, *conv, current, 1, 1, *neuron, pool, packed_out)
        assert 0.02 < float(want.float().mean() if not packed_out else 0.5) < 0.98
        assert torch.equal(ref.bconv_lif_infer_shortcut_reference(
            x, *conv, bx, *sc, stride, 0, 1, 1, *neuron, pool, packed_out), want)
        for algo in algos:
            for xin, bin_ in ((_packed(x), _packed(bx)), (x, bx)):
                with ops.cpu_algorithms(conv=algo):
                    got = OPS.bconv_lif_infer_shortcut(xin, *conv, bin_, *sc, stride, 0, 1, 1,
                                                       *neuron, pool, packed_out)
                assert torch.equal(got, want), (algo, pool, packed_out, xin.dtype)


def test_shortcut_op_refuses_a_mismatched_shortcut_and_non_binary_input():
    T, n, co = 2, 2, 8
    x = (torch.rand(T, n, co, 6, 6) < 0.3).float()
    wm, wp = ops.pack_weight(torch.randint(-1, 2, (co, co, 3, 3)).float())
    sm, sp = ops.pack_weight(torch.randint(-1, 2, (co, 4, 1, 1)).float())
    one = torch.ones(co)
    conv, sc = (wm, wp, one, one, one * 0), (sm, sp, one, one, one * 0)
    neuron = (2.0, False, 1.0, 0.0)
    bx = (torch.rand(T, n, 4, 12, 12) < 0.3).float()
    with pytest.raises(ValueError, match=r"shortcut's output \[8, 12, 12\].*layer's \[8, 6, 6\]"):
        OPS.bconv_lif_infer_shortcut(x, *conv, bx, *sc, 1, 0, 1, 1, *neuron, 1, False)
    bx[0, 1, 2, 3, 4] = 0.5
    for algo in ["event"] + (["onednn"] if onednn_runs() else []):  # both routes
        with ops.cpu_algorithms(conv=algo), pytest.raises(ValueError, match="block_x"):
            OPS.bconv_lif_infer_shortcut(x, *conv, bx, *sc, 2, 0, 1, 1, *neuron, 1, False)


@pytest.mark.parametrize("case", [dict(k=1, stride=2, ci=64, co=128), dict(k=1, ci=40, co=33),
                                  dict(k=3, stride=1, ci=32, co=16, h=9, w=7)],
                         ids=["1x1s2", "1x1-odd", "3x3"])
def test_bconv_affine_infer_equals_reference(case):
    """BinConv2d's no-grad op: (count * alpha) * scale + shift, bit for bit the reference's, from
    float spikes and from packed words."""
    x, wm, wp, alpha, scale, shift, _ = _case(stable_seed(sorted(case.items())), **case)
    xf = x.flatten(0, 1)
    k, stride = case.get("k", 3), case.get("stride", 1)
    want = ref.bconv_affine_infer_reference(xf, wm, wp, alpha, scale, shift, stride, k // 2)
    # the counts are the integers of a float64 conv
    w64 = ref.unpack_weight_reference(wm, wp, xf.shape[1]).double()
    c64 = torch.nn.functional.conv2d(xf.double(), w64, stride=stride, padding=k // 2)
    v = (-1, 1, 1)
    assert torch.equal(want, ((c64.float() * alpha.view(v)) * scale.view(v) + shift.view(v)))
    for xin in (xf, ref.pack_spikes_reference(xf)):
        got = ops.bconv_affine_infer(xin, wm, wp, alpha, scale, shift, stride, k // 2)
        assert got.shape == want.shape and got.is_contiguous() and torch.equal(got, want)
    bad = xf.clone()
    bad[1, 3, 2, 2] = 2.0
    with pytest.raises(ValueError, match="binary spikes"):
        ops.bconv_affine_infer(bad, wm, wp, alpha, scale, shift, stride, k // 2)
    with pytest.raises(ValueError, match="binary spikes"):
        ref.bconv_affine_infer_reference(bad, wm, wp, alpha, scale, shift, stride, k // 2)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ops.bconv_affine_infer(x, wm, wp, alpha, scale, shift, stride, k // 2)


@needs_amx
def test_binconv2d_eval_runs_the_exact_count_op():
    """On an AMX CPU a frozen BinConv2d + BN shortcut in eval gives (count * alpha) folded BN:
    within float rounding of its grad-mode forward, and taking packed words as well."""
    import binslt

    torch.manual_seed(2)
    m = binslt.BinConv2d(64, 96, 1, stride=2, bn=True)
    with torch.no_grad():
        m.bn.running_mean.normal_(0, 1)
        m.bn.running_var.uniform_(0.5, 2)
    binslt.models.set_mode(m, "frozen")
    m.eval()
    x = (torch.rand(2, 3, 64, 8, 8) < 0.3).float()
    with torch.no_grad():
        y = m(x)
        yp = m(ref.pack_spikes_reference(x.flatten(0, 1)).view(2, 3, 8, 8, 2))
    y_grad_mode = m(x)
    assert torch.equal(y, yp)
    torch.testing.assert_close(y, y_grad_mode.detach(), rtol=1e-5, atol=1e-5)
