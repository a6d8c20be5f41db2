"""The masked sign-weight spiking conv layer, ``BinSpikeConv2d``: conv (+BN) + LIF (+ 2x2
max-pool) in one fused op, with packed-word chaining for inference (``forward_packed``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops import contract as C
from .base import (
    _CONV_ARGS,
    _MODE_DOC,
    _NEURON_ARGS,
    _SPIKE_ARGS,
    _WEIGHT_ARGS,
    _check_input,
    _IntOrPair,
    _refuse_jit_trace,
    _square,
    _Surrogate,
    conv_padding,
    torch_conv_options,
)
from .spiking import _SpikingLayer


class BinSpikeConv2d(_SpikingLayer):
    __doc__ = """Masked sign-weight Conv2d (+BN) + multi-step LIF neuron, in one fused op.

    Replaces a SpikingJelly ``layer.Conv2d`` (+ ``layer.BatchNorm2d``) + ``neuron.LIFNode``
    (step mode 'm'). The effective weight is ``W_eff = alpha * sign(w) * M``: w is frozen, the
    mask M keeps the top-|s| of the trainable scores s.

    Args:
""" + _CONV_ARGS + _WEIGHT_ARGS + "\n" + _SPIKE_ARGS + "\n" + _NEURON_ARGS + """
        pool (int): 1 (default) or 2: conv -> BN -> neuron -> 2x2 max-pool (stride 2) in one
            layer, the same spikes as this layer followed by ``SpikeMaxPool2d(2)``.

    Shape:
        - input ``x``: ``[T, N, C_in, H, W]`` spikes (or real values with ``input='real'``).
        - ``residual`` (optional): a real current ``[T, N, C_out, H', W']`` added before the
          neuron (ResNet blocks), in the unpooled shape.
        - output: ``[T, N, C_out, H', W']`` spikes (exact 0./1.) in the input's dtype, with
          H' = (H + 2 * padding - kernel_size) // stride + 1 (halved again with ``pool=2``).

