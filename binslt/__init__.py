"""binslt: binary-weight spiking lottery tickets (BinW-SLT) for PyTorch.

Masked sign-weight spiking layers (``BinSpikeConv2d``, ``BinSpikeLinear``) with fused kernels
(C++ on the CPU, Triton and CUDA on the GPU), the search of the paper's Algorithm 1, baselines,
energy accounting and packed ticket files.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops, reference  # noqa: E402  (ops registers the binslt:: schemas)
from .ops import backends  # noqa: E402  (tries the Triton launchers first)

# Eager (cheap: torch and .layers only): importing the binslt.convert submodule would otherwise
# bind the *module* to `binslt.convert` and shadow the lazily returned function.
from .convert import convert, to_spikingjelly  # noqa: E402
from .layers import (  # noqa: E402
    LIF,
    BinConv2d,
    BinLinear,
    BinSpikeConv2d,
    BinSpikeLinear,
    SignActivation,
    SpikeMaxPool2d,
)
from .ops import use_backend  # noqa: E402

__all__ = [
    "BinConv2d",
    "BinLinear",
    "BinSpikeConv2d",
    "BinSpikeLinear",
    "LIF",
    "SignActivation",
    "SpikeMaxPool2d",
    "backends",
    "convert",
    "from_nir",
    "ops",
    "reference",
    "to_nir",
    "to_spikingjelly",
    "use_backend",
    "__version__",
]


def __getattr__(name):
    # Heavier subpackages load lazily so that `import binslt` stays fast.
    if name in ("models", "energy", "tickets", "data", "train", "artifacts", "nir", "export"):
        import importlib

        return importlib.import_module(f"binslt.{name}")
    if name in ("export_ticket", "load_ticket"):
        from . import tickets

        return getattr(tickets, name)
    if name in ("to_nir", "from_nir"):  # need the optional extra binslt[nir]
        from . import nir

        return getattr(nir, name)
    raise AttributeError(f"module 'binslt' has no attribute {name!r}")
