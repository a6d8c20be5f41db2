"""What the training path saves for the backward (the network-level memory rules of binslt.ops).

* The fused spike-input conv layers save packed input bits and their int16 counts; under
  ``ops.keep_counts(False)`` the backward recomputes the counts with the forward kernel instead,
  and the gradients are the same bits.
* A real-input layer fed the image repeated over T as an expanded view (direct encoding, as
  ``binslt.models`` does) computes its current once and saves it once, not T times; its spikes
  and gradients match the same input materialised T times.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from helpers import assert_close_rel

import binslt
from binslt import BinSpikeConv2d, BinSpikeLinear, models, ops

# The kernel backends that run here (Triton on CPU tensors under TRITON_INTERPRET=1).
BACKENDS = [b for b in ("cpu", "triton") if binslt.backends()[b]["usable"]]


class _Saved:
    """Bytes of the distinct storages autograd saves inside the block (by dtype)."""

    def __init__(self):
        self.by_dtype: dict[torch.dtype, int] = {}
        self._seen: set[int] = set()

    def _pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self._seen:
            self._seen.add(st.data_ptr())
            self.by_dtype[t.dtype] = self.by_dtype.get(t.dtype, 0) + st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_recomputed_counts_give_the_kept_counts_gradients(backend, residual):
    torch.manual_seed(0)
    layer = BinSpikeConv2d(8, 16, 3, 1, 1, bn=True, decay=0.9, backend=backend)
    layer.train()
    x = (torch.rand(3, 2, 8, 6, 6) < 0.3).float()
    res = torch.randn(3, 2, 16, 6, 6) if residual else None
    g = torch.randn(3, 2, 16, 6, 6)
    out = {}
    for keep in (True, False):
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        rg = None if res is None else res.clone().requires_grad_()
        with ops.keep_counts(keep), _Saved() as saved:
            s = layer(xg, rg)
        s.backward(g)
        out[keep] = (s.detach(), xg.grad, None if rg is None else rg.grad, _grads(layer),
                     saved.by_dtype)
    (s1, gx1, gr1, gp1, saved1), (s0, gx0, gr0, gp0, saved0) = out[True], out[False]
    assert torch.equal(s1, s0)
    assert torch.equal(gx1, gx0)
    if residual:
        assert torch.equal(gr1, gr0)
    assert gp1.keys() == gp0.keys() and gp1
    for name in gp1:
        assert torch.equal(gp1[name], gp0[name]), name
    # The counts ([T, N, Co, H, W]) are saved only when kept: int16, or on the CPU backend int8
    # where every count fits (here all do: |count| <= 8 * 9).
    n_counts = 3 * 2 * 16 * 6 * 6
    if backend == "cpu":
        assert saved1.get(torch.int8, 0) == n_counts and saved1.get(torch.int16, 0) == 0
    else:
        assert saved1.get(torch.int16, 0) == 2 * n_counts
    assert saved0.get(torch.int16, 0) == saved0.get(torch.int8, 0) == 0


@pytest.mark.parametrize("pool", [1, 2])
def test_spike_residual_is_saved_packed_with_the_same_gradients(pool):
    """A residual of spikes (an identity shortcut) is saved as packed bits on the CPU backend,
    a real-valued one as floats; with the spike residual the spikes equal the float64
    reference's and every gradient is within 1e-5 of it."""
    torch.manual_seed(1)
    layer = BinSpikeConv2d(8, 16, 3, 1, 1, bn=True, decay=0.9, pool=pool, backend="cpu")
    layer.train()
    x = (torch.rand(3, 2, 8, 6, 6) < 0.3).float()
    res = (torch.rand(3, 2, 16, 6, 6) < 0.4).float()
    out = []
    for r0, packed in ((res, True), (res * 1.0000001 + 0.5, False), (res, None)):
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        rg = r0.clone().requires_grad_()
        lay = layer
        if packed is None:  # the float64 reference of the binary residual
            lay = copy.deepcopy(layer).double()
            lay.backend = "torch"
            xg, rg = xg.detach().double().requires_grad_(), rg.detach().double().requires_grad_()
        with _Saved() as saved:
            s = lay(xg, rg)
        s.backward(torch.ones_like(s) * 0.3 + s.detach() * 0.1)
        out.append((s.detach(), xg.grad, rg.grad, _grads(lay)))
        if packed is not None:
            float_bytes = saved.by_dtype.get(torch.float32, 0)
            assert (float_bytes < res.numel() * 4) == packed, (packed, saved.by_dtype)
    (s1, gx1, gr1, gp1), _, (s2, gx2, gr2, gp2) = out
    assert torch.equal(s1.double(), s2)
    assert_close_rel(gx1, gx2, 1e-5, "input gradient")
    assert_close_rel(gr1, gr2, 1e-5, "residual gradient")
    for name in gp1:
        assert_close_rel(gp1[name], gp2[name], 1e-5, name)


