"""Conversion of a user's SpikingJelly model into a BinW-SLT search model.

``convert(model, prune_rate=..., example_input=...)`` finds every conv / linear whose output
reaches a spiking neuron through an optional BatchNorm and an optional residual add, and fuses
the three into one masked sign-weight layer:

* ``Conv2d`` [+ ``BatchNorm2d``] [+ residual] + ``LIFNode`` / ``IFNode`` -> ``BinSpikeConv2d``
* ``Linear`` [+ ``BatchNorm1d``] [+ residual] + ``LIFNode`` / ``IFNode`` -> ``BinSpikeLinear``

Every other conv / linear (1x1 shortcuts, the classifier, one in front of a neuron binslt does not
model) becomes a masked sign layer without a neuron (``BinConv2d`` / ``BinLinear``), as biprop
does for every layer, unless ``keep_dense`` names it. The conv / linear / BN may be SpikingJelly
layers in step mode 'm', plain ``torch.nn`` layers, or ``torch.nn`` layers inside a
``layer.SeqToANNContainer``.

How the graph is found. With ``example_input`` the model runs twice (no grad, states reset
before and after; once in eval mode, once in training mode with the model's state, BN
statistics and random number state restored after) while module hooks and a
``TorchFunctionMode`` record every module call and every tensor operation of the user's forward,
each tensor known by its identity and version (so that an in-place ``out += identity`` counts as
a new value). A chain is followed from each conv's output:
the value must go to exactly one consumer at each step (a BN, a reshape, one add with a tensor of
the same shape, then the neuron). Without ``example_input`` the fall-back looks only at runs of
consecutive children of each ``nn.Sequential`` (no residuals), and the report says so.

How the user's forward is kept. The model stays the user's object with the user's ``forward``:
modules are swapped at their paths, nothing is re-traced or generated.

* direct chain (no residual; only the reshapes of the ``SeqToANNContainer`` idiom): the new layer
  takes the conv's place (or its container's) and the BN and neuron become ``nn.Identity``, so
  that the remaining module names and state-dict keys do not move;
* staged chain (a residual add, or reshapes in the user's code): the conv's place gets a
  parameter-free ``InputTap`` that keeps its input and returns zeros of the conv's output shape,
  the BN becomes ``nn.Identity``, and the neuron's place gets a ``SpikeStage`` holding the new
  layer. The user's ``out += identity`` then computes ``0 + identity`` (exact), and the stage calls
  the layer with the kept input and ``residual=`` what arrived. It needs that no value of the
  chain is used anywhere else, which the recorded run checks.

Bias. A conv / linear bias is folded exactly: into the BN's running mean where a BN follows (in
training the batch mean absorbs it), otherwise into a ``BiasShift``: an eval-only, frozen
BatchNorm with scale 1 and shift ``b`` (running mean 0, variance 1, eps 0), which the fused
epilogue applies as its per-channel shift. A ``BinLinear`` with a bias is followed by a ``Bias``
module in an ``nn.Sequential``.

Neurons. ``LIFNode`` and ``IFNode`` in step mode 'm' with the ATan, Sigmoid, Rect or
PiecewiseQuadratic surrogate carry their settings over (IF needs a build whose layers take ``neuron='if'``). Other neuron types
(``ParametricLIFNode`` with a learnt tau, ...) and unsupported settings are left alone and the
report says why; their conv still becomes a ``BinConv2d``.

Input kind (``InputKind``), decided in one place (``_decide_kinds``) from what produces each
layer's input in the recorded graph, not from the values: a spiking neuron, through max-pools,
flattens and reshapes (and SEW's AND / IAND of spikes), makes ``spike`` (the packed path); a
dropout after those makes ``spike-dropout``; an add of spikes (SEW ADD) makes ``spike-sum``
(small integers, the exact real-input path, ``input='real'``); anything else (images, average
pools) is ``real``. The values both example runs gave each layer must agree with its kind, or
``convert`` stops naming the layer. Without ``example_input`` the kind comes from the module
before the layer in its ``nn.Sequential``.

Dropout. A dropout (SpikingJelly's ``layer.Dropout`` / ``Dropout2d``, torch's ``Dropout*``)
whose output goes only to converted spiking layers becomes a ``SpikeDropout``: the same mask
(the same random calls; ``layer.Dropout`` keeps one over T until reset, ``nn.Dropout`` draws one
per call) applied to the spikes as 0/1, and 1/(1-p) as the layers' ``input_gain``, folded into
their weights' gain: the packed path stays, the result is the dropout's. Otherwise the layers
after it take real input.

Strictness. A failed example run, or SpikingJelly modules holding state from an earlier run,
stop ``convert`` with one line naming the fix (``ExampleRunError``); ``strict=False`` converts as
far as it can (the ``nn.Sequential`` fall-back, stateful neurons left alone) and reports it.

Search mode trains the scores only: every other parameter is frozen (BN affine parameters train
with ``train_bn=True``); ``report.trainable`` / ``report.frozen`` say which, and
``to_spikingjelly`` unfreezes them again.

``to_spikingjelly(model)`` turns a converted model (its ticket) back into a plain SpikingJelly
model whose layers carry ``alpha * sign(w) * M``, rebuilt from meta-device copies of the original
modules that ``convert`` keeps (no weights).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..nn.layers import (
    BinConv2d,
    BinLinear,
    BinSpikeConv2d,
    BinSpikeLinear,
    _MaskedSignWeight,
    name_layers,
)
from ..ops import contract as C

__all__ = ["Bias", "BiasShift", "ConversionReport", "ExampleRunError", "FactoryError", "InputKind",
           "InputTap", "SpikeDropout", "SpikeStage", "SpikingJellyRun", "build_user_model",
           "convert", "load_factory", "to_spikingjelly"]


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
# What a module is, and whether binslt can take it
# ---------------------------------------------------------------------------------------------


def _sj():
    from spikingjelly.activation_based import layer, neuron, surrogate

    return layer, neuron, surrogate


def _is_seq2ann(m: nn.Module) -> bool:
    layer, _, _ = _sj()
    return isinstance(m, layer.SeqToANNContainer)


def _step_mode(m: nn.Module):
    return getattr(m, "step_mode", None)


def _kind(m: nn.Module) -> str:
    """'conv' / 'linear' / 'bn2d' / 'bn1d' / 'lif' / 'if' / 'node' (another spiking neuron) /
    'other'."""
    layer, neuron, _ = _sj()
    if type(m) in (nn.Conv2d, layer.Conv2d):
        return "conv"
    if type(m) in (nn.Linear, layer.Linear):
        return "linear"
    if type(m) in (nn.BatchNorm2d, layer.BatchNorm2d):
        return "bn2d"
    if type(m) in (nn.BatchNorm1d, layer.BatchNorm1d):
        return "bn1d"
    if isinstance(m, neuron.LIFNode):
        return "lif"
    if isinstance(m, neuron.IFNode):
        return "if"
    if isinstance(m, neuron.BaseNode):
        return "node"
    return "other"


def _is_neuron(m: nn.Module) -> bool:
    return _kind(m) in ("lif", "if", "node")


def _spiking(m: nn.Module) -> bool:
    """Whether ``m`` emits 0/1 spikes: a SpikingJelly neuron whose surrogate is in spiking mode
    (the example runs confirm the values)."""
    _, neuron, _ = _sj()
    sg = getattr(m, "surrogate_function", None)
    return isinstance(m, neuron.BaseNode) and getattr(sg, "spiking", True) is not False


_PASSING = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Flatten,
            nn.Unflatten, nn.Identity)


def _passes(m: nn.Module) -> bool:
    """Modules whose output holds their input's values, rearranged or max-pooled (SpikingJelly's
    layer.MaxPool2d / Flatten are these torch classes)."""
    return isinstance(m, _PASSING) and not getattr(m, "return_indices", False)


def _dropout_p(m: nn.Module) -> Optional[float]:
    """p of a dropout that zeroes elements and scales the rest by 1/(1-p) (torch's and
    SpikingJelly's Dropout / Dropout2d; not alpha dropout), else None."""
    layer, _, _ = _sj()
    if type(m) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, layer.Dropout,
                   layer.Dropout2d):
        return float(m.p)
    return None


