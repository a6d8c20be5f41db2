"""binslt: binary-weight spiking lottery tickets (BinW-SLT) for PyTorch.

Masked sign-weight spiking layers (``BinSpikeConv2d``, ``BinSpikeLinear``) with fused kernels
(C++ on the CPU, Triton and CUDA on the GPU), the search of the paper's Algorithm 1, baselines,
energy accounting and packed ticket files.
"""

import sys as _sys
import types as _types
import typing as _typing

__version__ = "0.1.0"

from . import _moved, ops  # noqa: E402  (ops registers the binslt:: schemas)

# Eager (cheap: torch and binslt.nn.layers only).
from .interop.convert import convert, to_spikingjelly  # noqa: E402
from .nn.layers import *  # noqa: E402, F403  (the public layers)
from .nn.layers import __all__ as _LAYERS  # noqa: E402
from .ops import backends, reference, use_backend  # noqa: E402

if _typing.TYPE_CHECKING:  # the lazy names below, as type checkers see them
    from .interop.nir import from_nir, to_nir
    from .io.tickets import export_ticket, load_ticket
    from .nn import models

# The flat layout's module paths (binslt.layers, binslt.reference, ...) keep importing, with a
# DeprecationWarning (binslt._moved).
_moved.install()


class _Package(_types.ModuleType):
    # Importing the old module path binslt.convert binds the *module* on this package; the
    # public `binslt.convert` is the function, which that binding must not shadow.
    def __setattr__(self, name, value):
        if name == "convert" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

# Every public name of the package, eager or lazy (``__getattr__`` below). The subpackages
# (binslt.nn, binslt.io, binslt.interop, binslt.training, binslt.analysis, binslt.cli) are
# imported by their path and not star-exported: ``from binslt import *`` must not rebind a
# user's ``nn`` (torch.nn).
__all__ = [
    *_LAYERS,
    "backends",
    "convert",
    "export_ticket",
    "from_nir",
    "load_ticket",
    "models",
    "ops",
    "reference",
    "to_nir",
    "to_spikingjelly",
    "use_backend",
    "__version__",
]


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):
    # Heavier subpackages load lazily so that `import binslt` stays fast.
    if name == "models":  # public: binslt.models.build(...)
        import importlib

        return importlib.import_module("binslt.nn.models")
    if f"binslt.{name}" in _moved.MOVED:  # an old module path: warns, naming the new one
        import importlib

        return importlib.import_module(f"binslt.{name}")
    if name in ("export_ticket", "load_ticket"):
        from .io import tickets

        return getattr(tickets, name)
    if name in ("to_nir", "from_nir"):  # need the optional extra binslt[nir]
        from .interop import nir

        return getattr(nir, name)
    raise AttributeError(f"module 'binslt' has no attribute {name!r}")