""" + _MODE_DOC + """

    The max of spikes is their OR: inference fuses the pool into the kernel, training saves
    one bit per spike for its backward.

    Example::

        >>> import torch, binslt
        >>> layer = binslt.BinSpikeConv2d(2, 4, 3, padding=1, prune_rate=0.5, bn=True)
        >>> x = (torch.rand(3, 1, 2, 8, 8) > 0.5).float()  # [T, N, C, H, W] spikes
        >>> y = layer(x)
        >>> y.shape
        torch.Size([3, 1, 4, 8, 8])
        >>> bool(((y == 0) | (y == 1)).all())
        True
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntOrPair,
                 stride: _IntOrPair = 1, padding: _IntOrPair | str = 0,
                 dilation: _IntOrPair = 1, groups: int = 1, bias: bool = False,
                 padding_mode: str = "zeros", *, prune_rate: float = 0.5,
                 tau: Optional[float] = None, decay_input: Optional[bool] = None,
                 v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, detach_reset: bool = False,
                 surrogate: _Surrogate = "atan", surrogate_alpha: Optional[float] = None,
                 bn: bool = False,
                 input: str = "spike", backend: str = "auto", decay: Optional[float] = None,
                 bn_affine: bool = False, bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                 per_channel_gain: bool = False, neuron: str = "lif", pool: int = 1):
        """Build the layer; every argument is described in ``help(binslt.BinSpikeConv2d)``."""
        k = _square(kernel_size, "kernel_size")
        if k < 1:
            raise ValueError("kernel_size must be >= 1")
        torch_conv_options("BinSpikeConv2d", dilation, groups, bias, padding_mode)
        if isinstance(pool, bool) or pool not in C.POOLS:
            raise ValueError(f"pool must be 1 (none) or 2 (2x2 max-pool after the neuron), got "
                             f"{pool!r}")
        super().__init__(
            (out_channels, in_channels, k, k), nn.BatchNorm2d, prune_rate=prune_rate,
            per_channel_gain=per_channel_gain, input=input, backend=backend, bn=bn,
            bn_affine=bn_affine, bn_eps=bn_eps, bn_momentum=bn_momentum,
            neuron=dict(tau=tau, decay_input=decay_input, v_threshold=v_threshold,
                        v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate,
                        surrogate_alpha=surrogate_alpha, decay=decay, neuron=neuron))
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride = _square(stride, "stride")
        if self.stride < 1:
            raise ValueError("stride must be >= 1")
        self.padding = conv_padding("BinSpikeConv2d", padding, k, self.stride)
        self.pool = pool

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, "
                + (f"pool={self.pool}, " if self.pool > 1 else "")
                + f"{self._weight_repr()}, input={self.input}, backend={self.backend}, "
                f"{self.neuron.extra_repr()}")

    def reset(self) -> None:
        """No-op: layers are stateless across calls (for SpikingJelly's functional.reset_net)."""

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """The conv's output size (before the pool)."""
        k = self.kernel_size
        return C.out_hw(h, w, k, k, self.stride, self.padding)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Spikes ``[T, N, C_out, H', W']`` (the input's dtype) of input ``x`` ``[T, N, C_in, H,
        W]``; ``residual``, a real current ``[T, N, C_out, H', W']`` (before the pool), is added
        to the BN output before the neuron."""
        _refuse_jit_trace(self)
        who = type(self).__name__
        _check_input(x, 5, "[T, N, C, H, W]", self.in_channels, 2, self.weight, who)
        return self._forward(x, residual, x.shape[3], x.shape[4], False)

    def forward_packed(self, x: torch.Tensor, packed_out: bool = True,
                       residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inference chaining between binslt layers, under ``torch.no_grad()`` with a kernel
        backend: x is float spikes [T, N, C_in, H, W] or packed words [T, N, H, W,
        ceil(C_in/32)] int32 (a previous layer's ``forward_packed``), or, for ``input='real'``,
        real values [T, N, C_in, H, W]; the output is packed words [T, N, H', W',
        ceil(C_out/32)] int32 (``packed_out``) or float 0./1. spikes, the same spikes
        ``forward`` gives. ``residual`` is a float current [T, N, C_out, H', W'] or spikes as
        packed words [T, N, H', W', ceil(C_out/32)] int32 (an identity shortcut's input), added
        as 0. / 1."""
        _refuse_jit_trace(self)
        who = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int32:
            _check_input(x, 5, "[T, N, C, H, W]", self.in_channels, 2, self.weight, who)
            return self._forward(x, residual, x.shape[3], x.shape[4], packed_out)
        if x.dim() != 5 or x.shape[4] != C.channel_words(self.in_channels):
            raise ValueError(f"{who} expects packed spikes [T, N, H, W, "
                             f"{C.channel_words(self.in_channels)}] int32 "
                             f"(in_channels={self.in_channels}), got shape {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"{who}: input is on {x.device} but the layer's weights are on "
                             f"{self.weight.device}; move one of them (.to(device))")
        return self._forward(x, residual, x.shape[2], x.shape[3], packed_out)

    def _forward(self, x, residual, h: int, w: int, packed_out: bool) -> torch.Tensor:
        who = type(self).__name__
        k = self.kernel_size
        ho, wo = C.check_output_size(who, h, w, k, k, self.stride, self.padding)
        if ho < self.pool or wo < self.pool:
            raise ValueError(f"{who}: pool={self.pool} needs a conv output of at least "
                             f"{self.pool}x{self.pool}, got {ho}x{wo} from a {h}x{w} input")
        if isinstance(residual, ops.Shortcut):  # a shortcut conv's current (no-grad)
            C.check_residual(who, residual, (x.shape[0], x.shape[1], self.out_channels, ho, wo))
        elif residual is not None and residual.dtype == torch.int32:  # packed spikes (no-grad)
            C.check_residual(who, residual, (x.shape[0], x.shape[1], ho, wo,
                                             C.channel_words(self.out_channels)))
        else:
            C.check_residual(who, residual, (x.shape[0], x.shape[1], self.out_channels, ho, wo))
        geo = ops.Geometry(False, self.stride, self.padding, self.pool, packed_out)
        return self._fire(x, residual, geo, stat_count=x.shape[0] * x.shape[1] * ho * wo)


def conv_output_numel(mod: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    """Output elements of a layer's conv / linear for input ``x``: a pooled BinSpikeConv2d
    (``pool=2``) returns its spikes after the pool, but its conv computes every position before
    it."""
    if isinstance(mod, BinSpikeConv2d) and mod.pool > 1:
        ho, wo = mod.out_size(x.shape[-2], x.shape[-1])
        return out.numel() // (out.shape[-2] * out.shape[-1]) * ho * wo
    return out.numel()
