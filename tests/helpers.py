"""Shared test helpers: tie-band spike comparison, an independent float64 layer reference, the
Triton test backend's device, and SpikingJelly imported lazily."""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

# The comparison rules (tie band, relative error) live in the package: `binslt check` applies
# the same ones on a user's machine.
from binslt.ops.check import TIE_BAND, close_rel, rel_error, spike_mismatch, tie_mask  # noqa: F401

#: A CUDA device is visible: the "triton" backend's tests then run on CUDA tensors (gpu-marked);
#: without one, on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it).
HAS_GPU = torch.cuda.is_available()


def triton_param(**kwargs):
    """The "triton" entry of a backend parametrization: on CUDA tensors where a GPU is visible
    (gpu-marked), else on CPU tensors under the Triton interpreter."""
    import os

    if HAS_GPU:
        return pytest.param("triton", id="triton", marks=pytest.mark.gpu, **kwargs)
    return pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") != "1",
        reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (no GPU here)"), **kwargs)


def backend_device(backend: str) -> str:
    """The device a backend's tests use: "cuda" for cuda, and for triton where a GPU is visible."""
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_GPU) else "cpu"


class _LazyModule:
    """A module imported on first attribute access. For optional test dependencies: where the
    module is not installed the access skips the running test (``pytest.importorskip``), and
    collecting the test file does not need the module at all."""

    def __init__(self, name: str):
        self._name = name
        self._mod = None

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if self._mod is None:
            self._mod = pytest.importorskip(
                self._name, reason=f"SpikingJelly is not installed ({self._name})")
        return getattr(self._mod, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name}>"


def sj_modules(*names: str) -> tuple:
    """``spikingjelly.activation_based.<name>`` for each name, imported lazily (see
    :class:`_LazyModule`): e.g. ``functional, layer = sj_modules("functional", "layer")``."""
    return tuple(_LazyModule(f"spikingjelly.activation_based.{n}") for n in names)


def cpu_isas() -> list[str]:
    """The CPU kernel ISAs this machine runs, from the baseline up ("scalar" first)."""
    from binslt.ops.cpu_algos import runnable_isas

    return runnable_isas()


def onednn_supported() -> bool:
    """Whether the CPU kernels' plan takes oneDNN's int8 convolution here (the "onednn" conv, the
    int8 input gradient): AMX-INT8 and PyTorch's oneDNN ops."""
    from binslt.ops import library as _ext

    return bool(_ext.cpu_info()["features"].get("onednn_int8", False))


def onednn_runs() -> bool:
    """Whether those forms run here when forced (``cpu_algorithms``): AMX-INT8 or AVX-512 VNNI,
    whose int8 dot products are exact (int32 sums)."""
    from binslt.ops import library as _ext

    return bool(_ext.cpu_info()["features"].get("onednn_int8_forced", False))


#: The conv geometries (T, N, C_in, C_out, H, W, k, stride, padding) the fused conv + LIF is
#: checked on, against the float64 reference and against SpikingJelly. Together they cover
#: C_in of 1 and across the 32- and 64-bit word boundaries (33, 65, 130), C_out below and above
#: one 16- or 32-channel tile, 1x1 and 3x3 kernels, strides 1 and 2 with and without padding,
#: square and non-square images, T from 1 to 4 and N from 1 to 3.
CONV_GEOMS = [
    (1, 1, 1, 1, 3, 3, 1, 1, 0),
    (4, 2, 33, 5, 7, 5, 3, 1, 1),
    (2, 1, 64, 17, 7, 5, 3, 2, 1),
    (3, 2, 65, 33, 6, 7, 3, 2, 0),
    (4, 1, 16, 40, 5, 5, 1, 2, 0),
    (2, 3, 130, 16, 4, 4, 3, 1, 1),
    (1, 1, 33, 5, 7, 7, 3, 1, 1),
    (4, 2, 33, 8, 7, 5, 3, 2, 0),
    (3, 1, 1, 4, 6, 6, 3, 1, 1),
    (2, 3, 64, 7, 5, 5, 1, 1, 0),
    (4, 2, 65, 6, 9, 9, 3, 2, 1),
]