def test_identity_shortcut_reuses_the_block_input_bits(monkeypatch):
    """In an identity ResNet block, conv2's residual is the block input conv1 already packed: its
    words are taken, not packed again (nor where the input changed in place in between). The
    block's spikes and gradients equal those with a copy of the input as the residual (packed
    anew), bit for bit, and the torch backend's within 1e-5."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ CPU kernels are not built")
    from binslt.nn.blocks import ResidualBlock
    from binslt.ops import autograd as A

    hits: list = []
    orig = A._packed_earlier
    monkeypatch.setattr(A, "_packed_earlier",
                        lambda last, t, be: hits.append(orig(last, t, be) is not None)
                        or orig(last, t, be))
    torch.manual_seed(3)
    x = (torch.rand(3, 2, 8, 6, 6) < 0.4).float()
    runs = []
    for backend, copy_res in (("cpu", False), ("cpu", True), ("torch", False)):
        torch.manual_seed(4)
        c1 = BinSpikeConv2d(8, 8, 3, 1, 1, bn=True, backend=backend)
        c2 = BinSpikeConv2d(8, 8, 3, 1, 1, bn=True, backend=backend)
        blk = ResidualBlock(c1, c2, None).train()
        xi = x.clone().requires_grad_()
        if copy_res:
            out = blk.conv2(blk.conv1(xi), residual=xi.clone())
        else:
            out = blk(xi)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        runs.append((out.detach(), xi.grad, _grads(blk)))
    assert hits[:4] == [True, True, False, False]  # (the residual check's lookup, ConvLIF's)
    (o0, g0, p0), (o1, g1, p1), (o2, g2, p2) = runs
    assert o0.any() and torch.equal(o0, o1) and torch.equal(g0, g1)
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
        assert_close_rel(p0[name], p2[name], 1e-5, name)
    assert torch.equal(o0, o2)
    assert_close_rel(g0, g2, 1e-5, "input gradient")
    # an input changed in place after conv1 packed it is packed again
    c1 = BinSpikeConv2d(8, 8, 3, 1, 1, bn=True, backend="cpu").train()
    c2 = BinSpikeConv2d(8, 8, 3, 1, 1, bn=True, backend="cpu").train()
    xi = x.clone()
    h = c1(xi)
    xi[0, 0, 0, 0, 0] = 1.0 - xi[0, 0, 0, 0, 0]
    hits.clear()
    c2(h, residual=xi)
    assert hits == [False, False]


def test_identity_shortcut_residual_is_not_checked_again(monkeypatch):
    """On a kernel backend, conv2's residual that is the block input conv1 packed (checked as
    spikes then) skips the finiteness check; a copy of it, or the input changed in place since,
    is checked, and a NaN put in place after conv1 is still refused (the reference backend packs
    nothing, so it checks every residual)."""
    from binslt.nn.blocks import ResidualBlock
    from binslt.ops import layer as L

    checked: list = []
    orig = L.check_finite
    monkeypatch.setattr(L, "check_finite", lambda t, name="input": checked.append(name)
                        or orig(t, name))
    torch.manual_seed(5)
    x = (torch.rand(2, 2, 8, 5, 5) < 0.4).float()
    for backend in ("torch", *BACKENDS):
        c1 = BinSpikeConv2d(8, 8, 3, 1, 1, bn=True, backend=backend)
        c2 = BinSpikeConv2d(8, 8, 3, 1, 1, bn=True, backend=backend)
        blk = ResidualBlock(c1, c2, None).train()
        checked.clear()
        blk(x.clone())
        # the reference backend packs nothing (no ConvLIF): its residual is checked
        assert any("residual" in n for n in checked) == (backend == "torch"), (backend, checked)
        checked.clear()
        blk.conv2(blk.conv1(x), residual=x.clone())
        assert sum("residual" in n for n in checked) == 1, (backend, checked)
        xi = x.clone()
        h = blk.conv1(xi)
        xi[0, 0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="residual contains NaN or inf"):
            blk.conv2(h, residual=xi)


def test_counts_past_int8_are_kept_int16_with_the_same_gradients():
    """Counts beyond int8's range (every input spiking into all-positive weights: 32 * 9 = 288)
    are saved int16; the gradients equal the recomputed counts' bit for bit."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ CPU kernels are not built")
    torch.manual_seed(2)
    layer = BinSpikeConv2d(32, 4, 3, 1, 1, bn=True, decay=0.9, backend="cpu")
    layer.train()
    with torch.no_grad():
        layer.weight.abs_()
    x = torch.ones(2, 2, 32, 5, 5)
    out = {}
    for keep in (True, False):
        layer.zero_grad()
        with ops.keep_counts(keep), _Saved() as saved:
            s = layer(x)
        s.backward(torch.full_like(s, 0.5))
        out[keep] = (_grads(layer), saved.by_dtype)
    assert out[True][1].get(torch.int16, 0) == 2 * 2 * 4 * 5 * 5 * 2
    assert out[True][1].get(torch.int8, 0) == 0
    for name, g in out[True][0].items():
        assert torch.equal(g, out[False][0][name]), name


