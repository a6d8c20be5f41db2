"""The types ``binslt.convert`` returns and the modules it puts into the user's model: the
report, the input kinds, the bias modules, the staged-chain ``InputTap`` / ``SpikeStage``, the
``SpikeDropout``, and the builders of the new binslt layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..nn.layers import (
    BinConv2d,
    BinLinear,
    BinSpikeConv2d,
    BinSpikeLinear,
)
from ..ops import contract as C
from .sj_modules import (
    _kind,
    _layer_neuron_kwargs,
    _pair_square,
    _sj,
    _step_mode,
    conv_module_padding,
)

if TYPE_CHECKING:
    from .convert_chains import _Chain


class ExampleRunError(ValueError):
    """``convert``'s example run failed, or the model holds state from an earlier run (one line
    saying what and the fix; ``strict=False`` converts on a best-effort basis instead)."""


class InputKind(str, Enum):
    """What a converted layer's input holds, read from what produces it in the recorded graph
    (``_value_kinds``) and confirmed against the values of the example runs (``_fits``).

    ``SPIKE``: 0/1, a spiking neuron's output, through max-pools, flattens, reshapes (and SEW's
    AND / IAND of spikes). ``DROPOUT``: such spikes through a dropout, 0 or 1/(1-p) in training.
    ``SPIKE_SUM``: small non-negative integers, adds of spikes (SEW ADD). ``REAL``: anything else
    (images, average pools, BN outputs, membrane shortcuts)."""

    SPIKE = "spike"
    DROPOUT = "spike-dropout"
    SPIKE_SUM = "spike-sum"
    REAL = "real"


@dataclass(frozen=True)
class _Val:
    """A value's kind; ``dropout``: the dropout module's path for ``InputKind.DROPOUT``."""

    kind: InputKind
    dropout: Optional[str] = None

    def join(self, other: _Val) -> _Val:
        """The narrowest kind that holds both (SPIKE is in DROPOUT and in SPIKE_SUM)."""
        if self == other:
            return self
        a, b = sorted((self, other), key=lambda v: list(InputKind).index(v.kind))
        if a.kind is InputKind.SPIKE and b.kind in (InputKind.DROPOUT, InputKind.SPIKE_SUM):
            return b
        return _REAL


_REAL = _Val(InputKind.REAL)
_SPIKE = _Val(InputKind.SPIKE)
_SPIKE_SUM = _Val(InputKind.SPIKE_SUM)


@dataclass
class ConversionReport:
    """What ``convert`` did. ``converted``: dicts with the replaced module paths (first: the conv
    or linear), the new layer's type (``new``) and settings. ``skipped``: dicts
    ``{'path', 'type', 'reason'}`` for every conv, linear and spiking neuron left as it was.
    ``method``: 'recorded run' or 'sequential' (the fall-back without ``example_input``).
    ``notes``: what the conversion decided beyond single layers (dropouts replaced, kinds the
    example run corrected with ``strict=False``). ``trainable``: what trains in search mode;
    ``frozen``: the parameters ``convert`` froze (names in the converted model)."""

    converted: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    method: str = "recorded run"
    notes: list[str] = field(default_factory=list)
    trainable: str = "scores"
    frozen: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s), left {len(self.skipped)} alone "
                 f"(graph from: {self.method})"]
        for c in self.converted:
            extra = []
            if c.get("input"):
                layer_in = c.get("layer_input")
                extra.append(f"input={c['input']}" + (
                    f" (as {layer_in})" if layer_in and layer_in != c["input"] else ""))
            if c.get("neuron"):
                extra += [f"bn={c['bn']}", f"neuron={c['neuron']}", f"tau={c['tau']:g}",
                          f"surrogate={c['surrogate']}({c['surrogate_alpha']:g})"]
                if c.get("residual"):
                    extra.append("residual")
            if c.get("bias"):
                extra.append(f"bias->{c['bias']}")
            note = f"; {c['note']}" if c.get("note") else ""
            lines.append(f"  + {' + '.join(c['paths'])} -> {c['new']} ({', '.join(extra)}){note}")
        for s in self.skipped:
            lines.append(f"  - {s['path']} ({s['type']}): {s['reason']}")
        for n in self.notes:
            lines.append(f"  * {n}")
        frozen = f"; frozen by convert: {len(self.frozen)} parameter(s)" if self.frozen else ""
        lines.append(f"  trains in search mode: {self.trainable}{frozen}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def clean(d):
            return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in d.items()}

        return dict(method=self.method, converted=[clean(c) for c in self.converted],
                    skipped=[dict(s) for s in self.skipped], notes=list(self.notes),
                    trainable=self.trainable, frozen=list(self.frozen))


# ---------------------------------------------------------------------------------------------
# Modules the conversion puts into the user's model
# ---------------------------------------------------------------------------------------------


class BiasShift(nn.BatchNorm2d):
    """A conv / linear bias ``b`` as an eval-only, frozen BatchNorm: scale 1, shift ``b``
    (weight 1, bias b, running mean 0, running variance 1, eps 0), so that the fused epilogue
    adds it exactly. It never switches to batch statistics (``train()`` keeps it in eval)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__(bias.numel(), eps=0.0, momentum=0.0, affine=True,
                         device=bias.device, dtype=bias.dtype)
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.copy_(bias.detach().flatten())
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.training = False

    def train(self, mode: bool = True):
        return super().train(False)

    def _check_input_dim(self, input):  # BinConv2d applies it to [N, C, H, W]; linear: [N, C]
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"BiasShift expects [N, C], [N, C, L] or [N, C, H, W], got shape "
                             f"{tuple(input.shape)}")


