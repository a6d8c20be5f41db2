"""The paper's networks (Conv-4, VGG-9, VGG-11, ResNet-19) in four variants.

Each architecture is ONE description, a list of layer specs (``SPECS``), interpreted by a builder
per variant (docs/design.md section 4):

* ``ann``: dense ``nn.Conv2d`` + BatchNorm + ReLU, max pooling, fully connected layers;
* ``snn``: dense weights with multi-step LIF neurons (``binslt.nn.layers.LIF``), surrogate training;
  a spiking conv layer is a dense conv on ``[T*N, ...]`` + BN + LIF;
* ``bnn``: BNN-BinAct. Masked sign weights (``BinConv2d`` / ``BinLinear``, search mode, scores
  trained) with sign activations (``SignActivation``, ApproxSign backward). Layer order
  conv -> [maxpool] -> BN -> sign;
* ``binwslt``: the search. ``BinSpikeConv2d`` / ``BinSpikeLinear`` (the first layer with
  ``input='real'``), ``SpikeMaxPool2d``; the last layer is a ``BinLinear`` whose output, averaged
  over T, gives the logits.

Conventions:

* Spiking variants use direct encoding: the image is repeated over T inside the model. The last
  layer outputs the mean over T of its membrane input (its linear output) as logits.
* ResNet-19 blocks add the shortcut as a residual current before the second neuron (identity
  shortcut: the block's input activations; otherwise a 1x1 conv + BN).
* Convolutions are 3x3 with padding 1 and no bias when BN follows; pools are 2x2 max. A pool whose
  input is already smaller than 2 in height or width is skipped (tiny inputs such as 8x8 digits in
  VGG-11), so no feature map shrinks below 1x1. The classifier (last layer) has no bias in any
  variant (as biprop), so that all four variants share one parameter count.
* ``prune_rate`` is the fraction of weights *removed* (biprop calls the kept fraction
  ``prune_rate``; we do not).
* ``binarize_first_last`` (default True, as biprop) binarises the first and last layers of the
  ``bnn`` / ``binwslt`` variants; with False they are dense ``nn.Conv2d`` / ``nn.Linear`` trained
  normally. Dense variants ignore it.

Parameter counting (``count_parameters``), as the paper's counts are reproduced (docs/design.md):
every conv / linear weight tensor once (for masked sign layers the frozen weight ``w``, not the
scores ``s``, which are a search-time aid of the same size), biases, and 2 per channel for every
BatchNorm (its affine weight and bias; a non-affine BN still applies a per-channel scale and shift
at inference, folded from its running statistics). Running statistics are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from .. import ops
from ..ops import contract as C
from ..ops.schemas import SURROGATES
from .layers import (
    LIF,
    MODES,
    NEURONS,
    BinConv2d,
    BinLinear,
    BinSpikeConv2d,
    BinSpikeLinear,
    SignActivation,
    SpikeMaxPool2d,
    _affine_infer_path,
    _MaskedSignWeight,
    _NoTorchScript,
    _refuse_jit_trace,
    check_if_settings,
    conv_output_numel,
    name_layers,
)

__all__ = [
    "ARCHS",
    "VARIANTS",
    "SPECS",
    "BinSLTNet",
    "build",
    "count_macs",
    "count_parameters",
    "layer_macs",
    "set_backend",
    "set_mode",
]

ARCHS = ("conv4", "vgg9", "vgg11", "resnet19")
VARIANTS = ("ann", "snn", "bnn", "binwslt")
SPIKING_VARIANTS = ("snn", "binwslt")


# ---------------------------------------------------------------------------------------------
# One description per architecture
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv:
    """3x3 conv (pad 1) + BN + activation."""

    out: int
    stride: int = 1


@dataclass(frozen=True)
class Pool:
    """2x2 max pool (skipped when the feature map is already below 2 in height or width)."""


@dataclass(frozen=True)
class Block:
    """Basic residual block: two 3x3 convs; 1x1 conv + BN shortcut where the shape changes."""

    out: int
    stride: int = 1


@dataclass(frozen=True)
class GlobalPool:
    """Global average pool over H, W (flattens to features)."""


@dataclass(frozen=True)
class FC:
    """Hidden fully connected layer + BN + activation (flattens conv features first)."""

    out: int


_CONV4 = [Conv(64), Conv(64), Pool(), Conv(128), Conv(128), Pool()]
_VGG9 = _CONV4 + [Conv(256), Conv(256), Pool()]
_VGG11 = _VGG9 + [Conv(512), Conv(512), Pool()]
_HEAD = [FC(256), FC(256)]

#: Layer specs; the classifier (num_classes outputs) is appended by the builder.
SPECS: dict[str, list] = {
    "conv4": _CONV4 + _HEAD,
    "vgg9": _VGG9 + _HEAD,
    "vgg11": _VGG11 + _HEAD,
    "resnet19": [Conv(64)] + [Block(128, 1)] * 3 + [Block(256, 2)] + [Block(256, 1)] * 2
    + [Block(512, 2), Block(512, 1), GlobalPool(), FC(256)],
}


# ---------------------------------------------------------------------------------------------
# Small modules shared by the builders
# ---------------------------------------------------------------------------------------------


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


class _PerStep(nn.Module):
    """Applies a per-image module (conv, BN) to [T, N, C, ...] by flattening T into N, so BN
    statistics run over T*N*spatial."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x.flatten(0, 1))
        return y.view(*x.shape[:2], *y.shape[1:])


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
        r = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(self.conv1(x), residual=r)


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


