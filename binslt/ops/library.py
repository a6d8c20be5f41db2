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
        "reason": f"C++ CPU kernels ({_cpu_summary(_cpu_info_of(cpu))})"
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


def _cpu_info_of(cpu) -> dict:
    return {
        "kernel_isa": cpu._cpu_kernel_isa(),
        "features": dict(cpu._cpu_features()),
        "openmp": bool(cpu._cpu_openmp()),
    }


def _cpu_summary(info: dict) -> str:
    """One line for humans: the kernel path, the feature flags this CPU has, OpenMP."""
    have = [name for name, on in info["features"].items() if on]
    return (f"kernel path {info['kernel_isa']}; features {', '.join(have) or 'none'}; "
            f"{'openmp' if info['openmp'] else 'no openmp'}")


def cpu_info() -> dict | None:
    """What the C++ CPU kernels run on here, or None when binslt._C is not built.

    ``{"kernel_isa": "avx512" | "avx2" | "popcnt" | "scalar", "features": {flag: bool},
    "openmp": bool}``: ``kernel_isa`` is the path the kernels take now (the best this CPU runs,
    unless forced with ``binslt.ops.cpu_algorithms``; "avx512" needs avx512f, avx512bw, avx512vl
    and avx512vpopcntdq together), ``features`` the raw flags it is chosen from.
    """
    cpu = load()["_modules"]["cpu"]
    return None if cpu is None else _cpu_info_of(cpu)


def backends() -> dict[str, dict]:
    """{'torch'|'cpu'|'triton'|'cuda': {'built': bool, 'usable': bool, 'reason': str}}."""
    st = load()
    return {k: dict(v) for k, v in st.items() if not k.startswith("_")}


def module(name: str):
    return load()["_modules"][name]
