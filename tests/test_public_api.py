"""The public face: ``binslt --version``, ``__all__``, type hints, reprs, docstrings (run as
doctests), TorchScript's refusal, output dtypes and the mode switches' ``requires_grad``."""

from __future__ import annotations

import pytest
import torch

import binslt
from binslt import cli


def test_version_option_prints_one_line_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    import triton

    assert out == (f"binslt {binslt.__version__}  torch {torch.__version__}  "
                   f"triton {triton.__version__}\n")


# --- __all__ ---------------------------------------------------------------------------------

#: Subpackages: reached by their path (binslt.nn.layers, ...), not star-exported.
SUBPACKAGES = {"analysis", "cli", "interop", "io", "nn", "training"}


def test_all_names_resolve_and_cover_the_public_attributes():
    assert len(set(binslt.__all__)) == len(binslt.__all__)
    for name in binslt.__all__:
        assert getattr(binslt, name) is not None, name
    for name in ("models", "export_ticket", "load_ticket", "to_nir", "from_nir"):
        assert name in binslt.__all__
    assert binslt.models.build is not None
    public = {n for n in dir(binslt) if not n.startswith("_")} - SUBPACKAGES
    assert public <= set(binslt.__all__), sorted(public - set(binslt.__all__))


def test_star_import_binds_all_without_warnings():
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('error')\n"
            "from torch import nn\n"
            "from binslt import *\n"
            "import binslt\n"
            "assert nn.Module is __import__('torch').nn.Module\n"
            "missing = [n for n in binslt.__all__ if n not in globals()]\n"
            "assert not missing, missing\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok" and r.stderr == ""
