"""What BinSpikeConv2d and BinSpikeLinear share: the neuron / BN set-up and the layer call
(``_SpikingLayer``). A call makes the values the ops read (the BN epilogue, the neuron's
``NeuronParams``, the geometry and the ``Weights`` the chosen path needs), runs one op path
(``binslt.ops.layer``) and updates the BN running statistics."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import contract as C
from ..ops import reference as ref
from .base import _call_named, check_input_kind, layer_label
from .neuron import NeuronConfig
from .weight import _MaskedSignWeight


class _SpikingLayer(_MaskedSignWeight):
    """A masked sign-weight conv / linear with a fused (BN) + LIF neuron: the settings its
    constructor takes besides the shape (the weight's, the neuron's, the BatchNorm's, the input
    kind and the backend) and its call, ``_fire``."""

    #: A constant factor of the layer's input, folded into its gain: the layer computes
    #: ``conv(input_gain * x)`` as ``conv(x)`` with ``input_gain * W_eff``, so that ``x`` stays
    #: 0/1 spikes on the packed path (a dropout's 1/(1-p) in front of a converted layer:
    #: ``binslt.interop.convert.SpikeDropout`` sets it on every call).
    input_gain = 1.0

    #: Keep the membrane potential of the last call (``v_seq`` [T, N, C, H', W'] before any
    #: pool, ``v`` its last step: SpikingJelly's ``LIFNode(store_v_seq=True)`` attributes, which
    #: ``monitor.AttributeMonitor('v')`` reads). A debug path: the fused kernels never write V,
    #: so each call recomputes it through the reference (binslt.reference), off the graph.
    store_v_seq = False

    def __init__(self, shape: tuple[int, ...], bn_type: type, *, prune_rate: float,
                 per_channel_gain: bool, input: str, backend: str, neuron: dict, bn: bool,
                 bn_affine: bool, bn_eps: float, bn_momentum: float):
        check_input_kind(input)
        C.check_backend(backend)
        super().__init__(shape, prune_rate, per_channel_gain)
        self.neuron = NeuronConfig(**neuron, who=type(self).__name__)
        self.__dict__["_channels"] = shape[0]  # output channels / features (a plain read)
        self.input = input
        self.backend = backend
        self.bn = bn_type(shape[0], eps=bn_eps, momentum=bn_momentum,
                          affine=bn_affine) if bn else None

    def _weights(self, need: str, gain: float) -> ops.Weights:
        """The weight as the chosen path reads it (``ops.weight_need``): the cached bit planes
        without autograd, W_eff (with the planes of the search pass that wrote it) with."""
        if need == "planes":
            return ops.Weights(planes=self.packed_weight(), gain=gain)
        if need == "w_eff+planes":
            w, planes = self.effective_weight_planes()
        else:
            w, planes = self._frozen_weight(), None
        return ops.Weights(w, planes, gain)

    def _records_grad(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
        """Whether autograd records this layer call: grad mode is on and the input, the residual
        or a parameter of this layer (scores, weight, BN affine) requires grad."""
        if not torch.is_grad_enabled():
            return False
        if x.requires_grad or (residual is not None and residual.requires_grad):
            return True
        return any(p.requires_grad for p in self.parameters())

    def _fire(self, x: torch.Tensor, residual: Optional[torch.Tensor], geo: ops.Geometry,
              stat_count: Optional[int] = None) -> torch.Tensor:
        """The spiking layer call: the BN epilogue, one op path, the BN running statistics
        (over ``stat_count`` neurons per channel: the count before pooling)."""
        channels = self._channels
        scale, shift, bn_train = _bn_scale_shift(self.bn, channels, x)
        # eps enters the op only with batch statistics; eval BN is folded above with its own
        # eps (which nn.BatchNorm allows to be 0).
        epi = ops.Epilogue(scale, shift, bn_train, self.bn.eps if bn_train else 1e-5, residual)
        gain, nrn, who = float(self.input_gain), self.neuron.params, layer_label(self)

        records = self._records_grad(x, residual)

        def call(be):
            path = ops.choose_path(be, self.input, gain, geo.linear, records)
            w = self._weights(ops.weight_need(path, be), gain)
            return ops.run_path(path, be, x, w, epi, nrn, geo, who)

        s, mean, var = _call_named(self, ops.run_auto, self.backend, x.device, call)
        if self.store_v_seq:
            self._store_v(x, epi, geo)
        if bn_train:
            _update_running_stats(self.bn, mean, var,
                                  s.numel() // channels if stat_count is None else stat_count)
        return s

    def __getattr__(self, name: str):
        if name == "v":  # V after the last step of the last call (store_v_seq)
            v_seq = self.__dict__.get("v_seq")
            if v_seq is None:
                raise AttributeError(
                    f"{layer_label(self)} keeps no membrane potential v: its kernels never "
                    "write V. Set layer.store_v_seq = True (a slower debug path through the "
                    "reference) and call it again; then .v and .v_seq hold V")
            return v_seq[-1]
        return super().__getattr__(name)

    def _unpacked(self, t: Optional[torch.Tensor], channels: int) -> Optional[torch.Tensor]:
        """Packed spike words [T, N, H, W, Cw] int32 as float spikes [T, N, C, H, W]."""
        if t is None or t.dtype != torch.int32:
            return t
        t_, n_ = t.shape[:2]
        return ops.unpack_spikes(t.flatten(0, 1), channels).view(t_, n_, channels, *t.shape[2:4])

    @torch.no_grad()
    def _store_v(self, x, epi: ops.Epilogue, geo: ops.Geometry) -> None:
        """V [T, N, ...] of this call, recomputed through the reference: the current, the
        epilogue (the batch statistics of this call when BN trains) and SpikingJelly's LIF."""
        x = self._unpacked(x, self.weight.shape[1])  # a previous layer's forward_packed
        residual = self._unpacked(epi.residual, self.weight.shape[0])
        w = (self.effective_weight() * float(self.input_gain)).detach().float()
        xf = x.detach().float()
        if geo.linear:
            z = F.linear(xf, w)[..., None, None]
            res = None if residual is None else residual.float()[..., None, None]
        else:
            z = F.conv2d(xf.flatten(0, 1), w, stride=geo.stride, padding=geo.padding)
            z = z.view(*xf.shape[:2], *z.shape[1:])
            res = None if residual is None else residual.float()
        y, _, _ = ref.epilogue(z, epi.scale.detach().float(), epi.shift.detach().float(), res,
                               epi.bn_train, epi.eps)
        nk = self.neuron
        vr = 0.0 if nk.v_reset is None else nk.v_reset
        v = torch.full_like(y[0], vr)
        vs = []
        for yt in y:  # SpikingJelly's charge, fire, reset (reference.lif_multistep's order)
            h = (v + (yt - (v - vr)) / nk.tau if nk.decay_input
                 else v - (v - vr) / nk.tau + yt)
            sp = (h >= nk.v_threshold).to(h.dtype)
            v = h - sp * nk.v_threshold if nk.v_reset is None else sp * nk.v_reset + (1 - sp) * h
            vs.append(v)
        v_seq = torch.stack(vs)
        self.__dict__["v_seq"] = v_seq.view(*v_seq.shape[:3]) if geo.linear else v_seq


