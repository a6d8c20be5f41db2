"""The C++ CPU kernels (csrc/cpu) against binslt.reference.

* packing ops: exactly;
* bconv_lif: counts exactly, spikes exactly outside a 1e-5 tie band around the threshold (a
  neuron is excluded from its first near-tie step on), mean/var to 1e-5 relative;
* bconv_lif_bwd / bn_lif_bwd: within 1e-5 (normwise relative) of a float64 reference built from
  binslt.reference's differentiable blocks on the same inputs;
* every popcount path this CPU can run gives the same counts;
* torch.library.opcheck, one torch.compile(fullgraph=True) model, and the layer end to end.
"""

from __future__ import annotations

import contextlib
import math
import random
import re

import pytest
import torch
from helpers import (
    CONV_GEOMS,
    cpu_isas,
    nudge_until_untied,
    onednn_runs,
    onednn_supported,
    stable_seed,
    tie_mask,
)

import binslt.ops as ops
from binslt.nn.layers import BinSpikeConv2d
from binslt.ops import cpu_algorithms, plan
from binslt.ops import cpu_algos as _cpu_algos
from binslt.ops import library as _ext
from binslt.ops import reference as ref

CPU = _ext.module("cpu")
pytestmark = pytest.mark.skipif(CPU is None, reason="binslt._C (the C++ CPU kernels) is not built")

OPS = torch.ops.binslt


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / (b.norm() + 1e-30))


def _assert_close(a, b, what, tol=1e-5):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = float((a.double() - b.double()).norm())
    assert err <= tol * float(b.double().norm()) + 1e-9, f"{what}: rel err {_rel(a, b):.3g}"


ISAS = cpu_isas()


@pytest.fixture
def use_algos():
    """use_algos(isa=..., conv=..., grad_x=..., grad_w=...) forces CPU algorithms until the test
    ends."""
    with contextlib.ExitStack() as stack:
        yield lambda **kw: stack.enter_context(cpu_algorithms(**kw))


# bconv_lif's forward algorithms: AND+popcount over every input word, and the event kernel
# (sum of the weight columns of the spikes); 'auto' picks by the input firing rate. Where the CPU
# has AMX-INT8 or AVX-512 VNNI, also oneDNN's int8 convolution (the training forward stores its
# counts and runs the bit kernels' second pass: every output the dense kernel's bit for bit).
ALGOS = ["dense", "event"] + (["onednn"] if onednn_runs() else [])


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 33, 7, 5), (2, 64, 4, 3), (2, 65, 3, 2),
                                   (2, 40, 33, 35)])  # > 1024 positions: two blocks
def test_pack_unpack_exact(shape):
    x = (torch.rand(shape) < 0.4).float()
    p = OPS.pack_spikes(x)
    assert torch.equal(p, ref.pack_spikes_reference(x))
    assert torch.equal(OPS.unpack_spikes(p, shape[1]), ref.unpack_spikes_reference(p, shape[1]))
    # Bit 31 set everywhere: the int32 sign bit must round-trip too.
    full = torch.ones(2, 32, 2, 2)
    assert torch.equal(OPS.pack_spikes(full), ref.pack_spikes_reference(full))
    # Non-contiguous and float64 input are handled by the kernel.
    xt = x.double().transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(OPS.pack_spikes(xt), p)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 33, 3, 3), (4, 64, 1, 1), (3, 65, 3, 3)])
def test_pack_weight_exact(shape):
    w = torch.randint(-1, 2, shape).float() * 0.37
    m, p = OPS.pack_weight(w)
    rm, rp = ref.pack_weight_reference(w)
    assert torch.equal(m, rm) and torch.equal(p, rp)
    back = ref.unpack_weight_reference(m, p, shape[1])
    assert torch.equal(back, torch.sign(w))


def test_pack_errors():
    with pytest.raises(RuntimeError, match=r"\[B, C, H, W\]"):
        OPS.pack_spikes(torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="int32"):
        OPS.unpack_spikes(torch.zeros(1, 2, 2, 1), 3)
    with pytest.raises(RuntimeError, match="channels must be in"):
        OPS.unpack_spikes(torch.zeros(1, 2, 2, 1, dtype=torch.int32), 33)


