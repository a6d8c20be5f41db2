"""The small modules the paper's networks are made of (``binslt.nn.models``' builders): flatten
and global pooling, the mean over T of the classifier, a per-step wrapper over [T, N, ...],
the dense spiking conv / linear layers of the ``snn`` variant, the residual block of every
variant and the non-spiking conv + BN + activation of the ``ann`` / ``bnn`` variants."""

from __future__ import annotations

import torch
from torch import nn

from .layers import LIF

__all__ = ["PerStep", "ResidualBlock", "SpikingConv", "SpikingLinear"]


class _Flatten(nn.Module):
    """[..., C, H, W] -> [..., C*H*W] (works with or without a leading T)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-3)


class _GlobalAvgPool(nn.Module):
    """[..., C, H, W] -> [..., C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class _MeanOverTime(nn.Module):
    """Applies ``layer`` to [T, N, F] and averages over T: the logits of a spiking network."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).mean(0)


class PerStep(nn.Module):
    """Applies a per-sample module (conv, BN, pool, flatten, linear) to [T, N, ...] by
    flattening T into N, so that BN statistics run over T*N*spatial."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x.flatten(0, 1))
        return y.view(*x.shape[:2], *y.shape[1:])


_PerStep = PerStep  # the name the networks' builders used


class SpikingConv(nn.Module):
    """Dense spiking conv layer (snn variant): conv on [T*N, ...] + BN + multi-step LIF.

    ``forward(x, residual=None)``: x [T, N, C, H, W] (spikes or, in the first layer, images);
    ``residual`` [T, N, C_out, H', W'] is a current added before the neuron.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int,
                 bn: bool, bn_affine: bool, neuron: dict, backend: str):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=not bn)
        self.bn = nn.BatchNorm2d(cout, affine=bn_affine) if bn else None
        self.lif = LIF(**neuron, backend=backend)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        T, n = x.shape[:2]
        z = self.conv(x.flatten(0, 1))
        if self.bn is not None:
            z = self.bn(z)
        z = z.view(T, n, *z.shape[1:])
        if residual is not None:
            z = z + residual
        return self.lif(z)


class SpikingLinear(nn.Module):
    """Dense spiking linear layer (snn variant): linear + BN (over T*N) + LIF, [T, N, F]."""

    def __init__(self, fin: int, fout: int, bn: bool, bn_affine: bool, neuron: dict,
                 backend: str):
        super().__init__()
        self.fc = nn.Linear(fin, fout, bias=not bn)
        self.bn = nn.BatchNorm1d(fout, affine=bn_affine) if bn else None
        self.lif = LIF(**neuron, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        if self.bn is not None:
            z = self.bn(z.flatten(0, 1)).view(z.shape)
        return self.lif(z)


class ResidualBlock(nn.Module):
    """Basic block for every variant: ``act(conv2(act(conv1(x))) + shortcut(x))``.

    ``conv1`` maps x to activations; ``conv2(h, residual=r)`` adds the current ``r`` before its
    activation (neuron, ReLU or sign). ``shortcut`` is None for the identity.
    """

    def __init__(self, conv1: nn.Module, conv2: nn.Module, shortcut: nn.Module | None):
        super().__init__()
        self.conv1, self.conv2, self.shortcut = conv1, conv2, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return self.conv2(self.conv1(x), residual=x)
        r, again = _call_handing_again(self.shortcut, x)
        h = self.conv1(x)
        if again is None:
            return self.conv2(h, residual=r)
        # Inside ops.keep_counts(False): the shortcut's float output, kept by conv2 for its
        # backward (a ResNet-19 block at 32x32, 128 channels, N=32, T=4: 64 MiB), is recomputed
        # there from the shortcut's packed input (ResNet-19's step: ~5 % more time on a 2-core
        # EPYC, peak memory 64 MiB lower).
        with torch.autograd.graph.saved_tensors_hooks(*_saved_as_recomputed(r, again)):
            return self.conv2(h, residual=r)


def _call_handing_again(shortcut: nn.Module, x: torch.Tensor):
    """``(shortcut(x), again)``: the module called as a module (its hooks run), and, inside
    ``binslt.ops.keep_counts(False)``, the function that recomputes its output where it hands
    one (``BinConv2d`` in a training graph); None otherwise."""
    from ..ops.autograd import _KEEP

    if getattr(_KEEP, "counts", True) or torch.compiler.is_compiling() or \
            not hasattr(shortcut, "_handed"):
        return shortcut(x), None
    handed: list = []
    shortcut._handed = handed
    try:
        r = shortcut(x)
    finally:  # back to the class's None (no instance entry for a compiled graph to guard on)
        del shortcut._handed
    return r, (handed[0] if handed else None)


def _saved_as_recomputed(r: torch.Tensor, again):
    """Saved-tensor hooks under which a save of exactly r (its storage, offset, shape, strides
    and dtype) keeps only ``again``, unpacked as ``again()``; every other tensor is kept as it
    is. Neither hook holds a reference to r."""
    key = _identity(r)  # (autograd keeps both hooks with every tensor saved under them)

    def pack(t: torch.Tensor):
        if _identity(t) == key:
            return _Recomputed(again)
        return t

    def unpack(saved):
        return saved.again() if isinstance(saved, _Recomputed) else saved

    return pack, unpack


def _identity(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            t.stride(), t.dtype)


class _Recomputed:
    """A saved tensor kept as the function that recomputes it."""

    __slots__ = ("again",)

    def __init__(self, again):
        self.again = again


class _ConvBNAct(nn.Module):
    """Non-spiking conv (+BN) [+residual] + activation, [N, C, H, W] (ann / bnn variants).

    Order: conv -> [maxpool] -> BN -> (+ residual) -> activation (``pool_first``, the bnn order),
    or conv -> BN -> activation -> [maxpool] (the ann order).
    """

    def __init__(self, conv: nn.Module, bn: nn.Module | None, act: nn.Module, pool: bool,
                 pool_first: bool):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act
        self.pool = nn.MaxPool2d(2) if pool else None
        self.pool_first = pool_first

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        z = self.conv(x)
        if self.pool is not None and self.pool_first:
            z = self.pool(z)
        if self.bn is not None:
            z = self.bn(z)
        if residual is not None:
            z = z + residual
        z = self.act(z)
        if self.pool is not None and not self.pool_first:
            z = self.pool(z)
        return z