def small_resnet19_eval(backend: str):
    """The paper's ResNet-19 at 16x16, T=2, in eval mode with BN statistics from one training
    forward (so its layers spike)."""
    from binslt.nn import models as M

    torch.manual_seed(0)
    net = M.build("resnet19", "binwslt", num_classes=10, in_channels=3, input_size=16,
                  timesteps=2, prune_rate=0.5, bn=True, bn_affine=False, backend=backend)
    with torch.no_grad():
        net(torch.randn(8, 3, 16, 16))  # training-mode BN statistics
    return net.eval()


def stable_seed(key) -> int:
    """A seed from a parameter tuple that is the same in every process (``hash`` of None or of
    strings is not: it changes with ASLR / PYTHONHASHSEED)."""
    return zlib.crc32(repr(key).encode()) % 10_000


def assert_spikes_equal(actual: torch.Tensor, expected: torch.Tensor, h: torch.Tensor,
                        v_threshold: float, min_compared: float = 0.5) -> None:
    """``actual`` equals ``expected`` wherever ``tie_mask`` holds, and the comparison is not
    vacuous: more than ``min_compared`` of the neurons are compared (binslt.check's rule)."""
    why = spike_mismatch(actual, expected, h, v_threshold, min_compared)
    assert not why, why


def assert_no_ties(h: torch.Tensor, v_threshold: float) -> None:
    """Pre-condition of a gradient comparison: no H of the float64 reference lies within
    TIE_BAND of the threshold (at any step), so float32 and float64 take the same decisions."""
    near = int(((h - v_threshold).abs() < TIE_BAND).sum())
    assert near == 0, (f"{near} near-ties (|H - v_th| < {TIE_BAND}) in the test data; "
                       "pick another seed")