@pytest.mark.parametrize("where", [0, -1, 40000])
@pytest.mark.parametrize("value", [0.5, float("nan"), -1.0, 2.0])
def test_pack_refuses_one_value_anywhere(where, value):
    """One non-binary value anywhere (the first, the last, in the middle of a parallel range)
    makes pack_spikes raise, and binslt.ops.spike_bits answer None, however the work is split."""
    x = (torch.rand(64, 40, 9, 9, generator=torch.Generator().manual_seed(4)) < 0.3).float()
    assert torch.equal(ops.spike_bits(x, OPS.pack_spikes), OPS.pack_spikes(x))
    x.view(-1)[where] = value
    with pytest.raises(ValueError, match="binary spikes"):
        OPS.pack_spikes(x)
    assert ops.spike_bits(x, OPS.pack_spikes) is None


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("lo,hi", [(-128, 127), (-129, 5), (-3, 128), (-40000 // 2, 9), (0, 0)])
def test_narrow_int8_matches_the_reference(dtype, lo, hi):
    """narrow_int8: the counts clamped to [-128, 127] as int8 and whether none needed it, equal
    to the reference's and to a plain clamp, over a range that splits across threads."""
    g = torch.Generator().manual_seed(lo * 7 + hi)
    c = torch.randint(-20, 21, (4, 3, 70, 33, 17), generator=g).to(dtype)
    c.view(-1)[[0, c.numel() // 2, -1]] = torch.tensor([lo, hi, lo], dtype=dtype)
    out, fits = OPS.narrow_int8(c)
    want, want_fits = ref.narrow_int8_reference(c)
    assert out.dtype == torch.int8 and fits.dtype == torch.bool and fits.dim() == 0
    assert torch.equal(out, want) and bool(fits) == bool(want_fits)
    assert bool(fits) == (lo >= -128 and hi <= 127)
    assert torch.equal(out.to(torch.int32), c.to(torch.int32).clamp(-128, 127))
    assert bool(OPS.narrow_int8(c[:0])[1])
    with pytest.raises(ValueError, match="int16 or int32"):
        OPS.narrow_int8(c.to(torch.int8))


# ----------------------------------------------------------------------------------------------
# bconv_lif forward
# ----------------------------------------------------------------------------------------------



def _neuron(rng: random.Random, v_reset, decay_input):
    return dict(tau=rng.uniform(1.5, 100.0), decay_input=decay_input,
                v_threshold=rng.choice([0.3, 1.0, 1.7]), v_reset=v_reset)


def _drive(z: torch.Tensor, nk: dict, bn_train: bool, seed: int):
    """Per-channel (scale, shift) float32 that put the LIF input X around the threshold, so that
    neurons fire sometimes (with tau up to 100 and decay_input the charge per step is X/tau)."""
    g = torch.Generator().manual_seed(seed)
    c = z.shape[2]
    dims = [0, 1] + list(range(3, z.dim()))
    eff = nk["v_threshold"] * (max(1.0, nk["tau"] / z.shape[0]) if nk["decay_input"] else 1.0)
    jit = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    if bn_train:
        scale, shift = 0.8 * eff * jit, 0.6 * eff * jit
    else:
        # a floor keeps X = z*scale + shift well conditioned in float32 (single-element channels)
        std = z.std(dim=dims, unbiased=False).clamp_min(0.5)
        scale = 0.8 * eff * jit / std
        shift = 0.6 * eff * jit - z.mean(dim=dims) * scale
    return scale.float(), shift.float()


def _conv_case(geom, seed, rate=0.3, bn_train=False, residual=False):
    T, N, Ci, Co, H, W, k, s, p = geom
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T * N, Ci, H, W, generator=g) < rate).float()
    w = torch.randint(-1, 2, (Co, Ci, k, k), generator=g).float()
    alpha = torch.rand(Co, generator=g) * 0.2 + 0.05
    scale = torch.rand(Co, generator=g) + 0.5
    shift = torch.rand(Co, generator=g) * 0.4 - 0.1
    ho, wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    res = torch.randn(T, N, Co, ho, wo, generator=g) * 0.3 if residual else None
    xp = ref.pack_spikes_reference(x)
    wm, wp = ref.pack_weight_reference(w)
    return dict(x=x, w=w, xp=xp, wm=wm, wp=wp, alpha=alpha, scale=scale, shift=shift, res=res,
                T=T, stride=s, padding=p, bn_train=bn_train, Ci=Ci)


def _infer(c, fwd_tail, res=None):
    """bconv_lif_infer on the case's float spikes; fwd_tail = (tau, decay_input, vth, v_reset)."""
    x = c["x"].view(c["T"], -1, *c["x"].shape[1:])
    return OPS.bconv_lif_infer(x, c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], res,
                               c["stride"], c["padding"], *fwd_tail)


def _z64(c):
    """The exact conv current Z = alpha * count in float64, [T, N, Co, Ho, Wo]."""
    counts = ref.bconv_count_reference(c["xp"], c["wm"], c["wp"], c["stride"], c["padding"])
    z = counts.double().view(c["T"], -1, *counts.shape[1:])
    return z * c["alpha"].double().view(1, 1, -1, 1, 1)


def _ref_h64(z64, c, nk):
    """H of the reference neuron in float64 from the current z (float64)."""
    x, _, _ = ref.epilogue(z64, c["scale"].double(), c["shift"].double(),
                           None if c["res"] is None else c["res"].double(), c["bn_train"], 1e-5)
    _, h = ref.lif_multistep(x, tau=nk["tau"], decay_input=nk["decay_input"],
                             v_threshold=nk["v_threshold"], v_reset=nk["v_reset"], return_h=True)
    return h


#: Short maps with many channels: the LIF stages take the maps of several channels per row.
SHORT_MAP_GEOMS = [(2, 3, 24, 70, 4, 4, 3, 1, 1), (3, 2, 20, 130, 2, 2, 3, 1, 1)]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("geom", CONV_GEOMS + SHORT_MAP_GEOMS)
@pytest.mark.parametrize("bn_train", [False, True])
@pytest.mark.parametrize("v_reset,decay_input,residual",
                         [(0.0, True, False), (None, False, True), (-0.2, False, False)])
def test_bconv_lif_forward(geom, bn_train, v_reset, decay_input, residual, algo, use_algos):
    use_algos(conv=algo)
    assert _cpu_algos.current()["conv"] == algo
    seed = stable_seed((geom, bn_train, v_reset, decay_input, residual))
    rng = random.Random(seed)
    c = _conv_case(geom, seed, bn_train=bn_train, residual=residual)
    nk = _neuron(rng, v_reset, decay_input)
    c["scale"], c["shift"] = _drive(_z64(c), nk, bn_train, seed)
    args = (c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], c["res"], c["T"],
            c["stride"], c["padding"], bn_train, 1e-5, nk["tau"], decay_input,
            nk["v_threshold"], v_reset)
    s, counts, mean, var = OPS.bconv_lif(*args)
    if algo != "dense":  # the same counts, statistics and spikes as the dense kernel's, bit for bit
        with cpu_algorithms(conv="dense"):
            dense = OPS.bconv_lif(*args)
        for got, want in zip((s, counts, mean, var), dense):
            assert torch.equal(got, want)
    rs, rcounts, rmean, rvar = ref.bconv_lif_reference(*args)
    assert counts.dtype == rcounts.dtype == torch.int16
    assert torch.equal(counts, rcounts)
    assert s.dtype == torch.float32 and s.shape == rs.shape
    if bn_train:
        torch.testing.assert_close(mean, rmean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(var, rvar, rtol=1e-5, atol=1e-7)
    else:
        assert not mean.any() and not var.any()
        # The inference form (float input packed per tile, counts kept in a per-thread buffer)
        # gives the same spikes.
        assert torch.equal(_infer(c, args[12:], c["res"]), s)
    z64 = rcounts.double() * c["alpha"].double().view(1, 1, -1, 1, 1)
    keep = tie_mask(_ref_h64(z64, c, nk), nk["v_threshold"])
    assert keep.float().mean() > 0.9
    assert torch.equal(s[keep], rs[keep])
    if s.numel() >= 200:
        assert 0 < float(s.mean()) < 1  # the case exercises both outcomes


@pytest.mark.skipif(not onednn_runs(), reason="neither AMX-INT8 nor AVX-512 VNNI on this CPU")
@pytest.mark.parametrize("bn_train", [False, True])
def test_bconv_lif_onednn_training_forward_with_int32_counts(bn_train):
    """Counts past int16 (Ci*kh*kw > 32767): the onednn training forward stores them as int32,
    as the dense kernel does, with the same statistics and spikes, and the reference's counts."""
    g = torch.Generator().manual_seed(3)
    ci, co = 4096, 16
    x = (torch.rand(2, ci, 3, 3, generator=g) < 0.5).float()
    w = torch.sign(torch.randn(co, ci, 3, 3, generator=g)) * (
        torch.rand(co, ci, 3, 3, generator=g) < 0.7)
    wm, wp = ref.pack_weight_reference(w)
    xp = ref.pack_spikes_reference(x)
    alpha = torch.full((co,), 0.01)
    args = (xp, wm, wp, alpha, torch.ones(co), torch.full((co,), 0.5), None, 1, 1, 1, bn_train,
            1e-5, 2.0, False, 1.0, 0.0)
    outs = {}
    for algo in ("onednn", "dense"):
        with cpu_algorithms(conv=algo):
            outs[algo] = OPS.bconv_lif(*args)
    assert outs["onednn"][1].dtype == torch.int32
    for got, want in zip(outs["onednn"], outs["dense"]):
        assert torch.equal(got, want)
    want = ref.bconv_count_reference(xp, wm, wp, 1, 1)
    assert torch.equal(outs["onednn"][1].flatten(0, 1).float(), want)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("geom", [CONV_GEOMS[1], CONV_GEOMS[3], CONV_GEOMS[5],
                                  # Co not a multiple of 64; Co > 256 (a 256-channel block + rest)
                                  (2, 1, 40, 70, 5, 6, 3, 1, 1), (1, 2, 20, 300, 4, 4, 3, 1, 1)])
def test_bconv_popcount_paths_agree(isa, geom, algo, use_algos):
    c = _conv_case(geom, 7, rate=0.5)
    use_algos(isa=isa, conv=algo)
    assert _ext.cpu_info()["kernel_isa"] == isa
    fwd = (c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None, c["T"],
           c["stride"], c["padding"])
    s, counts, _, _ = OPS.bconv_lif(*fwd, False, 1e-5, 2.0, True, 1.0, 0.0)
    want = ref.bconv_count_reference(c["xp"], c["wm"], c["wp"], c["stride"], c["padding"])
    assert torch.equal(counts.flatten(0, 1).float(), want)
    assert torch.equal(_infer(c, (2.0, True, 1.0, 0.0)), s)
    # The weight-gradient gather also has per-path code: check it against float64.
    gz = torch.randn(counts.shape, generator=torch.Generator().manual_seed(5))
    args = (gz, counts, c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"],
            torch.zeros_like(c["alpha"]), torch.ones_like(c["alpha"]), None, c["Ci"],
            c["stride"], c["padding"], False, 1e-5, 2.0, True, 1.0, 0.0, True, 0, 2.0, False)
    g_w = OPS.bconv_lif_bwd(*args)[1]
    g_z = OPS.bconv_lif_bwd(*args)[2].double() * c["scale"].double().view(1, 1, -1, 1, 1)
    w64 = torch.nn.grad.conv2d_weight(c["x"].double(), tuple(c["w"].shape), g_z.flatten(0, 1),
                                      stride=c["stride"], padding=c["padding"])
    _assert_close(g_w, w64, f"grad_weight ({isa})")


@pytest.mark.parametrize("isa", ISAS)
def test_bconv_event_widens_before_int8_overflow(isa, use_algos):
    # Every input spikes and every weight is +1 (or -1 for odd output channels): each output sums
    # 200 * 9 = 1800 columns, far past the 127 the event kernel may add in int8 lanes at a time.
    use_algos(isa=isa, conv="event")
    ci, co = 200, 66
    w = torch.ones(co, ci, 3, 3)
    w[1::2] = -1
    wm, wp = ref.pack_weight_reference(w)
    xp = ref.pack_spikes_reference(torch.ones(2, ci, 5, 5))
    one = torch.ones(co)
    _, counts, _, _ = OPS.bconv_lif(xp, wm, wp, one, one, one * 0, None, 2, 1, 1, False, 1e-5,
                                    2.0, True, 1.0, 0.0)
    want = ref.bconv_count_reference(xp, wm, wp, 1, 1)
    assert int(want.abs().max()) == 1800
    assert torch.equal(counts.flatten(0, 1).float(), want)


def test_bconv_conv_algo_rejects_unknown_name():
    with pytest.raises(ValueError, match="expected one of auto, dense, event, onednn"):
        CPU._set_cpu_algorithms("auto", "sparse", "auto", "auto")
    with pytest.raises(ValueError, match="expected one of auto, dense, ternary, combo, unfold, "
                       "int8, margined, pointwise"):
        CPU._set_cpu_algorithms("auto", "auto", "sparse", "auto")
    with pytest.raises(ValueError, match="expected one of auto, scalar, popcnt, avx2, avx512"):
        CPU._set_cpu_algorithms("sse", "auto", "auto", "auto")
    with pytest.raises(ValueError, match="expected one of auto, event, dense, unfold, taps, int8, "
                       "pointwise, bf16x3"):
        CPU._set_cpu_algorithms("auto", "auto", "auto", "gemm")
    before = _cpu_algos.current()
    for kw, choices in (({"conv": "sparse"}, "('auto', 'dense', 'event', 'onednn')"),
                        ({"grad_x": "sparse"},
                         "('auto', 'dense', 'ternary', 'combo', 'unfold', 'int8', 'margined', "
                         "'pointwise', 'bf16x3')"),
                        ({"isa": "sse"}, "('auto', 'scalar', 'popcnt', 'avx2', 'avx512')"),
                        ({"grad_w": "gemm"},
                         "('auto', 'event', 'dense', 'unfold', 'taps', 'int8', 'pointwise', "
                         "'bf16x3')")):
        with pytest.raises(ValueError, match=re.escape(f"must be one of {choices}")):
            with cpu_algorithms(**kw):
                pass
    assert _cpu_algos.current() == before


def test_cpu_algorithms_restores_the_previous_configuration():
    auto = {"isa": "auto", "conv": "auto", "grad_x": "auto", "grad_w": "auto"}
    assert _cpu_algos.current() == auto
    with cpu_algorithms(conv="event") as now:
        assert now == _cpu_algos.current() == dict(auto, conv="event")
        with cpu_algorithms(isa="scalar", grad_x="dense", grad_w="dense"):
            assert _cpu_algos.current() == {"isa": "scalar", "conv": "event", "grad_x": "dense",
                                            "grad_w": "dense"}
            assert _ext.cpu_info()["kernel_isa"] == "scalar"
        assert _cpu_algos.current() == dict(auto, conv="event")
    with pytest.raises(KeyError):
        with cpu_algorithms(conv="dense"):
            raise KeyError("inside")
    assert _cpu_algos.current() == auto


def test_cpu_info_reports_the_kernel_path():
    info = _ext.cpu_info()
    feats = info["features"]
    assert set(info) == {"kernel_isa", "features", "openmp"} and isinstance(info["openmp"], bool)
    avx512 = all(feats.get(f, False) for f in ("avx512f", "avx512bw", "avx512vl",
                                                "avx512vpopcntdq"))
    want = ("avx512" if avx512 else "avx2" if feats.get("avx2") else
            "popcnt" if feats.get("popcnt") else "scalar")
    assert info["kernel_isa"] == want == ISAS[-1]
    assert ("avx512" in ISAS) == avx512
    reason = _ext.backends()["cpu"]["reason"]
    assert f"kernel path {want}" in reason
    assert all(f in reason for f, on in feats.items() if on)


def test_bconv_counts_int32_when_large():
    # 32 * Cw * kh * kw = 32 * 2 * 29 * 29 > 32767 -> int32 counts (ops.counts_dtype); the count
    # itself (40 * 29 * 29 = 33640) would overflow int16.
    wm, wp = ref.pack_weight_reference(torch.ones(2, 40, 29, 29))
    x = torch.ones(1, 40, 29, 29)
    xp = ref.pack_spikes_reference(x)
    assert ops.counts_dtype(wm) == torch.int32
    alpha = torch.tensor([1e-4, 1e-5])  # z = 3.364 and 0.3364: one spikes, one does not
    fwd = (xp, wm, wp, alpha, torch.ones(2), torch.zeros(2), None, 1, 1, 0)
    s, counts, _, _ = OPS.bconv_lif(*fwd, False, 1e-5, 2.0, True, 1.0, 0.0)
    assert counts.dtype == torch.int32 and counts.flatten().tolist() == [40 * 29 * 29] * 2
    assert s.flatten().tolist() == [1.0, 0.0]
    inf = OPS.bconv_lif_infer(x[None], wm, wp, alpha, torch.ones(2), torch.zeros(2), None, 1, 0,
                              2.0, True, 1.0, 0.0)
    assert torch.equal(inf, s)


@pytest.mark.parametrize("algo", ALGOS)
def test_bconv_lif_infer_rejects_bad_input(algo, use_algos):
    use_algos(conv=algo)
    c = _conv_case(CONV_GEOMS[1], 3)
    c["x"][5, 7, 2, 3] = 0.5  # one non-binary value, in the last tile of one thread
    with pytest.raises(ValueError, match="binary spikes"):
        _infer(c, (2.0, True, 1.0, 0.0))
    c["x"][5, 7, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="binary spikes"):
        _infer(c, (2.0, True, 1.0, 0.0))
    # ValueError, as the contract's row for x (tests/test_contract.py) on every backend
    with pytest.raises(ValueError, match=r"\[T, N, C, H, W\]"):
        OPS.bconv_lif_infer(c["x"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None, 1,
                            1, 2.0, True, 1.0, 0.0)
    with pytest.raises(ValueError, match="words per position"):
        OPS.bconv_lif_infer(c["x"][None, :, :32], c["wm"], c["wp"], c["alpha"], c["scale"],
                            c["shift"], None, 1, 1, 2.0, True, 1.0, 0.0)


def test_bconv_lif_errors():
    c = _conv_case(CONV_GEOMS[1], 0)
    base = [c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None, c["T"], 1, 1,
            False, 1e-5, 2.0, True, 1.0, 0.0]

    def call(**kw):
        a = list(base)
        for i, v in kw.items():
            a[int(i[1:])] = v
        return OPS.bconv_lif(*a)

    with pytest.raises(RuntimeError, match="x_packed must be"):
        call(a0=c["xp"].float())
    with pytest.raises(ValueError, match="words per position"):
        call(a1=c["wm"][..., :0].contiguous(), a2=c["wp"][..., :0].contiguous())
    with pytest.raises(ValueError, match=r"alpha must have shape \[5\]"):
        call(a3=torch.ones(4))
    with pytest.raises(ValueError, match=r"T=3 must be >= 1 and divide the packed batch T\*N="):
        call(a7=3)
    with pytest.raises(ValueError, match="residual must have shape"):
        call(a6=torch.zeros(1))
    with pytest.raises(ValueError, match=r"input \d+x\d+ is smaller than the kernel 9x9"):
        call(a9=0, a1=c["wm"].repeat(1, 3, 3, 1), a2=c["wp"].repeat(1, 3, 3, 1))
    # Non-contiguous inputs are made contiguous, not rejected.
    xnc = c["xp"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not xnc.is_contiguous()
    assert torch.equal(call(a0=xnc)[1], call()[1])


# The op contract (binslt/_contract.py, csrc/include/binslt/checks.h): the CPU kernels raise the
# contract's type and message, compared up to and including "got " (C++ prints -1, Python -1.0).
_CONTRACT = [
    # (argument index in bconv_lif, bad value, exception, message up to "got ")
    (12, -1.0, ValueError, "binslt::bconv_lif: tau must be finite and > 0 (or +inf with decay_input=False: IF), got "),
    (12, float("nan"), ValueError, "binslt::bconv_lif: tau must be finite and > 0 (or +inf with decay_input=False: IF), got "),
    (14, float("inf"), ValueError, "binslt::bconv_lif: v_threshold must be finite, got "),
    (15, float("nan"), ValueError,
     "binslt::bconv_lif: v_reset must be None (soft reset) or finite, got "),
    (11, 0.0, ValueError, "binslt::bconv_lif: bn_eps must be finite and > 0, got "),
    (8, 0, ValueError, "binslt::bconv_lif: stride must be >= 1, got "),
    (9, -1, ValueError, "binslt::bconv_lif: padding must be >= 0, got "),
    (7, 3, ValueError, "binslt::bconv_lif: T=3 must be >= 1 and divide the packed batch T*N=8"),
    (7, 0, ValueError, "binslt::bconv_lif: T=0 must be >= 1 and divide the packed batch T*N=8"),
    (3, torch.ones(4), ValueError,
     "binslt::bconv_lif: alpha must have shape [5] (one value per output channel), got "),
    (4, torch.ones(5, 1), ValueError,
     "binslt::bconv_lif: scale must have shape [5] (one value per output channel), got "),
    (5, torch.ones(5, dtype=torch.int64), TypeError,
     "binslt::bconv_lif: shift must be a floating tensor, got "),
    (6, torch.zeros(1), ValueError,
     "binslt::bconv_lif: residual must have shape [4, 2, 5, 7, 5], got "),
]


@pytest.mark.parametrize("i,bad,exc,msg", _CONTRACT)
def test_bconv_lif_contract_errors(i, bad, exc, msg):
    c = _conv_case(CONV_GEOMS[1], 0)
    args = [c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None, c["T"], 1, 1,
            False, 1e-5, 2.0, True, 1.0, 0.0]
    args[i] = bad
    with pytest.raises(exc) as err:
        OPS.bconv_lif(*args)
    assert str(err.value).splitlines()[0].startswith(msg), str(err.value)


def test_contract_errors_of_the_other_cpu_ops():
    c = _conv_case(CONV_GEOMS[1], 0)
    x5 = c["x"].view(c["T"], -1, *c["x"].shape[1:])
    fwd = [c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None, c["T"], 1, 1,
           False, 1e-5, 2.0, True, 1.0, 0.0]

    def first_line(exc, fn, *a):
        with pytest.raises(exc) as err:
            fn(*a)
        return str(err.value).splitlines()[0]

    # the weight planes and the channel words
    bad = list(fwd)
    bad[2] = c["wp"][:4].contiguous()
    assert first_line(ValueError, OPS.bconv_lif, *bad).startswith(
        "binslt::bconv_lif: w_mask and w_pos must have the same shape, got [5, 3, 3, 2] and "
        "[4, 3, 3, 2]")
    assert first_line(ValueError, OPS.bconv_lif_infer, x5[:, :, :32], c["wm"], c["wp"],
                      c["alpha"], c["scale"], c["shift"], None, 1, 1, 2.0, True, 1.0, 0.0) == (
        "binslt::bconv_lif_infer: the weight has 2 words per position but x has 1 (pack both "
        "with the same in_channels)")
    # the output size: a 9x9 kernel over a 7x5 input without padding
    assert first_line(ValueError, OPS.bconv_lif_infer, x5, c["wm"].repeat(1, 3, 3, 1),
                      c["wp"].repeat(1, 3, 3, 1), c["alpha"], c["scale"], c["shift"], None, 1,
                      0, 2.0, True, 1.0, 0.0) == (
        "binslt::bconv_lif_infer: input 7x5 is smaller than the kernel 9x9 with padding 0")
    # the backward's surrogate arguments, and tau through bn_lif
    s, counts, mean, var = OPS.bconv_lif(*fwd)
    bwd = [torch.ones_like(s), counts, c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"],
           c["shift"], mean, var, None, c["Ci"], 1, 1, False, 1e-5, 2.0, True, 1.0, 0.0, False, 0,
           2.0, True]
    for i, v, msg in ((21, 4, "binslt::bconv_lif_bwd: surrogate must be 0 (atan), 1 (sigmoid), "
                               "2 (rect) or 3 (piecewise_quadratic), got 4"),
                      (22, 0.0, "binslt::bconv_lif_bwd: surrogate_alpha must be finite and > 0, "
                                "got "),
                      (8, torch.ones(5, dtype=torch.int32),
                       "binslt::bconv_lif_bwd: mean must be a floating tensor, got ")):
        a = list(bwd)
        a[i] = v
        exc = TypeError if isinstance(v, torch.Tensor) else ValueError
        assert first_line(exc, OPS.bconv_lif_bwd, *a).startswith(msg)
    z = torch.randn(2, 3, 4)
    assert first_line(ValueError, OPS.bn_lif, z, torch.ones(4), torch.zeros(4), None, False,
                      1e-5, 0.0, True, 1.0, 0.0).startswith(
        "binslt::bn_lif: tau must be finite and > 0 (or +inf with decay_input=False: IF), got ")
    assert first_line(ValueError, OPS.bn_lif, z, torch.ones(4), torch.zeros(4), torch.zeros(2),
                      False, 1e-5, 2.0, True, 1.0, 0.0).startswith(
        "binslt::bn_lif: residual must have shape [2, 3, 4], got [2]")
    # floating per-channel vectors of any dtype are converted, as on every backend
    out64 = OPS.bconv_lif(*fwd[:3], c["alpha"].double(), c["scale"].double(), *fwd[5:])
    assert torch.equal(out64[1], counts) and torch.equal(out64[0], s)


# ----------------------------------------------------------------------------------------------
# Backward: against float64 references
# ----------------------------------------------------------------------------------------------


def _bconv_bwd_ref64(gs, c, nk, shift, detach_reset, sur, sur_alpha):
    return ref.bconv_lif_bwd_float64(
        gs, c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], shift, c["res"], c["Ci"],
        c["stride"], c["padding"], c["bn_train"], 1e-5, nk["tau"], nk["decay_input"],
        nk["v_threshold"], nk["v_reset"], detach_reset, sur, sur_alpha)


BWD_CASES = [
    # geom, bn_train, v_reset, decay_input, detach_reset, surrogate, alpha, residual
    (CONV_GEOMS[0], False, 0.0, True, True, 0, 2.0, False),
    (CONV_GEOMS[1], True, 0.0, False, True, 0, 2.0, False),
    (CONV_GEOMS[1], False, None, True, False, 1, 4.0, True),
    (CONV_GEOMS[2], True, None, False, True, 1, 3.0, True),
    (CONV_GEOMS[3], False, -0.2, True, False, 0, 1.5, False),
    (CONV_GEOMS[3], True, 0.0, True, False, 1, 4.0, True),
    (CONV_GEOMS[4], True, None, True, True, 0, 2.0, False),
    (CONV_GEOMS[5], True, 0.0, False, False, 0, 2.0, True),
    # widths past one 16-pixel vector and not a multiple of it; 5x5 kernels; no padding
    ((2, 1, 40, 20, 6, 21, 3, 1, 1), True, 0.0, False, True, 0, 2.0, False),
    ((1, 2, 17, 33, 9, 18, 5, 1, 2), False, None, True, False, 0, 2.0, True),
    ((2, 1, 12, 9, 7, 19, 3, 1, 0), True, 0.0, True, True, 1, 4.0, False),
    # stride 3 (one kernel row per stride class), a 5x5 kernel at stride 2, 2x2 at stride 3
    # (classes no kernel tap reaches)
    ((2, 1, 20, 12, 10, 8, 3, 3, 1), True, 0.0, False, True, 0, 2.0, False),
    ((1, 2, 24, 10, 9, 11, 5, 2, 2), False, None, True, False, 1, 4.0, True),
    ((2, 1, 16, 9, 9, 7, 2, 3, 0), True, 0.0, False, True, 0, 2.0, False),
    # 1x1, stride 1, no padding (the linear layers as a 1 x N image; a spatial pointwise conv):
    # both gradients as matrix products
    ((4, 1, 40, 20, 1, 33, 1, 1, 0), True, 0.0, False, True, 0, 2.0, False),
    ((2, 2, 70, 9, 3, 5, 1, 1, 0), False, None, True, False, 1, 4.0, True),
    # weight gradient > 1 MiB: summed per input channel instead of per image (deep layers)
    ((1, 2, 176, 176, 4, 4, 3, 1, 1), True, 0.0, False, True, 0, 2.0, False),
    ((2, 1, 180, 160, 5, 5, 3, 2, 1), False, None, True, False, 0, 2.0, False),
    # small maps, where "auto" takes the unfold form: 3x3 over 1x1 (only the centre tap), over
    # 2x2 and 1x2, stride 2 from 2x2 to 1x1, a 5x5 kernel over 3x3 (two words of channels)
    ((2, 3, 70, 40, 1, 1, 3, 1, 1), True, 0.0, False, True, 0, 2.0, False),
    ((2, 2, 33, 24, 2, 2, 3, 1, 1), False, None, True, False, 1, 4.0, True),
    ((3, 1, 17, 9, 1, 2, 3, 1, 1), True, 0.0, True, True, 0, 2.0, True),
    ((2, 2, 40, 36, 2, 2, 3, 2, 1), True, -0.2, False, False, 1, 3.0, False),
    ((1, 3, 65, 12, 3, 3, 5, 1, 2), False, 0.0, True, True, 0, 2.0, False),
    # maps of >= 1024 output pixels at stride 1: the dense input gradient runs from the event
    # weight gradient's margined channel-last dZ (3x3 with and without padding, 5x5)
    ((2, 1, 5, 7, 32, 33, 3, 1, 1), True, 0.0, False, True, 0, 2.0, True),
    ((1, 1, 4, 6, 34, 34, 3, 1, 0), False, None, True, False, 1, 4.0, False),
    ((1, 1, 3, 5, 34, 35, 5, 1, 1), True, -0.2, False, True, 0, 2.0, False),
    # short maps with many channels: the LIF/BN stage's rows hold the maps of several channels
    # (4x4 with a residual and a partial last block of channels, 2x2 in eval, 8x6 at stride 2)
    ((2, 3, 24, 70, 4, 4, 3, 1, 1), True, 0.0, False, True, 0, 2.0, True),
    ((3, 2, 20, 130, 2, 2, 3, 1, 1), False, None, True, False, 1, 4.0, False),
    ((2, 2, 16, 40, 16, 12, 3, 2, 1), True, -0.2, False, True, 3, 0.6, False),
    # the compact surrogates: Rect and PiecewiseQuadratic, SpikingJelly's alpha and others
    (CONV_GEOMS[1], True, 0.0, False, False, 2, 1.0, True),
    (CONV_GEOMS[3], False, None, True, False, 2, 0.7, False),
    (CONV_GEOMS[2], True, 0.0, True, False, 3, 1.0, False),
    (CONV_GEOMS[3], True, -0.2, False, True, 3, 0.6, True),
]


def _gx_algos() -> list[str]:
    out = ["dense"]  # (and "int8" below, with its own weight gradient)
    for name in ("ternary", "combo"):
        try:
            with cpu_algorithms(grad_x=name):
                out.append(name)
        except RuntimeError:  # no AVX-512 here
            pass
    return out


# (input-gradient, weight-gradient) algorithms: the two gradients are independent code paths,
# so every input-gradient form runs with the event weight gradient, one with the dense one and
# the unfold, the tap, the pointwise, the bf16x3 and the int8 forms with their own (forced on
# every case (bf16x3 everywhere: float32 products where the CPU has no bf16 matrix engine):
# also the maps "auto" never gives them; where a forced form cannot run a case, e.g. "margined"
# at stride 2, "pointwise" off a 1x1 kernel, the op raises ValueError saying why, as
# binslt.ops.plan.backward_plan does).
BWD_ALGOS = [(gx, "event") for gx in _gx_algos()] + [
    ("margined", "event"), ("dense", "dense"), ("margined", "dense"), ("unfold", "unfold"),
    ("dense", "taps"), ("dense", "int8"), ("margined", "int8"), ("pointwise", "pointwise"),
    ("bf16x3", "bf16x3")]
if onednn_runs():  # the int8 input gradient: oneDNN's int8 convolution (AMX-INT8 or VNNI)
    BWD_ALGOS.append(("int8", "int8"))


@pytest.mark.parametrize("gx_algo,gw_algo", BWD_ALGOS)
@pytest.mark.parametrize("case", BWD_CASES)
def test_bconv_lif_bwd_float64(case, gx_algo, gw_algo, use_algos):
    use_algos(grad_x=gx_algo, grad_w=gw_algo)
    assert _cpu_algos.current()["grad_x"] == gx_algo
    assert _cpu_algos.current()["grad_w"] == gw_algo
    geom, bn_train, v_reset, decay_input, detach_reset, sur, sur_alpha, residual = case
    seed = stable_seed(case)
    rng = random.Random(seed)
    c = _conv_case(geom, seed, bn_train=bn_train, residual=residual)
    nk = _neuron(rng, v_reset, decay_input)
    z64 = _z64(c)
    c["scale"], c["shift"] = _drive(z64, nk, bn_train, seed)

    def h_of(shift):
        return _ref_h64(z64, dict(c, shift=shift), nk)

    shift = nudge_until_untied(h_of, nk["v_threshold"], c["shift"], step=1e-2)
    fwd = OPS.bconv_lif(c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], shift, c["res"],
                        c["T"], c["stride"], c["padding"], bn_train, 1e-5, nk["tau"],
                        decay_input, nk["v_threshold"], v_reset)
    gs = torch.randn(fwd[0].shape)
    T, N, Ci, _, H, W, k = geom[:7]
    try:
        plan.backward_plan((T, N, Ci, H, W), (c["wm"].shape[0], Ci, k, k), c["stride"],
                           c["padding"])
    except ValueError as e:  # the forced form cannot run this case: the op says why, too
        with pytest.raises(ValueError, match=re.escape(str(e).splitlines()[0])):
            OPS.bconv_lif_bwd(gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"],
                              shift, fwd[2], fwd[3], c["res"], c["Ci"], c["stride"],
                              c["padding"], bn_train, 1e-5, nk["tau"], decay_input,
                              nk["v_threshold"], v_reset, detach_reset, sur, sur_alpha, True)
        return
    out = OPS.bconv_lif_bwd(gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], shift,
                            fwd[2], fwd[3], c["res"], c["Ci"], c["stride"], c["padding"],
                            bn_train, 1e-5, nk["tau"], decay_input, nk["v_threshold"], v_reset,
                            detach_reset, sur, sur_alpha, True)
    want = _bconv_bwd_ref64(gs, c, nk, shift, detach_reset, sur, sur_alpha)
    for name, a, b in zip(("grad_x", "grad_weight", "grad_current", "grad_scale", "grad_shift"),
                          out, want):
        assert a.dtype == torch.float32
        _assert_close(a, b, name)
    # need_grad_x=False skips the input gradient, the rest is unchanged.
    out2 = OPS.bconv_lif_bwd(gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"],
                             shift, fwd[2], fwd[3], c["res"], c["Ci"], c["stride"], c["padding"],
                             bn_train, 1e-5, nk["tau"], decay_input, nk["v_threshold"], v_reset,
                             detach_reset, sur, sur_alpha, False)
    assert out2[0].shape == (0,)
    for a, b in zip(out2[1:], out[1:]):
        assert torch.equal(a, b)
    # need_grad_current=False: dL/dX becomes dL/dZ in place; the other outputs bit for bit.
    out3 = OPS.bconv_lif_bwd(gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"],
                             shift, fwd[2], fwd[3], c["res"], c["Ci"], c["stride"], c["padding"],
                             bn_train, 1e-5, nk["tau"], decay_input, nk["v_threshold"], v_reset,
                             detach_reset, sur, sur_alpha, True, False)
    assert out3[2].shape == (0,)
    for i in (0, 1, 3, 4):
        assert torch.equal(out3[i], out[i])
    # int8 counts (the autograd path's copy where every count fits): every output bit for bit
    if int(fwd[1].abs().max()) <= 127:
        out4 = OPS.bconv_lif_bwd(gs, fwd[1].to(torch.int8), c["xp"], c["wm"], c["wp"], c["alpha"],
                                 c["scale"], shift, fwd[2], fwd[3], c["res"], c["Ci"],
                                 c["stride"], c["padding"], bn_train, 1e-5, nk["tau"],
                                 decay_input, nk["v_threshold"], v_reset, detach_reset, sur,
                                 sur_alpha, True)
        for a, b in zip(out4, out):
            assert torch.equal(a, b)



def test_forced_unfold_refuses_a_huge_matrix(use_algos):
    c = _conv_case((1, 1, 32, 32, 24, 24, 3, 1, 1), 0, bn_train=True)
    fwd = OPS.bconv_lif(c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None, 1,
                        1, 1, True, 1e-5, 2.0, False, 0.5, 0.0)
    use_algos(grad_w="unfold")
    with pytest.raises(ValueError, match="'unfold' cannot run this call: it would build a 1296 MiB "
                       "matrix"):
        OPS.bconv_lif_bwd(torch.ones(fwd[0].shape), fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"],
                          c["scale"], c["shift"], fwd[2], fwd[3], None, 32, 1, 1, True, 1e-5,
                          2.0, False, 0.5, 0.0, True, 0, 2.0, True)


@pytest.mark.parametrize("geom,auto_unfolds", [
    ((2, 3, 70, 40, 1, 1, 3, 1, 1), True),    # 3x3 over 1x1
    ((2, 2, 40, 36, 2, 2, 3, 2, 1), True),    # stride 2, 2x2 -> 1x1
    ((2, 2, 33, 24, 3, 3, 3, 1, 1), False),   # 9 taps over 9 pixels: the unfold form would not pay
])
def test_auto_takes_the_unfold_form_on_small_maps(geom, auto_unfolds, use_algos):
    """Under "auto" a 3x3 kernel over at most 2x2 pixels takes the unfold form of both
    gradients (bit-identical to forcing it), larger maps do not."""
    c = _conv_case(geom, stable_seed(geom), bn_train=True, residual=False)
    args = (c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None, c["T"],
            c["stride"], c["padding"], True, 1e-5, 2.0, False, 0.5, 0.0)
    fwd = OPS.bconv_lif(*args)
    gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(3))

    def bwd():
        return OPS.bconv_lif_bwd(gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"],
                                 c["shift"], fwd[2], fwd[3], None, c["Ci"], c["stride"],
                                 c["padding"], True, 1e-5, 2.0, False, 0.5, 0.0, True, 0, 2.0,
                                 True)

    auto = bwd()
    use_algos(grad_x="unfold", grad_w="unfold")
    unfolded = bwd()
    use_algos(grad_x="dense", grad_w="dense")
    dense = bwd()
    for a, u, d in zip(auto[:2], unfolded[:2], dense[:2]):  # grad_x, grad_weight
        torch.testing.assert_close(u, d, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, u) == auto_unfolds