def _bn_scale_shift(bn: Optional[nn.modules.batchnorm._BatchNorm], channels: int,
                    like: torch.Tensor):
    """(scale, shift, bn_train) for the fused epilogue from an optional BatchNorm module."""
    if bn is None:
        one = torch.ones(channels, dtype=torch.float32, device=like.device)
        return one, torch.zeros_like(one), False
    train = bn.training or not bn.track_running_stats
    w = bn.weight if bn.affine else torch.ones(channels, device=like.device)
    b = bn.bias if bn.affine else torch.zeros(channels, device=like.device)
    if train:
        return w, b, True
    scale = w * torch.rsqrt(bn.running_var + bn.eps)
    return scale, b - bn.running_mean * scale, False


@torch.no_grad()
def _update_running_stats(bn, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    if bn is None or not (bn.training and bn.track_running_stats) or count == 0:
        return  # an empty batch (N = 0) has no statistics; NaN must not enter the running ones
    if ops.is_vmapped(mean):
        raise NotImplementedError(
            "torch.func.vmap cannot update a BatchNorm's running statistics (each vmapped entry "
            "has its own batch statistics, the module one buffer): vmap the model in eval mode "
            "(model.eval()), or build its BatchNorm with track_running_stats=False")
    bn.num_batches_tracked += 1
    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
