"""Build script for binslt's C++ (CPU) and CUDA extensions.

Environment switches (documented in README.md, "Build switches"):

* ``BINSLT_CPP=0``      -- skip every C++ extension (pure-Python install; backend 'torch' only).
* ``BINSLT_CUDA=auto|0|1`` -- build ``binslt._C_cuda``: auto builds it when nvcc and a CUDA build
  of torch are present (no GPU needed), 1 makes a missing toolchain an error, 0 skips it.
* ``CUDA_HOME``         -- CUDA toolkit root (the folder whose lib64/ holds libcudart); defaults
  to /usr/local/cuda when unset.
* ``TORCH_CUDA_ARCH_LIST`` -- defaults to "8.0;9.0" when no GPU is visible.
* ``MAX_JOBS``          -- parallel compile jobs (honoured by torch's BuildExtension/ninja).
* ``BINSLT_NATIVE=1``   -- add -march=native to the CPU build (off by default: the AVX2 path is
  compiled per-function and chosen at runtime).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[binslt setup] {msg}", file=sys.stderr, flush=True)


def _extensions():
    if os.environ.get("BINSLT_CPP", "1") == "0":
        _log("BINSLT_CPP=0: building no C++ extension (pure-Python install)")
        return [], {}
    mode = os.environ.get("BINSLT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"BINSLT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode != "0":
        # torch.utils.cpp_extension reads CUDA_HOME when it is first imported.
        os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _log("torch is not importable at build time: no C++ extension will be built")
        return [], {}

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp", "-DBINSLT_WITH_OPENMP"]
    if os.environ.get("BINSLT_NATIVE", "0") == "1":
        cxx_flags.append("-march=native")
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    exts = [
        CppExtension(
            "binslt._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]

    if mode != "0":
        cuda_home = os.environ["CUDA_HOME"]
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        have_nvcc = os.path.exists(nvcc) or shutil.which("nvcc") is not None
        why_not = None
        if torch.version.cuda is None:
            why_not = f"torch {torch.__version__} is not a CUDA build"
        elif not have_nvcc:
            why_not = f"nvcc not found (CUDA_HOME={cuda_home})"
        elif not os.path.exists(os.path.join(cuda_home, "lib64")):
            why_not = f"CUDA_HOME={cuda_home} has no lib64/ (point it at the toolkit root)"
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + sorted(
            glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
        )
        if not cuda_sources:
            why_not = "no sources in csrc/cuda"
        if why_not is None:
            from torch.utils.cpp_extension import CUDAExtension

            if not torch.cuda.is_available():
                os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
            _log(
                f"building binslt._C_cuda with CUDA_HOME={cuda_home}, "
                f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}"
            )
            nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
            exts.append(
                CUDAExtension(
                    "binslt._C_cuda",
                    cuda_sources,
                    include_dirs=include_dirs,
                    extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
                )
            )
        elif mode == "1":
            raise SystemExit(f"BINSLT_CUDA=1 but the CUDA extension cannot be built: {why_not}")
        else:
            _log(f"skipping the CUDA extension: {why_not}")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