def _bwd_of(c, fwd, gs):
    return OPS.bconv_lif_bwd(gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"],
                             c["shift"], fwd[2], fwd[3], c["res"], c["Ci"], c["stride"],
                             c["padding"], c["bn_train"], 1e-5, 2.0, False, 0.5, 0.0, True, 0,
                             2.0, True)


def _fwd_of(c):
    return OPS.bconv_lif(c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], c["res"],
                         c["T"], c["stride"], c["padding"], c["bn_train"], 1e-5, 2.0, False, 0.5,
                         0.0)


@pytest.mark.parametrize("geom", SHORT_MAP_GEOMS)
@pytest.mark.parametrize("bn_train", [False, True])
def test_lif_rows_of_several_channels_do_not_depend_on_the_grouping(geom, bn_train):
    """The LIF stages put the short maps of several channels in one row, fewer per row where
    more threads share the channels: the forward's spikes and statistics and the backward's
    dL/dX, dL/dscale and dL/dshift are the same bit for bit at 1, 2 and 3 threads (2 and 3
    group the channels differently from 1), and agree with the reference (test_bconv_lif_forward
    and test_bconv_lif_bwd_float64 check them against float64)."""
    c = _conv_case(geom, stable_seed(geom), bn_train=bn_train, residual=True)
    threads = torch.get_num_threads()
    outs, gs = [], None
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            fwd = _fwd_of(c)
            if gs is None:
                gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(4))
            bwd = _bwd_of(c, fwd, gs)
            outs.append((fwd[0], fwd[2], fwd[3], bwd[2], bwd[3], bwd[4]))
    finally:
        torch.set_num_threads(threads)
    rs = ref.bconv_lif_reference(c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"],
                                 c["res"], c["T"], c["stride"], c["padding"], bn_train, 1e-5,
                                 2.0, False, 0.5, 0.0)[0]
    assert 0 < float(outs[0][0].mean()) < 1
    assert float((outs[0][0] != rs).float().mean()) < 0.01  # (ties at the threshold aside)
    for other in outs[1:]:
        for a, b in zip(other, outs[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("geom", [(2, 3, 40, 36, 8, 8, 3, 1, 1), (3, 2, 33, 70, 7, 5, 3, 2, 1)])
def test_bwd_reads_a_packed_residual(geom):
    """A residual of spikes given as pack_spikes words [T, N, Ho, Wo, ceil(Co/32)] (what ConvLIF
    saves) gives every output of the float residual bit for bit, on the CPU kernel and the
    reference; words of another shape are refused."""
    c = _conv_case(geom, stable_seed(geom), bn_train=True, residual=True)
    T, N = geom[:2]
    c["res"] = (c["res"] > 0).float()
    fwd = _fwd_of(c)
    gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(3))
    words = OPS.pack_spikes(c["res"].flatten(0, 1)).view(T, N, *fwd[0].shape[3:], -1)
    want = _bwd_of(c, fwd, gs)
    got = _bwd_of(dict(c, res=words), fwd, gs)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    args = (gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], fwd[2],
            fwd[3])
    rest = (c["Ci"], c["stride"], c["padding"], True, 1e-5, 2.0, False, 0.5, 0.0, True, 0, 2.0,
            True)
    r_float = ref.bconv_lif_bwd_reference(*args, c["res"], *rest)
    r_words = ref.bconv_lif_bwd_reference(*args, words, *rest)
    for a, b in zip(r_words, r_float):
        assert torch.equal(a, b)
    for bad in (words[..., :1, :], words.flatten(0, 1)):
        with pytest.raises(ValueError, match="packed residual must be spike words"):
            _bwd_of(dict(c, res=bad), fwd, gs)
        with pytest.raises(ValueError, match="packed residual must be spike words"):
            ref.bconv_lif_bwd_reference(*args, bad, *rest)


