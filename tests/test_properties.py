"""Property tests (hypothesis) of the binslt modules and of the ``torch.ops.binslt`` ops on
awkward input: wrong ranks, dtypes and devices (meta as the other device), non-contiguous and
channels-last layouts, NaN / inf, N = 0, T = 1, channel counts that are not a multiple of 32 and
kernels larger than the input.

Every case must give either the correct output (equal to the float64 reference outside a tie
band around the threshold, and exactly equal to the contiguous input's output) or a clear
ValueError / TypeError / RuntimeError whose message names the op or module -- never a crash and
never silent garbage. Bounded: ``max_examples=25`` per property, tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TIE_BAND, assert_spikes_equal, tie_mask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import binslt
from binslt import LIF, BinSpikeConv2d, BinSpikeLinear
from binslt.nn.layers import _bn_scale_shift
from binslt.ops import reference as ref

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ERRORS = (ValueError, TypeError, RuntimeError)
OPS = torch.ops.binslt
CPU_BUILT = binslt.backends()["cpu"]["built"]
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")
# BN statistics of an empty batch (N = 0) in the reference: torch warns, the layer ignores them
pytestmark = pytest.mark.filterwarnings("ignore:var.*degrees of freedom:UserWarning")

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout (channel dim = ndim - 3 for rank >= 4,
    else the last)."""
    if layout == "contiguous" or x.dim() == 0:
        return x.contiguous()
    if layout == "channels_last" and x.dim() >= 3:
        c = x.dim() - 3 if x.dim() >= 4 else x.dim() - 1
        perm = [d for d in range(x.dim()) if d != c] + [c]
        inv = [perm.index(d) for d in range(x.dim())]
        return x.permute(*perm).contiguous().permute(*inv)
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    # strided: every other element of a twice-as-wide buffer along the last dim
    big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    big[..., 1::2] = x
    return big[..., 1::2]


def spikes(shape, gen: torch.Generator, rate: float = 0.4, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) < rate).to(dtype)


def assert_clear(exc: BaseException, *names: str) -> None:
    msg = str(exc)
    assert len(msg) >= 20, f"unhelpful error message: {msg!r}"
    assert any(n in msg for n in names), f"message does not name {names}: {msg!r}"