def _pair_square(v, name: str):
    """int from an int or a square pair; None (and a reason) otherwise."""
    if isinstance(v, str):
        return None, f"{name}={v!r} (string padding) is not supported; give explicit ints"
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            return None, f"non-square {name} {tuple(v)}"
        v = v[0]
    return int(v), ""


def _conv_problem(m: nn.Module) -> str:
    if m.groups != 1:
        return f"groups={m.groups} (only groups=1 is supported)"
    if tuple(m.dilation) != (1, 1):
        return f"dilation={tuple(m.dilation)} (only 1 is supported)"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only 'zeros' is supported)"
    for name in ("kernel_size", "stride", "padding"):
        _, why = _pair_square(getattr(m, name), name)
        if why:
            return why
    return ""


def _layer_problem(m: nn.Module) -> str:
    return _conv_problem(m) if _kind(m) == "conv" else ""


def _if_supported() -> bool:
    return "neuron" in inspect.signature(BinSpikeConv2d.__init__).parameters


def _surrogate_name(sg) -> str | None:
    """binslt's name (``binslt.ops.schemas.SURROGATES``) of a SpikingJelly surrogate object, or
    None when binslt has no such surrogate."""
    _, _, surrogate = _sj()
    return {surrogate.ATan: "atan", surrogate.Sigmoid: "sigmoid", surrogate.Rect: "rect",
            surrogate.PiecewiseQuadratic: "piecewise_quadratic"}.get(type(sg))


def _neuron_problem(m: nn.Module) -> str:
    _, neuron, surrogate = _sj()
    k = _kind(m)
    if k == "node" or type(m) not in (neuron.LIFNode, neuron.IFNode):
        return (f"{type(m).__name__} is not binslt's LIF or IF neuron (its own dynamics, e.g. a "
                "learnt tau); left as it is")
    name = type(m).__name__
    if k == "if" and not _if_supported():
        return "IFNode needs binslt layers with neuron='if', which this build lacks"
    if _step_mode(m) != "m":
        return (f"{name} in single-step mode 's': the caller steps it over T and it carries "
                "state between calls (stateful use); binslt layers are multi-step")
    if getattr(m, "store_v_seq", False):
        return "store_v_seq=True: the model reads membrane potentials that binslt does not keep"
    if isinstance(getattr(m, "v", None), torch.Tensor):
        return ("holds membrane state from an earlier call (stateful use); call "
                "spikingjelly functional.reset_net(model) first if the calls are independent")
    sg = m.surrogate_function
    if _surrogate_name(sg) is None:
        return (f"surrogate {type(sg).__name__} is not supported (ATan, Sigmoid, Rect or "
                "PiecewiseQuadratic)")
    if not getattr(sg, "spiking", True):
        return "surrogate in non-spiking mode (spiking=False)"
    if k == "lif" and not (float(m.tau) >= 1.0):
        return f"tau={m.tau} < 1"
    return ""


def _neuron_settings(m: nn.Module) -> dict:
    """The report's view of a neuron: kind, tau (inf for IF) and the shared settings."""
    _, _, surrogate = _sj()
    sg = m.surrogate_function
    k = _kind(m)
    return dict(neuron=k, tau=float(m.tau) if k == "lif" else math.inf,
                decay_input=bool(m.decay_input) if k == "lif" else False,
                v_threshold=float(m.v_threshold),
                v_reset=None if m.v_reset is None else float(m.v_reset),
                detach_reset=bool(m.detach_reset),
                surrogate=_surrogate_name(sg),
                surrogate_alpha=float(sg.alpha))


def _layer_neuron_kwargs(m: nn.Module) -> dict:
    s = _neuron_settings(m)
    kind = s.pop("neuron")
    if kind == "if":
        s.pop("tau")
        s.pop("decay_input")
        s["neuron"] = "if"
    return s


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(model, parent), name, new)


def _proto(m: nn.Module) -> nn.Module:
    """A weightless copy (meta device) that ``to_spikingjelly`` rebuilds the module from."""
    p = copy.deepcopy(m).to("meta")
    if hasattr(p, "reset"):
        try:
            p.reset()
        except Exception:  # noqa: BLE001 -- a meta copy only needs its settings
            pass
    return p


# ---------------------------------------------------------------------------------------------
# The recorded run: module calls and tensor operations, tensors by identity and version
# ---------------------------------------------------------------------------------------------

_RESHAPES = {"view", "reshape", "flatten", "unflatten", "contiguous", "view_as", "reshape_as"}
_ADDS = {"add", "add_", "__add__", "__radd__", "__iadd__"}
# operations whose output holds the values of their first input (rearranged, selected, maxed)
_PASSING_OPS = _RESHAPES | {
    "permute", "transpose", "t", "movedim", "squeeze", "unsqueeze", "clone", "detach",
    "__getitem__", "expand", "expand_as", "repeat", "narrow", "chunk", "split", "unbind", "float",
    "double", "half", "to", "type_as", "max_pool1d", "max_pool2d", "max_pool3d",
    "_max_pool1d", "_max_pool2d", "_max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d"}
_JOINING_OPS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_MULS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply"}
_RSUBS = {"__rsub__", "rsub"}
_MAX_LEVELS = 8  # distinct values kept per observed input (more: real-valued)


def _levels(x: torch.Tensor) -> Optional[frozenset]:
    """The distinct values of x (at most _MAX_LEVELS of them), or None."""
    u = torch.unique(x.detach())
    return frozenset(u.double().tolist()) if u.numel() <= _MAX_LEVELS else None


def _union(a: Optional[frozenset], b: Optional[frozenset]) -> Optional[frozenset]:
    if a is None or b is None or len(a | b) > _MAX_LEVELS:
        return None
    return a | b


