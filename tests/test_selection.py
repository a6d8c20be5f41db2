"""Mask selection: ``binslt::topk_mask`` (the CPU radix selection behind ``ops.topk_mask``) keeps
exactly the bits of biprop's top-k rule, ``reference.topk_mask``, ties and all."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import stable_seed

import binslt.ops as ops
from binslt.nn import models as models
from binslt.nn.layers import _MaskedSignWeight
from binslt.ops import library as _ext
from binslt.ops import reference as ref
from binslt.ops.cpu_algos import cpu_algorithms, runnable_isas

CPU = _ext.module("cpu")
pytestmark = pytest.mark.skipif(CPU is None, reason="binslt._C (the C++ CPU kernels) is not built")

RATES = (0.0, 0.1, 0.5, 0.9, 0.99)


def _kernel_is_compiled() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("binslt::topk_mask", "CPU")


def test_the_cpu_kernel_is_the_compiled_one():
    # Otherwise the reference serves the op and every comparison below compares it with itself.
    assert _kernel_is_compiled()


def _assert_same_mask(scores: torch.Tensor, prune_rate: float) -> None:
    want = ref.topk_mask(scores, prune_rate)
    got = ops.topk_mask(scores, prune_rate)
    assert got.dtype == scores.dtype and got.shape == scores.shape
    assert torch.equal(got, want), (
        f"masks differ at {int((got != want).sum())} of {scores.numel()} entries "
        f"(prune_rate {prune_rate}, shape {list(scores.shape)})")
    n = scores.numel()
    if not torch.isnan(scores).any():
        assert int(got.sum()) == n - ref.num_pruned(n, prune_rate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 3, 3), (64, 32, 3, 3), (300, 700)])
def test_random_scores(dtype, shape):
    g = torch.Generator().manual_seed(stable_seed(("random", str(dtype), shape)))
    s = torch.randn(shape, generator=g, dtype=dtype)
    for p in RATES:
        _assert_same_mask(s, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_heavy_ties_zeros_and_negative_zeros(dtype):
    g = torch.Generator().manual_seed(stable_seed(("ties", str(dtype))))
    for n, levels in ((10, 2), (1000, 3), (50_000, 4), (400_000, 5)):
        mag = torch.randint(0, levels, (n,), generator=g).to(dtype) / 4
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(dtype)
        s = mag * sign  # zeros of both signs: |−0| == |+0|, one tie class
        assert (torch.signbit(s) & (s == 0)).any()
        for p in RATES + (0.3, 0.37, 0.75):
            _assert_same_mask(s, p)
        _assert_same_mask(torch.zeros(n, dtype=dtype), 0.5)
        _assert_same_mask(-torch.zeros(n, dtype=dtype), 0.5)


def test_ties_spanning_parallel_chunks():
    # A large layer runs in several chunks: the ties kept must still be the lowest flat indices.
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            n = 5 * 65536 + 17
            s = torch.full((n,), 0.25)
            s[::7] = -0.5
            s[n // 3] = 2.0
            for p in (0.1, 0.5, 0.8, 0.86, 0.9):
                _assert_same_mask(s, p)
            g = torch.Generator().manual_seed(threads)
            _assert_same_mask(torch.randint(-3, 4, (n,), generator=g).float(), 0.5)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", runnable_isas())
def test_selection_on_every_isa_over_chunks_and_tails(isa):
    # The pass that gathers the threshold's bucket has an AVX-512 form (16 keys a step, a scalar
    # tail): sizes off 16, the wide radix digit, several parallel chunks, ties inside a bucket.
    g = torch.Generator().manual_seed(stable_seed(("isa", isa)))
    for n in (4_001, 300_001):
        distinct = torch.randn(n, generator=g)
        ties = torch.randint(-40, 41, (n,), generator=g).float() / 16
        for s in (distinct, ties):
            for p in (0.1, 0.5, 0.77):
                with cpu_algorithms(isa=isa):
                    got = ops.topk_mask(s, p)
                assert torch.equal(got, ref.topk_mask(s, p)), (isa, n, p)


def test_ties_in_the_low_digit_only():
    # Keys equal in their high 16 bits and different below: the second radix digit decides.
    base = torch.tensor(1.0).view(torch.int32)
    bits = base + torch.arange(0, 4000, dtype=torch.int32) % 37
    s = bits.view(torch.float32)[torch.randperm(4000, generator=torch.Generator().manual_seed(3))]
    for p in RATES + (0.33,):
        _assert_same_mask(s, p)


def _assert_same_non_finite_error(scores: torch.Tensor, prune_rate: float, counts: str) -> None:
    """The kernel and the reference refuse NaN / inf scores with one message and its counts."""
    msgs = []
    for select in (ops.topk_mask, ref.topk_mask):
        with pytest.raises(ValueError, match=r"^binslt::topk_mask: scores contain ") as ei:
            select(scores, prune_rate)
        msgs.append(str(ei.value).splitlines()[0])
    assert msgs[0] == msgs[1]
    assert counts in msgs[0], msgs[0]


def test_infinities_and_nans_are_errors_naming_their_counts():
    s = torch.tensor([1.0, float("inf"), -float("inf"), 0.0, -0.0, 3.0, float("nan"), -2.0,
                      float("nan"), 1.0])
    # every prune rate, the ones that keep all or nothing included (no selection runs there)
    for p in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.99):
        _assert_same_non_finite_error(s, p, "NaN (2 of 10) and inf (2 of 10)")
    _assert_same_non_finite_error(torch.full((9,), float("nan")), 0.5, "NaN (9 of 9)")
    _assert_same_non_finite_error(torch.tensor([1.0, -float("inf")], dtype=torch.float64), 0.5,
                                  "inf (1 of 2)")
    g = torch.Generator().manual_seed(11)
    s = torch.randn(200_000, generator=g)  # several parallel chunks, the wide radix digit
    idx = torch.randperm(s.numel(), generator=g)[:500]
    s[idx] = float("nan")
    for p in (0.0, 0.5, 0.999):
        _assert_same_non_finite_error(s, p, "NaN (500 of 200000)")
    # the largest finite value is not an error
    big = torch.tensor([torch.finfo(torch.float32).max, -1.0, 0.5])
    _assert_same_mask(big, 0.5)


def test_non_contiguous_scores_follow_the_logical_order():
    g = torch.Generator().manual_seed(5)
    s = torch.randint(-2, 3, (40, 60), generator=g).float().t()
    assert not s.is_contiguous()
    for p in RATES:
        _assert_same_mask(s, p)


def test_other_dtypes_use_the_reference():
    s = torch.randn(100, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert torch.equal(ops.topk_mask(s, 0.5), ref.topk_mask(s, 0.5))


def test_op_bounds_and_errors():
    s = torch.randn(10)
    assert torch.equal(torch.ops.binslt.topk_mask(s, 10), torch.ones(10))
    assert torch.equal(torch.ops.binslt.topk_mask(s, 0), torch.zeros(10))
    assert torch.ops.binslt.topk_mask(torch.empty(0), 0).shape == (0,)
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.binslt.topk_mask(torch.ones(4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="prune_rate"):
        ops.topk_mask(s, 1.0)


@pytest.mark.parametrize("arch", ["conv4", "vgg11", "resnet19"])
def test_every_layer_shape_of_the_models(arch):
    net = models.build(arch, "binwslt", input_size=32 if arch != "conv4" else 8, in_channels=3)
    layers = [m for m in net.modules() if isinstance(m, _MaskedSignWeight)]
    assert layers
    g = torch.Generator().manual_seed(stable_seed(arch))
    for i, m in enumerate(layers):
        s = m.scores.detach()
        _assert_same_mask(s, m.prune_rate)  # Kaiming-uniform scores as drawn
        tied = torch.randint(-8, 9, s.shape, generator=g).float()
        _assert_same_mask(tied, (0.5, 0.25, 0.9)[i % 3])


def test_search_steps_keep_the_top_k_mask_and_w_eff():
    """A few search steps of a small model: after each, every layer's mask is the top-k rule's
    and W_eff is the reference's, bit for bit (the forward used the kernel's selection)."""
    torch.manual_seed(0)
    net = models.build("conv4", "binwslt", in_channels=1, input_size=8, timesteps=2,
                       prune_rate=0.5, decay=0.99, decay_input=False, detach_reset=True, bn=True)
    models.set_mode(net, "search")
    layers = [m for m in net.modules() if isinstance(m, _MaskedSignWeight)]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5,
                          momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    changed = 0
    before = [m.current_mask().clone() for m in layers]
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        for m, old in zip(layers, before):
            want = ref.topk_mask(m.scores, m.prune_rate)
            assert torch.equal(m.current_mask(), want)
            assert torch.equal(m.effective_weight(),
                               ref.masked_sign_weight(m.weight, m.scores, m.prune_rate,
                                                      m.per_channel_gain))
            changed += int((want != old).sum())
        before = [m.current_mask().clone() for m in layers]
    assert changed > 0  # the steps moved the mask, so the check saw new selections


def test_search_gradient_is_unchanged():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(16, 8, 3, 3, generator=g)
    s = torch.randn(16, 8, 3, 3, generator=g, requires_grad=True)
    s_ref = s.detach().clone().requires_grad_(True)
    up = torch.randn(16, 8, 3, 3, generator=g)
    (ops.masked_sign_weight(w, s, 0.5) * up).sum().backward()
    (ref.masked_sign_weight(w, s_ref, 0.5) * up).sum().backward()
    assert torch.equal(s.grad, s_ref.grad)


# ---------------------------------------------------------------------------------------------
# sign_gain_pack: W_eff, its bit planes and the kernels' gain in one pass
# ---------------------------------------------------------------------------------------------


def _assert_sign_gain_pack(w, m, alpha):
    got = torch.ops.binslt.sign_gain_pack(w, m, alpha)
    want_w = ref._expand_gain(alpha, w) * torch.sign(w) * m
    want = (want_w, *ops.pack_weight(want_w), ops.max_abs_gain(want_w))
    for g, e, what in zip(got, want, ("w_eff", "mask bits", "positive bits", "gain")):
        assert g.dtype == e.dtype and g.shape == e.shape, what
        assert torch.equal(g.view(torch.int32) if g.is_floating_point() else g,
                           e.view(torch.int32) if e.is_floating_point() else e), what
    for g, e in zip(got, ref.sign_gain_pack_reference(w, m, alpha)):
        assert torch.equal(g, e)


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (16, 70, 1, 1), (64, 32, 3, 3), (5, 33, 2, 1)])
def test_sign_gain_pack_matches_the_reference_bits(shape):
    g = torch.Generator().manual_seed(stable_seed(("sgp", shape)))
    w = torch.randn(shape, generator=g)
    w.view(-1)[::5] = 0.0
    w.view(-1)[1::7] = -0.0  # -0 has sign 0 and gives +0 or -0 in W_eff exactly as torch does
    m = (torch.rand(shape, generator=g) < 0.5).float()
    m[0] = 0.0  # an output channel with nothing kept: gain 0
    _assert_sign_gain_pack(w, m, ref.mean_abs_gain(w, m))
    _assert_sign_gain_pack(w, m, ref.mean_abs_gain(w, m, per_channel=True))
    _assert_sign_gain_pack(w, m, torch.tensor(0.0))
    for bad in (float("nan"), float("inf")):  # found in the pass that reads the weight
        w[1, 0, 0, 0] = bad
        for sgp in (torch.ops.binslt.sign_gain_pack, ref.sign_gain_pack_reference):
            with pytest.raises(ValueError, match=r"^binslt::sign_gain_pack: weight contains "
                               rf"{'NaN' if bad != bad else 'inf'} \(1 of {w.numel()}\)"):
                sgp(w, m, torch.tensor(0.75))


def test_sign_gain_pack_errors():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="mask must have"):
        torch.ops.binslt.sign_gain_pack(w, torch.ones(4, 3, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="alpha must be"):
        torch.ops.binslt.sign_gain_pack(w, torch.ones_like(w), torch.ones(3))
    with pytest.raises(TypeError, match="float32"):
        torch.ops.binslt.sign_gain_pack(w.double(), torch.ones_like(w).double(),
                                        torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# search_sign_pack: selection, gain and packing in one op
# ---------------------------------------------------------------------------------------------


def _exact_gain(w, mask, per_channel):
    """alpha from math.fsum (the exact sum of |w| over the kept weights, rounded once to
    double), divided in double and rounded to float32: independent of every kernel's order."""
    import math

    rows = [(w.flatten(1) if per_channel else w.reshape(1, -1)),
            (mask.flatten(1) if per_channel else mask.reshape(1, -1))]
    out = []
    for wr, mr in zip(*rows):
        kept = [abs(float(v)) for v, k in zip(wr.tolist(), mr.tolist()) if k]
        out.append(math.fsum(kept) / len(kept) if kept else 0.0)
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("isa", runnable_isas())
@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (16, 70, 1, 1), (64, 33, 3, 3), (5, 33, 2, 1),
                                   (40, 300, 1, 1)])