def assert_spikes_match(actual: torch.Tensor, expected: torch.Tensor, h: torch.Tensor,
                        v_threshold: float, check_rate: bool = True) -> None:
    """Equal outside the tie band (helpers.assert_spikes_equal), and the compared spikes are
    neither all 0 nor all 1 when there are enough of them (MIN_RATE_NEURONS) for the drawn data
    to fire at a non-trivial rate: an output stuck at 0 or 1 cannot pass."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.numel() == 0:
        return
    assert_spikes_equal(actual, expected, h, v_threshold)
    if check_rate:
        assert_nontrivial_rate(expected[tie_mask(h, v_threshold)])


MIN_RATE_NEURONS = 8


def assert_nontrivial_rate(compared: torch.Tensor) -> None:
    """The compared spikes fire at a rate strictly between 0 and 1 (sets smaller than
    MIN_RATE_NEURONS may legitimately be uniform and are not checked)."""
    if compared.numel() < MIN_RATE_NEURONS:
        return
    rate = float(compared.double().mean())
    assert 0.0 < rate < 1.0, f"firing rate {rate} over {compared.numel()} compared spikes"


def neuron_strategy():
    """Neuron settings. tau = 100 only without input decay (the paper's setting): with
    decay_input the current is divided by tau, and in the few timesteps drawn here no neuron
    would fire, so that the spike comparisons would compare zeros only."""
    return st.booleans().flatmap(lambda decay_input: st.fixed_dictionaries({
        "tau": st.sampled_from([1.5, 2.0] if decay_input else [1.5, 2.0, 100.0]),
        "decay_input": st.just(decay_input),
        "v_threshold": st.sampled_from([0.1, 0.5]),
        "v_reset": st.sampled_from([0.0, None]),
    }))


def randomize_bn(layer, gen: torch.Generator) -> None:
    """Eval-mode BN statistics that scale the current up (so that neurons fire)."""
    if layer.bn is not None:
        c = layer.bn.running_mean.numel()
        layer.bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
        layer.bn.running_var.copy_(torch.rand(c, generator=gen) * 0.1 + 0.02)


def layer_reference64(layer, x: torch.Tensor, residual=None):
    """(spikes, H) in float64 for a BinSpikeConv2d/BinSpikeLinear on input x (any layout)."""
    co = layer.weight.shape[0]
    scale, shift, bn_train = _bn_scale_shift(layer.bn, co, x)
    nk = layer.neuron.kwargs()
    w = layer.effective_weight().detach().double()
    x64 = x.detach().double()
    if x64.dim() == 3:  # linear: [T, N, F] as a 1x1 image
        x64 = x64[..., None, None]
        w = w[:, :, None, None]
    T, n = x64.shape[:2]
    z = torch.nn.functional.conv2d(x64.flatten(0, 1), w, stride=getattr(layer, "stride", 1),
                                   padding=getattr(layer, "padding", 0))
    z = z.view(T, n, *z.shape[1:])
    eps = layer.bn.eps if layer.bn is not None else 1e-5
    xin, _, _ = ref.epilogue(z, scale.detach().double(), shift.detach().double(),
                             None if residual is None else residual.double(), bn_train, eps)
    s, h = ref.lif_multistep(xin, tau=nk["tau"], decay_input=nk["decay_input"],
                             v_threshold=nk["v_threshold"], v_reset=nk["v_reset"], return_h=True)
    if layer.weight.dim() == 2:
        s, h = s.flatten(2), h.flatten(2)
    return s, h


# ---------------------------------------------------------------------------------------------
# Modules: correct output on awkward but valid input
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(T=st.integers(1, 3), n=st.integers(0, 2), cin=st.sampled_from([1, 3, 31, 32, 33, 65]),
       cout=st.integers(1, 5), hw=st.tuples(st.integers(1, 6), st.integers(1, 6)),
       k=st.integers(1, 5), stride=st.integers(1, 2), padding=st.integers(0, 2),
       bn=st.booleans(), training=st.booleans(), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       neuron=neuron_strategy(), backend=st.sampled_from(["auto", "torch"]),
       seed=st.integers(0, 2**16))
def test_conv_module_spike_input(T, n, cin, cout, hw, k, stride, padding, bn, training, layout,
                                 dtype, neuron, backend, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layer = BinSpikeConv2d(cin, cout, k, stride, padding, bn=bn, backend=backend, **neuron)
    randomize_bn(layer, gen)
    layer.train(training)
    x = spikes((T, n, cin, *hw), gen, dtype=dtype)
    ho = (hw[0] + 2 * padding - k) // stride + 1
    wo = (hw[1] + 2 * padding - k) // stride + 1
    if ho < 1 or wo < 1:  # kernel larger than the padded input
        with pytest.raises(ValueError) as ei:
            layer(relayout(x, layout))
        assert_clear(ei.value, "smaller than the kernel")
        return
    s_ref, h = layer_reference64(layer, x)
    out_c = layer(x.contiguous())
    out = layer(relayout(x, layout))
    assert out.dtype == dtype and out.shape == (T, n, cout, ho, wo)
    assert torch.equal(out, out_c)  # layout never changes the answer
    # padding >= kernel: most outputs see padding only (a constant current), so a uniform
    # output is legitimate there; the spikes are still compared
    assert_spikes_match(out, s_ref, h, neuron["v_threshold"], check_rate=padding < k)
    if bn and training:
        assert bool(torch.isfinite(layer.bn.running_mean).all())
        assert bool(torch.isfinite(layer.bn.running_var).all())


@SETTINGS
@given(T=st.integers(1, 3), n=st.integers(0, 3), fin=st.sampled_from([1, 5, 32, 33, 70]),
       fout=st.integers(1, 6), bn=st.booleans(), training=st.booleans(),
       layout=st.sampled_from(["contiguous", "strided", "transposed"]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       neuron=neuron_strategy(), frozen=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_module_spike_input(T, n, fin, fout, bn, training, layout, dtype, neuron, frozen,
                                   seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layer = BinSpikeLinear(fin, fout, bn=bn, **neuron)
    randomize_bn(layer, gen)
    if frozen:
        layer.mode = "frozen"
    layer.train(training)
    x = spikes((T, n, fin), gen, dtype=dtype)
    s_ref, h = layer_reference64(layer, x)
    with torch.no_grad():  # frozen + no_grad: the packed path
        out_c = layer(x.contiguous())
        out = layer(relayout(x, layout))
    assert out.dtype == dtype and out.shape == (T, n, fout)
    assert torch.equal(out, out_c)
    assert_spikes_match(out, s_ref, h, neuron["v_threshold"])
    if bn and training:
        assert bool(torch.isfinite(layer.bn.running_mean).all())


@SETTINGS
@given(T=st.integers(1, 3), n=st.integers(0, 2), cin=st.sampled_from([1, 3, 33]),
       hw=st.integers(2, 6), k=st.sampled_from([1, 3]), bn=st.booleans(),
       training=st.booleans(), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       neuron=neuron_strategy(), seed=st.integers(0, 2**16))
def test_conv_module_real_input(T, n, cin, hw, k, bn, training, layout, dtype, neuron, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layer = BinSpikeConv2d(cin, 4, k, 1, k // 2, bn=bn, input="real", **neuron)
    randomize_bn(layer, gen)
    layer.train(training)
    x = (torch.randn((T, n, cin, hw, hw), generator=gen) * 2).to(dtype)
    out_c = layer(x.contiguous())
    out = layer(relayout(x, layout))
    assert out.dtype == dtype and out.shape == (T, n, 4, hw, hw)
    assert torch.equal(out, out_c)
    # reference: the dense conv in the input's dtype (as the layer computes it), then float64
    w = layer.effective_weight().detach().to(dtype)
    z = torch.nn.functional.conv2d(x.flatten(0, 1), w, padding=k // 2).double()
    z = z.view(T, n, *z.shape[1:])
    scale, shift, bn_train = _bn_scale_shift(layer.bn, 4, x)
    xin, _, _ = ref.epilogue(z, scale.double(), shift.double(), None, bn_train, 1e-5)
    s_ref, h = ref.lif_multistep(xin, tau=neuron["tau"], decay_input=neuron["decay_input"],
                                 v_threshold=neuron["v_threshold"], v_reset=neuron["v_reset"],
                                 return_h=True)
    assert_spikes_match(out, s_ref, h, neuron["v_threshold"])


@SETTINGS
@given(T=st.integers(1, 4), rest=st.lists(st.integers(0, 4), min_size=1, max_size=4),
       layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from([torch.float32, torch.float64]),
       neuron=neuron_strategy(), backend=st.sampled_from(["auto", "torch"]),
       seed=st.integers(0, 2**16))
def test_lif_module(T, rest, layout, dtype, neuron, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn((T, *rest), generator=gen) * 1.5 + 0.5).to(dtype)
    lif = LIF(backend=backend, **neuron)
    out_c = lif(x.contiguous())
    out = lif(relayout(x, layout))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, out_c)
    s_ref, h = ref.lif_multistep(x.double(), tau=neuron["tau"],
                                 decay_input=neuron["decay_input"],
                                 v_threshold=neuron["v_threshold"], v_reset=neuron["v_reset"],
                                 return_h=True)
    assert_spikes_match(out, s_ref, h, neuron["v_threshold"])


# ---------------------------------------------------------------------------------------------
# Modules: clear errors on bad input
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(kind=st.sampled_from(["conv", "linear", "conv_real", "linear_real", "lif"]),
       where=st.floats(0, 1, exclude_max=True), value=st.sampled_from(["nan", "inf", "-inf"]),
       T=st.integers(1, 3), n=st.integers(1, 2))
def test_nonfinite_input_is_rejected(kind, where, value, T, n):
    shapes = {"conv": (T, n, 3, 4, 4), "conv_real": (T, n, 3, 4, 4), "linear": (T, n, 5),
              "linear_real": (T, n, 5), "lif": (T, n, 5)}
    make = {"conv": lambda: BinSpikeConv2d(3, 2, 3, padding=1),
            "conv_real": lambda: BinSpikeConv2d(3, 2, 3, padding=1, input="real"),
            "linear": lambda: BinSpikeLinear(5, 2),
            "linear_real": lambda: BinSpikeLinear(5, 2, input="real"),
            "lif": lambda: LIF()}
    x = torch.zeros(shapes[kind])
    x.view(-1)[int(where * x.numel())] = float(value)
    with pytest.raises(ValueError) as ei:
        make[kind]()(x)
    assert_clear(ei.value, "NaN or inf", "binary spikes")


def _module_cases():
    return {
        "conv": (lambda: BinSpikeConv2d(3, 2, 3, padding=1), (2, 1, 3, 4, 4), "BinSpikeConv2d"),
        "conv_real": (lambda: BinSpikeConv2d(3, 2, 3, padding=1, input="real"), (2, 1, 3, 4, 4),
                      "BinSpikeConv2d"),
        "linear": (lambda: BinSpikeLinear(5, 2), (2, 1, 5), "BinSpikeLinear"),
        "lif": (lambda: LIF(), (2, 1, 5), "LIF"),
    }


@SETTINGS
@given(kind=st.sampled_from(["conv", "conv_real", "linear", "lif"]), rank=st.integers(0, 6))
def test_wrong_rank_is_rejected(kind, rank):
    make, shape, name = _module_cases()[kind]
    ok_rank = len(shape)
    if rank == ok_rank or (kind == "lif" and rank >= 2):
        return  # valid (LIF takes any rank >= 2); covered by the correctness properties
    x = torch.zeros((2,) * rank)
    with pytest.raises(ValueError) as ei:
        make()(x)
    assert_clear(ei.value, name, "rank")


@SETTINGS
@given(kind=st.sampled_from(["conv", "conv_real", "linear", "lif"]),
       dtype=st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.bool,
                              torch.complex64]))
def test_non_float_dtype_is_rejected(kind, dtype):
    make, shape, name = _module_cases()[kind]
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises(TypeError) as ei:
        make()(x)
    assert_clear(ei.value, name)


@SETTINGS
@given(kind=st.sampled_from(["conv", "conv_real", "linear"]), layer_on_meta=st.booleans())
def test_device_mismatch_is_rejected(kind, layer_on_meta):
    make, shape, name = _module_cases()[kind]
    layer = make()
    x = torch.zeros(shape)
    if layer_on_meta:
        layer = layer.to("meta")
    else:
        x = x.to("meta")
    with pytest.raises(ValueError) as ei:
        layer(x)
    assert_clear(ei.value, "meta")


def test_lif_on_meta_infers_shapes():
    out = LIF()(torch.zeros(3, 2, 5, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 2, 5)
    with pytest.raises(RuntimeError, match="needs CPU tensors"):
        LIF(backend="cpu")(torch.zeros(3, 2, 5, device="meta"))


def test_empty_batch_keeps_running_stats_finite():
    for layer, x in ((BinSpikeConv2d(33, 4, 3, padding=1, bn=True), torch.zeros(2, 0, 33, 5, 5)),
                     (BinSpikeLinear(33, 4, bn=True), torch.zeros(2, 0, 33)),
                     (BinSpikeConv2d(3, 4, 3, padding=1, bn=True, input="real"),
                      torch.zeros(2, 0, 3, 5, 5))):
        layer.train()
        out = layer(x)
        assert out.shape[1] == 0
        assert torch.equal(layer.bn.running_mean, torch.zeros(4))
        assert torch.equal(layer.bn.running_var, torch.ones(4))


# ---------------------------------------------------------------------------------------------
# Ops (torch.ops.binslt.*): correct output on awkward but valid input
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(b=st.integers(0, 3), c=st.sampled_from([1, 7, 31, 32, 33, 64, 65]),
       hw=st.tuples(st.integers(1, 5), st.integers(1, 5)), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_pack_unpack_spikes_ops(b, c, hw, layout, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = spikes((b, c, *hw), gen, dtype=dtype)
    try:
        packed = OPS.pack_spikes(relayout(x, layout))
    except ERRORS as exc:  # a dtype the kernel does not take must be refused clearly
        assert dtype != torch.float32, exc
        assert_clear(exc, "pack_spikes")
        return
    want = ref.pack_spikes_reference(x.float())
    assert packed.dtype == torch.int32 and torch.equal(packed, want)
    back = OPS.unpack_spikes(relayout(packed, layout), c)
    assert torch.equal(back, x.float())


@SETTINGS
@given(co=st.integers(1, 4), ci=st.sampled_from([1, 3, 32, 33, 70]), k=st.integers(1, 3),
       layout=st.sampled_from(LAYOUTS), alpha=st.floats(0.01, 3.0), seed=st.integers(0, 2**16))
def test_pack_weight_op(co, ci, k, layout, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randint(-1, 2, (co, ci, k, k), generator=gen) * alpha).float()
    m, p = OPS.pack_weight(relayout(w, layout))
    rm, rp = ref.pack_weight_reference(w)
    assert torch.equal(m, rm) and torch.equal(p, rp)
    assert torch.equal(ref.unpack_weight_reference(m, p, ci), torch.sign(w))


def _bconv_problem(gen, T, n, ci, co, h, w, k):
    x = spikes((T * n, ci, h, w), gen)
    wt = torch.randint(-1, 2, (co, ci, k, k), generator=gen).float()
    m, p = ref.pack_weight_reference(wt)
    alpha = torch.rand(co, generator=gen) + 0.1
    scale = torch.rand(co, generator=gen) + 0.5
    shift = torch.randn(co, generator=gen) * 0.2
    return x, ref.pack_spikes_reference(x), m, p, alpha, scale, shift


@SETTINGS
@given(T=st.integers(1, 3), n=st.integers(0, 2), ci=st.sampled_from([1, 5, 32, 33, 65]),
       co=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5), k=st.integers(1, 4),
       stride=st.integers(1, 2), padding=st.integers(0, 2), bn_train=st.booleans(),
       with_res=st.booleans(), layout=st.sampled_from(LAYOUTS), neuron=neuron_strategy(),
       seed=st.integers(0, 2**16))
def test_bconv_lif_op(T, n, ci, co, h, w, k, stride, padding, bn_train, with_res, layout, neuron,
                      seed):
    gen = torch.Generator().manual_seed(seed)
    x, xp, m, p, alpha, scale, shift = _bconv_problem(gen, T, n, ci, co, h, w, k)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    nargs = (neuron["tau"], neuron["decay_input"], neuron["v_threshold"], neuron["v_reset"])
    res = torch.randn((T, n, co, max(ho, 1), max(wo, 1)), generator=gen) if with_res else None

    def call(xp_, m_, p_, res_):
        return OPS.bconv_lif(xp_, m_, p_, alpha, scale, shift, res_, T, stride, padding, bn_train,
                             1e-5, *nargs)

    if ho < 1 or wo < 1:  # kernel larger than the padded input
        with pytest.raises(ERRORS) as ei:
            call(xp, m, p, res)
        assert_clear(ei.value, "bconv_lif", "kernel", "input size")
        return
    def lay(t):
        return relayout(t, layout)

    s, counts, mean, var = call(lay(xp), lay(m), lay(p), None if res is None else lay(res))
    s_c, counts_c, mean_c, var_c = call(xp, m, p, res)
    assert torch.equal(s, s_c) and torch.equal(counts, counts_c)
    torch.testing.assert_close(mean, mean_c, equal_nan=True, rtol=0, atol=0)  # N=0: NaN
    torch.testing.assert_close(var, var_c, equal_nan=True, rtol=0, atol=0)
    # reference: exact integer counts, then the float64 epilogue + LIF
    wt = ref.unpack_weight_reference(m, p, ci)
    cnt = torch.nn.functional.conv2d(x.double(), wt.double(), stride=stride, padding=padding)
    cnt = cnt.view(T, n, co, ho, wo)
    assert torch.equal(counts.double(), cnt)
    z = cnt * alpha.double().view(1, 1, -1, 1, 1)
    xin, mu, vr = ref.epilogue(z, scale.double(), shift.double(),
                               None if res is None else res.double(), bn_train, 1e-5)
    s_ref, hh = ref.lif_multistep(xin, tau=nargs[0], decay_input=nargs[1], v_threshold=nargs[2],
                                  v_reset=nargs[3], return_h=True)
    assert_spikes_match(s, s_ref, hh, nargs[2])
    if bn_train and n > 0:
        torch.testing.assert_close(mean.double(), mu.double(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(var.double(), vr.double(), rtol=1e-3, atol=1e-3)


@SETTINGS
@given(T=st.integers(1, 3), n=st.integers(0, 2), c=st.integers(1, 5),
       rest=st.lists(st.integers(1, 3), max_size=2), bn_train=st.booleans(),
       with_res=st.booleans(), nonfinite=st.sampled_from([None, "nan", "inf", "-inf"]),
       layout=st.sampled_from(LAYOUTS), neuron=neuron_strategy(), seed=st.integers(0, 2**16))
def test_bn_lif_op(T, n, c, rest, bn_train, with_res, nonfinite, layout, neuron, seed):
    """bn_lif on real currents, NaN / inf included: equal to the reference (NaN never fires); with
    batch statistics a NaN / inf current is a ValueError."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((T, n, c, *rest), generator=gen) * 2
    if nonfinite is not None and z.numel():
        z.view(-1)[int(torch.randint(z.numel(), (1,), generator=gen))] = float(nonfinite)
    scale = torch.rand(c, generator=gen) + 0.5
    shift = torch.randn(c, generator=gen) * 0.2
    res = torch.randn(z.shape, generator=gen) if with_res else None
    nargs = (neuron["tau"], neuron["decay_input"], neuron["v_threshold"], neuron["v_reset"])
    def lay(t):
        return relayout(t, layout)

    if bn_train and nonfinite is not None and z.numel():
        # batch statistics over a NaN / inf current: an error, not NaN in the running statistics
        for zz, rr in ((lay(z), None if res is None else lay(res)), (z, res)):
            with pytest.raises(ValueError, match=r"^binslt::bn_lif: BN batch statistics are not "
                               "finite in 1 of"):
                OPS.bn_lif(zz, scale, shift, rr, bn_train, 1e-5, *nargs)
        return
    s, mean, var = OPS.bn_lif(lay(z), scale, shift, None if res is None else lay(res), bn_train,
                              1e-5, *nargs)
    s_c, mean_c, var_c = OPS.bn_lif(z, scale, shift, res, bn_train, 1e-5, *nargs)
    assert torch.equal(s, s_c)
    torch.testing.assert_close(mean, mean_c, equal_nan=True, rtol=0, atol=0)
    xin, _, _ = ref.epilogue(z.double(), scale.double(), shift.double(),
                             None if res is None else res.double(), bn_train, 1e-5)
    s_ref, hh = ref.lif_multistep(xin, tau=nargs[0], decay_input=nargs[1], v_threshold=nargs[2],
                                  v_reset=nargs[3], return_h=True)
    if nonfinite is None:
        assert_spikes_match(s, s_ref, hh, nargs[2])
    else:  # no tie band can be computed through NaN; compare where the reference is finite
        assert set(s.unique().tolist()) <= {0.0, 1.0}
        fin = torch.isfinite(hh) & ((hh - nargs[2]).abs() >= TIE_BAND)
        fin = torch.cummin(fin.to(torch.int8), dim=0).values.bool()
        assert torch.equal(s.double()[fin], s_ref[fin])


@SETTINGS
@given(T=st.integers(1, 2), n=st.integers(0, 2), ci=st.sampled_from([3, 33]),
       k=st.integers(1, 3), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_backward_ops_layouts(T, n, ci, k, layout, seed):
    """The backward ops give the same gradients for any layout of their inputs."""
    gen = torch.Generator().manual_seed(seed)
    co, h = 3, 4
    x, xp, m, p, alpha, scale, shift = _bconv_problem(gen, T, n, ci, co, h, h, k)
    pad = k // 2
    nargs = (2.0, True, 0.5, 0.0)
    s, counts, mean, var = OPS.bconv_lif(xp, m, p, alpha, scale, shift, None, T, 1, pad, True,
                                         1e-5, *nargs)
    g = torch.randn(s.shape, generator=gen)
    def lay(t):
        return relayout(t, layout)

    tail = (ci, 1, pad, True, 1e-5, *nargs, True, 0, 2.0, True)
    a = OPS.bconv_lif_bwd(lay(g), lay(counts), lay(xp), lay(m), lay(p), alpha, scale, shift,
                          mean, var, None, *tail)
    b = OPS.bconv_lif_bwd(g, counts, xp, m, p, alpha, scale, shift, mean, var, None, *tail)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    z = counts.float() * alpha.view(1, 1, -1, 1, 1)
    a = OPS.bn_lif_bwd(lay(g), lay(z), scale, shift, mean, var, None, True, 1e-5, *nargs, True,
                       0, 2.0)
    b = OPS.bn_lif_bwd(g, z, scale, shift, mean, var, None, True, 1e-5, *nargs, True, 0, 2.0)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_meta_tensors_give_shapes():
    """All-meta calls run the fake kernels (shape inference, as torch.compile uses them)."""
    xp = torch.empty(6, 5, 5, 2, dtype=torch.int32, device="meta")
    wm = torch.empty(4, 3, 3, 2, dtype=torch.int32, device="meta")
    v = torch.empty(4, device="meta")
    s, counts, mean, var = OPS.bconv_lif(xp, wm, wm, v, v, v, None, 3, 1, 1, False, 1e-5, 2.0,
                                         True, 1.0, 0.0)
    assert s.device.type == "meta" and s.shape == (3, 2, 4, 5, 5)
    assert counts.dtype == torch.int16
    assert OPS.pack_spikes(torch.empty(2, 40, 3, 3, device="meta")).shape == (2, 3, 3, 2)


# ---------------------------------------------------------------------------------------------
# Ops: clear errors on bad arguments (the C++ kernels must raise, never crash)
# ---------------------------------------------------------------------------------------------

BCONV_BAD = {
    "x_packed rank 3": lambda a: a.update(xp=a["xp"][0]),
    "x_packed rank 5": lambda a: a.update(xp=a["xp"][None]),
    "x_packed float": lambda a: a.update(xp=a["xp"].float()),
    "x_packed int64": lambda a: a.update(xp=a["xp"].long()),
    "w_mask rank 3": lambda a: a.update(m=a["m"][0]),
    "w_mask int16": lambda a: a.update(m=a["m"].short()),
    "w_pos shape": lambda a: a.update(p=a["p"][:1]),
    "Cw mismatch": lambda a: a.update(m=torch.cat([a["m"], a["m"]], -1),
                                      p=torch.cat([a["p"], a["p"]], -1)),
    "alpha length": lambda a: a.update(alpha=a["alpha"][:1].repeat(7)),
    "alpha 2-d": lambda a: a.update(alpha=a["alpha"][None]),
    "scale length": lambda a: a.update(scale=a["scale"][:-1]),
    "shift int": lambda a: a.update(shift=a["shift"].long()),
    "residual shape": lambda a: a.update(res=torch.zeros(1, 1, 1, 1, 1)),
    "T zero": lambda a: a.update(T=0),
    "T not dividing B": lambda a: a.update(T=a["xp"].shape[0] + 1),
    "stride zero": lambda a: a.update(stride=0),
    "padding negative": lambda a: a.update(padding=-1),
    "kernel larger than input": lambda a: a.update(padding=0, xp=a["xp"][:, :1, :1]),
    "meta x_packed": lambda a: a.update(xp=a["xp"].to("meta")),
    "meta w_mask": lambda a: a.update(m=a["m"].to("meta")),
    "meta alpha": lambda a: a.update(alpha=a["alpha"].to("meta")),
    "meta residual": lambda a: a.update(res=torch.zeros(a["res_shape"], device="meta")),
}


@pytest.mark.skipif(not CPU_BUILT, reason="the C++ CPU extension is not built (checks live there)")
@SETTINGS
@given(bad=st.sampled_from(sorted(BCONV_BAD)), T=st.integers(1, 2), n=st.integers(1, 2),
       ci=st.sampled_from([3, 33]), seed=st.integers(0, 2**16))
def test_bconv_lif_bad_arguments(bad, T, n, ci, seed):
    gen = torch.Generator().manual_seed(seed)
    co, h, k = 3, 4, 3
    x, xp, m, p, alpha, scale, shift = _bconv_problem(gen, T, n, ci, co, h, h, k)
    a = dict(xp=xp, m=m, p=p, alpha=alpha, scale=scale, shift=shift, res=None, T=T, stride=1,
             padding=1, res_shape=(T, n, co, h, h))
    BCONV_BAD[bad](a)
    with pytest.raises(ERRORS) as ei:
        OPS.bconv_lif(a["xp"], a["m"], a["p"], a["alpha"], a["scale"], a["shift"], a["res"],
                      a["T"], a["stride"], a["padding"], False, 1e-5, 2.0, True, 1.0, 0.0)
    assert_clear(ei.value, "binslt")


BN_LIF_BAD = {
    "z rank 2": lambda a: a.update(z=a["z"][0]),
    "z int": lambda a: a.update(z=a["z"].long()),
    "scale length": lambda a: a.update(scale=a["scale"][:-1]),
    "shift 2-d": lambda a: a.update(shift=a["shift"][None]),
    "residual shape": lambda a: a.update(res=a["z"][:, :, :1]),
    "meta z": lambda a: a.update(z=a["z"].to("meta")),
    "meta scale": lambda a: a.update(scale=a["scale"].to("meta")),
    "tau zero": lambda a: a.update(tau=0.0),
}


@pytest.mark.skipif(not CPU_BUILT, reason="the C++ CPU extension is not built (checks live there)")
@SETTINGS
@given(bad=st.sampled_from(sorted(BN_LIF_BAD)), T=st.integers(1, 2), n=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_bn_lif_bad_arguments(bad, T, n, seed):
    gen = torch.Generator().manual_seed(seed)
    c = 3
    a = dict(z=torch.randn((T, n, c, 2, 2), generator=gen), scale=torch.ones(c),
             shift=torch.zeros(c), res=None, tau=2.0)
    BN_LIF_BAD[bad](a)
    with pytest.raises(ERRORS) as ei:
        OPS.bn_lif(a["z"], a["scale"], a["shift"], a["res"], False, 1e-5, a["tau"], True, 1.0,
                   0.0)
    assert_clear(ei.value, "binslt")


PACK_BAD = {
    "pack_spikes rank 3": lambda: OPS.pack_spikes(torch.zeros(2, 3, 4)),
    "pack_spikes rank 5": lambda: OPS.pack_spikes(torch.zeros(1, 2, 3, 4, 4)),
    "unpack_spikes float": lambda: OPS.unpack_spikes(torch.zeros(1, 2, 2, 1), 3),
    "unpack_spikes too many channels": lambda: OPS.unpack_spikes(
        torch.zeros(1, 2, 2, 1, dtype=torch.int32), 33),
    "unpack_spikes negative channels": lambda: OPS.unpack_spikes(
        torch.zeros(1, 2, 2, 1, dtype=torch.int32), -1),
    "pack_weight rank 2": lambda: OPS.pack_weight(torch.zeros(3, 4)),
    "pack_weight rank 5": lambda: OPS.pack_weight(torch.zeros(3, 4, 1, 1, 1)),
}


@pytest.mark.skipif(not CPU_BUILT, reason="the C++ CPU extension is not built (checks live there)")
@pytest.mark.parametrize("bad", sorted(PACK_BAD))
def test_pack_ops_bad_arguments(bad):
    with pytest.raises(ERRORS) as ei:
        PACK_BAD[bad]()
    assert_clear(ei.value, "binslt", "pack")



# ---------------------------------------------------------------------------------------------
# Degenerate shapes, in a child process: a crash (SIGFPE, SIGSEGV) in a kernel must show up as a
# failing test naming the op and the inputs, not take the test session down with it.
# ---------------------------------------------------------------------------------------------

_DEGENERATE_CHILD = r'''
import sys, torch, binslt
from binslt.ops import reference as ref
OPS = torch.ops.binslt

def i32(*s):
    return torch.zeros(s, dtype=torch.int32)

def v(c):
    return torch.ones(c)

def bconv(B, H, W, Cw, Co, k, T=1, pad=1):
    return lambda f: f["bconv_lif"](i32(B, H, W, Cw), i32(Co, k, k, Cw), i32(Co, k, k, Cw), v(Co),
                                    v(Co), v(Co), None, T, 1, pad, False, 1e-5, 2.0, True, 1.0,
                                    0.0)

def bn(*shape, bn_train=False):
    c = shape[2] if len(shape) > 2 else 1
    return lambda f: f["bn_lif"](torch.zeros(shape), v(c), v(c), None, bn_train, 1e-5, 2.0, True,
                                 1.0, 0.0)

def bn_bwd(*shape):
    c = shape[2]
    return lambda f: f["bn_lif_bwd"](torch.zeros(shape), torch.zeros(shape), v(c), v(c), v(c),
                                     v(c), None, False, 1e-5, 2.0, True, 1.0, 0.0, True, 0, 2.0)

def bconv_bwd(B, H, W, Ci, Co, k, T=1, pad=1):
    cw = (Ci + 31) // 32
    ho, wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    n = B // T if T else 0
    cnt = torch.zeros((T, n, Co, ho, wo), dtype=torch.int16)
    return lambda f: f["bconv_lif_bwd"](torch.zeros(cnt.shape), cnt, i32(B, H, W, cw),
                                        i32(Co, k, k, cw), i32(Co, k, k, cw), v(Co), v(Co), v(Co),
                                        v(Co), v(Co), None, Ci, 1, pad, False, 1e-5, 2.0, True,
                                        1.0, 0.0, True, 0, 2.0, True)

CASES = {
    "pack_spikes x=[0,3,2,2]": lambda f: f["pack_spikes"](torch.zeros(0, 3, 2, 2)),
    "pack_spikes x=[2,0,2,2] (C=0)": lambda f: f["pack_spikes"](torch.zeros(2, 0, 2, 2)),
    "pack_spikes x=[2,3,0,2]": lambda f: f["pack_spikes"](torch.zeros(2, 3, 0, 2)),
    "pack_spikes x=[2,3,2,0]": lambda f: f["pack_spikes"](torch.zeros(2, 3, 2, 0)),
    "unpack_spikes packed=[0,2,2,1]": lambda f: f["unpack_spikes"](i32(0, 2, 2, 1), 3),
    "unpack_spikes packed=[1,2,0,1]": lambda f: f["unpack_spikes"](i32(1, 2, 0, 1), 3),
    "unpack_spikes packed=[1,2,2,0], channels=0": lambda f: f["unpack_spikes"](i32(1, 2, 2, 0), 0),
    "pack_weight w=[0,3,3,3]": lambda f: f["pack_weight"](torch.zeros(0, 3, 3, 3)),
    "pack_weight w=[2,0,3,3] (Ci=0)": lambda f: f["pack_weight"](torch.zeros(2, 0, 3, 3)),
    "pack_weight w=[2,3,0,0]": lambda f: f["pack_weight"](torch.zeros(2, 3, 0, 0)),
    "bconv_lif B=0": bconv(0, 4, 4, 1, 2, 3),
    "bconv_lif T=2, B=0": bconv(0, 4, 4, 1, 2, 3, T=2),
    "bconv_lif H=0": bconv(2, 0, 4, 1, 2, 3),
    "bconv_lif W=0, pad=0": bconv(2, 4, 0, 1, 2, 1, pad=0),
    "bconv_lif Cw=0": bconv(2, 4, 4, 0, 2, 3),
    "bconv_lif Co=0": bconv(2, 4, 4, 1, 0, 3),
    "bconv_lif k=0": bconv(2, 4, 4, 1, 2, 0),
    "bconv_lif T=0": bconv(2, 4, 4, 1, 2, 3, T=0),
    "bconv_lif_bwd B=0": bconv_bwd(0, 4, 4, 3, 2, 3),
    "bconv_lif_bwd Co=0": bconv_bwd(2, 4, 4, 3, 0, 3),
    "bconv_lif_bwd H=1, k=3, pad=1": bconv_bwd(2, 1, 1, 3, 2, 3),
    "bn_lif z=[0,1,3]": bn(0, 1, 3),
    "bn_lif z=[2,0,3]": bn(2, 0, 3),
    "bn_lif z=[2,1,0]": bn(2, 1, 0),
    "bn_lif z=[2,1,1,0]": bn(2, 1, 1, 0),
    "bn_lif z=[2,1,3,0], bn_train": bn(2, 1, 3, 0, bn_train=True),
    "bn_lif z=[2,2,3,0,4]": bn(2, 2, 3, 0, 4),
    "bn_lif z=[2,2,3,4,0]": bn(2, 2, 3, 4, 0),
    "bn_lif_bwd z=[2,0,3]": bn_bwd(2, 0, 3),
    "bn_lif_bwd z=[2,1,3,0]": bn_bwd(2, 1, 3, 0),
}

MUST_RAISE = {"bconv_lif k=0"}

REF = {k: getattr(ref, k + "_reference") for k in
       ("pack_spikes", "unpack_spikes", "pack_weight", "bconv_lif", "bconv_lif_bwd", "bn_lif",
        "bn_lif_bwd")}
KERNEL = {k: getattr(OPS, k) for k in REF}

def flat(r):
    return list(r) if isinstance(r, (tuple, list)) else [r]

import os
for name, case in list(CASES.items())[int(os.environ.get("BINSLT_SKIP_CASES", "0")):]:
    print("CASE", name, flush=True)
    try:
        got = flat(case(KERNEL))
    except (RuntimeError, ValueError, TypeError) as exc:
        print("ERR", str(exc).splitlines()[0], flush=True)
        continue
    try:
        want = flat(case(REF))
    except Exception:
        want = None
    if want is not None:
        same = len(got) == len(want) and all(
            g.shape == w.shape and torch.equal(torch.nan_to_num(g.float()),
                                               torch.nan_to_num(w.float()))
            for g, w in zip(got, want))
        print("OK" if same else "MISMATCH " + str([tuple(g.shape) for g in got]) + " vs " +
              str([tuple(w.shape) for w in want]), flush=True)
    else:
        # the reference has no answer: an empty reduction (Ci = 0, Co = 0) has a defined one,
        # a 0x0 kernel has none
        tag = "ACCEPTED " if name in MUST_RAISE else "OK-NOREF "
        print(tag + str([tuple(g.shape) for g in got]), flush=True)
print("DONE", flush=True)
'''


def test_degenerate_shapes_in_ops_raise_or_match_the_reference():
    """Zero-size dims in every position of every op: a result equal to the reference's, or a
    clear error where the reference has no answer -- never a crash. Runs in child processes so
    that a crash is reported with its case (op and input shapes), and the other cases still run."""
    import os
    import subprocess
    import sys

    problems: list[str] = []
    skip = 0
    for _ in range(40):  # a new child after each crash, resuming at the next case
        res = subprocess.run([sys.executable, "-c", _DEGENERATE_CHILD], capture_output=True,
                             text=True, timeout=300,
                             env={**os.environ, "BINSLT_SKIP_CASES": str(skip)})
        lines = res.stdout.splitlines()
        cases = [ln[5:] for ln in lines if ln.startswith("CASE ")]
        outcomes = [ln for ln in lines if not ln.startswith(("CASE ", "DONE"))]
        for case, outcome in zip(cases, outcomes):
            if outcome.startswith("ERR"):
                msg = outcome[4:]
                if "binslt" not in msg or len(msg) < 20:
                    problems.append(f"{case}: unhelpful error {msg!r}")
            elif outcome.startswith("MISMATCH"):
                problems.append(f"{case}: output differs from the reference ({outcome})")
            elif outcome.startswith("ACCEPTED"):
                problems.append(f"{case}: the kernel returns {outcome[9:]} where the reference "
                                "rejects the input (expected a clear error)")
        if lines and lines[-1] == "DONE":
            break
        if not cases:
            pytest.fail(f"the child process failed before its first case: {res.stderr[-500:]}")
        problems.append(f"{cases[-1]}: the process died (exit {res.returncode}) -- a kernel "
                        "crashed instead of raising")
        skip += len(cases)
    assert not problems, "\n".join(problems)