def test_keep_counts_restores_the_previous_setting():
    assert getattr(ops._KEEP, "counts", True)  # the default: counts are saved
    with ops.keep_counts(False):
        with ops.keep_counts():
            assert ops._KEEP.counts
        assert not ops._KEEP.counts
    assert ops._KEEP.counts


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_time_invariant_real_input_is_computed_and_saved_once(backend, kind):
    torch.manual_seed(1)
    T = 4
    if kind == "conv":
        layer = BinSpikeConv2d(3, 8, 3, 1, 1, bn=True, decay=0.9, input="real", backend=backend)
        img = torch.randn(2, 3, 6, 6)
    else:
        layer = BinSpikeLinear(12, 8, bn=True, decay=0.9, input="real", backend=backend)
        img = torch.randn(8, 12)  # BN over 2 images (x T copies) is ill-conditioned
    layer.train()
    res = {}
    for how in ("expanded", "repeated"):
        layer.zero_grad()
        x = img.clone().requires_grad_()
        xt = (x.unsqueeze(0).expand(T, *x.shape) if how == "expanded"
              else x.unsqueeze(0).repeat(T, *([1] * x.dim())))
        with _Saved() as saved:
            s = layer(xt)
        (s * torch.linspace(0.5, 1.5, s.numel()).view_as(s)).sum().backward()
        res[how] = (s.detach(), x.grad, _grads(layer), saved.by_dtype.get(torch.float32, 0))
    (se, gxe, gpe, be), (sr, gxr, gpr, br) = res["expanded"], res["repeated"]
    # One conv over N images instead of T*N: the same values up to float rounding.
    assert torch.equal(se, sr)
    assert_close_rel(gxe, gxr, 1e-5, "input grad")
    for name in gpr:
        assert_close_rel(gpe[name], gpr[name], 1e-5, name)
    if backend != "torch":
        # The fused BN+LIF op saves the current and the conv/linear its input: each once instead
        # of T times.
        cur = 8 * img.shape[0] * (36 if kind == "conv" else 1) * 4
        inp = img.numel() * 4
        assert br - be == (T - 1) * (cur + inp)


def test_model_saves_less_than_the_counts_and_float_current():
    """Conv-4 on 8x8 input, one training forward under keep_counts(False): what autograd keeps
    is the packed bits, the statistics and the weights, not the counts (int8 here, where they
    fit)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ CPU kernels are not built")
    torch.manual_seed(0)
    m = models.build("conv4", "binwslt", in_channels=1, input_size=8, num_classes=10)
    m.train()
    x = torch.randn(4, 1, 8, 8)
    with ops.keep_counts(False), _Saved() as saved:
        m(x)
    with _Saved() as kept:
        m(x)
    small_ints = (torch.int16, torch.int8)
    assert sum(saved.by_dtype.get(d, 0) for d in small_ints) == 0
    assert kept.by_dtype.get(torch.int8, 0) > 0


class _DropGrad(torch.autograd.Function):
    """Identity whose backward passes no gradient (None) on."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return None