def test_search_sign_pack_matches_the_reference_and_the_exact_gain(shape, isa):
    g = torch.Generator().manual_seed(stable_seed(("ssp", shape)))
    w = torch.randn(shape, generator=g)
    w.view(-1)[::5] = 0.0
    w.view(-1)[1::7] = -0.0
    n = w.numel()
    scores = {"distinct": torch.randn(shape, generator=g),
              # three values: the entries equal to the threshold are kept only in part, by flat
              # index across output channels
              "ties": torch.randint(-1, 2, shape, generator=g).float() * 0.5}
    for kind, s in scores.items():
        for keep in (0, 1, n // 3, n // 2, n - 1, n):
            for per_channel in (False, True):
                with cpu_algorithms(isa=isa):
                    got = torch.ops.binslt.search_sign_pack(w, s, keep, per_channel)
                mask = ref.topk_mask_reference(s, keep)
                want = ref.sign_gain_pack_reference(w, mask,
                                                    ref.mean_abs_gain(w, mask, per_channel))
                for a, b, what in zip(got, want, ("w_eff", "mask bits", "pos bits", "gain")):
                    assert a.dtype == b.dtype and torch.equal(a, b), (kind, keep, what)
                # the gain: alpha where the channel keeps a non-zero weight, else 0
                alpha = _exact_gain(w, mask, per_channel).expand(shape[0])
                live = (mask * (w != 0)).flatten(1).any(1)
                assert torch.equal(got[3], torch.where(live, alpha, torch.zeros(()))), (kind, keep)


def test_search_sign_pack_refuses_bad_input_as_the_reference_does():
    w, s = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    for bad in (float("nan"), float("inf")):
        name = "NaN" if bad != bad else "inf"
        s2 = s.clone()
        s2[2, 1, 0, 0] = bad
        w2 = w.clone()
        w2[3, 0, 1, 1] = bad
        for op in (torch.ops.binslt.search_sign_pack, ref.search_sign_pack_reference):
            for keep in (0, 100, 216):
                with pytest.raises(ValueError, match=r"^binslt::search_sign_pack: scores contain "
                                   rf"{name} \(1 of 216\)"):
                    op(w, s2, keep, False)
            with pytest.raises(ValueError, match=r"^binslt::search_sign_pack: weight contains "
                               rf"{name} \(1 of 216\)"):
                op(w2, s, 100, True)
    with pytest.raises(ValueError, match="scores must have the weight's shape"):
        torch.ops.binslt.search_sign_pack(w, s[:3], 10, False)
    with pytest.raises(ValueError, match=r"weight must be \[Co, Ci, kh, kw\]"):
        torch.ops.binslt.search_sign_pack(w.flatten(1), s.flatten(1), 10, False)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.binslt.search_sign_pack(w.double(), s.double(), 10, False)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_search_layer_with_fused_planes_equals_packing_w_eff(kind, per_channel):
    """The search-mode layer call that takes W_eff's planes from sign_gain_pack gives the same
    spikes and score gradients, bit for bit, as packing the reference W_eff in ConvLIF."""
    from binslt.nn.layers import BinSpikeConv2d, BinSpikeLinear

    torch.manual_seed(stable_seed(("fused", kind, per_channel)))
    def mk():
        if kind == "conv":
            return BinSpikeConv2d(40, 24, 3, padding=1, bn=True, per_channel_gain=per_channel,
                                  backend="cpu")
        return BinSpikeLinear(70, 12, bn=True, per_channel_gain=per_channel, backend="cpu")

    shape = (3, 2, 40, 6, 6) if kind == "conv" else (3, 4, 70)
    x = (torch.rand(shape) < 0.4).float()
    a, b = mk(), mk()
    b.load_state_dict(a.state_dict())
    b.effective_weight_planes = lambda: (
        ref.masked_sign_weight(b.weight, b.scores, b.prune_rate, b.per_channel_gain), None)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    up = torch.randn_like(ya)
    (ya * up).sum().backward()
    (yb * up).sum().backward()
    assert torch.equal(a.scores.grad, b.scores.grad)
    w_eff, planes = a.effective_weight_planes()
    assert planes is not None
    for p, e in zip(planes, a._pack_effective_weight()):
        assert torch.equal(p, e)


def test_search_score_grad_matches_the_reference_bits():
    g = torch.Generator().manual_seed(21)
    shape = (70, 33, 3, 3)
    grad, w, s = (torch.randn(shape, generator=g) for _ in range(3))
    s.view(-1)[::4] = 0.0
    s.view(-1)[1::9] = -0.0
    s.view(-1)[2::11] = float("nan")
    w.view(-1)[3::13] = -0.0
    got = torch.ops.binslt.search_score_grad(grad, w, s)
    want = ref.search_score_grad(grad, w, s)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    g2, w2, s2 = (t.view(70, -1).t() for t in (grad, w, s))  # non-contiguous [O, F] weights
    assert torch.equal(torch.ops.binslt.search_score_grad(g2, w2, s2),
                       ref.search_score_grad(g2, w2, s2))
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.binslt.search_score_grad(grad, w, s[:1])
    with pytest.raises(TypeError, match="float32"):
        torch.ops.binslt.search_score_grad(grad.double(), w, s)