def test_bf16x3_weight_grad_chunks_span_images(use_algos):
    """The bf16x3 weight gradient's chunks of output rows (54 rows of 300 pixels at 32 -> 32
    channels fill 24 MiB) cross from one image into the next: the same gradient as the dense
    float form, within float32 summation order."""
    c = _conv_case((1, 2, 32, 32, 50, 300, 3, 1, 1), 17, bn_train=True)
    fwd = _fwd_of(c)
    gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(9))
    use_algos(grad_x="dense", grad_w="bf16x3")
    a = _bwd_of(c, fwd, gs)
    use_algos(grad_x="dense", grad_w="dense")
    b = _bwd_of(c, fwd, gs)
    _assert_close(a[1], b[1], "grad_weight")


@pytest.mark.parametrize("gx_algo,gw_algo,seed,grad_seed", [("margined", "int8", 11, 5),
                                                            ("bf16x3", "bf16x3", 13, 8)]
                         + ([("int8", "event", 12, 6)] if onednn_runs() else []))
def test_split_grads_in_chunks_of_images(gx_algo, gw_algo, seed, grad_seed, use_algos):
    """Two 256x256 images of 32 -> 32 channels fill more than one chunk of the split forms'
    buffers (int8: 16 MiB for the weight gradient, 8 MiB for the input gradient, one image's
    limbs and sums 31 MB; bf16x3: 24 MiB, one image's parts and unfolded input take 100 MB, so
    its weight gradient takes 64 output rows a chunk): the
    sums of the chunks (int8: each channel on one limb unit, its largest |dZ| as the LIF/BN
    backward found it; bf16x3: on one scale) agree with the
    dense float forms (and the int8 case's input gradient from the margined copy with the NCHW
    one's), within float32 summation order over 131072 products per weight."""
    c = _conv_case((1, 2, 32, 32, 256, 256, 3, 1, 1), seed, bn_train=True)
    fwd = _fwd_of(c)
    gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(grad_seed))
    use_algos(grad_x=gx_algo, grad_w=gw_algo)
    a = _bwd_of(c, fwd, gs)
    use_algos(grad_x="dense", grad_w="dense")
    b = _bwd_of(c, fwd, gs)
    _assert_close(a[1], b[1], "grad_weight")
    _assert_close(a[0], b[0], "grad_x")


