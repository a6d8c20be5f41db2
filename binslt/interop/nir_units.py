"""The torch modules a NIR graph is read into (:func:`binslt.interop.nir.from_nir`): a NIR
neuron as binslt's multi-step LIF / IF, a synapse fused with its neuron, pools, thresholds,
scales, and :class:`NIRNet`, the graph as a model."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.blocks import PerStep as _PerStep
from ..nn.layers import LIF, SpikeMaxPool2d

__all__ = ["NIRNet"]


class _Neuron(nn.Module):
    """A NIR LIF / IF node as binslt's multi-step neuron (SpikingJelly semantics, S = H >= thr):
    ``x`` is first scaled by ``gain`` when the node's r does not fold into a binslt form."""

    def __init__(self, tau: float, decay_input: bool, v_threshold: float, gain: float = 1.0,
                 backend: str = "auto"):
        super().__init__()
        self.gain = gain
        self.inf = math.isinf(tau)
        if self.inf:  # IF: H = V + X
            self.lif = LIF(neuron="if", v_threshold=v_threshold, v_reset=0.0, backend=backend)
        else:
            self.lif = LIF(tau=tau, decay_input=decay_input, v_threshold=v_threshold,
                           v_reset=0.0, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gain != 1.0:
            x = x * self.gain
        return self.lif(x)


class _Sum(nn.Module):
    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class _DenseSpiking(nn.Module):
    """Dense synapse (+bias) then a neuron; extra inputs are added before the neuron."""

    def __init__(self, syn: nn.Module, neuron: nn.Module):
        super().__init__()
        self.syn, self.neuron = _PerStep(syn), neuron

    def forward(self, x, *residual):
        z = self.syn(x)
        for r in residual:
            z = z + r
        return self.neuron(z)


class _Spiking(nn.Module):
    """A binslt layer (BinSpikeConv2d / BinSpikeLinear) taking (x, residual_sum)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, *residual):
        r = None
        for t in residual:
            r = t if r is None else r + t
        return self.layer(x, residual=r)


class _ThresholdOp(nn.Module):
    def __init__(self, thr: torch.Tensor):
        super().__init__()
        self.register_buffer("thr", thr)

    def forward(self, x):  # NIR's Heaviside: 1 where x > threshold
        return (x > self.thr).to(x.dtype)


class _SumPool(nn.Module):
    def __init__(self, k, s, p):
        super().__init__()
        self.k, self.s, self.p = k, s, p

    def forward(self, x):
        return F.avg_pool2d(x, self.k, self.s, self.p, count_include_pad=True,
                            divisor_override=1)


class _GlobalMean(nn.Module):
    def forward(self, x):  # [T, N, C, H, W] -> [T, N, C], as binslt.models' global pool
        return x.mean(dim=(-2, -1))


class _SpikeOr(nn.Module):
    """2x2 max of spikes (Threshold(SumPool(x), 0.5) of a binslt file): binslt's own pool."""

    def __init__(self, k, s, p):
        super().__init__()
        self.pool = SpikeMaxPool2d(k, s, p)

    def forward(self, x):
        return self.pool(x)


class NIRNet(nn.Module):
    """A NIR graph as a torch model.

    ``forward(x)``: images ``[N, *input_shape]`` are repeated over ``timesteps`` (direct
    encoding), or a sequence ``[T, N, *input_shape]`` is given. Graphs written by binslt return
    the logits ``[N, classes]`` (the mean over T of the output node, as ``BinSLTNet``); other
    graphs return the output sequence ``[T, N, ...]``. ``spikes`` (after a forward with
    ``record=True``) maps each neuron's name to its output spikes.
    """

    def __init__(self, units: nn.ModuleDict, plan: list[tuple[str, str, list[str]]],
                 output: str, input_shape: tuple[int, ...], timesteps: Optional[int],
                 readout: str, metadata: dict):
        super().__init__()
        self.units = units
        self.plan = plan
        self.output = output
        self.input_shape = tuple(int(v) for v in input_shape)
        self.timesteps = timesteps
        self.readout = readout
        self.nir_metadata = metadata
        self.spikes: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, record: bool = False) -> torch.Tensor:
        d = len(self.input_shape)
        if x.dim() == d + 1 and tuple(x.shape[1:]) == self.input_shape:
            if self.timesteps is None:
                raise ValueError("this graph has no time steps recorded; give a sequence "
                                 f"[T, N, {', '.join(map(str, self.input_shape))}]")
            x = x.unsqueeze(0).expand(self.timesteps, *x.shape)
        elif not (x.dim() == d + 2 and tuple(x.shape[2:]) == self.input_shape):
            raise ValueError(f"expected [N, {list(self.input_shape)}] images or a "
                             f"[T, N, {list(self.input_shape)}] sequence, got {tuple(x.shape)}")
        vals = {"input": x}
        self.spikes = {}
        for name, key, inputs in self.plan:
            out = self.units[key](*(vals[i] for i in inputs))
            vals[name] = out
            if record and isinstance(self.units[key], (_Spiking, _DenseSpiking, _Neuron)):
                self.spikes[name] = out
        out = vals[self.output]
        return out.mean(0) if self.readout == "mean_over_time" else out


class _ScaleOp(nn.Module):
    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x):
        return x * self.scale


class _BiasOp(nn.Module):
    def __init__(self, b):
        super().__init__()
        self.register_buffer("b", b)

    def forward(self, x):
        return x + self.b


class _BinConvSeq(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)  # BinConv2d accepts [T, N, C, H, W]


def _dense(conv: bool, w, b, stride, padding) -> nn.Module:
    if conv:
        m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride, padding, bias=True)
    else:
        m = nn.Linear(w.shape[1], w.shape[0], bias=True)
    m.weight.data.copy_(w)
    m.bias.data.copy_(b)
    m.requires_grad_(False)
    return m
