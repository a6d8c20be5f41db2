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

__all__ = ["count_macs", "count_parameters", "fan_in", "layer_macs"]


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
            macs = conv_output_numel(mod, inp[0], out) * fan_in(mod)
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
