"""The benchmarks' SpikingJelly baselines: binslt's network layouts built from SpikingJelly 2.0.

Two flavours of each network (``build_sj``):

- ``masked=False``, SpikingJelly dense: ``layer.Conv2d`` / ``layer.Linear`` (no bias) ->
  ``layer.BatchNorm2d`` / ``layer.BatchNorm1d`` -> ``neuron.LIFNode``, step mode 'm', real
  weights trained normally;
- ``masked=True``, SpikingJelly plus the biprop mask written in plain PyTorch (what a user would
  write without binslt): the convs and linears are score-masked sign-weight modules
  (:class:`BipropConv2d`, :class:`BipropLinear`, inside ``layer.SeqToANNContainer``); the
  frozen weights stay fixed and the scores train.

The layout is read from ``binslt.models.SPECS`` (the paper's Conv-4 / VGG-9 / VGG-11 /
ResNet-19) and follows the rules of ``binslt.models.build``: 3x3 convs with padding 1, 2x2 max
pooling (``layer.MaxPool2d``) after the conv it follows, skipped when the map is already below
2x2; residual blocks add the shortcut (identity, or 1x1 conv + BN where the shape changes) as a
current before the second neuron; global average pooling (``layer.AdaptiveAvgPool2d``) before
the head of ResNet-19; the classifier is a linear layer without bias whose output is averaged
over T. The image is repeated over T (direct encoding). Nothing is copied from binslt but the
layout, with binslt's plain-PyTorch containers for the residual block and the mean over T of
the classifier (and, where a benchmark asks for it, the initial weights and scores:
:func:`copy_init`).

The biprop rule: mask = the entries with the largest |s| (floor(prune_rate * numel) removed,
ties broken by a stable sort), ``W_eff = alpha * sign(w) * M`` with
``alpha = sum(|w| M) / sum(M)``, and the straight-through score gradient
``dL/ds = dL/dW_eff * w * sign(s)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from common import import_spikingjelly
from torch import nn

from binslt.nn.blocks import ResidualBlock, _MeanOverTime
from binslt.ops.schemas import DEFAULT_SURROGATE_ALPHA

#: The paper's neuron as the benchmarks configure it on both sides.
PAPER_TAU = 1.0 / (1.0 - 0.99)  # decay 0.99


# ---------------------------------------------------------------------------------------------
# biprop masked layers (plain PyTorch)
# ---------------------------------------------------------------------------------------------


class _BipropSubnet(torch.autograd.Function):
    """scores -> alpha * M (M: keep the largest |s|); backward: straight-through times |w|."""

    @staticmethod
    def forward(ctx, abs_scores, weight, prune_rate):
        n = abs_scores.numel()
        n_pruned = math.floor(prune_rate * n)
        order = abs_scores.flatten().argsort(stable=True)
        mask = torch.ones(n, dtype=abs_scores.dtype, device=abs_scores.device)
        mask[order[:n_pruned]] = 0
        mask = mask.view_as(abs_scores)
        abs_w = weight.abs()
        alpha = (abs_w * mask).sum() / mask.sum()
        ctx.save_for_backward(abs_w)
        return alpha * mask

    @staticmethod
    def backward(ctx, g):
        (abs_w,) = ctx.saved_tensors
        return g * abs_w, None, None


class _BipropMasked(nn.Module):
    """Frozen weight ``w``, trainable scores ``s``; ``W_eff = sign(w) * alpha * M(|s|)``."""

    def __init__(self, shape: tuple[int, ...], prune_rate: float):
        super().__init__()
        self.prune_rate = prune_rate
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.scores = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))

    def effective_weight(self) -> torch.Tensor:
        # d|s|/ds = sign(s), so dL/ds = G * sign(w) * |w| * sign(s) = G * w * sign(s).
        return torch.sign(self.weight) * _BipropSubnet.apply(self.scores.abs(), self.weight,
                                                             self.prune_rate)


class BipropConv2d(_BipropMasked):
    def __init__(self, cin: int, cout: int, k: int = 3, padding: int = 1, prune_rate=0.5,
                 stride: int = 1):
        super().__init__((cout, cin, k, k), prune_rate)
        self.padding = padding
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] (single step)
        return F.conv2d(x, self.effective_weight(), stride=self.stride, padding=self.padding)


class BipropLinear(_BipropMasked):
    def __init__(self, fin: int, fout: int, prune_rate=0.5):
        super().__init__((fout, fin), prune_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())


# ---------------------------------------------------------------------------------------------
# Network modules
# ---------------------------------------------------------------------------------------------


class SJConvLayer(nn.Module):
    """conv -> BN [+ residual current] -> LIF [-> 2x2 max pool], on [T, N, C, H, W].

    One module per spiking conv layer, so that ``memopt.optimize_memory`` can checkpoint it
    (``LAYER_TYPES``).
    """

    def __init__(self, conv: nn.Module, bn: nn.Module, lif: nn.Module,
                 pool: nn.Module | None = None):
        super().__init__()
        self.conv, self.bn, self.lif, self.pool = conv, bn, lif, pool

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        z = self.bn(self.conv(x))
        if residual is not None:
            z = z + residual
        s = self.lif(z)
        return s if self.pool is None else self.pool(s)


class SJLinearLayer(nn.Module):
    """linear -> BN (over T*N) -> LIF, on [T, N, F]."""

    def __init__(self, fc: nn.Module, bn: nn.Module, lif: nn.Module):
        super().__init__()
        self.fc, self.bn, self.lif = fc, bn, lif

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lif(self.bn(self.fc(x)))


class SJResidualBlock(ResidualBlock):
    """binslt's block, ``lif(bn(conv2(conv1(x))) + shortcut(x))`` of two ``SJConvLayer``
    (``shortcut`` None is the identity), as its own type (``LAYER_TYPES``).

    Submodules are registered in binslt's order (conv1, conv2, shortcut), so that
    :func:`copy_init` pairs the masked layers one to one.
    """


class SJNet(nn.Module):
    """images [N, C, H, W] -> logits; resets every neuron, then repeats the image over T."""

    def __init__(self, features: nn.Sequential, head: nn.Module, timesteps: int, reset):
        super().__init__()
        self.features, self.head, self.T = features, head, timesteps
        self._reset = reset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._reset(self)
        x = x.unsqueeze(0).expand(self.T, *x.shape)
        return self.head(self.features(x))


#: The per-layer module types (the candidates for ``memopt.optimize_memory``'s checkpointing;
#: blocks win over the layers inside them).
LAYER_TYPES = (SJConvLayer, SJLinearLayer, SJResidualBlock)


def sj_surrogate_class(name: str):
    """SpikingJelly's surrogate class of binslt's surrogate name (``SURROGATES``; the mapping
    ``binslt.convert`` reads SpikingJelly's neurons with)."""
    from binslt.nn.neuron import sj_surrogate_classes

    classes = sj_surrogate_classes()
    if name not in classes:
        raise ValueError(f"unknown surrogate {name!r}; expected one of {tuple(classes)}")
    return classes[name]


def build_sj(arch: str, *, masked: bool, num_classes: int = 10, in_channels: int = 3,
             input_size: int = 32, timesteps: int = 4, prune_rate: float = 0.5,
             tau: float = PAPER_TAU, bn_affine: bool = False,
             surrogate_name: str = "atan") -> SJNet:
    """binslt's ``arch`` layout from SpikingJelly layers (see the module docstring).

    The neuron is the paper's: ``LIFNode(tau, decay_input=False, v_threshold=1, v_reset=0,
    ATan(alpha=2), detach_reset=True)``; ``surrogate_name`` (binslt's name, e.g. ``rect``) puts
    another SpikingJelly surrogate at its default alpha in ATan's place. BatchNorm is non-affine
    unless ``bn_affine``.
    """
    from binslt.nn.models import SPECS, feature_layers

    if arch not in SPECS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {tuple(SPECS)}")
    functional, layer, neuron, surrogate = import_spikingjelly()
    sg_class = sj_surrogate_class(surrogate_name)

    def lif():
        return neuron.LIFNode(tau=tau, decay_input=False, v_threshold=1.0, v_reset=0.0,
                              surrogate_function=sg_class(alpha=DEFAULT_SURROGATE_ALPHA[
                                  surrogate_name]), detach_reset=True, step_mode="m")

    def conv_op(ci, co, k, stride):
        if masked:
            return layer.SeqToANNContainer(BipropConv2d(ci, co, k, k // 2, prune_rate, stride))
        return layer.Conv2d(ci, co, k, stride, k // 2, bias=False, step_mode="m")

    def linear_op(fi, fo):
        if masked:
            return layer.SeqToANNContainer(BipropLinear(fi, fo, prune_rate))
        return layer.Linear(fi, fo, bias=False, step_mode="m")

    def bn2d(c):
        return layer.BatchNorm2d(c, affine=bn_affine, step_mode="m")

    def conv(ci, co, stride, pool=False):
        return SJConvLayer(conv_op(ci, co, 3, stride), bn2d(co), lif(),
                           layer.MaxPool2d(2, step_mode="m") if pool else None)

    class Builder:  # binslt.nn.models.feature_layers's builder, in SpikingJelly layers
        def conv(self, cin, cout, stride, *, first, pool):
            return conv(cin, cout, stride, pool)

        def pool(self):
            return layer.MaxPool2d(2, step_mode="m")

        def block(self, cin, cout, stride):
            sc = None
            if stride != 1 or cin != cout:
                sc = nn.Sequential(conv_op(cin, cout, 1, stride), bn2d(cout))
            return SJResidualBlock(conv(cin, cout, stride), conv(cout, cout, 1), sc)

        def global_pool(self):
            return [layer.AdaptiveAvgPool2d(1, step_mode="m"), layer.Flatten(step_mode="m")]

        def flatten(self):
            return layer.Flatten(step_mode="m")

        def fc(self, fin, fout, *, real_input):
            return SJLinearLayer(linear_op(fin, fout),
                                 layer.BatchNorm1d(fout, affine=bn_affine, step_mode="m"), lif())

    size = int(input_size)
    mods, flat = feature_layers(Builder(), SPECS[arch], in_channels, size, size)
    return SJNet(nn.Sequential(*mods), _MeanOverTime(linear_op(flat, num_classes)), timesteps,
                 functional.reset_net)


# ---------------------------------------------------------------------------------------------
# Pairing with a binslt network
# ---------------------------------------------------------------------------------------------


def weight_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Shapes of every conv / linear weight in forward order (binslt or SpikingJelly)."""
    out = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() in (2, 4) and not isinstance(
                m, nn.modules.batchnorm._BatchNorm):
            out.append(tuple(w.shape))
    return out


def check_same_layout(binslt_model: nn.Module, sj_model: nn.Module, arch: str) -> None:
    """Raise if the two networks' conv / linear weights differ in number, order or shape."""
    a, b = weight_shapes(binslt_model), weight_shapes(sj_model)
    if a != b:
        raise RuntimeError(f"the SpikingJelly {arch} does not match binslt's layout: "
                           f"binslt {a} vs SpikingJelly {b}")


def masked_layers(model: nn.Module) -> list[nn.Module]:
    """Modules holding (weight, scores), in forward order."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "scores", None), torch.Tensor)
            and isinstance(getattr(m, "weight", None), torch.Tensor)]


@torch.no_grad()
def copy_init(src: nn.Module, dst: nn.Module) -> None:
    """Copy the frozen weights and scores of ``src``'s masked layers into ``dst``'s."""
    a, b = masked_layers(src), masked_layers(dst)
    if [tuple(m.weight.shape) for m in a] != [tuple(m.weight.shape) for m in b]:
        raise RuntimeError("the baseline's masked layers do not match binslt's: "
                           f"{[tuple(m.weight.shape) for m in a]} vs "
                           f"{[tuple(m.weight.shape) for m in b]}")
    for m, n in zip(a, b):
        n.weight.copy_(m.weight)
        n.scores.copy_(m.scores)


# ---------------------------------------------------------------------------------------------
# SpikingJelly's own ResNet-18 (network.py's sj-resnet18)
# ---------------------------------------------------------------------------------------------


def sj_resnet18(num_classes: int = 10) -> nn.Module:
    """SpikingJelly's zoo ``spiking_resnet18`` with the paper's neuron (LIFNode tau=100,
    decay_input=False, hard reset 0, ATan(2), detach_reset), step mode 'm'. The benchmark's
    binslt side converts this same factory with ``binslt.interop.convert.build_user_model`` (what
    ``binslt search --model benchmarks/sj_models.py:sj_resnet18`` does)."""
    import_spikingjelly()
    from spikingjelly.activation_based import functional, neuron, surrogate
    from spikingjelly.activation_based.model import spiking_resnet

    net = spiking_resnet.spiking_resnet18(
        spiking_neuron=neuron.LIFNode, num_classes=num_classes, tau=PAPER_TAU,
        decay_input=False, v_threshold=1.0, v_reset=0.0, detach_reset=True,
        surrogate_function=surrogate.ATan())
    functional.set_step_mode(net, "m")
    return net


def sj_resnet18_block_types() -> tuple:
    """The zoo ResNet's per-block modules (what memopt checkpoints)."""
    from spikingjelly.activation_based.model import spiking_resnet

    return (spiking_resnet.BasicBlock,)


class SJImages(nn.Module):
    """An unconverted SpikingJelly model on images: [N, C, H, W] repeated over T (direct
    encoding), run from a reset state, its [T, N, K] output averaged over T."""

    def __init__(self, net: nn.Module, timesteps: int):
        super().__init__()
        self.net = net
        self.timesteps = timesteps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from spikingjelly.activation_based import functional

        functional.reset_net(self.net)
        y = self.net(x.unsqueeze(0).repeat(self.timesteps, 1, 1, 1, 1))
        return y.mean(0)