@dataclass
class _Node:
    kind: str  # 'module' or 'op'
    name: str  # module path or op name
    ins: list
    outs: list = field(default_factory=list)
    scope: str = ""  # innermost non-leaf module running when an op was recorded
    kwargs: tuple = ()
    consts: tuple = ()  # an op's number arguments (``1.0 - y``: (1.0,))


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.nodes: list[_Node] = []
        self.alive: list[torch.Tensor] = []  # keeps ids unique for the run
        self.shapes: dict = {}
        self.depth = 0
        self.quiet = False
        self.calls: Counter = Counter()
        self.stack: list[str] = []
        self.module_node: dict[str, int] = {}  # path -> node index of its (last) call
        self.io: dict[str, tuple] = {}  # any module path -> (in keys, out keys) of its last call
        self.levels: dict[str, Optional[frozenset]] = {}  # conv/linear -> values its input held
        self.handles = []
        self.leaves = {}
        for path, m in model.named_modules():
            leaf = (_kind(m) != "other" or isinstance(m, _MaskedSignWeight)
                    or next(m.children(), None) is None)
            self.leaves[id(m)] = leaf
            self.handles.append(m.register_forward_pre_hook(self._pre(path, m), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post(path, m), with_kwargs=True))

    def _keys(self, obj) -> list:
        out = []
        for t in tree_flatten(obj)[0]:
            if isinstance(t, torch.Tensor):
                self.alive.append(t)
                k = (id(t), t._version)
                self.shapes[k] = tuple(t.shape)
                out.append(k)
        return out

    def _pre(self, path, m):
        leaf = self.leaves[id(m)]

        def hook(mod, args, kwargs):
            self.calls[path] += 1
            if self.depth == 0:
                ins = self._keys((args, kwargs))
                self.io[path] = (ins, [])
                if leaf:
                    self.module_node[path] = len(self.nodes)
                    self.nodes.append(_Node("module", path, ins))
                    if _kind(m) in ("conv", "linear"):
                        self.quiet = True
                        try:
                            xs = [a for a in tree_flatten((args, kwargs))[0]
                                  if isinstance(a, torch.Tensor)]
                            lv = _levels(xs[0]) if len(xs) == 1 else None
                        finally:
                            self.quiet = False
                        self.levels[path] = (_union(self.levels[path], lv)
                                             if path in self.levels else lv)
                else:
                    self.stack.append(path)
            if leaf:
                self.depth += 1

        return hook

    def _post(self, path, m):
        leaf = self.leaves[id(m)]

        def hook(mod, args, kwargs, out):
            if leaf:
                self.depth -= 1
            new = None
            if self.depth == 0:
                if leaf and isinstance(out, torch.Tensor) and any(
                        out is a for a in tree_flatten((args, kwargs))[0]):
                    # a module that returns its input object (a dropout in eval mode) still
                    # makes a value of its own: a view, so that its uses are told apart
                    self.quiet = True
                    try:
                        out = new = out.view_as(out)
                    finally:
                        self.quiet = False
                outs = self._keys(out)
                self.io[path] = (self.io.get(path, ([], []))[0], outs)
                if leaf:
                    self.nodes[self.module_node[path]].outs = outs
                elif self.stack and self.stack[-1] == path:
                    self.stack.pop()
            return new

        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth > 0 or self.quiet:
            return func(*args, **kwargs)
        ins = self._keys(args)
        out = func(*args, **kwargs)
        outs = self._keys(out)
        if outs:
            consts = tuple(a for a in tree_flatten(args)[0]
                           if isinstance(a, (int, float)) and not isinstance(a, bool))
            self.nodes.append(_Node("op", getattr(func, "__name__", str(func)), ins, outs,
                                    self.stack[-1] if self.stack else "",
                                    tuple(sorted(kwargs)), consts))
        return out

    def consumers(self) -> dict:
        cons: dict = {}
        for i, n in enumerate(self.nodes):
            for k in dict.fromkeys(n.ins):
                cons.setdefault(k, []).append(i)
        return cons

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _record(model: nn.Module, example_input, training: bool = False) -> _Recorder:
    """One no-grad run of ``example_input``, recorded, from reset states (reset again after), in
    eval mode or in training mode (active dropouts and every mode-dependent forward; BatchNorms
    stay on their running statistics, so that an example of one image and one step runs and no
    statistics move). The model comes back as it was: its modes, its buffers and the random
    number state (dropout masks draw from it)."""
    from spikingjelly.activation_based import functional

    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers(),
                                                    *_tensors(example_input)] if t.is_cuda})
    rec = _Recorder(model)
    model.train(training)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.training = False
    try:
        with torch.random.fork_rng(devices=devices):
            functional.reset_net(model)
            with rec:
                if isinstance(example_input, (tuple, list)):
                    model(*example_input)
                else:
                    model(example_input)
    finally:
        rec.close()
        functional.reset_net(model)
        for m, t in modes.items():
            m.training = t
        for b, saved in buffers:
            b.copy_(saved)
    return rec


def _tensors(obj) -> list:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------------------------------------
# Input kinds: from what produces each value in the recorded graph, confirmed by the values
# ---------------------------------------------------------------------------------------------


def _value_kinds(rec: _Recorder, mods: dict, inputs: _Val) -> dict:
    """key -> _Val for the values of the recorded run, in execution order: a spiking neuron
    makes spikes; max-pools, flattens, reshapes and the like keep their input's kind; a dropout
    turns spikes into dropout spikes; an add of spikes or spike sums makes a spike sum; a product
    of spikes (SEW AND) or ``1 - spikes`` (SEW IAND) stays spikes. The model's inputs are
    ``inputs``; every other value (images, BN outputs, average pools, ...) is real."""
    kinds: dict = {k: inputs for k in rec.io.get("", ([], []))[0]}

    def of(k) -> _Val:
        return kinds.get(k, _REAL)

    for n in rec.nodes:
        out = _REAL
        ins = [of(k) for k in n.ins]
        if n.kind == "module":
            m = mods[n.name]
            if _spiking(m):
                out = _SPIKE
            elif len(ins) == 1 and _passes(m):
                out = ins[0]
            elif len(ins) == 1 and _dropout_p(m) is not None and ins[0] == _SPIKE:
                out = _Val(InputKind.DROPOUT, n.name)
        elif n.name in _PASSING_OPS and ins:
            out = ins[0]
        elif n.name in _JOINING_OPS and ins:
            out = ins[0]
            for v in ins[1:]:
                out = out.join(v)
        elif n.name in _ADDS and len(ins) == 2 and not n.kwargs and not n.consts and all(
                v.kind in (InputKind.SPIKE, InputKind.SPIKE_SUM) for v in ins):
            out = _SPIKE_SUM
        elif n.name in _MULS and not n.kwargs:
            counts = all(v.kind in (InputKind.SPIKE, InputKind.SPIKE_SUM) for v in ins)
            if len(ins) == 2 and not n.consts and counts:
                out = _SPIKE if ins == [_SPIKE, _SPIKE] else _SPIKE_SUM
            elif len(ins) == 1 and n.consts in ((1,), (1.0,)):
                out = ins[0]
            elif len(ins) == 1 and len(n.consts) == 1 and counts and n.consts[0] >= 0 \
                    and float(n.consts[0]).is_integer():
                out = _SPIKE_SUM
        elif n.name in _RSUBS and ins == [_SPIKE] and n.consts in ((1,), (1.0,)) \
                and not n.kwargs:
            out = _SPIKE  # 1 - s of spikes s (SEW IAND)
        for k in n.outs:
            kinds[k] = out
    return kinds


def _input_of(rec: _Recorder, kinds: dict, path: str) -> _Val:
    """The kind of the conv / linear at ``path``'s input in the recorded run (its last call)."""
    if path not in rec.module_node:
        return _REAL
    ins = rec.nodes[rec.module_node[path]].ins
    return kinds.get(ins[0], _REAL) if len(ins) == 1 else _REAL


def _fits(v: _Val, levels: Optional[frozenset], p: Optional[float]) -> bool:
    """Whether observed input values (``_levels``) agree with kind ``v`` (dropout probability
    ``p`` for DROPOUT)."""
    if v.kind is InputKind.REAL:
        return True
    if levels is None:
        return False
    if v.kind is InputKind.SPIKE:
        return levels <= {0.0, 1.0}
    if v.kind is InputKind.SPIKE_SUM:
        return all(x >= 0 and float(x).is_integer() for x in levels)
    s = 1.0 / (1.0 - p)
    return all(x in (0.0, 1.0) or math.isclose(x, s, rel_tol=1e-6) for x in levels)


