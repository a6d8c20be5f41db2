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