@pytest.mark.skipif(not onednn_runs(),
                    reason="the int8 input gradient needs AMX-INT8 or AVX-512 VNNI")
@pytest.mark.parametrize("geom,bad", [((1, 2, 32, 32, 256, 256, 3, 1, 1), 1),
                                      ((1, 30, 512, 512, 4, 4, 3, 1, 1), 28)],
                         ids=["conv-image-chunks", "unfolded-26-image-chunks"])
def test_int8_input_grad_over_dz_finishes_an_overflowing_chunk_as_the_float_form(geom, bad,
                                                                                  use_algos):
    """The int8 input gradient of a layer with Ci = Co writes each chunk of images over dZ once
    its limbs are taken (chunks of one 256x256 image for the convolution; of 26 4x4 images of 512
    channels for the unfolded product). Where alpha * dZ overflows in a later chunk (dZ itself
    finite), the chunks already written stay the int8 gradient and the rest is the float form's,
    as the float form gives them (an infinity where it overflows too), not a gradient of
    overwritten values."""
    co = geom[3]
    c = _conv_case(geom, 21)
    c["alpha"] = torch.full((co,), 1e7)
    c["scale"] = torch.full((co,), 1e-6)
    fwd = _fwd_of(c)
    gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(4))
    gs[0, bad] = gs[0, bad].sign() * 3e38  # dZ finite, alpha * dZ past float32's
    use_algos(grad_x="int8", grad_w="event")
    a = _bwd_of(c, fwd, gs)[0]
    use_algos(grad_x="dense", grad_w="event")
    b = _bwd_of(c, fwd, gs)[0]
    _assert_close(a[0, :bad], b[0, :bad], "grad_x of the images before (int8)")
    want = b[0, bad:]  # the float form's: it overflows as well
    assert not torch.isfinite(want).all()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(a[0, bad:]), kind(want))
    fin = torch.isfinite(want)
    assert torch.equal(a[0, bad:][fin], want[fin])


@pytest.mark.skipif(not onednn_runs(),
                    reason="the int8 input gradient needs AMX-INT8 or AVX-512 VNNI")
@pytest.mark.parametrize("geom", [(3, 130, 70, 4, 4, 3, 1), (2, 64, 64, 2, 2, 3, 1),
                                  (2, 33, 40, 4, 4, 5, 2), (2, 16, 24, 3, 5, 3, 0)],
                         ids=lambda g: "x".join(map(str, g)))