# ---------------------------------------------------------------------------------------------
# Builders: one per variant, all reading the same spec list
# ---------------------------------------------------------------------------------------------


class _Builder:
    spiking = False

    def __init__(self, opts: dict, prune_rate: float):
        self.o = opts
        self.prune_rate = prune_rate
        keys = ("v_threshold", "v_reset", "detach_reset", "surrogate", "surrogate_alpha")
        if opts["neuron"] == "lif":
            keys = ("tau", "decay_input") + keys  # IF has no leak settings (NeuronConfig)
        self.neuron = {"neuron": opts["neuron"], **{k: opts[k] for k in keys}}

    def _bn2d(self, c: int) -> nn.Module | None:
        return nn.BatchNorm2d(c, affine=self.o["bn_affine"]) if self.o["bn"] else None

    def _bn1d(self, c: int) -> nn.Module | None:
        return nn.BatchNorm1d(c, affine=self.o["bn_affine"]) if self.o["bn"] else None

    def _dense_first_last(self, first_or_last: bool) -> bool:
        return first_or_last and not self.o["binarize_first_last"]

    def conv(self, cin, cout, stride, *, first, pool, residual_slot=False): ...  # noqa: E704

    def shortcut(self, cin, cout, stride): ...  # noqa: E704

    def fc(self, fin, fout, *, real_input): ...  # noqa: E704

    def head(self, fin, num_classes): ...  # noqa: E704

    def pool(self) -> nn.Module:
        return nn.MaxPool2d(2)

    def block(self, cin: int, cout: int, stride: int) -> nn.Module:
        c1 = self.conv(cin, cout, stride, first=False, pool=False)
        c2 = self.conv(cout, cout, 1, first=False, pool=False, residual_slot=True)
        sc = None if (stride == 1 and cin == cout) else self.shortcut(cin, cout, stride)
        return ResidualBlock(c1, c2, sc)


class _ANNBuilder(_Builder):
    def conv(self, cin, cout, stride, *, first, pool, residual_slot=False):
        c = nn.Conv2d(cin, cout, 3, stride, 1, bias=not self.o["bn"])
        return _ConvBNAct(c, self._bn2d(cout), nn.ReLU(), pool, pool_first=False)

    def shortcut(self, cin, cout, stride):
        c = nn.Conv2d(cin, cout, 1, stride, 0, bias=not self.o["bn"])
        return c if not self.o["bn"] else nn.Sequential(c, self._bn2d(cout))

    def fc(self, fin, fout, *, real_input):
        layers = [nn.Linear(fin, fout, bias=not self.o["bn"])]
        if self.o["bn"]:
            layers.append(self._bn1d(fout))
        return nn.Sequential(*layers, nn.ReLU())

    def head(self, fin, num_classes):
        return nn.Linear(fin, num_classes, bias=False)