def nudge_until_untied(h_of, v_threshold: float, value: torch.Tensor, step: float,
                       tries: int = 64, seed: int = 1) -> torch.Tensor:
    """Return ``value`` (a shift or residual the data depends on), perturbed by uniform noise of
    width ``step`` until ``h_of(value)`` has no H within TIE_BAND of the threshold."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(tries):
        h = h_of(value)
        if not bool(((h - v_threshold).abs() < TIE_BAND).any()):
            return value
        value = value + (torch.rand(value.shape, generator=g, dtype=value.dtype) - 0.5) * step
    raise AssertionError("could not build a tie-free case")


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = ""):
    """Normwise relative error ||a - e|| <= rtol * ||e|| (+ a tiny absolute floor)."""
    assert close_rel(actual, expected, rtol), \
        f"{what}: relative error {rel_error(actual, expected):.3e} > {rtol}"


# ---------------------------------------------------------------------------------------------
# An independent float64 reference of the whole layer, written from DESIGN.md section 1 and
# sharing no code with binslt.reference.
# ---------------------------------------------------------------------------------------------


#: binslt's surrogate names -> SpikingJelly's surrogate classes (spikingjelly.activation_based.
#: surrogate), and SpikingJelly's default alpha of each.
SJ_SURROGATES = {"atan": ("ATan", 2.0), "sigmoid": ("Sigmoid", 4.0), "rect": ("Rect", 1.0),
                 "piecewise_quadratic": ("PiecewiseQuadratic", 1.0)}


def sj_surrogate(kind: str, alpha: float):
    """SpikingJelly's surrogate object of binslt's surrogate name ``kind``."""
    (surrogate,) = sj_modules("surrogate")
    return getattr(surrogate, SJ_SURROGATES[kind][0])(alpha=alpha)


class _Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kind, alpha):
        ctx.save_for_backward(x)
        ctx.kind, ctx.alpha = kind, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        a = ctx.alpha
        if ctx.kind == "atan":
            d = a / (2 * (1 + (math.pi / 2 * a * x) ** 2))
        elif ctx.kind == "sigmoid":
            sg = torch.sigmoid(a * x)
            d = a * sg * (1 - sg)
        elif ctx.kind == "rect":  # a on the open window |x| < 1/(2a)
            d = a * (x.abs() < 1 / (2 * a)).to(x.dtype)
        else:  # piecewise_quadratic: a - a^2 |x| on the closed window |x| <= 1/a
            assert ctx.kind == "piecewise_quadratic", ctx.kind
            d = torch.where(x.abs() <= 1 / a, a * (1 - a * x.abs()), 0.0)
        return g * d, None, None


def lif64(x, tau, decay_input, v_th, v_reset, detach_reset, kind, alpha):
    """LIF in float64 with autograd, from SpikingJelly's definition. -> (S, H). ``tau`` inf is
    the IF neuron, H = V + X (``decay_input`` does not apply)."""
    vr = 0.0 if v_reset is None else v_reset
    v = torch.zeros_like(x[0]) + vr
    out, hs = [], []
    for t in range(x.shape[0]):
        if tau == math.inf:
            h = v + x[t]
        elif decay_input:
            h = v + (x[t] - (v - vr)) / tau
        else:
            h = v - (v - vr) / tau + x[t]
        s = _Heaviside.apply(h - v_th, kind, alpha)
        sd = s.detach() if detach_reset else s
        v = h - sd * v_th if v_reset is None else sd * v_reset + (1 - sd) * h
        out.append(s)
        hs.append(h)
    return torch.stack(out), torch.stack(hs)


def layer64(x, w_eff, *, stride, padding, bn, bn_weight=None, bn_bias=None, eps=1e-5,
            residual=None, tau, decay_input, v_threshold, v_reset, detach_reset, surrogate,
            surrogate_alpha):
    """conv -> (batch-stat BN) -> (+residual) -> LIF, float64 autograd. Returns (spikes, H)."""
    T, n = x.shape[:2]
    z = F.conv2d(x.reshape(T * n, *x.shape[2:]), w_eff, stride=stride, padding=padding)
    if bn:
        mu = z.mean(dim=(0, 2, 3), keepdim=True)
        var = ((z - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        z = (z - mu) / torch.sqrt(var + eps)
        if bn_weight is not None:
            z = z * bn_weight.view(1, -1, 1, 1) + bn_bias.view(1, -1, 1, 1)
    z = z.reshape(T, n, *z.shape[1:])
    if residual is not None:
        z = z + residual
    return lif64(z, tau, decay_input, v_threshold, v_reset, detach_reset, surrogate,
                 surrogate_alpha)


def biprop_weight64(w, s, prune_rate):
    """alpha * sign(w) * M in float64, with M = top-|s| keeping numel - floor(p*numel)."""
    flat = s.abs().flatten()
    keep = flat.numel() - int(math.floor(prune_rate * flat.numel()))
    idx = torch.sort(flat, descending=True, stable=True).indices[:keep]
    m = torch.zeros_like(flat)
    m[idx] = 1
    m = m.view_as(w)
    alpha = (w.abs() * m).sum() / m.sum()
    return alpha * torch.sign(w) * m, m, alpha


def binarised_copy(net: torch.nn.Module, paths) -> torch.nn.Module:
    """A copy of a (SpikingJelly) model whose modules at ``paths`` carry alpha * sign(w),
    alpha = mean |w| (what binslt.convert's layers compute at prune_rate 0)."""
    out = copy.deepcopy(net)
    mods = dict(out.named_modules())
    with torch.no_grad():
        for p in paths:
            w = mods[p].weight
            w.copy_(w.abs().mean() * torch.sign(w))
    return out


def fake_cifar(root, name, n_train, n_test, value):
    """CIFAR-10/100 files in torchvision's extracted python layout under ``root``: n_train
    training and n_test test images, every pixel = value (uint8), labels cycling over the
    classes (tests/test_data.py, tests/test_reproduce.py)."""
    import pickle

    import numpy as np
    import torchvision.datasets.cifar as tvc

    cls = tvc.CIFAR10 if name == "cifar10" else tvc.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    lab = "labels" if name == "cifar10" else "fine_labels"
    ncls = 10 if name == "cifar10" else 100
    per = {f: n_train // len(cls.train_list) for f, _ in cls.train_list}
    per.update({f: n_test for f, _ in cls.test_list})
    for fname, n in per.items():
        entry = {"data": np.full((n, 3072), value, dtype=np.uint8),
                 lab: [i % ncls for i in range(n)]}
        with open(folder / fname, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"c{i}" for i in range(ncls)]}, f)