def test_int8_input_grad_unfolded_equals_its_convolution(geom):
    """The int8 input gradient's two executions at stride 1, oneDNN's convolution of the limbs
    and one int8 matrix product over the unfolded limbs (small maps), form the same integer sums:
    equal bit for bit, both within 1e-5 relative of the float64 transposed convolution of
    alpha * dZ with the ternary weight; channels past one block of 64 and not a multiple of 32, a
    5x5 kernel, no padding, a non-square map and an all-zero image (unit 0). A NaN in dZ gives
    None from both."""
    B, Ci, Co, H, W, k, pad = geom
    g = torch.Generator().manual_seed(stable_seed(geom))
    w = torch.randint(-1, 2, (Co, Ci, k, k), generator=g).float()
    wm, wp = ref.pack_weight_reference(w)
    alpha = torch.rand(Co, generator=g) * 0.2 + 0.05
    ho, wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    gz = torch.randn(B, Co, ho, wo, generator=g) * torch.logspace(-3, 3, B).view(B, 1, 1, 1)
    gz[-1] = 0.0
    mod = CPU
    conv = mod._int8_input_grad(gz, wm, wp, alpha, Ci, H, W, 1, pad, "conv")
    unf = mod._int8_input_grad(gz, wm, wp, alpha, Ci, H, W, 1, pad, "unfolded")
    assert torch.equal(unf, conv)
    want = torch.nn.functional.conv_transpose2d(gz.double() * alpha.double().view(1, -1, 1, 1),
                                                w.double(), padding=pad)
    _assert_close(unf, want, "unfolded int8 grad_x vs float64")
    assert torch.equal(unf[-1], torch.zeros_like(unf[-1]))
    bad = gz.clone()
    bad[0, 0, 0, 0] = float("nan")
    for exe in ("conv", "unfolded"):
        assert mod._int8_input_grad(bad, wm, wp, alpha, Ci, H, W, 1, pad, exe) is None
    with pytest.raises(ValueError, match="exec"):
        mod._int8_input_grad(gz, wm, wp, alpha, Ci, H, W, 1, pad, "gemm")
    with pytest.raises(RuntimeError, match="stride 1"):
        mod._int8_input_grad(gz[:, :, ::2, ::2].contiguous(), wm, wp, alpha, Ci, H, W, 2, pad,
                             "unfolded")


def _driven_case(geom, seed):
    """A batch-statistics BN case at rate 0.2 with _bwd_of's neuron (tau 2, threshold 0.5, hard
    reset to 0), driven around the threshold and its shift nudged off ties: (case, neuron,
    shift)."""
    c = _conv_case(geom, seed, rate=0.2, bn_train=True)
    nk = dict(tau=2.0, decay_input=False, v_threshold=0.5, v_reset=0.0)
    z64 = _z64(c)
    c["scale"], c["shift"] = _drive(z64, nk, True, seed)
    shift = nudge_until_untied(lambda sh: _ref_h64(z64, dict(c, shift=sh), nk),
                               nk["v_threshold"], c["shift"], step=1e-2)
    return c, nk, shift


@pytest.mark.parametrize("geom", [(2, 4, 256, 160, 8, 8, 3, 1, 1),    # 2 blocks of 4 images
                                  (2, 16, 256, 160, 8, 8, 3, 2, 1),  # stride 2: 25 + 7 images
                                  (1, 3, 160, 200, 23, 23, 3, 1, 1)],  # 3 blocks of 1 image
                         ids=["stride1", "stride2", "image-per-block"])
def test_event_weight_grad_in_blocks_of_images(geom, use_algos):
    """A weight gradient over 1 MiB takes the event form's blocked schedule (blocks of images
    whose dZ fits half of L2, input channels split among the threads; 256 -> 160 3x3: 1.5 MB):
    several blocks, a block of one image where an image's dZ is larger than a block, stride 1
    and 2. dL/dW_eff within 1e-5 relative of float64 and of ATen's dense weight gradient, the
    same with 1 thread as with 2 (the sums do not depend on the thread count)."""
    seed = stable_seed(geom)
    c, nk, shift = _driven_case(geom, seed)
    c["shift"] = shift
    fwd = _fwd_of(c)
    gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(seed))
    want = _bconv_bwd_ref64(gs, c, nk, shift, True, 0, 2.0)
    use_algos(grad_x="dense", grad_w="event")
    got = _bwd_of(c, fwd, gs)
    _assert_close(got[1], want[1], "event grad_weight vs float64")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _bwd_of(c, fwd, gs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[1], got[1])
    use_algos(grad_x="dense", grad_w="dense")
    _assert_close(got[1], _bwd_of(c, fwd, gs)[1], "event grad_weight vs ATen's")


@pytest.mark.parametrize("tau", [0.5, 2.0, 4.0, 3.0, 100.0])
def test_lif_divides_by_tau_as_ieee_float32(tau):
    """The kernels multiply by 1 / tau where tau is a power of two (the reciprocal is exact, so
    the product is the float the division rounds to) and divide otherwise. On one step of
    bn_lif in eval mode (scale 1, shift 0: X = z) with decay_input, H = X / tau: the spikes of
    X planted at every float within 256 ulps of tau * v_threshold, and dL/dX = dL/dH / tau
    under the Rect surrogate, equal the float32 division bit for bit (at tau = 3 an inexact
    1 / tau moves both)."""
    vth = 1.0
    t = torch.tensor(tau * vth, dtype=torch.float32)
    up, down = t.clone(), t.clone()
    xs = [t]
    for _ in range(256):
        up = torch.nextafter(up, torch.tensor(float("inf")))
        down = torch.nextafter(down, torch.tensor(float("-inf")))
        xs += [up, down]
    x = torch.stack(xs)
    n = 16 * ((x.numel() + 15) // 16)
    x = torch.cat([x, x[: n - x.numel()]]).view(1, 1, 16, -1)  # [T=1, N=1, C=16, L]
    ones, zeros = torch.ones(16), torch.zeros(16)
    s, mean, var = torch.ops.binslt.bn_lif(x, ones, zeros, None, False, 1e-5, tau, True, vth, 0.0)
    tt = torch.tensor(tau, dtype=torch.float32)
    assert torch.equal(s, (x / tt >= vth).float())
    gs = torch.randn(s.shape, generator=torch.Generator().manual_seed(0))
    alpha = 2.0
    out = torch.ops.binslt.bn_lif_bwd(gs, x, ones, zeros, mean, var, None, False, 1e-5, tau,
                                      True, vth, 0.0, False, 2, alpha, True)
    h = x / tt
    sg = alpha * ((h - vth).abs() < 0.5 / alpha).float()
    want = (gs * sg) / tt
    assert (sg > 0).float().mean() > 0.9  # the window holds the planted neurons
    assert torch.equal(out[1], want)
    if tau == 3.0:  # the planted values tell the two roundings apart
        inv = torch.tensor(1.0 / 3.0, dtype=torch.float32)
        assert not torch.equal(want, (gs * sg) * inv)


def _paper_layers() -> list[tuple[int, ...]]:
    """Every binary-input conv shape of Conv-4, VGG-11 and ResNet-19 at CIFAR size (C_in, C_out,
    H, stride, kernel, padding; the 1x1 shortcuts included), and a hidden linear layer as a 1x1
    conv. (The first layer takes real values: ATen's float conv, not these forms.)"""
    from binslt.nn.counting import binary_conv_shapes
    from binslt.nn.models import build
    shapes = {s for arch in ("conv4", "vgg11", "resnet19")
              for s in binary_conv_shapes(build(arch, "binwslt", input_size=32))}
    return sorted(shapes | {(512, 256, 1, 1, 1, 0)})


PAPER_LAYERS = _paper_layers()


@pytest.mark.parametrize("layer", PAPER_LAYERS, ids=lambda v: "x".join(map(str, v)))
def test_split_forms_on_the_paper_layers_match_float64(layer, use_algos):
    """The bf16x3 forms and the int8 weight gradient (and input gradient where the CPU runs it)
    on every layer shape of the paper's networks (T=2, N=1, batch-statistics BN: dZ dense):
    dL/dX, dL/dW_eff and the search's score gradient dL/ds = dL/dW_eff * w * sign(s) within
    1e-5 relative of float64."""
    Ci, Co, H, stride, k, pad = layer
    geom = (2, 1, Ci, Co, H, H, k, stride, pad)
    seed = stable_seed(layer)
    c, nk, shift = _driven_case(geom, seed)
    fwd = OPS.bconv_lif(c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], shift, None, c["T"],
                        stride, pad, True, 1e-5, nk["tau"], False, nk["v_threshold"], 0.0)
    gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(seed))
    want = _bconv_bwd_ref64(gs, c, nk, shift, True, 0, 2.0)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(c["w"].shape, generator=g)
    scores = torch.randn(c["w"].shape, generator=g)
    # the int8 weight gradient runs everywhere (ATen's _int_mm; AMX tiles only where the CPU
    # has them), its input gradient (oneDNN: AMX-INT8 or VNNI) here at stride 1
    forms = [("bf16x3", "bf16x3"), ("dense", "int8")]
    if onednn_runs() and stride == 1 and k > 1:
        forms.append(("int8", "int8"))
    for gx, gw in forms:
        use_algos(grad_x=gx, grad_w=gw)
        out = OPS.bconv_lif_bwd(gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"],
                                shift, fwd[2], fwd[3], None, Ci, stride, pad, True, 1e-5,
                                nk["tau"], False, nk["v_threshold"], 0.0, True, 0, 2.0, True)
        _assert_close(out[0], want[0], f"{gx} grad_x")
        _assert_close(out[1], want[1], f"{gw} grad_weight")
        _assert_close(torch.ops.binslt.search_score_grad(out[1], w, scores),
                      ref.search_score_grad(want[1], w.double(), scores.double()),
                      f"{gw} score gradient")


@pytest.mark.skipif(not onednn_runs(), reason="the int8 input gradient needs oneDNN's int8 "
                    "convolution (AMX-INT8 or AVX-512 VNNI)")
@pytest.mark.parametrize("geom", [(1, 2, 97, 130, 5, 5, 3, 1, 1), (2, 1, 70, 65, 6, 6, 3, 2, 1),
                                  (1, 2, 65, 129, 6, 6, 5, 1, 2)],
                         ids=lambda g: "x".join(map(str, g)))
