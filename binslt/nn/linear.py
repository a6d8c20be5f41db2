"""The masked sign-weight spiking linear layer, ``BinSpikeLinear``: linear (+BN) + LIF in one
fused op (run by the ops as a 1x1 conv)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops import contract as C
from .base import (
    _MODE_DOC,
    _NEURON_ARGS,
    _SPIKE_ARGS,
    _WEIGHT_ARGS,
    _check_input,
    _refuse_jit_trace,
    _Surrogate,
    no_bias,
)
from .spiking import _SpikingLayer

#: A linear layer's geometry (a 1x1 conv to the ops).
_LINEAR = ops.Geometry(linear=True)


class BinSpikeLinear(_SpikingLayer):
    __doc__ = """Masked sign-weight Linear (+BN) + multi-step LIF (or IF) neuron, in one fused op.

    Args:
        in_features (int): input features F.
        out_features (int): output features O.
        bias (bool): False only (torch.nn.Linear's option at the one value the layer computes:
            binslt's sign-weight layers have no bias).
""" + _WEIGHT_ARGS + "\n" + _SPIKE_ARGS + "\n" + _NEURON_ARGS + """

    Shape:
        - input ``x``: ``[T, N, F]`` spikes (or real values with ``input='real'``).
        - ``residual`` (optional): a real current ``[T, N, O]`` added before the neuron.
        - output: ``[T, N, O]`` spikes (exact 0./1.) in the input's dtype.

""" + _MODE_DOC + """

    Example::

        >>> import torch, binslt
        >>> layer = binslt.BinSpikeLinear(16, 4, prune_rate=0.25, decay=0.99, decay_input=False)
        >>> layer(torch.ones(3, 2, 16)).shape  # [T, N, F] -> [T, N, O]
        torch.Size([3, 2, 4])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 prune_rate: float = 0.5,
                 tau: Optional[float] = None, decay_input: Optional[bool] = None,
                 v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, detach_reset: bool = False,
                 surrogate: _Surrogate = "atan", surrogate_alpha: Optional[float] = None,
                 bn: bool = False,
                 input: str = "spike", backend: str = "auto", decay: Optional[float] = None,
                 bn_affine: bool = False, bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                 per_channel_gain: bool = False, neuron: str = "lif"):
        """Build the layer; every argument is described in ``help(binslt.BinSpikeLinear)``."""
        no_bias("BinSpikeLinear", bias)
        super().__init__(
            (out_features, in_features), nn.BatchNorm1d, prune_rate=prune_rate,
            per_channel_gain=per_channel_gain, input=input, backend=backend, bn=bn,
            bn_affine=bn_affine, bn_eps=bn_eps, bn_momentum=bn_momentum,
            neuron=dict(tau=tau, decay_input=decay_input, v_threshold=v_threshold,
                        v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate,
                        surrogate_alpha=surrogate_alpha, decay=decay, neuron=neuron))
        self.in_features, self.out_features = in_features, out_features

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, {self._weight_repr()}, "
                f"input={self.input}, backend={self.backend}, {self.neuron.extra_repr()}")

    def reset(self) -> None:
        """No-op: layers are stateless across calls."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Spikes ``[T, N, O]`` (the input's dtype) of input ``x`` ``[T, N, F]``; ``residual``,
        a real current ``[T, N, O]``, is added to the BN output before the neuron."""
        _refuse_jit_trace(self)
        who = type(self).__name__
        _check_input(x, 3, "[T, N, F]", self.in_features, 2, self.weight, who)
        C.check_residual(who, residual, (x.shape[0], x.shape[1], self.out_features))
        return self._fire(x, residual, _LINEAR)