class _BNNBuilder(_Builder):
    def _w(self, cin, cout, k, stride, dense):
        if dense:
            return nn.Conv2d(cin, cout, k, stride, k // 2, bias=not self.o["bn"])
        return BinConv2d(cin, cout, k, stride, k // 2, prune_rate=self.prune_rate,
                         per_channel_gain=self.o["per_channel_gain"])

    def conv(self, cin, cout, stride, *, first, pool, residual_slot=False):
        c = self._w(cin, cout, 3, stride, self._dense_first_last(first))
        return _ConvBNAct(c, self._bn2d(cout), SignActivation(), pool, pool_first=True)

    def shortcut(self, cin, cout, stride):
        return BinConv2d(cin, cout, 1, stride, 0, prune_rate=self.prune_rate, bn=self.o["bn"],
                         bn_affine=self.o["bn_affine"], per_channel_gain=self.o["per_channel_gain"])

    def fc(self, fin, fout, *, real_input):
        layers = [BinLinear(fin, fout, prune_rate=self.prune_rate,
                            per_channel_gain=self.o["per_channel_gain"])]
        if self.o["bn"]:
            layers.append(self._bn1d(fout))
        return nn.Sequential(*layers, SignActivation())

    def head(self, fin, num_classes):
        if self._dense_first_last(True):
            return nn.Linear(fin, num_classes, bias=False)
        return BinLinear(fin, num_classes, prune_rate=self.prune_rate,
                         per_channel_gain=self.o["per_channel_gain"])


class _SNNBuilder(_Builder):
    spiking = True

    def _dense_conv(self, cin, cout, stride):
        return SpikingConv(cin, cout, 3, stride, 1, self.o["bn"], self.o["bn_affine"],
                           self.neuron, self.o["backend"])

    def conv(self, cin, cout, stride, *, first, pool, residual_slot=False):
        c = self._dense_conv(cin, cout, stride)
        return nn.Sequential(c, SpikeMaxPool2d(2)) if pool else c

    def pool(self):
        return SpikeMaxPool2d(2)

    def shortcut(self, cin, cout, stride):
        c = nn.Conv2d(cin, cout, 1, stride, 0, bias=not self.o["bn"])
        seq = nn.Sequential(c, self._bn2d(cout)) if self.o["bn"] else c
        return _PerStep(seq)  # applies conv (+BN) over [T*N, ...]

    def fc(self, fin, fout, *, real_input):
        return SpikingLinear(fin, fout, self.o["bn"], self.o["bn_affine"], self.neuron,
                             self.o["backend"])

    def head(self, fin, num_classes):
        return _MeanOverTime(nn.Linear(fin, num_classes, bias=False))


class _BinWSLTBuilder(_SNNBuilder):
    def _bin_kwargs(self) -> dict:
        return dict(prune_rate=self.prune_rate, bn=self.o["bn"], bn_affine=self.o["bn_affine"],
                    backend=self.o["backend"], per_channel_gain=self.o["per_channel_gain"],
                    **self.neuron)

    def conv(self, cin, cout, stride, *, first, pool, residual_slot=False):
        if self._dense_first_last(first):
            c = self._dense_conv(cin, cout, stride)
            return nn.Sequential(c, SpikeMaxPool2d(2)) if pool else c
        c = BinSpikeConv2d(cin, cout, 3, stride, 1, input="real" if first else "spike",
                           pool=2 if pool else 1, **self._bin_kwargs())
        # The pool is fused into the layer (pool=2); the one-child Sequential keeps the
        # state-dict keys (features.<i>.0.*) of the conv + SpikeMaxPool2d pair, so checkpoints
        # and tickets written with the separate pool module load unchanged.
        return nn.Sequential(c) if pool else c

    def shortcut(self, cin, cout, stride):
        return BinConv2d(cin, cout, 1, stride, 0, prune_rate=self.prune_rate, bn=self.o["bn"],
                         bn_affine=self.o["bn_affine"], per_channel_gain=self.o["per_channel_gain"])

    def fc(self, fin, fout, *, real_input):
        return BinSpikeLinear(fin, fout, input="real" if real_input else "spike",
                              **self._bin_kwargs())

    def head(self, fin, num_classes):
        if self._dense_first_last(True):
            return _MeanOverTime(nn.Linear(fin, num_classes, bias=False))
        return _MeanOverTime(BinLinear(fin, num_classes, prune_rate=self.prune_rate,
                                       per_channel_gain=self.o["per_channel_gain"]))


_BUILDERS = {"ann": _ANNBuilder, "snn": _SNNBuilder, "bnn": _BNNBuilder,
             "binwslt": _BinWSLTBuilder}


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class BinSLTNet(_NoTorchScript, nn.Module):
    """images [N, C, H, W] -> logits [N, num_classes].

    Spiking variants repeat the image over ``timesteps`` (direct encoding) and run the layers on
    [T, N, ...]; their classifier averages its output over T. ``build_config`` holds the
    arguments that rebuild the same network: ``build(**model.build_config)``.
    """

    def __init__(self, features: nn.Sequential, classifier: nn.Module, *, spiking: bool,
                 timesteps: int, in_channels: int, input_hw: tuple[int, int],
                 build_config: dict):
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.spiking = spiking
        self.timesteps = timesteps
        self.in_channels = in_channels
        self.input_hw = input_hw
        self.build_config = build_config

    def extra_repr(self) -> str:
        c = self.build_config
        return (f"arch={c['arch']}, variant={c['variant']}, input={self.in_channels}x"
                f"{self.input_hw[0]}x{self.input_hw[1]}, timesteps={self.timesteps}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` of images ``x`` ``[N, C, H, W]``."""
        _refuse_jit_trace(self)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        want = (self.in_channels, *self.input_hw)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected images [N, {want[0]}, {want[1]}, {want[2]}] (the model was "
                             f"built for in_channels={want[0]}, input_size={want[1:]}), got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point images, got {x.dtype}")
        if self.spiking:  # direct encoding
            x = x.unsqueeze(0).expand(self.timesteps, *x.shape)
            if not torch.is_grad_enabled():
                return self.classifier(self._chained_features(x))
        return self.classifier(self.features(x))

    def _chained_features(self, x: torch.Tensor) -> torch.Tensor:
        """``self.features(x)`` without autograd, with packed spikes between consecutive binslt
        spike-input convs: such a conv followed by another emits packed words
        ([T, N, H, W, ceil(C/32)] int32) that the next one consumes, so no float spike tensor is
        written in between. Layers with hooks run as modules (the hooks see float spikes). The
        output has ``x``'s dtype."""
        mods = list(self.features)
        units = [_packable_conv(m, x.device) or _PackedBlock.of(m, x.device) for m in mods]
        h = x
        for i, m in enumerate(mods):
            nxt = units[i + 1] if i + 1 < len(mods) else None
            consumer = nxt is not None and nxt.input == "spike"
            conv = units[i]
            if conv is not None and (h.dtype == torch.int32 or consumer):
                h = conv.forward_packed(h, packed_out=consumer)
            else:
                h = m(h)
        # A packed-input layer's spikes come out as float32 (the words carry no dtype); the
        # features' output follows the input's dtype, as the layers' forward does (exact 0/1).
        return h.to(x.dtype) if h.is_floating_point() and h.dtype != x.dtype else h


class _PackedBlock:
    """A ResidualBlock of binslt spiking convs run with packed spikes: conv1 emits packed words,
    an identity shortcut hands its input to conv2 as a packed residual (added as 0. / 1., the
    spikes it packs), a BinConv2d shortcut runs as the module (on the packed words where its
    bconv_affine_infer path runs, on the unpacked float spikes otherwise); conv2 emits
    packed words when the next layer consumes them. The same spikes as the block's forward."""

    input = "spike"

    def __init__(self, block: ResidualBlock):
        self.block = block

    @classmethod
    def of(cls, m: nn.Module, device: torch.device) -> _PackedBlock | None:
        if not isinstance(m, ResidualBlock) or m._forward_hooks or m._forward_pre_hooks:
            return None
        if _packable_conv(m.conv1, device) is None or _packable_conv(m.conv2, device) is None:
            return None
        if m.conv1.input != "spike" or m.conv2.input != "spike":
            return None
        sc = m.shortcut
        if sc is not None and (not isinstance(sc, BinConv2d) or sc._forward_hooks
                               or sc._forward_pre_hooks):
            return None
        return cls(m)

    def forward_packed(self, x: torch.Tensor, packed_out: bool) -> torch.Tensor:
        b = self.block
        h = b.conv1.forward_packed(x, packed_out=True)
        if b.shortcut is None:
            r = x  # packed words, or float spikes
        else:
            xs = x
            if x.dtype == torch.int32 and not _affine_infer_path(b.shortcut, x.flatten(0, 1)):
                xs = ops.unpack_spikes(x.flatten(0, 1), b.conv1.in_channels).view(
                    x.shape[0], x.shape[1], b.conv1.in_channels, *x.shape[2:4])
                xs = xs.to(b.shortcut.weight.dtype)  # exact 0/1, in the shortcut's dtype
            r = b.shortcut(xs)  # packed words in: BinConv2d's bconv_affine_infer path
        return b.conv2.forward_packed(h, packed_out=packed_out, residual=r)


def _packable_conv(m: nn.Module, device: torch.device) -> BinSpikeConv2d | None:
    """The BinSpikeConv2d behind a features entry (itself, or the one-child Sequential of a
    pooled layer) when it can pass packed spikes: a kernel backend, no hooks. A spike-input one
    takes and gives packed words; a real-input one (the first layer) only gives them."""
    mods = [m]
    if isinstance(m, nn.Sequential) and len(m) == 1:
        mods.append(m[0])
    conv = mods[-1]
    if not isinstance(conv, BinSpikeConv2d):
        return None
    if ops.resolve_backend(conv.backend, device) == "torch":
        return None
    glob = nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks:
        return None
    if any(mm._forward_hooks or mm._forward_pre_hooks for mm in mods):
        return None
    return conv


def _hw(input_size) -> tuple[int, int]:
    if isinstance(input_size, (tuple, list)) and len(input_size) == 2:
        h, w = input_size
    else:
        h = w = input_size
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"input_size must be a positive int or an (H, W) pair of them, got "
                             f"{input_size!r}")
    return int(h), int(w)


def _pos_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


_OPTION_DEFAULTS = dict(
    neuron="lif", tau=None, decay=None, decay_input=False, v_threshold=1.0, v_reset=0.0,
    detach_reset=True,
    surrogate="atan", surrogate_alpha=2.0, bn=True, bn_affine=False, binarize_first_last=True,
    backend="auto", per_channel_gain=False,
)
_PAPER_DECAY = 0.99


def _resolve_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid options are "
                         f"{sorted(_OPTION_DEFAULTS)}")
    o = {**_OPTION_DEFAULTS, **options}
    if o["neuron"] not in NEURONS:
        raise ValueError(f"neuron must be one of {NEURONS}, got {o['neuron']!r}")
    if o["neuron"] == "if":
        # no leak: tau stays None in the build config (JSON has no +inf; NeuronConfig sets it)
        check_if_settings("build", o["tau"], o.pop("decay"), o["decay_input"])
    else:
        if o["tau"] is not None and o["decay"] is not None:
            raise ValueError("give either tau or decay (lambda = 1 - 1/tau), not both")
        if o["tau"] is None and o["decay"] is None:
            o["decay"] = _PAPER_DECAY
        o["tau"] = C.resolve_tau(o["tau"] if o["tau"] is not None else 2.0, o.pop("decay"),
                                 "build")
    if o["surrogate"] not in SURROGATES:
        raise ValueError(f"surrogate must be one of {tuple(SURROGATES)}, got {o['surrogate']!r}")
    C.check_backend(o["backend"])
    if o["v_reset"] is not None:
        o["v_reset"] = float(o["v_reset"])
    for k in ("v_threshold", "surrogate_alpha"):
        o[k] = float(o[k])
    for k in ("decay_input", "detach_reset", "bn", "bn_affine", "binarize_first_last",
              "per_channel_gain"):
        if not isinstance(o[k], bool):
            raise ValueError(f"{k} must be a bool, got {o[k]!r}")
    return o