def test_int8_grads_past_one_block_of_64_channels_match_float64(geom, use_algos):
    """The int8 input gradient builds its flipped, transposed ternary kernel from 64 x 64 blocks
    of (C_out, C_in) weight bits, and the int8 weight gradient reorders its [taps, C_in] rows:
    with channel counts past one block and not a multiple of 64 or 32, strides 1 and 2 and a 5x5
    kernel, dL/dX and dL/dW_eff are within 1e-5 relative of float64."""
    seed = stable_seed(geom)
    c, nk, shift = _driven_case(geom, seed)
    Ci, stride, pad = geom[2], geom[7], geom[8]
    fwd = OPS.bconv_lif(c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], shift, None, c["T"],
                        stride, pad, True, 1e-5, nk["tau"], False, nk["v_threshold"], 0.0)
    gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(seed))
    want = _bconv_bwd_ref64(gs, c, nk, shift, True, 0, 2.0)
    use_algos(grad_x="int8", grad_w="int8")
    out = OPS.bconv_lif_bwd(gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], shift,
                            fwd[2], fwd[3], None, Ci, stride, pad, True, 1e-5, nk["tau"], False,
                            nk["v_threshold"], 0.0, True, 0, 2.0, True)
    _assert_close(out[0], want[0], "int8 grad_x")
    _assert_close(out[1], want[1], "int8 grad_weight")


def _driven_grads(geom, seed, grad_seed):
    """_driven_case's layer (stride 1, padding 1) run forward, and a random dL/dspikes:
    (the float64 backward, bwd), bwd() giving binslt::bconv_lif_bwd's outputs under the
    algorithms forced when it is called."""
    c, nk, shift = _driven_case(geom, seed)
    fwd = OPS.bconv_lif(c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], shift, None, c["T"],
                        1, 1, True, 1e-5, nk["tau"], False, nk["v_threshold"], 0.0)
    gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(grad_seed))

    def bwd():
        return OPS.bconv_lif_bwd(gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"],
                                 shift, fwd[2], fwd[3], None, c["Ci"], 1, 1, True, 1e-5,
                                 nk["tau"], False, nk["v_threshold"], 0.0, True, 0, 2.0, True)

    return _bconv_bwd_ref64(gs, c, nk, shift, True, 0, 2.0), bwd


def test_bf16x3_forms_in_several_chunks_match_float64(use_algos):
    """The bf16x3 forms split their work into chunks of a few MiB (output rows for the weight
    gradient, images for the input gradient), so that their parts never outgrow dZ: a 64->64
    32x32 layer at T=2, N=6 takes several chunks in both, and gives dL/dX and dL/dW_eff within
    1e-5 relative of float64 and of the dense float forms."""
    want, bwd = _driven_grads((2, 6, 64, 64, 32, 32, 3, 1, 1), 31, 32)
    outs = {}
    for form in ("bf16x3", "dense"):
        use_algos(grad_x=form, grad_w=form)
        outs[form] = bwd()
    for i, name in ((0, "grad_x"), (1, "grad_weight")):
        _assert_close(outs["bf16x3"][i], want[i], f"bf16x3 {name}")
        _assert_close(outs["bf16x3"][i], outs["dense"][i], f"bf16x3 vs dense {name}")


def test_int8_weight_grad_of_a_wide_layer_in_chunks_matches_float64(use_algos):
    """The int8 weight gradient's chunk of output rows grows with its product's int32 output
    ([3 Co, 9 Ci]: 6.75 MiB at 256 -> 256 channels, so a 20.25 MiB chunk instead of 16), and its
    chunks are of even size: two 64x64 images (24 MiB of limbs and unfolded input) take two
    chunks of 64 rows, whose sums, added in double, give dL/dW_eff within 1e-5 relative of
    float64 and of the dense float form."""
    want, bwd = _driven_grads((1, 2, 256, 256, 64, 64, 3, 1, 1), 41, 42)
    outs = {}
    for form in ("int8", "dense"):
        use_algos(grad_x="dense", grad_w=form)
        outs[form] = bwd()
    _assert_close(outs["int8"][1], want[1], "int8 grad_weight")
    _assert_close(outs["int8"][1], outs["dense"][1], "int8 vs dense grad_weight")


def test_int8_weight_grad_of_an_empty_batch_is_zero(use_algos):
    """A batch of no images has no output pixels to sum over: the int8 weight gradient (chunked
    by output rows, of which there are none) is zero, as the dense form's."""
    c = _conv_case((1, 0, 8, 8, 6, 6, 3, 1, 1), 5, bn_train=True)
    fwd = _fwd_of(c)
    gs = torch.zeros(fwd[0].shape)
    use_algos(grad_x="dense", grad_w="int8")
    out = _bwd_of(c, fwd, gs)
    use_algos(grad_x="dense", grad_w="dense")
    dense = _bwd_of(c, fwd, gs)
    assert out[1].shape == (8, 8, 3, 3)
    assert torch.equal(out[1], torch.zeros(8, 8, 3, 3))
    assert torch.equal(out[1], dense[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("gx_algo,gw_algo", [("dense", "int8"), ("bf16x3", "bf16x3")]
                         + ([("int8", "int8")] if onednn_runs() else []))
def test_split_grads_take_the_float_forms_on_a_non_finite_dz(gx_algo, gw_algo, bad, use_algos):
    """A NaN or an infinity in dL/dspikes (so in dL/dZ: eval BN scales it) cannot be split into
    int8 limbs or bf16 parts (the scale pass finds it as the largest |value|'s bits, inf's
    0x7f800000 or above): the forced split forms give the event weight gradient's and the dense
    input gradient's results (NaN and infinities where those carry them), never a number made
    up from one."""
    c = _conv_case((2, 1, 16, 16, 6, 6, 3, 1, 1), 12, bn_train=False)
    fwd = _fwd_of(c)
    gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(6))
    gs[0, 0, 3, 2, 2] = bad  # the first step: the infinity reaches dZ alone, no NaN beside it
    use_algos(grad_x=gx_algo, grad_w=gw_algo)
    a = _bwd_of(c, fwd, gs)
    use_algos(grad_x="dense", grad_w="event")
    b = _bwd_of(c, fwd, gs)
    for i in (0, 1):  # grad_x, grad_weight
        assert not torch.isfinite(a[i]).all()
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(a[i]), kind(b[i]))
        assert torch.equal(torch.nan_to_num(a[i], 0.0, 0.0, 0.0),
                           torch.nan_to_num(b[i], 0.0, 0.0, 0.0))


INT8_AUTO = [
    # gradient, geometry, input rate, whether auto takes the int8 form
    ("grad_w", (2, 2, 64, 64, 8, 8, 3, 1, 1), 0.6, True),      # dense-rate input over 8x8
    ("grad_w", (2, 2, 64, 64, 16, 16, 3, 1, 1), 0.3, True),
    ("grad_w", (2, 2, 64, 64, 16, 16, 3, 1, 1), 0.05, False),  # sparse: the event form
    ("grad_w", (2, 2, 64, 64, 4, 4, 3, 1, 1), 0.6, True),
    ("grad_w", (2, 2, 64, 64, 4, 4, 3, 1, 1), 0.05, True),     # 4x4: int8 at any rate
    ("grad_w", (2, 2, 64, 64, 16, 16, 3, 2, 1), 0.6, True),    # stride 2, any rate
    ("grad_w", (2, 2, 64, 64, 16, 16, 3, 2, 1), 0.05, True),
    ("grad_w", (2, 2, 64, 64, 2, 2, 3, 1, 1), 0.3, False),     # 3x3 over 2x2: the unfold form
    ("grad_w", (2, 2, 64, 64, 8, 8, 1, 1, 0), 0.6, True),      # pointwise, dense-rate input
    ("grad_w", (2, 2, 64, 64, 8, 8, 1, 1, 0), 0.05, False),    # pointwise, sparse: event
    ("grad_x", (2, 2, 64, 64, 8, 8, 3, 1, 1), 0.3, True),
    ("grad_x", (2, 2, 64, 64, 16, 16, 3, 2, 1), 0.3, True),    # stride 2: the class convs
    ("grad_x", (2, 2, 128, 256, 4, 4, 3, 1, 1), 0.3, True),    # 4x4: the unfolded product
    ("grad_x", (2, 2, 64, 128, 4, 4, 3, 1, 1), 0.3, False),    # ... from 2^15 channel pairs
    ("grad_x", (2, 2, 128, 256, 8, 8, 3, 2, 1), 0.3, False),   # stride 2 to 4x4: dense conv
    ("grad_x", (2, 2, 32, 32, 32, 32, 3, 1, 1), 0.3, True),
    ("grad_x", (2, 2, 64, 64, 2, 2, 3, 1, 1), 0.3, False),     # 3x3 over 2x2: the unfold form
    ("grad_x", (2, 2, 64, 64, 64, 64, 3, 1, 1), 0.3, False),   # above the measured range
]


@pytest.mark.skipif(not onednn_supported(), reason="the int8 input and weight gradients are auto "
                    "only on a CPU with AMX-INT8; elsewhere forced, as in "
                    "test_bconv_lif_bwd_float64")
@pytest.mark.parametrize("grad,geom,rate,auto_int8", INT8_AUTO)
def test_auto_takes_the_int8_grad_with_amx(grad, geom, rate, auto_int8, use_algos):
    """Auto picks the int8 form of ``grad`` exactly where it is expected to: its result then
    equals the forced int8 one."""
    which, seed = {"grad_x": (0, 8), "grad_w": (1, 7)}[grad]
    c = _conv_case(geom, stable_seed(geom), rate=rate, bn_train=True)
    fwd = _fwd_of(c)
    gs = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(seed))
    auto = _bwd_of(c, fwd, gs)
    use_algos(**{grad: "int8"})
    forced = _bwd_of(c, fwd, gs)
    assert torch.equal(auto[which], forced[which]) == auto_int8


# ----------------------------------------------------------------------------------------------
# bn_lif
# ----------------------------------------------------------------------------------------------

# S = H*W of 35 and 323 (> one 256-row chunk) run the per-(n, c) row path, shorter ones flat rows
BN_SHAPES = [(1, 1, 1), (4, 3, 33), (2, 2, 65, 7, 5), (4, 1, 64, 3), (3, 2, 1, 4, 4),
             (2, 2, 3, 17, 19)]


def _bn_case(shape, seed, bn_train, v_reset, decay_input, residual):
    """A bn_lif case: a random neuron (``_neuron``), a current z of ``shape``, a BN scale and
    shift that drive it around the threshold, a residual or None, and the generator to draw
    more from. -> (neuron, z, scale, shift, res, generator)."""
    nk = _neuron(random.Random(seed), v_reset, decay_input)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g) + 0.5
    scale, shift = _drive(z.double(), nk, bn_train, seed)
    res = torch.randn(shape, generator=g) * 0.3 if residual else None
    return nk, z, scale, shift, res, g


