"""Build script for binslt's C++ (CPU) and CUDA extensions.

Environment switches (documented in README.md, "Build switches"):

* ``BINSLT_CPP=0``      -- skip every C++ extension (pure-Python install; backend 'torch' only).
* ``BINSLT_CUDA=auto|0|1`` -- build ``binslt._C_cuda``: auto builds it when nvcc and a CUDA build
  of torch are present (no GPU needed), 1 makes a missing toolchain an error, 0 skips it.
* ``BINSLT_CPU=0``      -- skip the CPU extension ``binslt._C`` and build only ``binslt._C_cuda``
  (with ``BINSLT_CUDA=1``: e.g. rebuilding the CUDA kernels alone).
* ``CUDA_HOME``         -- CUDA toolkit root (the folder whose lib64/ or lib/ holds libcudart);
  defaults to /usr/local/cuda when unset.
* ``TORCH_CUDA_ARCH_LIST`` -- defaults to "8.0;9.0+PTX" when no GPU is visible (A100, H100/H200,
  and PTX that newer GPUs compile at load time).
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

#: Flags of the CPU build. -ffp-contract=off: no FMA contraction, so the LIF / epilogue float
#: maths (csrc/include/binslt/lif.h) rounds operation by operation, like the reference.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-DBINSLT_WITH_OPENMP"]

#: nvcc flags of the CUDA build. -fmad=false: nvcc contracts a*b+c into one FMA by default, which
#: rounds differently from the CPU build; without it the CUDA spikes match the CPU's bit for bit.
#: (The Triton kernels get the same from kernels/_common.launch_options.) tests/test_fp_rounding.py
#: compiles the CUDA sources with these flags and checks the PTX.
NVCC_FLAGS = ["-O3", "-fmad=false", "--expt-relaxed-constexpr", "-lineinfo"]

#: Default TORCH_CUDA_ARCH_LIST when no GPU is visible at build time.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_lib_dir(cuda_home: str) -> str | None:
    """The toolkit's library folder: lib64/ (most installs) or lib/ (conda, some distributions;
    torch.utils.cpp_extension links against either)."""
    for sub in ("lib64", "lib"):
        if os.path.isdir(os.path.join(cuda_home, sub)):
            return os.path.join(cuda_home, sub)
    return None


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

    cpu = os.environ.get("BINSLT_CPU", "1")
    if cpu not in ("0", "1"):
        raise SystemExit(f"BINSLT_CPU must be 0 or 1, got {cpu!r}")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = list(CXX_FLAGS)
    if os.environ.get("BINSLT_NATIVE", "0") == "1":
        cxx_flags.append("-march=native")
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    exts = []
    if cpu == "1":
        exts.append(
            CppExtension(
                "binslt._C",
                cpu_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=["-fopenmp"],
            )
        )
    else:
        _log("BINSLT_CPU=0: skipping the CPU extension binslt._C")

    if mode != "0":
        cuda_home = os.environ["CUDA_HOME"]
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        have_nvcc = os.path.exists(nvcc) or shutil.which("nvcc") is not None
        why_not = None
        if torch.version.cuda is None:
            why_not = f"torch {torch.__version__} is not a CUDA build"
        elif not have_nvcc:
            why_not = f"nvcc not found (CUDA_HOME={cuda_home})"
        elif cuda_lib_dir(cuda_home) is None:
            why_not = f"CUDA_HOME={cuda_home} has no lib64/ or lib/ (point it at the toolkit root)"
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + sorted(
            glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
        )
        if not cuda_sources:
            why_not = "no sources in csrc/cuda"
        if why_not is None:
            from torch.utils.cpp_extension import CUDAExtension

            if not torch.cuda.is_available():
                os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
            _log(
                f"building binslt._C_cuda with CUDA_HOME={cuda_home}, "
                f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}"
            )
            exts.append(
                CUDAExtension(
                    "binslt._C_cuda",
                    cuda_sources,
                    include_dirs=include_dirs,
                    extra_compile_args={"cxx": ["-O3"], "nvcc": list(NVCC_FLAGS)},
                )
            )
        elif mode == "1":
            raise SystemExit(f"BINSLT_CUDA=1 but the CUDA extension cannot be built: {why_not}")
        else:
            _log(f"skipping the CUDA extension: {why_not}")
    if cpu == "0" and not any(e.name == "binslt._C_cuda" for e in exts):
        raise SystemExit("BINSLT_CPU=0 skips the CPU extension, but the CUDA extension is not "
                         "being built either; set BINSLT_CUDA=1 (and CUDA_HOME) or drop BINSLT_CPU")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


if __name__ == "__main__":  # pip / setuptools run this file as __main__; tests import the flags
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