def _dropout_takers(rec: _Recorder, mods: dict, cons: dict, path: str) -> Optional[list]:
    """The conv / linear paths that take the output of the dropout at ``path`` (through passing
    modules and operations), or None if anything else takes some of it."""
    if rec.calls[path] != 1 or path not in rec.module_node:
        return None
    todo = list(rec.nodes[rec.module_node[path]].outs)
    takers = []
    while todo:
        k = todo.pop()
        for i in cons.get(k, []):
            c = rec.nodes[i]
            if c.kind == "module" and _passes(mods[c.name]) or (
                    c.kind == "op" and c.name in _PASSING_OPS and c.ins and c.ins[0] == k):
                todo.extend(c.outs)
            elif c.kind == "module" and _kind(mods[c.name]) in ("conv", "linear"):
                takers.append(c.name)
            else:
                return None
    return takers or None


# ---------------------------------------------------------------------------------------------
# Chains: conv/linear [-> BN] [-> reshapes] [-> + residual] -> neuron
# ---------------------------------------------------------------------------------------------


@dataclass
class _Chain:
    conv: str
    bn: Optional[str] = None
    neuron: Optional[str] = None
    residual: bool = False
    staged: bool = False
    units: list = field(default_factory=list)  # direct: [first (gets the layer), others]
    kind: _Val = _REAL  # what its input holds
    layer_input: str = "real"  # the new layer's ``input``: 'spike' (packed path) or 'real'
    add_first: bool = True  # the chain's value is the add's first operand
    note: str = ""


