"""Multi-step 2-D max pooling of spikes, ``SpikeMaxPool2d``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import MultiStepOnly, _IntOrPair, _square


class SpikeMaxPool2d(MultiStepOnly, nn.Module):
    """Multi-step 2-D max pooling (on spikes: their OR over each window).

    Args:
        kernel_size (int or (k, k)): square window (default 2).
        stride (int or (s, s), optional): default ``kernel_size``.
        padding (int or (p, p)): default 0.

    Shape:
        - input: ``[T, N, C, H, W]``.
        - output: ``[T, N, C, H', W']``, H' = (H + 2 * padding - kernel_size) // stride + 1.

    Example::

        >>> import torch, binslt
        >>> binslt.SpikeMaxPool2d(2)(torch.ones(3, 1, 4, 8, 8)).shape
        torch.Size([3, 1, 4, 4, 4])
    """

    def __init__(self, kernel_size: _IntOrPair = 2, stride: Optional[_IntOrPair] = None,
                 padding: _IntOrPair = 0):
        """Build the layer; every argument is described in ``help(binslt.SpikeMaxPool2d)``."""
        super().__init__()
        self.kernel_size = _square(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _square(stride, "stride")
        self.padding = _square(padding, "padding")

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The max over each window of ``x`` ``[T, N, C, H, W]`` (per time step)."""
        if x.dim() != 5:
            raise ValueError(f"SpikeMaxPool2d expects [T, N, C, H, W], got shape "
                             f"{tuple(x.shape)}")
        y = F.max_pool2d(x.flatten(0, 1), self.kernel_size, self.stride, self.padding)
        return y.view(*x.shape[:2], *y.shape[1:])