def _zero_fills(prof) -> list[str]:
    """The zero-filled tensors made directly by the fused Functions' backward nodes (where
    autograd materialises missing output gradients), with their sizes."""
    out = []
    for e in prof.events():
        if e.name == "aten::zeros" and e.cpu_parent is not None and \
                e.cpu_parent.name.endswith("Backward") and \
                e.cpu_parent.name.split("Backward")[0] in ("ConvLIF", "BNLIF", "SpikePool"):
            out.append(f"{e.cpu_parent.name}: {e.input_shapes}")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_fills_no_zero_gradients_for_the_saved_outputs(backend):
    """The fused Functions return what the backward reads (packed bits, counts, the current) as
    non-differentiable outputs; autograd gets no zero-filled gradients made for them (VGG-11's
    kept counts alone would be 22 MiB of zeros a step). Where autograd passes no gradient at all
    for the spikes, the backward runs on zeros: the reference's gradients of a zero input."""
    torch.manual_seed(3)
    real = BinSpikeConv2d(3, 8, 3, 1, 1, bn=True, input="real", backend=backend)
    conv = BinSpikeConv2d(8, 8, 3, 1, 1, bn=True, pool=2, backend=backend)
    real.train(), conv.train()
    x = torch.randn(4, 2, 3, 8, 8)
    assert real(x).any() and conv(real(x)).any()  # both layers fire
    conv(real(x)).sum().backward()  # the first call may choose (and time) its algorithms
    real.zero_grad(), conv.zero_grad()
    with torch.profiler.profile(record_shapes=True) as prof:
        out = conv(real(x))
        (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
    assert _zero_fills(prof) == []
    assert real.scores.grad.abs().sum() > 0

    # No gradient reaches the real layer's spikes: its backward runs on zeros, and its score
    # gradient is zero, as the chain rule has it (the conv above still gets its own).
    for m in (real, conv):
        m.zero_grad()
    out = conv(_DropGrad.apply(real(x)))
    (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
    assert real.scores.grad is None or not real.scores.grad.any()
    assert conv.scores.grad.abs().sum() > 0


def _block(backend, bn_cls=torch.nn.BatchNorm2d):
    from binslt.nn.blocks import ResidualBlock

    torch.manual_seed(5)
    c1 = BinSpikeConv2d(6, 8, 3, 2, 1, bn=True, backend=backend)
    c2 = BinSpikeConv2d(8, 8, 3, 1, 1, bn=True, backend=backend)
    sc = binslt.BinConv2d(6, 8, 1, stride=2, bn=True)
    sc.bn = bn_cls(8)
    return ResidualBlock(c1, c2, sc).train()


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_projection_shortcut_output_is_recomputed_not_kept(backend):
    """Inside keep_counts(False), a ResNet block with a 1x1 conv + BN shortcut keeps no float
    copy of the shortcut's output for conv2's backward: it is recomputed there from the packed
    input spikes (conv, then BN with the batch's statistics taken again). The block's output and
    every gradient are the same bits as with the output kept (the default), and the output
    itself is freed after the forward."""
    import contextlib
    import gc
    import weakref

    torch.manual_seed(6)
    x = (torch.rand(3, 2, 6, 8, 8) < 0.4).float()
    g = torch.randn(3, 2, 8, 4, 4)
    runs = {}
    for keep in (False, True):
        blk = _block(backend)
        refs: list = []
        blk.shortcut.register_forward_hook(lambda m, i, o, refs=refs: refs.append(weakref.ref(o)))
        xi = x.clone().requires_grad_()
        with contextlib.nullcontext() if keep else ops.keep_counts(False):
            out = blk(xi)
        gc.collect()
        kept = refs[-1]() is not None
        out.backward(g)
        runs[keep] = (out.detach(), xi.grad, {n: p.grad.clone() for n, p in
                                              blk.named_parameters() if p.grad is not None},
                      kept, blk.shortcut.bn.running_mean.clone())
    (o0, gx0, gp0, kept0, rm0), (o1, gx1, gp1, kept1, rm1) = runs[False], runs[True]
    # (the fused op saves the residual current; the reference's autograd graph does not)
    assert not kept0 and kept1 == (backend != "torch")
    assert o1.any() and gx1.any()
    assert torch.equal(o0, o1) and torch.equal(gx0, gx1) and torch.equal(rm0, rm1)
    assert gp0.keys() == gp1.keys() and len(gp0) >= 3
    for name in gp0:
        assert torch.equal(gp0[name], gp1[name]), name


def test_shortcut_with_sync_batchnorm_keeps_its_output():
    """Inside keep_counts(False) too, a BN whose statistics are not the local batch's alone
    (SyncBatchNorm) is not recomputed: the shortcut hands no recompute function, and the block
    runs as it did."""
    blk = _block("torch", torch.nn.SyncBatchNorm)
    x = (torch.rand(3, 2, 6, 8, 8) < 0.4).float()
    from binslt.nn.blocks import _call_handing_again

    with ops.keep_counts(False):
        assert _call_handing_again(blk.shortcut, x)[1] is None
        blk.shortcut.bn = torch.nn.BatchNorm2d(8)
        assert _call_handing_again(blk.shortcut, x)[1] is not None
    assert _call_handing_again(blk.shortcut, x)[1] is None  # the default keeps the output


_PEAK_SCRIPT = r"""
import ctypes, json, sys
import torch
from binslt import ops
from binslt.ops import cpu_algorithms, reference as ref

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 64 << 10)   # M_MMAP_THRESHOLD: every large block its own mapping, unmapped when
libc.mallopt(-1, 128 << 10)  # freed (M_TRIM_THRESHOLD likewise), so RSS follows what is live
ops.set_cpu_cache_limit(0)   # no freed blocks kept resident
torch.set_num_threads(1)
grad_x, need_x = sys.argv[1], sys.argv[2] == "1"
T, N, C, H = 4, 16, 64, 32
g = torch.Generator().manual_seed(0)
w = torch.sign(torch.randn(C, C, 3, 3, generator=g)) * (torch.rand(C, C, 3, 3, generator=g) >= 0.5)
wm, wp = ref.pack_weight_reference(w)
alpha, one, zero = torch.rand(C, generator=g) * 0.1 + 0.05, torch.ones(C), torch.zeros(C)
x = ops.get_op("pack_spikes", "cpu")((torch.rand(T * N, C, H, H, generator=g) < 0.2).float())
s, counts, mean, var = ops.get_op("bconv_lif", "cpu")(
    x, wm, wp, alpha, one, zero, None, T, 1, 1, True, 1e-5, 2.0, False, 1.0, 0.0)
gs = torch.randn(s.shape, generator=g)
bwd = ops.get_op("bconv_lif_bwd", "cpu")
args = (gs, counts, x, wm, wp, alpha, one, zero, mean, var, None, C, 1, 1, True, 1e-5, 2.0,
        False, 1.0, 0.0, True, 0, 2.0, need_x, False)  # no dL/dcurrent buffer

def kb(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

with cpu_algorithms(grad_x=grad_x, grad_w="event"):
    bwd(*args)  # plan, lists, thread pool
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = kb("VmRSS")
    out = bwd(*args)
    print(json.dumps({"peak": (kb("VmHWM") - base) * 1024, "dz": gs.nbytes}))
"""


@pytest.mark.skipif(not binslt.backends()["cpu"]["usable"], reason="the C++ CPU extension is "
                    "not built")
def test_event_weight_gradient_keeps_no_whole_copy_of_dz():
    # The event weight gradient reads dZ channel-last with zero margins. Unless the margined input
    # gradient reads that copy too, each image is turned channel-last into a buffer of its own
    # just before its sums, so the call's peak holds one dZ, not dZ and a margined copy of it.
    # Measured as the resident set's high-water mark of one bconv_lif_bwd call in a fresh
    # process (T=4, N=16, 64->64 32x32: dZ 16 MiB, the copy 18 MiB).
    def peak(grad_x, need_x):
        r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, grad_x, need_x],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    alone = peak("dense", "0")  # the weight gradient alone: dZ, then the sums
    copy = 4 * 16 * 34 * 34 * 64 * 4
    assert alone["peak"] < alone["dz"] + copy // 3, alone
    # The measurement sees a copy where one is made: the margined input gradient's.
    margined = peak("margined", "1")
    assert margined["peak"] >= margined["dz"] + copy * 0.9, margined