class Bias(nn.Module):
    """Adds a frozen per-feature bias over the last dim (a ``BinLinear``'s folded bias)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone().flatten(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.to(x.dtype)


class _Slot:
    """The input an ``InputTap`` keeps for its ``SpikeStage`` (a plain object: not a module, so
    the layer's tensors are registered once, at the stage)."""

    __slots__ = ("x",)

    def __init__(self):
        self.x = None


class InputTap(nn.Module):
    """Sits at a staged chain's conv / linear path: keeps its input for the ``SpikeStage`` and
    returns zeros of the conv's output shape, so that the user's residual add yields the residual
    alone."""

    def __init__(self, slot: _Slot, kind: str, out_channels: int, kernel: int = 1,
                 stride: int = 1, padding: int = 0):
        super().__init__()
        self._slot = slot
        self.kind, self.out_channels = kind, out_channels
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def extra_repr(self) -> str:
        return f"{self.kind}, out={self.out_channels}"

    def reset(self) -> None:
        self._slot.x = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._slot.x = x
        if self.kind == "conv":
            ho, wo = C.out_hw(x.shape[-2], x.shape[-1], self.kernel, self.kernel, self.stride,
                              self.padding)
            shape = (*x.shape[:-3], self.out_channels, ho, wo)
        else:
            shape = (*x.shape[:-1], self.out_channels)
        return x.new_zeros(shape)


class SpikeStage(nn.Module):
    """Sits at a staged chain's neuron path and holds the binslt layer: fires it on the input its
    ``InputTap`` kept, with what reaches the neuron as the residual current (when the chain has a
    residual add)."""

    def __init__(self, layer: nn.Module, slot: _Slot, residual: bool):
        super().__init__()
        self.layer = layer
        self._slot = slot
        self.residual = bool(residual)

    def extra_repr(self) -> str:
        return f"residual={self.residual}"

    def reset(self) -> None:
        self._slot.x = None

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = self._slot.x
        self._slot.x = None
        if x is None:
            raise RuntimeError("SpikeStage called before its InputTap: the model's forward no "
                               "longer calls the converted conv/linear before its neuron (convert "
                               "the model again with an example_input of the new forward)")
        rank = 5 if isinstance(self.layer, BinSpikeConv2d) else 3
        if x.dim() == rank - 1:  # a SeqToANNContainer flattened [T, N] to [T*N]
            x = x.view(u.shape[0], u.shape[1], *x.shape[1:])
        return self.layer(x, residual=u if self.residual else None)


class SpikeDropout(nn.Module):
    """Sits at the path of a dropout whose output (spikes) goes only to converted spiking layers:
    applies the user's dropout mask to the spikes as 0/1 and sets those layers'
    ``input_gain`` to 1/(1-p) while the mask is active (training), 1 otherwise. The layers fold
    the gain into their weights' gain and keep the packed spike path; the result is the
    dropout's ``x * mask`` followed by the layer.

    The mask is drawn as the user's module draws it (the same random calls): SpikingJelly's
    ``layer.Dropout`` / ``Dropout2d`` with its own ``create_mask``, kept over all T steps (and
    calls) until ``reset()``; a ``torch.nn`` dropout draws a new one every call."""

    def __init__(self, dropout: nn.Module, layers: list):
        super().__init__()
        self.dropout = dropout  # the user's module: its settings and its mask state
        self.__dict__["_layers"] = list(layers)  # not submodules: they sit at their own paths

    def extra_repr(self) -> str:
        return f"layers={len(self._layers)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dropout
        p = float(d.p)
        gain = 1.0
        if d.training and p > 0:
            layer, _, _ = _sj()
            if isinstance(d, layer.Dropout):
                if d.mask is None:
                    d.mask = d.create_mask(x[0] if _step_mode(d) == "m" else x)
                keep = d.mask != 0
            else:
                keep = d(torch.ones_like(x)) != 0
            x = x * keep.to(x.dtype)
            gain = 1.0 / (1.0 - p)
        for m in self._layers:
            m.input_gain = gain
        return x


# ---------------------------------------------------------------------------------------------
# Building the new layers
# ---------------------------------------------------------------------------------------------


def _fresh_bn(bn: nn.Module, cls, like: torch.Tensor) -> nn.Module:
    """A plain torch BN with the same settings and state (momentum None = cumulative average)."""
    fresh = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                track_running_stats=bn.track_running_stats).to(device=like.device,
                                                               dtype=like.dtype)
    fresh.load_state_dict(bn.state_dict())
    fresh.train(bn.training)
    return fresh