def _container_of(model_paths: dict, path: str) -> Optional[str]:
    """The path of the nearest SeqToANNContainer holding ``path``, if any."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        p = ".".join(parts[:i])
        if _is_seq2ann(model_paths[p]):
            return p
    return None


def _follow(rec: _Recorder, mods: dict, cons: dict, path: str):
    """(chain, reason): the chain from the conv/linear at ``path`` to its neuron, or why none."""
    m = mods[path]
    kind = _kind(m)
    bn_kind = "bn2d" if kind == "conv" else "bn1d"
    if rec.calls[path] != 1:
        return None, f"called {rec.calls[path]} times in one forward (a shared module)"
    node = rec.nodes[rec.module_node[path]]
    if len(node.outs) != 1:
        return None, "returns no single tensor"
    cur = node.outs[0]
    ch = _Chain(conv=path)
    ops: list[_Node] = []
    add = None
    while True:
        users = cons.get(cur, [])
        where = "its output" if cur == node.outs[0] else "the value on its way to a neuron"
        if not users:
            return None, f"{where} reaches no spiking neuron (it is the model's output)"
        if len(users) > 1:
            return None, (f"{where} is used {len(users)} times; only a single conv/linear -> [BN] "
                          "-> [+ residual] -> neuron chain fuses")
        c = rec.nodes[users[0]]
        if c.kind == "module":
            cm = mods[c.name]
            ck = _kind(cm)
            if ck == bn_kind and ch.bn is None and add is None and len(c.outs) == 1:
                if rec.calls[c.name] != 1:
                    return None, f"its BatchNorm {c.name} is called {rec.calls[c.name]} times"
                if cm.num_features != (m.out_channels if kind == "conv" else m.out_features):
                    return None, f"BatchNorm {c.name} has {cm.num_features} features"
                ch.bn = c.name
                cur = c.outs[0]
                continue
            if _is_neuron(cm):
                why = _neuron_problem(cm)
                if why:
                    return None, f"its neuron {c.name} is not converted: {why}"
                if rec.calls[c.name] != 1:
                    return None, f"its neuron {c.name} is called {rec.calls[c.name]} times"
                rank = rec.shapes[cur]
                want = 5 if kind == "conv" else 3
                if len(rank) != want:
                    return None, (f"its neuron {c.name} gets shape {rank}; binslt layers need "
                                  + ("[T, N, C, H, W]" if want == 5 else "[T, N, F]"))
                ch.neuron = c.name
                break
            return None, (f"{where} goes to {type(cm).__name__} ({c.name}), not to a BatchNorm "
                          "or a spiking neuron")
        if c.name in _RESHAPES and add is None and len(c.ins) == 1 and c.ins[0] == cur:
            ops.append(c)
            cur = c.outs[0]
            continue
        if c.name in _ADDS and add is None and len(c.ins) == 2 and not c.kwargs \
                and cur in c.ins and c.ins[0] != c.ins[1]:
            other = c.ins[1] if c.ins[0] == cur else c.ins[0]
            if rec.shapes[other] != rec.shapes[c.outs[0]] or rec.shapes[cur] != \
                    rec.shapes[c.outs[0]]:
                return None, "its residual add broadcasts (shapes differ)"
            add = c
            ch.residual = True
            ch.add_first = c.ins[0] == cur
            cur = c.outs[0]
            continue
        return None, f"{where} goes to the operation {c.name!r}"
    # direct replacement: no residual, and any reshape is the SeqToANNContainer idiom's own
    unit_of = {p: (_container_of(mods, p) or p) for p in (ch.conv, ch.bn, ch.neuron) if p}
    units = list(dict.fromkeys(unit_of.values()))
    ok = not ch.residual
    members = {p for p in unit_of}
    for u in units:
        if u not in members:  # a container: all its modules must be part of the chain
            inner = {f"{u}.{n}" for n, _ in mods[u].named_children()}
            ok = ok and inner <= members
    containers = {u for u in units if u not in members}
    ok = ok and all(o.scope in containers for o in ops)
    first_in = rec.io.get(units[0], ([], []))[0]
    want = 5 if kind == "conv" else 3
    ok = ok and len(first_in) == 1 and len(rec.shapes[first_in[0]]) == want
    ch.staged = not ok
    ch.units = units
    return ch, ""


# ---------------------------------------------------------------------------------------------
# The fall-back without an example run: consecutive children of each nn.Sequential
# ---------------------------------------------------------------------------------------------


@dataclass
class _Elem:
    """One module of a Sequential's stream; ``owner`` is its child path in the Sequential,
    ``inner`` whether it sits inside a SeqToANNContainer."""

    module: nn.Module
    owner: str
    inner: bool
    path: str


def _stream(seq: nn.Sequential, prefix: str) -> list[_Elem]:
    out = []
    for name, child in seq.named_children():
        p = f"{prefix}.{name}" if prefix else name
        if _is_seq2ann(child):
            for sub_name, sub in child.named_children():
                out.append(_Elem(sub, p, True, f"{p}.{sub_name}"))
        else:
            out.append(_Elem(child, p, False, p))
    return out


def _mode_problem(e: _Elem) -> str:
    """The multi-step convention: inside a SeqToANNContainer a module sees [T*N, ...] (single
    step); outside, SpikingJelly layers must be in step mode 'm'."""
    sm = _step_mode(e.module)
    if e.inner and sm == "m":
        return "step mode 'm' inside a SeqToANNContainer"
    if not e.inner and sm is not None and sm != "m":
        return (f"step mode {sm!r}: the model is stepped over T by the caller (stateful use); "
                "set step mode 'm' (functional.set_step_mode(model, 'm'))")
    return ""


def _match(stream: list[_Elem], i: int):
    """(chain or None, reason, neuron_follows) for a conv/linear [+BN] + neuron run at
    stream[i]. ``neuron_follows``: False when the reason is only that no neuron follows."""
    first = stream[i]
    kind = _kind(first.module)
    bn_kind = "bn2d" if kind == "conv" else "bn1d"
    run = [first]
    j = i + 1
    if j < len(stream) and _kind(stream[j].module) == bn_kind:
        run.append(stream[j])
        j += 1
    if j >= len(stream) or not _is_neuron(stream[j].module):
        nxt = "the end of its Sequential" if j >= len(stream) else type(stream[j].module).__name__
        return None, f"not followed by a LIFNode or IFNode (next: {nxt})", False
    run.append(stream[j])
    owners = list(dict.fromkeys(e.owner for e in run))
    for e in stream:  # a SeqToANNContainer is replaced entirely or not at all
        if e.owner in owners and e not in run:
            return None, (f"shares a SeqToANNContainer with {type(e.module).__name__} "
                          f"({e.path}), which is not part of the pattern"), True
    for e in run[:-1]:
        why = _mode_problem(e)
        if why:
            return None, f"{e.path}: {why}", True
    why = _layer_problem(first.module)
    if why:
        return None, why, True
    why = _neuron_problem(run[-1].module)
    if why:
        return None, f"its neuron {run[-1].path}: {why}", True
    if len(run) == 3:
        bn = run[1].module
        c = first.module.out_channels if kind == "conv" else first.module.out_features
        if bn.num_features != c:
            return None, f"BatchNorm has {bn.num_features} features, the layer {c} outputs", True
    ch = _Chain(conv=first.path, bn=run[1].path if len(run) == 3 else None, neuron=run[-1].path,
                units=owners)
    return ch, "", True


def _sequential_chains(model: nn.Module, keep: set, inputs: _Val):
    """Chains (their input kinds set) and no-neuron layers found in nn.Sequentials (module
    order); ``inputs``: the kind of the model's inputs (the model's own Sequential takes them)."""
    chains, plain, seen = [], [], set()
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or _is_seq2ann(seq):
            continue
        stream = _stream(seq, seq_name)
        i = 0
        while i < len(stream):
            e = stream[i]
            if _kind(e.module) in ("conv", "linear") and e.path not in seen:
                seen.add(e.path)
                if e.path in keep:
                    i += 1
                    continue
                ch, why, follows = _match(stream, i)
                if ch is not None:
                    ch.kind = _stream_kind(stream, i, inputs if seq is model else _REAL)
                    chains.append(ch)
                    seen.update(p for p in (ch.bn, ch.neuron) if p)
                    i += 1 + (ch.bn is not None) + 1
                    continue
                plain.append((e.path, why))
            i += 1
    return chains, plain, seen


def _stream_kind(stream: list[_Elem], i: int, inputs: _Val) -> _Val:
    """The kind of stream[i]'s input from the modules before it in its Sequential; ``inputs``:
    the kind of what the Sequential itself takes."""
    def back(j):
        while j >= 0 and _passes(stream[j].module):
            j -= 1
        return j

    j = back(i - 1)
    if j < 0:
        return inputs
    m = stream[j].module
    if _spiking(m):
        return _SPIKE
    if _dropout_p(m) is not None:
        k = back(j - 1)
        if k >= 0 and _spiking(stream[k].module):
            return _Val(InputKind.DROPOUT, stream[j].path)
    return _REAL


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
        p, _ = _pair_square(lin.padding, "padding")
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
        p, _ = _pair_square(lin.padding, "padding")
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


def _bn_taking(rec: Optional[_Recorder], mods: dict, cons: dict, path: str):
    """The BN (matching kind, called once) that takes the whole output of the conv at ``path``,
    or None."""
    if rec is None or rec.calls[path] != 1:
        return None
    outs = rec.nodes[rec.module_node[path]].outs
    users = cons.get(outs[0], []) if len(outs) == 1 else []
    if len(users) != 1 or rec.nodes[users[0]].kind != "module":
        return None
    c = rec.nodes[users[0]]
    want = "bn2d" if _kind(mods[path]) == "conv" else "bn1d"
    return mods[c.name] if _kind(mods[c.name]) == want and rec.calls[c.name] == 1 else None


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


def _held_state(model: nn.Module) -> dict:
    """path -> the state a SpikingJelly module holds from an earlier run (a neuron's ``v`` that
    is a tensor, a dropout's mask): memories that differ from their reset values."""
    from spikingjelly.activation_based import base

    held = {}
    for path, m in model.named_modules():
        if not isinstance(m, base.MemoryModule):
            continue
        for name, cur in m._memories.items():
            rv = m._memories_rv.get(name)
            if isinstance(cur, torch.Tensor) or isinstance(rv, torch.Tensor):
                same = (isinstance(cur, torch.Tensor) and isinstance(rv, torch.Tensor)
                        and cur.shape == rv.shape and bool(torch.equal(cur.cpu(), rv.cpu())))
            else:
                try:
                    same = bool(cur == rv)
                except Exception:  # noqa: BLE001 -- e.g. lists of tensors: not the reset value
                    same = False
            if not same:
                held[path or type(m).__name__] = name
                break
    return held


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy; state tensors that autograd produced (a neuron's ``v`` after a training
    call), which deepcopy refuses, are copied detached."""
    memo = {}
    for m in model.modules():
        for t in getattr(m, "_memories", {}).values():
            if isinstance(t, torch.Tensor) and not t.is_leaf:
                memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)


def _run_failure(exc: BaseException, example_input, training: bool) -> str:
    """One line: the example run failed, why, and the fix."""
    msg = (str(exc).strip().splitlines() or [""])[0]
    shapes = [tuple(t.shape) for t in _tensors(example_input)]
    mode = " in training mode" if training else ""
    head = (f"convert: the example run{mode} failed ({type(exc).__name__}: {msg}) on "
            f"example_input of shape {shapes[0] if len(shapes) == 1 else shapes}")
    if len(shapes) == 1 and len(shapes[0]) in (2, 4):
        fix = ("example_input must be multi-step [T, N, ...] ([T, N, C, H, W] for images; "
               "SpikingJelly models in step mode 'm'): add the T axis, e.g. "
               "x.unsqueeze(0).repeat(T, 1, 1, 1, 1)")
    elif training:
        fix = "the model must also run in training mode (model.train())"
    else:
        fix = "give an input that model(example_input) runs on"
    return f"{head}; {fix} (strict=False converts without the run, as far as it can)"


def _decide_kinds(chains: list, rec: Optional[_Recorder], rec_train: Optional[_Recorder],
                  mods: dict, cons: dict, inputs: _Val, strict: bool,
                  report: ConversionReport) -> dict:
    """Sets each chain's input kind and the new layer's ``input``; returns the dropouts to
    replace by ``SpikeDropout`` (dropout path -> conv paths taking its output).

    With recorded runs the kind comes from the graph of each run (joined) and must agree with
    the values the conv saw in both runs; a disagreement stops ``convert`` (``strict``) or makes
    the layer real-input with a note. Dropout spikes keep the packed spike path only where the
    dropout's output goes to converted spiking layers alone (else: real input)."""
    fused = {ch.conv for ch in chains}
    if rec is not None:
        runs = [r for r in (rec, rec_train) if r is not None]
        value_kinds = [_value_kinds(r, mods, inputs) for r in runs]
        for ch in chains:
            v = _input_of(runs[0], value_kinds[0], ch.conv)
            for r, k in zip(runs[1:], value_kinds[1:]):
                v = v.join(_input_of(r, k, ch.conv))
            p = _dropout_p(mods[v.dropout]) if v.dropout else None
            bad = [("training" if r is rec_train else "eval") for r in runs
                   if not _fits(v, r.levels.get(ch.conv), p)]
            if bad:
                seen = runs[0].levels.get(ch.conv) if "eval" in bad else rec_train.levels.get(
                    ch.conv)
                what = (f"values {sorted(seen)}" if seen is not None
                        else f"more than {_MAX_LEVELS} distinct values")
                msg = (f"the graph says {ch.conv}'s input holds {v.kind.value} values, but the "
                       f"example run in {' and '.join(bad)} mode gave it {what}")
                if strict:
                    raise ValueError(f"convert: {msg}; keep it dense (keep_dense=["
                                     f"{ch.conv!r}]) or pass strict=False to run it as a "
                                     "real-input layer")
                report.notes.append(f"{msg}: converted as a real-input layer")
                v = _REAL
            ch.kind = v
    plan: dict = {}
    for ch in chains:
        v = ch.kind
        if v.kind is not InputKind.DROPOUT:
            continue
        if v.dropout not in plan:
            p = _dropout_p(mods[v.dropout])
            takers = ([ch.conv] if rec is None else
                      _dropout_takers(rec, mods, cons, v.dropout))
            ok = p is not None and p < 1 and takers is not None and set(takers) <= fused
            plan[v.dropout] = takers if ok else None
            if not ok:
                report.notes.append(
                    f"dropout {v.dropout}: its output goes elsewhere too, not only to "
                    "converted spiking layers; the layers after it take real input")
    for ch in chains:
        v = ch.kind
        spike = v.kind is InputKind.SPIKE or (
            v.kind is InputKind.DROPOUT and plan.get(v.dropout) is not None)
        ch.layer_input = "spike" if spike else "real"
    return {d: t for d, t in plan.items() if t is not None}


def _freeze(model: nn.Module, train_bn: bool, report: ConversionReport) -> list:
    """Search mode trains the scores only: every other parameter that requires grad is frozen,
    except the affine parameters of BatchNorms with ``train_bn`` (``BiasShift`` stays frozen).
    Returns the names frozen."""
    frozen = []
    bn_params = {id(p) for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, BiasShift)
                 for p in m.parameters(recurse=False)}
    scores = {id(m.scores) for m in model.modules() if isinstance(m, _MaskedSignWeight)}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in scores or (train_bn and id(p) in bn_params):
            continue
        p.requires_grad_(False)
        frozen.append(name)
    n_bn = sum(1 for _, p in model.named_parameters() if id(p) in bn_params)
    report.trainable = "scores" + (f" and BatchNorm affine ({n_bn} tensors; train_bn=True)"
                                   if train_bn and n_bn else
                                   " (BatchNorm affine frozen; train_bn=True trains it)"
                                   if n_bn else "")
    report.frozen = frozen
    return frozen


