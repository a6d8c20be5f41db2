"""The README's Python examples run as written: each fenced ``python`` block of README.md in a
fresh interpreter (the drop-in layer, converting SpikingJelly's ``spiking_resnet18``), with the
checks that the README's comments state about their results."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)

# What each block's comments promise, checked after it runs (block index -> code).
CHECKS = {
    0: """
        assert tuple(spikes.shape) == (4, 16, 128, 16, 16), spikes.shape
        assert bool(((spikes == 0) | (spikes == 1)).all())
    """,
    1: """
        assert type(model).__name__ == type(net).__name__
        assert any(type(m).__name__ == "BinSpikeConv2d" for m in model.modules())
        assert all(type(m).__module__.startswith("spikingjelly")
                   for m in ticket_sj.modules() if "Conv" in type(m).__name__)
    """,
}


def test_the_readme_has_the_examples_this_file_checks():
    assert len(BLOCKS) == len(CHECKS), f"README.md has {len(BLOCKS)} python blocks"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path):
    script = tmp_path / f"readme_{i}.py"
    script.write_text(BLOCKS[i] + "\n" + textwrap.dedent(CHECKS.get(i, "")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, f"README block {i} failed:\n{r.stderr[-3000:]}"
