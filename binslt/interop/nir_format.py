"""What the NIR export and import share: the format's name and version in a graph's metadata,
the default time step, the errors, the optional ``nir`` package (imported on first use) and the
BatchNorm fold (scale and shift, as binslt's fused epilogue computes them)."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

FORMAT_NAME = "binslt-nir"
FORMAT_VERSION = 1
#: The simulation step in seconds written into NIR time constants (tau_nir = tau * dt). It is
#: SpikingJelly's and snnTorch's default, so that their importers read binslt files unchanged.
DEFAULT_DT = 1e-4
MAXPOOL_FORMS = ("threshold", "lif")
EXTRA_HINT = "pip install 'binslt[nir]'"

PathLike = Union[str, os.PathLike[str]]


class NIRError(ValueError):
    """A NIR graph or file binslt cannot write or read: the message names the file (if any) and
    the layer or node."""


class NIRDependencyError(ImportError):
    """The optional ``nir`` package is missing."""


def _nir():
    try:
        import nir
    except ImportError as exc:
        raise NIRDependencyError(
            f"NIR export/import needs the optional 'nir' package ({exc}); install the extra: "
            f"{EXTRA_HINT}") from None
    return nir


def _bn_fold(bn: Optional[nn.Module], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BatchNorm, computed as binslt's fused epilogue
    computes them (scale = w * rsqrt(var + eps), shift = b - mean * scale)."""
    if bn is None:
        return torch.ones(channels), torch.zeros(channels)
    w = bn.weight.detach().float() if bn.affine else torch.ones(channels)
    b = bn.bias.detach().float() if bn.affine else torch.zeros(channels)
    scale = w * torch.rsqrt(bn.running_var.float() + bn.eps)
    return scale, b - bn.running_mean.float() * scale
