"""Loading of the compiled extensions, and what each backend can do here.

``import binslt`` never fails because an extension is missing: it warns once and the affected
ops fall back to the pure-torch reference (see ``binslt.backends()``).
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

_STATE: dict[str, dict] = {}


def _try_import(modname: str):
    try:
        return importlib.import_module(modname), ""
    except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError
        return None, f"{type(exc).__name__}: {exc}"


def load() -> dict[str, dict]:
    """Import the extensions once and record why any is unavailable."""
    if _STATE:
        return _STATE
    cpu, cpu_err = _try_import("binslt._C")
    cuda, cuda_err = _try_import("binslt._C_cuda")
    tri_err = ""
    try:
        import triton  # noqa: F401

        tri_built = True
    except Exception as exc:
        tri_built, tri_err = False, f"triton is not importable: {exc}"
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    gpu = torch.cuda.is_available()

    _STATE["torch"] = {"built": True, "usable": True, "reason": "pure-PyTorch reference"}
    _STATE["cpu"] = {
        "built": cpu is not None,
        "usable": cpu is not None,
        "reason": "C++ CPU kernels" + (f" ({cpu.cpu_features()})" if cpu is not None else "")
        if cpu is not None
        else f"binslt._C did not load ({cpu_err}); reinstall with `pip install -e .`",
    }
    if tri_built:
        why = "GPU" if gpu else ("TRITON_INTERPRET=1 (CPU tensors, slow)" if interp else "")
        _STATE["triton"] = {
            "built": True,
            "usable": gpu or interp,
            "reason": f"Triton kernels via {why}" if why else
            "no CUDA device; set TRITON_INTERPRET=1 to run the Triton kernels on the CPU",
        }
    else:
        _STATE["triton"] = {"built": False, "usable": False, "reason": tri_err}
    if cuda is not None:
        _STATE["cuda"] = {
            "built": True,
            "usable": gpu,
            "reason": "CUDA kernels" if gpu else "built, but no CUDA device is visible",
        }
    else:
        _STATE["cuda"] = {
            "built": False,
            "usable": False,
            "reason": f"binslt._C_cuda did not load ({cuda_err}); it is built when nvcc and a "
            "CUDA build of torch are present (BINSLT_CUDA=1 to require it)",
        }
    if cpu is None and os.environ.get("BINSLT_CPP", "1") != "0":
        warnings.warn(
            f"binslt: the C++ CPU extension is unavailable ({cpu_err}); falling back to the "
            "pure-torch backend. Rebuild with `pip install -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    _STATE["_modules"] = {"cpu": cpu, "cuda": cuda}
    return _STATE


def backends() -> dict[str, dict]:
    """{'torch'|'cpu'|'triton'|'cuda': {'built': bool, 'usable': bool, 'reason': str}}."""
    st = load()
    return {k: dict(v) for k, v in st.items() if not k.startswith("_")}


def module(name: str):
    return load()["_modules"][name]
