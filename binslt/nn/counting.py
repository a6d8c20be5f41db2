"""Counting a network: parameters as the paper counts them, and dense multiply-accumulates per
layer (``layer_macs``, ``count_macs``) with the one fan-in rule (``fan_in``) that
``binslt.analysis.energy`` shares."""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .layers import (
    BinConv2d,
    BinLinear,
    BinSpikeConv2d,
    BinSpikeLinear,
    _MaskedSignWeight,
    conv_output_numel,
)
from .network import BinSLTNet, _hw

__all__ = ["binary_conv_shapes", "count_macs", "count_parameters", "fan_in", "layer_macs"]


def count_parameters(model: nn.Module) -> int:
    """Parameters as the paper counts them (see :mod:`binslt.nn.models`' docstring).

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


def fan_in(m: nn.Module) -> int:
    """Multiply-accumulates per output element of a weighted layer: ``C_in / groups x
    prod(kernel)`` for a convolution (``nn.Conv1d/2d/3d``, binslt's ``BinSpikeConv2d`` and
    ``BinConv2d``), ``in_features`` for a linear layer (``nn.Linear``, ``BinSpikeLinear``,
    ``BinLinear``). Read off the weight's shape ``[C_out, C_in / groups, *kernel]`` /
    ``[out, in]``, which every one of them has (a frozen ticket layer's placeholder weight
    included), so that a rectangular, grouped or 1-D/3-D kernel counts right."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        raise TypeError(f"fan_in: {type(m).__name__} has no [out, in, ...] weight")
    return int(w[0].numel())


_fan_in = fan_in  # the name layer_macs used


def _hooked_forward(model: BinSLTNet, types: tuple[type, ...], fn,
                    input_size: Union[int, tuple[int, int], None],
                    in_channels: int | None) -> None:
    """One eval-mode forward of a batch of one zero image (``input_size`` / ``in_channels``
    default to the model's own) with ``fn(name, module, inputs, output)`` hooked on every
    module of ``types``; the model's mode and hooks are restored after."""
    cfg = getattr(model, "build_config", {})
    size = input_size if input_size is not None else cfg.get("input_size")
    cin = in_channels if in_channels is not None else cfg.get("in_channels")
    if size is None or cin is None:
        raise ValueError("give input_size and in_channels (the model has no build_config)")
    h, w = _hw(size)
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: fn(name, mod, inp, out))
             for name, m in model.named_modules() if isinstance(m, types)]
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, cin, h, w, dtype=p.dtype, device=p.device))
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)


def layer_macs(model: BinSLTNet, input_size: Union[int, tuple[int, int], None] = None,
               in_channels: int | None = None) -> dict[str, int]:
    """Dense multiply-accumulates per image (per time step for spiking variants), by layer name.

    Counted by forward hooks on every conv / linear layer (dense and binslt): output elements x
    fan-in. Masks are ignored (a dense count), BN, pooling and activations are not counted.
    ``input_size`` / ``in_channels`` default to the model's own.
    """
    steps = getattr(model, "timesteps", 1) if getattr(model, "spiking", False) else 1
    counts: dict[str, int] = {}

    def count(name, mod, inp, out):
        counts[name] = counts.get(name, 0) + conv_output_numel(mod, inp[0], out) * fan_in(mod)

    _hooked_forward(model, _MAC_TYPES, count, input_size, in_channels)
    return {k: v // steps for k, v in counts.items()}


def binary_conv_shapes(model: BinSLTNet, input_size: Union[int, tuple[int, int], None] = None,
                       in_channels: int | None = None) -> list[tuple[int, int, int, int, int, int]]:
    """``(C_in, C_out, H, stride, kernel, padding)`` of every convolution of ``model`` whose
    input is spikes (``BinSpikeConv2d`` with ``input`` other than ``'real'``, and ``BinConv2d``,
    the residual shortcuts), each distinct shape once in order of first use; ``H`` is the
    height of the layer's input map at ``input_size`` (default the model's own). What the
    kernel tests and ``benchmarks/split_precision.py`` run on the paper's layer shapes.

    >>> from binslt.nn.models import build
    >>> from binslt.nn.counting import binary_conv_shapes
    >>> binary_conv_shapes(build("conv4", "binwslt", input_size=32))
    [(64, 64, 32, 1, 3, 1), (64, 128, 16, 1, 3, 1), (128, 128, 16, 1, 3, 1)]
    """
    shapes: list[tuple[int, int, int, int, int, int]] = []

    def record(name, mod, inp, out):
        if getattr(mod, "input", "spike") == "real":
            return
        shape = (mod.in_channels, mod.out_channels, int(inp[0].shape[-2]), mod.stride,
                 mod.kernel_size, mod.padding)
        if shape not in shapes:
            shapes.append(shape)

    _hooked_forward(model, (BinSpikeConv2d, BinConv2d), record, input_size, in_channels)
    return shapes


def count_macs(model: BinSLTNet, input_size: Union[int, tuple[int, int], None] = None,
               in_channels: int | None = None) -> int:
    """Total dense MACs per image of ``model`` (per time step for spiking variants)."""
    return sum(layer_macs(model, input_size, in_channels).values())