def _bn_h64(z, scale, shift, res, bn_train, nk):
    """The float64 reference's membrane potential H of a bn_lif case (for the tie band)."""
    return _ref_h64(z.double(), dict(scale=scale, shift=shift, res=res, bn_train=bn_train), nk)


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("bn_train", [False, True])
@pytest.mark.parametrize("v_reset,decay_input,residual", [(0.0, True, True), (None, False, False)])
def test_bn_lif_forward(shape, bn_train, v_reset, decay_input, residual):
    seed = stable_seed((shape, bn_train, v_reset, decay_input, residual))
    nk, z, scale, shift, res, _ = _bn_case(shape, seed, bn_train, v_reset, decay_input, residual)
    args = (z, scale, shift, res, bn_train, 1e-5, nk["tau"], decay_input, nk["v_threshold"],
            v_reset)
    s, mean, var = OPS.bn_lif(*args)
    rs, rmean, rvar = ref.bn_lif_reference(*args)
    torch.testing.assert_close(mean, rmean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, rvar, rtol=1e-5, atol=1e-6)
    keep = tie_mask(_bn_h64(z, scale, shift, res, bn_train, nk), nk["v_threshold"])
    assert torch.equal(s[keep], rs[keep])


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("bn_train,v_reset,decay_input,detach_reset,sur,sur_alpha,residual", [
    (False, 0.0, True, True, 0, 2.0, True),
    (True, None, False, False, 1, 4.0, False),
    (True, 0.0, False, False, 0, 1.3, True),
    (False, None, True, True, 1, 2.5, False),
    (True, 0.0, False, False, 2, 1.0, True),
    (False, None, True, False, 2, 0.7, False),
    (True, None, True, False, 3, 1.0, False),
    (False, 0.0, False, True, 3, 0.6, True),
])
def test_bn_lif_bwd_float64(shape, bn_train, v_reset, decay_input, detach_reset, sur, sur_alpha,
                            residual):
    seed = stable_seed((shape, bn_train, v_reset, sur))
    nk, z, scale, shift0, res, g = _bn_case(shape, seed, bn_train, v_reset, decay_input,
                                            residual)
    shift = nudge_until_untied(lambda sh: _bn_h64(z, scale, sh, res, bn_train, nk),
                               nk["v_threshold"], shift0, step=1e-2)
    _, mean, var = OPS.bn_lif(z, scale, shift, res, bn_train, 1e-5, nk["tau"], decay_input,
                              nk["v_threshold"], v_reset)
    gs = torch.randn(shape, generator=g)
    out = OPS.bn_lif_bwd(gs, z, scale, shift, mean, var, res, bn_train, 1e-5, nk["tau"],
                         decay_input, nk["v_threshold"], v_reset, detach_reset, sur, sur_alpha)
    want = ref.bn_lif_bwd_reference(
        gs.double(), z.double(), scale.double(), shift.double(), None, None,
        None if res is None else res.double(), bn_train, 1e-5, nk["tau"], decay_input,
        nk["v_threshold"], v_reset, detach_reset, sur, sur_alpha)
    for name, a, b in zip(("grad_z", "grad_current", "grad_scale", "grad_shift"), out, want):
        _assert_close(a, b, name)
    # need_grad_current=False: dL/dX becomes dL/dz in its buffer; the other outputs bit for bit
    out2 = OPS.bn_lif_bwd(gs, z, scale, shift, mean, var, res, bn_train, 1e-5, nk["tau"],
                          decay_input, nk["v_threshold"], v_reset, detach_reset, sur, sur_alpha,
                          False)
    assert out2[1].shape == (0,)
    for i in (0, 2, 3):
        assert torch.equal(out2[i], out[i])


@pytest.mark.parametrize("shape", [(4, 3, 5, 7, 5), (3, 2, 3, 17, 19), (4, 2, 6, 3)])
@pytest.mark.parametrize("bn_train", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_bn_lif_reads_an_expanded_current_in_place(shape, bn_train, residual):
    """A current expanded over T (time stride 0: direct encoding's first layer) is read in place
    by bn_lif and bn_lif_bwd, with every output bit-identical to the materialised current's."""
    g = torch.Generator().manual_seed(stable_seed((shape, bn_train, residual)))
    T = shape[0]
    once = (torch.randn(1, *shape[1:], generator=g) + 0.5).expand(shape)
    full = once.contiguous()
    assert once.stride(0) == 0
    c = shape[2]
    scale, shift = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.3
    res = torch.randn(shape, generator=g) * 0.3 if residual else None
    gs = torch.randn(shape, generator=g)
    nk = (2.0, True, 0.8, 0.0)
    fwd = [OPS.bn_lif(z, scale, shift, res, bn_train, 1e-5, *nk) for z in (once, full)]
    for a, b in zip(*fwd):
        assert torch.equal(a, b)
    assert 0 < float(fwd[0][0].mean()) < 1
    mean, var = fwd[1][1], fwd[1][2]
    bwd = [OPS.bn_lif_bwd(gs, z, scale, shift, mean, var, res, bn_train, 1e-5, *nk, False, 0, 2.0,
                          need)
           for z in (once, full) for need in (True, False)]
    assert torch.equal(bwd[1][0], bwd[0][0]) and bwd[1][1].shape == (0,)
    bwd = bwd[::2]
    for a, b in zip(*bwd):
        assert a.shape == b.shape and torch.equal(a, b)
    assert T > 1


def test_bn_lif_errors():
    z = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"\[T, N, C, \*\]"):
        OPS.bn_lif(torch.randn(2, 3), torch.ones(3), torch.zeros(3), None, False, 1e-5, 2.0,
                   True, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="float32"):
        OPS.bn_lif(z.double(), torch.ones(4), torch.zeros(4), None, False, 1e-5, 2.0, True, 1.0,
                   0.0)
    with pytest.raises(ValueError, match=r"scale must have shape \[4\]"):
        OPS.bn_lif(z, torch.ones(3), torch.zeros(4), None, False, 1e-5, 2.0, True, 1.0, 0.0)
    with pytest.raises(ValueError, match="surrogate must be 0"):
        OPS.bn_lif_bwd(z, z, torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4), None,
                       False, 1e-5, 2.0, True, 1.0, 0.0, False, 7, 2.0)


# ----------------------------------------------------------------------------------------------
# opcheck, torch.compile, the layer end to end
# ----------------------------------------------------------------------------------------------


def _opcheck_samples():
    c = _conv_case(CONV_GEOMS[1], 11, bn_train=True, residual=True)
    fwd = ref.bconv_lif_reference(c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"],
                                  c["res"], c["T"], 1, 1, True, 1e-5, 2.0, True, 1.0, 0.0)
    z = torch.randn(2, 3, 5, 4)
    gs = torch.randn(fwd[0].shape)
    return [
        ("pack_spikes", (c["x"],)),
        ("unpack_spikes", (c["xp"], 33)),
        ("pack_weight", (c["w"],)),
        ("bconv_lif", (c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], c["res"],
                       c["T"], 1, 1, True, 1e-5, 2.0, True, 1.0, 0.0)),
        ("bconv_lif", (c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], c["shift"], None,
                       c["T"], 2, 0, False, 1e-5, 5.0, False, 0.5, None)),
        ("bconv_lif_infer", (c["x"].view(c["T"], -1, *c["x"].shape[1:]), c["wm"], c["wp"],
                             c["alpha"], c["scale"], c["shift"], c["res"], 1, 1, 2.0, True, 1.0,
                             0.0)),
        ("bconv_lif_bwd", (gs, fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"],
                           c["shift"], fwd[2], fwd[3], c["res"], 33, 1, 1, True, 1e-5, 2.0,
                           True, 1.0, 0.0, True, 0, 2.0, True)),
        ("bn_lif", (z, torch.ones(5), torch.zeros(5), None, True, 1e-5, 2.0, True, 0.5, 0.0)),
        ("bn_lif_bwd", (torch.randn_like(z), z, torch.ones(5), torch.zeros(5), z.mean((0, 1, 3)),
                        z.var((0, 1, 3), unbiased=False), z, True, 1e-5, 2.0, False, 0.5,
                        None, False, 1, 4.0)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_samples(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_opcheck(name, args):
    op = getattr(OPS, name).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"binslt::{name}", "CPU")
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                "test_autograd_registration"))


def test_kernels_are_the_compiled_ones():
    # The CPU key must be served by the C++ kernels, not the Python fallback of binslt/ops.py.
    assert ops._ext.backends()["cpu"]["usable"]
    table = torch._C._dispatch_dump_table("binslt::bconv_lif")
    cpu_line = next(ln for ln in table.splitlines() if ln.startswith("CPU:"))
    assert "python" not in cpu_line.lower(), cpu_line


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        BinSpikeConv2d(3, 8, 3, padding=1, bn=True, backend="cpu"),
        BinSpikeConv2d(8, 16, 3, stride=2, padding=1, backend="cpu", v_reset=None),
    ).eval()
    x = (torch.rand(2, 2, 3, 7, 7) < 0.3).float()
    with torch.no_grad():
        want = model(x)
        # aot_eager traces through the fake kernels (like inductor) at a fraction of the
        # compile time; the compiled graph then runs the C++ kernels.
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bn,stride,padding,v_reset", [(True, 1, 1, 0.0), (False, 2, 0, None)])
def test_layer_cpu_vs_torch(bn, stride, padding, v_reset):
    torch.manual_seed(3)
    kw = dict(stride=stride, padding=padding, bn=bn, tau=2.0, v_threshold=0.5, v_reset=v_reset,
              detach_reset=True, prune_rate=0.5)
    a = BinSpikeConv2d(33, 17, 3, backend="cpu", **kw)
    b = BinSpikeConv2d(33, 17, 3, backend="torch", **kw)
    b.load_state_dict(a.state_dict())
    x = (torch.rand(3, 2, 33, 7, 6) < 0.3).float()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    sa, sb = a(xa), b(xb)
    assert torch.equal(sa, sb)
    g = torch.randn_like(sa)
    (sa * g).sum().backward()
    (sb * g).sum().backward()
    torch.testing.assert_close(a.scores.grad, b.scores.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    if bn:
        torch.testing.assert_close(a.bn.running_mean, b.bn.running_mean)
        torch.testing.assert_close(a.bn.running_var, b.bn.running_var)
    assert math.isfinite(float(xa.grad.abs().sum()))
