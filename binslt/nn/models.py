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

This module holds the descriptions, the builders and ``build``; the modules the networks are
made of are in :mod:`binslt.nn.blocks`, the network class in :mod:`binslt.nn.network`, the
counting in :mod:`binslt.nn.counting` (all re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from torch import nn

from ..ops import contract as C
from ..ops.schemas import SURROGATES
from .blocks import (  # noqa: F401  (re-exported: the modules' old home)
    PerStep,
    ResidualBlock,
    SpikingConv,
    SpikingLinear,
    _ConvBNAct,
    _Flatten,
    _GlobalAvgPool,
    _MeanOverTime,
    _PerStep,
)
from .counting import (  # noqa: F401
    _MAC_TYPES,
    _fan_in,
    count_macs,
    count_parameters,
    fan_in,
    layer_macs,
)
from .layers import (  # noqa: F401  (re-exported: names this module has always offered)
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
from .network import BinSLTNet, _hw, _packable_conv, _PackedBlock, _pos_int  # noqa: F401

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
class _Width:
    """A spec with ``out`` output channels (features)."""

    out: int


@dataclass(frozen=True)
class _Strided(_Width):
    """A spec with ``out`` output channels and a stride."""

    stride: int = 1


class Conv(_Strided):
    """3x3 conv (pad 1) + BN + activation."""


class Block(_Strided):
    """Basic residual block: two 3x3 convs; 1x1 conv + BN shortcut where the shape changes."""


class FC(_Width):
    """Hidden fully connected layer + BN + activation (flattens conv features first)."""


@dataclass(frozen=True)
class Pool:
    """2x2 max pool (skipped when the feature map is already below 2 in height or width)."""


@dataclass(frozen=True)
class GlobalPool:
    """Global average pool over H, W (flattens to features)."""


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

    def global_pool(self) -> list[nn.Module]:
        return [_GlobalAvgPool()]

    def flatten(self) -> nn.Module:
        return _Flatten()

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


def feature_layers(b, specs: list, c: int, h: int, w: int) -> tuple[list[nn.Module], int]:
    """The feature layers a builder ``b`` makes for ``specs`` on ``c`` x ``h`` x ``w`` images,
    and the number of features they hand the classifier (flattened, or after the global pool):
    the one reading of ``SPECS`` (pools absorbed into the conv before them, or skipped below
    2x2; the FC after a global pool takes real input). ``b`` has the methods of ``_Builder``:
    ``conv``, ``pool``, ``block``, ``global_pool``, ``flatten``, ``fc`` (benchmarks/sj_models.py
    builds its SpikingJelly networks with its own)."""
    layers: list[nn.Module] = []
    first, flat = True, None
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
            layers += b.global_pool()
            flat, h, w = c, 1, 1
        elif isinstance(spec, FC):
            real_input = False
            if flat is None:
                layers.append(b.flatten())
                flat = c * h * w
            elif isinstance(specs[i - 1], GlobalPool):
                real_input = True  # averaged spikes are not binary
            layers.append(b.fc(flat, spec.out, real_input=real_input))
            flat = spec.out
        else:  # pragma: no cover - SPECS are fixed
            raise TypeError(f"unknown layer spec {spec!r}")
        i += 1
    if flat is None:
        layers.append(b.flatten())
        flat = c * h * w
    return layers, flat


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
    layers, flat = feature_layers(b, SPECS[arch], in_channels, h, w)
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
