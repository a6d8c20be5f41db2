"""The module paths of the flat layout keep importing, with a DeprecationWarning.

``import binslt.layers`` gives the module ``binslt.nn.layers`` itself (the same object, so that
monkeypatching through the old name reaches the code that runs) and warns once, naming the new
path. No file sits at an old path: a finder on ``sys.meta_path`` answers for the names in
``MOVED``, so that every move stays a rename in git.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

MOVED = {
    "binslt._schemas": "binslt.ops.schemas",
    "binslt._contract": "binslt.ops.contract",
    "binslt._ext": "binslt.ops.library",
    "binslt._triton_ops": "binslt.ops.triton",
    "binslt._cpu_algos": "binslt.ops.cpu_algos",
    "binslt._fallback": "binslt.ops.fallback",
    "binslt.reference": "binslt.ops.reference",
    "binslt.check": "binslt.ops.check",
    "binslt.layers": "binslt.nn.layers",
    "binslt.models": "binslt.nn.models",
    "binslt.convert": "binslt.interop.convert",
    "binslt.nir": "binslt.interop.nir",
    "binslt.export": "binslt.interop.export",
    "binslt.artifacts": "binslt.io.artifacts",
    "binslt.tickets": "binslt.io.tickets",
    "binslt.train": "binslt.training.loop",
    "binslt.data": "binslt.training.data",
    "binslt.stats": "binslt.training.stats",
    "binslt.energy": "binslt.analysis.energy",
}

_HERE = os.path.abspath(__file__)


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside this file and the import machinery (whose
    frames ``warnings`` does not count), so that the warning names the importing line."""
    level, frame = 1, sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:
            pass  # skipped by warnings.warn's own count
        elif os.path.abspath(name) == _HERE:
            level += 1
        else:
            return level
        frame = frame.f_back
    return 1


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # a placeholder module, replaced in sys.modules by exec_module

    def exec_module(self, module):
        old = module.__name__
        new = MOVED[old]
        warnings.warn(f"{old} moved to {new}; import {new} instead (the old path will be "
                      "removed)", DeprecationWarning, stacklevel=_caller_stacklevel())
        # The import system returns (and binds on the parent package) what sys.modules holds
        # once this returns: the new module itself.
        sys.modules[old] = importlib.import_module(new)


def install() -> None:
    # First in the list: an older binslt elsewhere on the path (an editable install's finder)
    # must not answer for the old names.
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
