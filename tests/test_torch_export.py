"""torch.export of frozen binslt tickets (binslt.export)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from binslt.interop.export import export_program, load_program, op_library_paths, save_program
from binslt.io.tickets import export_ticket, load_ticket
from binslt.nn import models


def _ticket(tmp_path: Path, arch: str = "conv4", **kw) -> nn.Module:
    torch.manual_seed(0)
    m = models.build(arch, "binwslt", in_channels=1, input_size=8, timesteps=2, **kw)
    for mod in m.modules():  # BN statistics of one batch, so that every layer fires
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(torch.randn(32, 1, 8, 8))
    m.eval()
    export_ticket(m, tmp_path / "t.safetensors")
    return load_ticket(tmp_path / "t.safetensors")


def _binslt_ops(program) -> list[str]:
    return sorted({str(n.target) for n in program.graph.nodes
                   if n.op == "call_function" and "binslt" in str(n.target)})


def test_frozen_ticket_exports_and_runs_identically(tmp_path):
    m = _ticket(tmp_path)
    x = torch.randn(5, 1, 8, 8)
    ep = export_program(m, x)
    ops = _binslt_ops(ep)
    if op_library_paths()["cpu"]:
        # the spiking convs run from packed bits through the binslt ops (fake kernels traced);
        # the real-input first conv through bn_lif_infer (pooled, packed for the next conv)
        assert "binslt.bconv_lif_infer.default" in ops and "binslt.bn_lif_infer.default" in ops
    with torch.no_grad():
        want = m(x)
        got = ep.module()(x)
        other = torch.randn(9, 1, 8, 8)  # the batch dimension is symbolic
        assert torch.equal(ep.module()(other), m(other))
    assert torch.equal(got, want) and bool((want != 0).any())
    # the program carries the 2-bit planes, not float weights of the masked layers
    consts = {**dict(ep.named_buffers()), **dict(ep.named_parameters())}
    assert any(k.endswith("w_mask_bits") and v.dtype == torch.int32 for k, v in consts.items())


def test_save_load_and_run_loaded_program(tmp_path):
    m = _ticket(tmp_path)
    x = torch.randn(3, 1, 8, 8)
    path = save_program(export_program(m, x, dynamic_batch=False), tmp_path / "t.pt2")
    loaded = load_program(path)
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), m(x))


def test_export_from_ticket_file_and_refuses_unfrozen(tmp_path):
    m = _ticket(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    ep = export_program(tmp_path / "t.safetensors", x)
    with torch.no_grad():
        assert torch.equal(ep.module()(x), m(x))
    search = models.build("conv4", "binwslt", in_channels=1, input_size=8)
    with pytest.raises(ValueError, match="frozen"):
        export_program(search, x)


@pytest.mark.skipif(not op_library_paths()["cpu"], reason="binslt._C is not built")
def test_loaded_program_runs_without_importing_binslt(tmp_path):
    """Outside this package's Python: declare the schemas from binslt/_schemas.py and load the
    op library binslt/_C*.so (load_ops_standalone does both, and runs without binslt)."""
    m = _ticket(tmp_path)
    x = torch.randn(4, 1, 8, 8)
    save_program(export_program(m, x), tmp_path / "t.pt2")
    with torch.no_grad():
        torch.save({"x": x, "y": m(x)}, tmp_path / "ref.pt")
    here = Path(__file__).resolve().parents[1] / "binslt"
    script = textwrap.dedent(f"""
        import sys, torch
        ns = {{"__name__": "standalone"}}
        exec(open({str(here / "interop" / "export.py")!r}).read(), ns)
        ns["load_ops_standalone"]({op_library_paths()["cpu"]!r},
                                  schemas_file={str(here / "ops" / "schemas.py")!r})
        assert "binslt" not in sys.modules
        ep = torch.export.load({str(tmp_path / "t.pt2")!r})
        ref = torch.load({str(tmp_path / "ref.pt")!r}, weights_only=True)
        with torch.no_grad():
            y = ep.module()(ref["x"])
        assert torch.equal(y, ref["y"]), (y - ref["y"]).abs().max()
        assert "binslt" not in sys.modules
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_op_library_paths_pick_this_pythons_build(tmp_path):
    """A folder with builds for several Pythons: only the one this interpreter imports counts."""
    from importlib.machinery import EXTENSION_SUFFIXES

    other = "cpython-39-x86_64-linux-gnu.so" if "39" not in EXTENSION_SUFFIXES[0] else \
        "cpython-313-x86_64-linux-gnu.so"
    for name in (f"_C.{other}", f"_C_cuda.{other}", f"_C{EXTENSION_SUFFIXES[0]}"):
        (tmp_path / name).write_bytes(b"")
    assert op_library_paths(tmp_path) == {"cpu": str(tmp_path / f"_C{EXTENSION_SUFFIXES[0]}"),
                                          "cuda": None}
    assert op_library_paths(tmp_path / "empty") == {"cpu": None, "cuda": None}


@pytest.mark.parametrize("grad", [True, False], ids=["autograd_on", "no_grad"])
def test_torch_export_export_as_the_docs_write_it(tmp_path, grad):
    """``torch.export.export(ticket, (x,))`` on a loaded ticket, with or without
    ``torch.no_grad()``: no data-dependent guard, the packed inference kernels in both (autograd
    records nothing of a frozen ticket), and the eager logits."""
    m = _ticket(tmp_path)
    x = torch.randn(3, 1, 8, 8)
    with torch.set_grad_enabled(grad):
        ep = torch.export.export(m, (x,))
        got, want = ep.module()(x), m(x)
    if op_library_paths()["cpu"]:  # nothing requires grad: the packed inference kernels
        assert _binslt_ops(ep) == ["binslt.bconv_lif_infer.default",
                                   "binslt.bn_lif_infer.default"]
    assert torch.equal(got, want) and bool((want != 0).any())
    with torch.no_grad():
        assert torch.equal(ep.module()(x), m(x))


def test_frozen_ticket_takes_autograd_only_where_something_requires_grad(tmp_path):
    """Called without no_grad, a frozen ticket runs the inference kernels (nothing to record);
    an input that requires grad (e.g. a saliency map) still gets its gradient."""
    m = _ticket(tmp_path)
    x = torch.randn(3, 1, 8, 8)
    y = m(x)
    assert not y.requires_grad
    with torch.no_grad():
        assert torch.equal(y, m(x))
    xg = x.clone().requires_grad_()
    yg = m(xg)
    assert torch.equal(yg.detach(), y)
    yg.sum().backward()
    assert xg.grad is not None and bool(xg.grad.abs().sum() > 0)