def convert(model: nn.Module, prune_rate: float = 0.5, *, example_input=None,
            keep_dense=(), inplace: bool = False, backend: str = "auto",
            per_channel_gain: bool = False, strict: bool = True, train_bn: bool = False,
            spike_input: bool = False) -> tuple[nn.Module, ConversionReport]:
    """Replace the conv/linear [+BN] [+residual] + spiking-neuron chains of a SpikingJelly model
    with BinW-SLT search layers, and the other convs/linears with masked sign layers.

    Args:
        model: a SpikingJelly model in step mode 'm' (inputs [T, N, ...]), reset
            (``functional.reset_net``).
        prune_rate: fraction of weights the mask removes, in [0, 1).
        example_input: input (or tuple of inputs) [T, N, ...] for two recorded no-grad runs, in
            eval and in training mode, that tell the graph (see the module docstring). Without
            it only runs inside ``nn.Sequential`` s are found.
        keep_dense: paths (``model.named_modules()`` names) of convs/linears to keep dense; a
            neuron after one stays too.
        inplace: modify ``model`` itself; by default a deep copy is converted.
        backend: ``backend`` of the new layers.
        per_channel_gain: per-output-channel alpha instead of one scalar per layer.
        strict: a failed example run, a model holding state from an earlier run, or an input
            whose values contradict its graph kind raise a ValueError (one line with the fix);
            ``strict=False`` converts as far as it can and says so in the report.
        train_bn: search mode trains the scores only; with ``train_bn`` the BatchNorms' affine
            parameters too. Every other parameter is frozen (``report.frozen``).
        spike_input: the model's inputs are binary spikes (event data): the layers that take
            them keep the packed spike path (the example runs check the values).

    Returns:
        (model, report): the converted model (search mode) and a ``ConversionReport``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    prune_rate = C.check_prune_rate(prune_rate)
    C.check_backend(backend)
    if isinstance(keep_dense, str):
        keep_dense = [keep_dense]
    keep = set(keep_dense)
    mods = dict(model.named_modules())
    unknown = sorted(p for p in keep if p not in mods or _kind(mods[p]) not in ("conv", "linear"))
    if unknown:
        raise ValueError(f"keep_dense names {unknown}, which are not conv/linear modules of the "
                         "model (give paths as in model.named_modules())")
    held = _held_state(model)
    if held and strict:
        first = ", ".join(f"{p} ({n})" for p, n in list(held.items())[:3])
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        raise ExampleRunError(
            f"convert: {len(held)} SpikingJelly module(s) hold state from an earlier run: "
            f"{first}{more}; call spikingjelly.activation_based.functional.reset_net(model) "
            "first (strict=False converts without those neurons)")
    # stateful neurons are judged on the user's model, before the example run resets them
    state_problem = {p: _neuron_problem(m) for p, m in mods.items() if _is_neuron(m)}
    if not inplace:
        model = _copy(model)
        mods = dict(model.named_modules())
    report = ConversionReport()
    inputs = _SPIKE if spike_input else _REAL
    rec = rec_train = None
    if example_input is not None:
        if spike_input and not all(_fits(_SPIKE, _levels(t), None)
                                   for t in _tensors(example_input)):
            msg = "spike_input=True, but example_input holds values other than 0 and 1"
            if strict:
                raise ValueError(f"convert: {msg}; drop spike_input for real-valued inputs")
            report.notes.append(f"{msg}: the model's inputs are taken as real")
            inputs = _REAL
        try:
            rec = _record(model, example_input)
        except Exception as exc:  # noqa: BLE001 -- the user's forward: one line, or fall back
            if strict:
                raise ExampleRunError(_run_failure(exc, example_input, False)) from None
            msg = (str(exc).strip().splitlines() or [""])[0]
            report.method = f"sequential (the example run failed: {type(exc).__name__}: {msg})"
        if rec is not None:
            try:
                rec_train = _record(model, example_input, training=True)
            except Exception as exc:  # noqa: BLE001
                if strict:
                    raise ExampleRunError(_run_failure(exc, example_input, True)) from None
                report.notes.append(f"the example run in training mode failed "
                                    f"({type(exc).__name__}); kinds from the eval run only")
    else:
        report.method = "sequential (no example_input: only nn.Sequential runs are found)"

    plain: list[tuple[str, str]] = []
    chains: list[_Chain] = []
    cons: dict = {}
    if rec is not None:
        cons = rec.consumers()
        by_neuron: dict[str, list[_Chain]] = {}
        for path, m in mods.items():
            if _kind(m) not in ("conv", "linear") or path in keep:
                continue
            if rec.calls[path] == 0:
                report.skipped.append(dict(path=path, type=type(m).__name__, reason=(
                    "not called by the model's forward on example_input; left as it is")))
                continue
            why = _layer_problem(m)
            if why:
                report.skipped.append(dict(path=path, type=type(m).__name__, reason=why))
                continue
            ch, why = _follow(rec, mods, cons, path)
            if ch is not None and state_problem.get(ch.neuron):
                ch, why = None, f"its neuron {ch.neuron} is not converted: " \
                                f"{state_problem[ch.neuron]}"
            if ch is None:
                plain.append((path, why))
            else:
                by_neuron.setdefault(ch.neuron, []).append(ch)
        for npath, group in by_neuron.items():
            group.sort(key=lambda c: not c.add_first)
            chains.append(group[0])
            for other in group[1:]:
                plain.append((other.conv, f"its residual add also takes {group[0].conv}, which "
                                          f"fires {npath}"))
        chains.sort(key=lambda c: list(mods).index(c.conv))
        plain.sort(key=lambda pw: list(mods).index(pw[0]))
        seen_sequential = None
    else:
        chains, plain, seen_sequential = _sequential_chains(model, keep, inputs)
        kept = []
        for p, why in plain:
            if _layer_problem(mods[p]):
                report.skipped.append(dict(path=p, type=type(mods[p]).__name__, reason=why))
            else:
                kept.append((p, why))
        plain = kept
    dropouts = _decide_kinds(chains, rec, rec_train, mods, cons, inputs, strict, report)

    records: list[dict] = []
    taken: set = set()
    new_of: dict = {}
    for ch in chains:
        new, how = _spiking_layer(ch, mods, prune_rate, backend, per_channel_gain)
        new_of[ch.conv] = new
        rec_entry = dict(kind="spiking", conv=ch.conv, bn=ch.bn, neuron=ch.neuron,
                         staged=ch.staged, units=list(ch.units),
                         protos={p: _proto(mods[p]) for p in (ch.conv, ch.bn, ch.neuron) if p},
                         unit_protos={u: _proto(mods[u]) for u in ch.units
                                      if u not in (ch.conv, ch.bn, ch.neuron)})
        if ch.staged:
            slot = _Slot()
            lin = mods[ch.conv]
            if _kind(lin) == "conv":
                tap = InputTap(slot, "conv", lin.out_channels, new.kernel_size, new.stride,
                               new.padding)
            else:
                tap = InputTap(slot, "linear", lin.out_features)
            _set(model, ch.conv, tap)
            if ch.bn:
                _set(model, ch.bn, nn.Identity())
            _set(model, ch.neuron, SpikeStage(new, slot, ch.residual))
            rec_entry["layer"] = f"{ch.neuron}.layer"
        else:
            _set(model, ch.units[0], new)
            for u in ch.units[1:]:
                _set(model, u, nn.Identity())
            rec_entry["layer"] = ch.units[0]
        records.append(rec_entry)
        taken.update(p for p in (ch.conv, ch.bn, ch.neuron) if p)
        settings = _neuron_settings(mods[ch.neuron])
        report.converted.append(dict(
            paths=[p for p in (ch.conv, ch.bn, ch.neuron) if p], new=type(new).__name__,
            input=ch.kind.kind.value, layer_input=ch.layer_input, dropout=ch.kind.dropout,
            bn=ch.bn is not None, bias=how or None, residual=ch.residual, staged=ch.staged,
            **settings))
    for dpath, takers in dropouts.items():
        _set(model, dpath, SpikeDropout(mods[dpath], [new_of[t] for t in takers]))
        records.append(dict(kind="dropout", path=dpath))
        report.notes.append(f"dropout {dpath} -> SpikeDropout: its mask applies to the spikes "
                            f"and 1/(1-p) to the gain of {', '.join(takers)}")
    for path, why in plain:
        bn_after = _bn_taking(rec, mods, cons, path)
        if bn_after is not None and any(r.get("bn") and mods[r["bn"]] is bn_after
                                        for r in records):
            bn_after = None
        new, how = _plain_layer(path, mods, prune_rate, per_channel_gain, bn_after)
        records.append(dict(kind="plain", conv=path, layer=path, protos={path: _proto(mods[path])},
                            bias_in_bn=how == "bn running mean"))
        _set(model, path, new)
        taken.add(path)
        report.converted.append(dict(paths=[path], new=type(new).__name__ if not isinstance(
            new, nn.Sequential) else "BinLinear", input=None, bn=False, bias=how or None,
            neuron=None, note=f"no neuron fused: {why}"))

    # everything else: the convs/linears and neurons left as they are
    reported = {s["path"] for s in report.skipped}
    for path, m in mods.items():
        k = _kind(m)
        if path in taken or path in reported or k not in ("conv", "linear", "lif", "if", "node"):
            continue
        if path in keep:
            reason = "kept dense (keep_dense)"
        elif k in ("conv", "linear"):
            reason = ("not inside an nn.Sequential: its execution order is unknown without an "
                      "example_input (give one to convert it)")
        else:
            why = state_problem.get(path) or ""
            if rec is not None:
                reason = why or "not reached by a convertible conv/linear [+BN] [+residual]"
            elif seen_sequential is not None and path in seen_sequential:
                reason = why or "its conv/linear was not converted"
            else:
                reason = (f"{type(m).__name__} not preceded by a convertible conv/linear [+BN] "
                          "in an nn.Sequential" + (f"; also: {why}" if why else ""))
        report.skipped.append(dict(path=path, type=type(m).__name__, reason=reason))
    frozen = _freeze(model, train_bn, report)
    model.__dict__["_binslt_conversion"] = records
    model.__dict__["_binslt_frozen"] = frozen
    name_layers(model)  # their errors carry the path (BinSpikeConv2d features.3: ...)
    return model, report


# ---------------------------------------------------------------------------------------------
# Back to SpikingJelly
# ---------------------------------------------------------------------------------------------


def _rebuilt(proto: nn.Module, device, dtype) -> nn.Module:
    m = copy.deepcopy(proto).to_empty(device=device)
    if dtype is not None:
        m = m.to(dtype=dtype)
    return m


@torch.no_grad()
def to_spikingjelly(model: nn.Module) -> nn.Module:
    """The converted model's current ticket as a plain SpikingJelly model.

    Each converted conv / linear is put back (its original type and settings) carrying
    ``alpha * sign(w) * M`` (the layer's effective weight, in whichever mode it is), its BN and
    neuron are put back with the binslt layer's BN state, and ``InputTap`` / ``SpikeStage`` /
    ``nn.Identity`` placeholders give way to the original modules. Folded biases come back as a
    zero conv bias with the BN's running mean shifted (where a BN follows) or as the bias
    itself. The model is a copy; its forward is the user's.
    """
    records = model.__dict__.get("_binslt_conversion")
    if records is None:
        raise ValueError("to_spikingjelly expects a model returned by binslt.convert (this one "
                         "carries no conversion record)")
    out = copy.deepcopy(model)
    for r in records:
        if r["kind"] == "dropout":  # the user's dropout, with the settings it had
            _set(out, r["path"], _get(out, r["path"]).dropout)
            continue
        layer = _get(out, r["layer"])
        mlayer = layer[0] if isinstance(layer, nn.Sequential) else layer
        w = mlayer.effective_weight().detach()
        dev, dt = w.device, w.dtype
        conv = _rebuilt(r["protos"][r["conv"]], dev, dt)
        conv.weight.copy_(w.view(conv.weight.shape))
        bias = None
        if isinstance(layer, nn.Sequential):
            bias = layer[1].bias
        elif isinstance(getattr(mlayer, "bn", None), BiasShift):
            bias = mlayer.bn.bias
        if conv.bias is not None:
            conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))
        if r["kind"] == "plain":
            if isinstance(mlayer, BinConv2d) and mlayer.bn is not None and not isinstance(
                    mlayer.bn, BiasShift):
                raise ValueError(f"{r['layer']}: a BinConv2d with its own BN has no "
                                 "SpikingJelly counterpart in this model")
            _set(out, r["conv"], conv)
            continue
        bn = None
        if r["bn"]:
            bn = _rebuilt(r["protos"][r["bn"]], dev, dt)
            bn.load_state_dict(mlayer.bn.state_dict())
            bn.train(mlayer.bn.training)
        nrn = copy.deepcopy(r["protos"][r["neuron"]])  # no tensors: settings only
        if hasattr(nrn, "reset"):
            nrn.reset()
        conv.train(mlayer.training)
        nrn.train(mlayer.training)
        if r["staged"]:
            _set(out, r["conv"], conv)
            if bn is not None:
                _set(out, r["bn"], bn)
            _set(out, r["neuron"], nrn)
            continue
        # direct: the units (conv/BN/neuron or their SeqToANNContainers) come back in place
        for u in r["units"]:
            if u in r["unit_protos"]:
                cont = _rebuilt(r["unit_protos"][u], dev, dt)
                _set(out, u, cont)
        for p, m in ((r["conv"], conv), (r["bn"], bn), (r["neuron"], nrn)):
            if p:
                _set(out, p, m)
    params = dict(out.named_parameters())
    for name in out.__dict__.pop("_binslt_frozen", []):  # what convert froze trains again
        if name in params:
            params[name].requires_grad_(True)
    out.__dict__.pop("_binslt_conversion", None)
    return out


# ---------------------------------------------------------------------------------------------
# A user's SpikingJelly model as the network of a binslt run (``binslt search --model``)
# ---------------------------------------------------------------------------------------------


class FactoryError(ValueError):
    """A ``--model FILE.py:FACTORY`` that does not give a usable model; the message is one line
    naming the file."""


def load_factory(spec: str):
    """``(path, name, callable)`` for ``'path/to/file.py:factory'``. The file is imported as a
    module (its code runs: it is the user's own model definition, named on the command line)."""
    import importlib.util
    from pathlib import Path

    if not isinstance(spec, str) or ":" not in spec:
        raise FactoryError(f"--model must be FILE.py:FACTORY (a Python file and the function in "
                           f"it that returns the SpikingJelly model), got {spec!r}")
    file, name = spec.rsplit(":", 1)
    path = Path(file).expanduser()
    if not name.isidentifier():
        raise FactoryError(f"--model {spec!r}: {name!r} is not a Python name")
    if not path.is_file():
        raise FactoryError(f"--model: no such file {str(path)!r}")
    mod_name = f"_binslt_user_model_{abs(hash(str(path.resolve())))}"
    try:
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        if mspec is None or mspec.loader is None:
            raise ImportError("not an importable Python file")
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 -- any failure of the user's file, in one line
        msg = str(exc).strip().splitlines()
        raise FactoryError(f"--model: {str(path)!r} fails to import ({type(exc).__name__}: "
                           f"{msg[0] if msg else ''})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise FactoryError(f"--model: {str(path)!r} has no function {name!r}")
    return path, name, fn


class SpikingJellyRun(nn.Module):
    """A converted SpikingJelly model as a run's network: images ``[N, C, H, W]`` are repeated
    over T (direct encoding), the model runs on ``[T, N, C, H, W]`` from a reset state, and
    ``[T, N, K]`` outputs are averaged over T (``[N, K]`` outputs are taken as they are)."""

    def __init__(self, net: nn.Module, timesteps: int, build_config: dict,
                 report: ConversionReport):
        super().__init__()
        self.net = net
        self.timesteps = int(timesteps)
        self.build_config = build_config
        self.conversion_report = report
        c, h, w = build_config["input_shape"]
        self.in_channels, self.input_hw = c, (h, w)

    def extra_repr(self) -> str:
        return (f"factory={self.build_config['factory']}, input={self.in_channels}x"
                f"{self.input_hw[0]}x{self.input_hw[1]}, timesteps={self.timesteps}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from spikingjelly.activation_based import functional

        want = (self.in_channels, *self.input_hw)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected images [N, {want[0]}, {want[1]}, {want[2]}] (the model "
                             f"was converted for --input-shape {','.join(map(str, want))}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        if x.dim() == 4:
            x = x.unsqueeze(0).repeat(self.timesteps, 1, 1, 1, 1)
        functional.reset_net(self.net)
        y = self.net(x)
        return y.mean(0) if y.dim() == 3 else y


def _parse_shape(shape) -> tuple[int, int, int]:
    if isinstance(shape, str):
        parts = shape.split(",")
    else:
        parts = list(shape)
    try:
        c, h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise FactoryError(f"--input-shape must be C,H,W (three positive ints), got "
                           f"{shape!r}") from None
    if min(c, h, w) < 1:
        raise FactoryError(f"--input-shape must be C,H,W (three positive ints), got {shape!r}")
    return c, h, w


def build_user_model(factory: str, *, num_classes: int, input_shape, timesteps: int,
                     prune_rate: float, backend: str = "auto", keep_dense=(),
                     **_ignored) -> SpikingJellyRun:
    """The network of a ``--model`` run: ``factory`` (``'FILE.py:NAME'``) is called (with
    ``num_classes=`` when it takes it), the SpikingJelly model is set to step mode 'm' and
    converted with one example run of ``[T, 2, C, H, W]`` random images. Its ``build_config``
    records the factory and the settings (JSON), from which this function rebuilds it."""
    from spikingjelly.activation_based import functional

    path, name, fn = load_factory(factory)
    c, h, w = _parse_shape(input_shape)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        net = fn(num_classes=num_classes) if "num_classes" in params else fn()
    except Exception as exc:  # noqa: BLE001 -- the user's factory, in one line
        msg = str(exc).strip().splitlines()
        raise FactoryError(f"--model: {name}() in {str(path)!r} fails ({type(exc).__name__}: "
                           f"{msg[0] if msg else ''})") from None
    if not isinstance(net, nn.Module):
        raise FactoryError(f"--model: {name}() in {str(path)!r} returned a "
                           f"{type(net).__name__}, not a SpikingJelly model (an nn.Module)")
    functional.set_step_mode(net, "m")
    g = torch.Generator().manual_seed(0)
    example = torch.rand(timesteps, 2, c, h, w, generator=g)
    try:
        conv, report = convert(net, prune_rate=prune_rate, example_input=example,
                               keep_dense=keep_dense, backend=backend)
    except ExampleRunError as exc:
        why = str(exc).removeprefix("convert: ").split("; ")[0]
        raise FactoryError(f"--model: the model of {str(path)!r} does not run on "
                           f"[T={timesteps}, N=2, {c}, {h}, {w}] inputs ({why}); check "
                           "--input-shape") from None
    except (ValueError, TypeError) as exc:
        raise FactoryError(f"--model: {str(path)!r}: {exc}") from None
    if report.method != "recorded run":
        raise FactoryError(f"--model: the model of {str(path)!r} does not run on "
                           f"[T={timesteps}, N=2, {c}, {h}, {w}] inputs ({report.method}); check "
                           "--input-shape")
    config = dict(arch="custom", variant="binwslt", factory=f"{path.resolve()}:{name}",
                  num_classes=int(num_classes),
                  input_shape=[c, h, w], in_channels=c, input_size=h, timesteps=int(timesteps),
                  prune_rate=float(prune_rate), backend=backend, keep_dense=list(keep_dense))
    model = SpikingJellyRun(conv, timesteps, config, report)
    with torch.no_grad():
        y = model.eval()(example[0])
    model.train()
    if tuple(y.shape) != (2, num_classes):
        raise FactoryError(f"--model: the model of {str(path)!r} gives outputs of shape "
                           f"{tuple(y.shape)} for 2 images; a run needs [T, N, {num_classes}] or "
                           f"[N, {num_classes}] logits ({num_classes} classes)")
    return model
