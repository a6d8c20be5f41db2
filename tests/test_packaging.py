"""The installed layout: the top-level kernels/ folder is the subpackage ``binslt.kernels``.

A top-level module named ``kernels`` would clash with the PyPI package of that name, so outside
the source tree (here: a temporary working directory) ``import kernels`` must not find this
project, while ``binslt.kernels`` and the Triton ops that use it import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.util, json
import binslt.kernels, binslt.ops.triton
spec = importlib.util.find_spec("kernels")
print(json.dumps({"kernels": None if spec is None else spec.origin,
                  "binslt.kernels": binslt.kernels.__file__}))
"""


def test_kernels_install_as_binslt_kernels(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(got["binslt.kernels"]).resolve() == ROOT / "kernels" / "__init__.py"
    assert got["kernels"] is None or not Path(got["kernels"]).resolve().is_relative_to(ROOT), got