def build(arch: str, variant: str, *, num_classes: int = 10, in_channels: int = 3,
          input_size: Union[int, tuple[int, int]] = 32, timesteps: int = 4,
          prune_rate: float = 0.5, **neuron_options) -> BinSLTNet:
    """Build one of the paper's networks: images [N, C, H, W] -> logits [N, num_classes].

    Args:
        arch: one of ``ARCHS`` ('conv4', 'vgg9', 'vgg11', 'resnet19').
        variant: one of ``VARIANTS`` ('ann', 'snn', 'bnn', 'binwslt').
        num_classes, in_channels, input_size: data shape (e.g. 10, 3, 32 for CIFAR-10; 10, 1, 8
            for scikit-learn digits); FC sizes follow from them.
        timesteps: T of the spiking variants (ignored by ann / bnn).
        prune_rate: fraction of weights removed by the mask (bnn / binwslt).
        **neuron_options: ``neuron`` ('lif', or 'if': SpikingJelly's IFNode, H = V + X, which
            takes no tau, decay or decay_input=True),
            ``tau`` or ``decay`` (lambda = 1 - 1/tau; default the paper's 0.99),
            ``decay_input`` (False), ``v_threshold`` (1.0), ``v_reset`` (0.0; None = soft reset),
            ``detach_reset`` (True), ``surrogate`` ('atan'), ``surrogate_alpha`` (2.0), ``bn``
            (True: BN before every activation), ``bn_affine`` (False, as biprop),
            ``binarize_first_last`` (True), ``backend`` ('auto') for the binslt layers,
            ``per_channel_gain`` (False).

    Raises:
        ValueError: unknown arch / variant / option, or a bad value.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    num_classes = _pos_int(num_classes, "num_classes")
    in_channels = _pos_int(in_channels, "in_channels")
    timesteps = _pos_int(timesteps, "timesteps")
    h, w = _hw(input_size)
    prune_rate = C.check_prune_rate(prune_rate)
    opts = _resolve_options(neuron_options)

    b = _BUILDERS[variant](opts, prune_rate)
    layers: list[nn.Module] = []
    specs = SPECS[arch]
    c, first, flat = in_channels, True, None
    i = 0
    while i < len(specs):
        spec = specs[i]
        if isinstance(spec, Conv):
            nxt = specs[i + 1] if i + 1 < len(specs) else None
            h, w = (h - 1) // spec.stride + 1, (w - 1) // spec.stride + 1  # k=3, pad=1
            pool = isinstance(nxt, Pool) and h >= 2 and w >= 2
            layers.append(b.conv(c, spec.out, spec.stride, first=first, pool=pool))
            if pool:
                h, w = h // 2, w // 2
            if isinstance(nxt, Pool):
                i += 1  # the pool is absorbed into the conv layer (or skipped)
            c, first = spec.out, False
        elif isinstance(spec, Pool):
            if h >= 2 and w >= 2:
                layers.append(b.pool())
                h, w = h // 2, w // 2
        elif isinstance(spec, Block):
            layers.append(b.block(c, spec.out, spec.stride))
            h, w = (h - 1) // spec.stride + 1, (w - 1) // spec.stride + 1
            c, first = spec.out, False
        elif isinstance(spec, GlobalPool):
            layers.append(_GlobalAvgPool())
            flat, h, w = c, 1, 1
        elif isinstance(spec, FC):
            real_input = False
            if flat is None:
                layers.append(_Flatten())
                flat = c * h * w
            elif isinstance(specs[i - 1], GlobalPool):
                real_input = True  # averaged spikes are not binary
            layers.append(b.fc(flat, spec.out, real_input=real_input))
            flat = spec.out
        else:  # pragma: no cover - SPECS are fixed
            raise TypeError(f"unknown layer spec {spec!r}")
        i += 1
    if flat is None:
        layers.append(_Flatten())
        flat = c * h * w
    classifier = b.head(flat, num_classes)
    config = dict(arch=arch, variant=variant, num_classes=num_classes, in_channels=in_channels,
                  input_size=input_size if isinstance(input_size, int) else tuple(input_size),
                  timesteps=timesteps, prune_rate=prune_rate, **opts)
    net = BinSLTNet(nn.Sequential(*layers), classifier, spiking=b.spiking, timesteps=timesteps,
                    in_channels=in_channels, input_hw=_hw(input_size), build_config=config)
    return name_layers(net)  # errors name the layer: "BinSpikeConv2d features.3: ..."


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` on every binslt layer that has one (BinSpikeConv2d/Linear, LIF)."""
    C.check_backend(backend)
    for m in model.modules():
        if isinstance(m, (BinSpikeConv2d, BinSpikeLinear, LIF)):
            m.backend = backend
    return model


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set ``mode`` ('search', 'finetune' or 'frozen') on every masked sign-weight layer."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, _MaskedSignWeight):
            m.mode = mode
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters as the paper counts them (see the module docstring).

    Conv / linear weights once (masked sign layers: ``w`` only, not the scores), biases, and 2
    per channel for every BatchNorm (affine or not). Other modules' own parameters are counted
    as they are.
    """
    total = 0
    for m in model.modules():
        if isinstance(m, _MaskedSignWeight):
            total += m.weight.numel()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            total += 2 * m.num_features
        else:
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


_MAC_TYPES = (nn.Conv2d, nn.Linear, BinConv2d, BinLinear, BinSpikeConv2d, BinSpikeLinear)


def _fan_in(m: nn.Module) -> int:
    if isinstance(m, nn.Conv2d):
        return (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    if isinstance(m, (BinConv2d, BinSpikeConv2d)):
        return m.in_channels * m.kernel_size * m.kernel_size
    return m.in_features


@torch.no_grad()
def layer_macs(model: BinSLTNet, input_size: Union[int, tuple[int, int], None] = None,
               in_channels: int | None = None) -> dict[str, int]:
    """Dense multiply-accumulates per image (per time step for spiking variants), by layer name.

    Counted by forward hooks on every conv / linear layer (dense and binslt): output elements x
    fan-in. Masks are ignored (a dense count), BN, pooling and activations are not counted.
    ``input_size`` / ``in_channels`` default to the model's own.
    """
    cfg = getattr(model, "build_config", {})
    size = input_size if input_size is not None else cfg.get("input_size")
    cin = in_channels if in_channels is not None else cfg.get("in_channels")
    if size is None or cin is None:
        raise ValueError("give input_size and in_channels (the model has no build_config)")
    h, w = _hw(size)
    steps = getattr(model, "timesteps", 1) if getattr(model, "spiking", False) else 1
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(mod, inp, out):
            macs = conv_output_numel(mod, inp[0], out) * _fan_in(mod)
            counts[name] = counts.get(name, 0) + macs
        return fn

    for name, m in model.named_modules():
        if isinstance(m, _MAC_TYPES):
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, cin, h, w, dtype=p.dtype, device=p.device))
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    return {k: v // steps for k, v in counts.items()}


def count_macs(model: BinSLTNet, input_size: Union[int, tuple[int, int], None] = None,
               in_channels: int | None = None) -> int:
    """Total dense MACs per image of ``model`` (per time step for spiking variants)."""
    return sum(layer_macs(model, input_size, in_channels).values())