def _fold_bias_into_bn(bn: nn.Module, bias: Optional[torch.Tensor]) -> None:
    """BN(y + b) == BN'(y) with running_mean' = running_mean - b (batch statistics: the batch
    mean absorbs b, and the running mean, updated from it, stays shifted by b)."""
    if bias is not None and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.running_mean.sub_(bias.detach().to(bn.running_mean.dtype))


def _spiking_layer(ch: _Chain, mods: dict, prune_rate: float, backend: str,
                   per_channel_gain: bool) -> tuple[nn.Module, str]:
    lin = mods[ch.conv]
    bn = mods[ch.bn] if ch.bn else None
    nrn = mods[ch.neuron]
    bias = lin.bias.detach() if lin.bias is not None else None
    kw = dict(prune_rate=prune_rate, bn=bn is not None, input=ch.layer_input, backend=backend,
              per_channel_gain=per_channel_gain, **_layer_neuron_kwargs(nrn))
    if bn is not None:
        kw.update(bn_affine=bn.affine, bn_eps=bn.eps,
                  bn_momentum=bn.momentum if bn.momentum is not None else 0.1)
    if _kind(lin) == "conv":
        k, _ = _pair_square(lin.kernel_size, "kernel_size")
        s, _ = _pair_square(lin.stride, "stride")
        p = conv_module_padding(lin)
        new = BinSpikeConv2d(lin.in_channels, lin.out_channels, k, s, p, **kw)
        bn_cls = nn.BatchNorm2d
    else:
        new = BinSpikeLinear(lin.in_features, lin.out_features, **kw)
        bn_cls = nn.BatchNorm1d
    w = lin.weight.detach()
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
    how = ""
    if bn is not None:
        new.bn = _fresh_bn(bn, bn_cls, w)
        if bias is not None:
            _fold_bias_into_bn(new.bn, bias)
            how = "bn running mean"
    elif bias is not None:
        new.bn = BiasShift(bias)
        how = "shift"
    new.train(lin.training)
    return new, how


def _plain_layer(path: str, mods: dict, prune_rate: float, per_channel_gain: bool,
                 bn_after: Optional[nn.Module]) -> tuple[nn.Module, str]:
    """BinConv2d / BinLinear for a conv / linear that feeds no converted neuron; its bias goes
    into the BN that takes its whole output (``bn_after``), else into a shift."""
    lin = mods[path]
    w = lin.weight.detach()
    bias = lin.bias.detach() if lin.bias is not None else None
    if _kind(lin) == "conv":
        k, _ = _pair_square(lin.kernel_size, "kernel_size")
        s, _ = _pair_square(lin.stride, "stride")
        p = conv_module_padding(lin)
        new = BinConv2d(lin.in_channels, lin.out_channels, k, s, p, prune_rate=prune_rate,
                        per_channel_gain=per_channel_gain)
    else:
        new = BinLinear(lin.in_features, lin.out_features, prune_rate=prune_rate,
                        per_channel_gain=per_channel_gain)
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
    new.train(lin.training)
    how = ""
    if bias is not None:
        if bn_after is not None and bn_after.track_running_stats:
            _fold_bias_into_bn(bn_after, bias)
            how = "bn running mean"
        elif isinstance(new, BinConv2d):
            new.bn = BiasShift(bias)
            how = "shift"
        else:
            new = nn.Sequential(new, Bias(bias))
            how = "shift"
    return new, how
