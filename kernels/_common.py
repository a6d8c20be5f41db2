"""Shared pieces of the Triton kernels: interpreter switch, launch helpers, LIF device functions.

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests only) every kernel runs one tiny configuration:
the interpreter executes programs one by one in numpy, so autotuning there is useless and slow.
On a GPU the conv kernels autotune over configurations aimed at H100/H200;
``BINSLT_TRITON_AUTOTUNE=first`` (read at import) keeps only the first GPU configuration of each
kernel, so a short check compiles one variant per kernel instead of the whole sweep.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch.library import wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from triton.language.extra import libdevice

#: True when Triton runs kernels with its numpy interpreter (must be set before triton imports).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: ``BINSLT_TRITON_AUTOTUNE``: ``all`` (default) autotunes over every GPU configuration,
#: ``first`` keeps only the first (no autotuning: one compile per kernel and specialization).
AUTOTUNE: str = os.environ.get("BINSLT_TRITON_AUTOTUNE", "all").strip().lower() or "all"
if AUTOTUNE not in ("all", "first"):
    raise ValueError(f"BINSLT_TRITON_AUTOTUNE must be 'all' or 'first', got {AUTOTUNE!r}")

#: Precision of the float ``tl.dot`` in the backward convolutions. One operand is always exact in
#: tf32 (binary spikes, ternary weights), so tf32x3 keeps float32 accuracy on tensor cores. The
#: interpreter computes in numpy and only knows plain IEEE float32.
DOT_PRECISION: str = "ieee" if INTERPRET else "tf32x3"

_INT32_MAX = 2**31 - 1


def check_device(*tensors: torch.Tensor, op: str) -> None:
    """Raise RuntimeError unless every tensor is on CUDA, or on the CPU under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRET:
            continue
        raise RuntimeError(
            f"binslt::{op}_triton needs CUDA tensors (got a tensor on {t.device}); on the CPU it "
            "only runs with TRITON_INTERPRET=1 set before triton is imported (tests only). Use "
            "backend='cpu' or 'torch' for CPU tensors.")


def check_int32_index(numel: int, what: str) -> None:
    """The kernels index with int32; refuse tensors that would overflow instead of corrupting."""
    if numel > _INT32_MAX:
        raise ValueError(f"{what} has {numel} elements; the Triton kernels index with int32 and "
                         f"support at most {_INT32_MAX}. Split the batch.")


#: Kernels whose float maths must round like csrc/include/binslt/lif.h (the CPU build uses
#: -ffp-contract=off, the CUDA build -fmad=false): compiled with ``enable_fp_fusion=False``, so
#: Triton/LLVM never contracts a multiply and an add into one FMA (which rounds once instead of
#: twice and can move a neuron within an ulp of its threshold across it). Registered with
#: :func:`no_fp_fusion`; the float ``tl.dot`` kernels of the backward are not listed (their sums
#: run in the MMA units in an order of their own, and they are not claimed bit-exact).
_NO_FP_FUSION: set = set()


def no_fp_fusion(kernel):
    """Decorator (outermost, above ``@triton.autotune`` / ``@triton.jit``): launch ``kernel``
    without FMA contraction. Returns ``kernel`` unchanged."""
    _NO_FP_FUSION.add(kernel)
    if isinstance(kernel, triton.runtime.Autotuner):
        _NO_FP_FUSION.add(kernel.fn)
    return kernel


def launch_options(kernel) -> dict:
    """Triton compile options that :func:`launch` adds for ``kernel`` (also used by aot_check)."""
    return {"enable_fp_fusion": False} if kernel in _NO_FP_FUSION else {}


def _cuda_device(args, kwargs) -> torch.device | None:
    """The CUDA device of the first CUDA tensor argument (None when there is none)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.device.type == "cuda":
            return a.device
    return None


def launch(kernel, grid, *args, **kwargs) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs, **launch_options(kernel))`` on the device of
    the tensor arguments; under the interpreter ``kernel[grid](...)``.

    Triton launches on the *current* CUDA device, not on the tensors' one, so the launch runs
    under ``torch.cuda.device(<device of the first CUDA tensor>)``: tensors on ``cuda:1`` work
    without ``torch.cuda.set_device``. (The callers check that all tensors share one device.)

    On a GPU, wrap_triton turns the launch into a higher-order op that FakeTensorMode and
    torch.compile trace. Under the interpreter the kernel is launched as it is (what wrap_triton
    returns there in torch 2.14; torch 2.11 refuses the interpreter's kernels), which would
    read the storage of fake tensors; there the launch is skipped for fake/meta tensors, so that
    ``triton_op``'s derived fake kernel (the op body itself) still produces the output metadata.
    """
    kwargs = {**kwargs, **launch_options(kernel)}
    if INTERPRET:
        if any(isinstance(a, torch.Tensor) and (a.device.type == "meta" or is_fake(a))
               for a in args):
            modes = _get_current_dispatch_mode_stack()
            if any(not isinstance(m, FakeTensorMode) for m in modes):
                # AOT tracing would record the op body without its (interpreted) kernels.
                raise RuntimeError(
                    "torch.compile / AOT tracing of the binslt Triton ops is not supported under "
                    "TRITON_INTERPRET=1 (CPU); compile them on a GPU, or use backend='cpu' on the "
                    "CPU")
            return
        kernel[grid](*args, **kwargs)
        return
    dev = _cuda_device(args, kwargs)
    if dev is None:
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    with torch.cuda.device(dev):
        wrap_triton(kernel)[grid](*args, **kwargs)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def elementwise_blocks(rows: int, inner: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_S, num_warps) for the [rows, inner] tiles of the LIF kernels.

    Each program walks T for a tile of neurons; the tile is wide along the contiguous spatial
    axis. The interpreter gets one big tile (few programs), the GPU ~1-2K neurons per program.
    """
    budget = 8192 if INTERPRET else 1024
    bs = min(next_pow2(inner), budget)
    br = max(1, min(next_pow2(rows), budget // bs))
    return br, bs, (1 if INTERPRET else 4)


def autotune_configs(gpu: list[dict], interp: dict) -> list[triton.Config]:
    """triton.Config list: the GPU sweep (its first entry only with BINSLT_TRITON_AUTOTUNE=first),
    or the single interpreter config."""
    if INTERPRET:
        return [triton.Config(dict(interp), num_warps=1, num_stages=1)]
    out = []
    for c in gpu[:1] if AUTOTUNE == "first" else gpu:
        c = dict(c)
        nw, ns = c.pop("num_warps"), c.pop("num_stages")
        out.append(triton.Config(c, num_warps=nw, num_stages=ns))
    return out


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


HALF_PI: float = math.pi / 2


# ----------------------------------------------------------------------------------------------
# LIF device functions: csrc/include/binslt/lif.h operation for operation in float32, so that the
# Triton, CPU and CUDA kernels round alike (the forward follows SpikingJelly's order, see
# binslt.reference.lif_multistep). Every division is tl.div_rn, IEEE round-to-nearest like torch
# and nvcc's default ``/``; Triton's plain ``/`` is approximate on CUDA. The kernels that call
# these are registered with ``no_fp_fusion``, so no multiply and add are contracted into an FMA
# (the CPU build's -ffp-contract=off, the CUDA build's -fmad=false).
# ----------------------------------------------------------------------------------------------


@triton.jit
def lif_step(v, x, tau, v_threshold, v_reset, DECAY_INPUT: tl.constexpr, HARD: tl.constexpr):
    """One forward step, V[t-1] and X[t] -> (H[t], S[t], V[t]). ``v_reset`` is 0 for a soft reset.

    H = V + (X - (V - vr)) / tau (decay_input) or V - (V - vr) / tau + X; S = (H - th >= 0);
    hard reset: V = S*vr + (1-S)*H; soft: V = H - S*th."""
    if DECAY_INPUT:
        h = v + tl.div_rn(x - (v - v_reset), tau)
    else:
        h = v - tl.div_rn(v - v_reset, tau) + x
    s = ((h - v_threshold) >= 0).to(tl.float32)
    if HARD:
        v_next = s * v_reset + (1.0 - s) * h
    else:
        v_next = h - s * v_threshold
    return h, s, v_next


_INTERPRET_C = tl.constexpr(INTERPRET)


@triton.jit
def _expf(x):
    """CUDA's expf (libdevice), as lif.h calls it; the interpreter has no libdevice (numpy exp)."""
    if _INTERPRET_C:
        y = tl.exp(x)
    else:
        y = libdevice.exp(x)
    return y


def surrogate_constants(surrogate: int, surrogate_alpha: float) -> tuple[float, float]:
    """(alpha**2, window half-width) of the kernels' ``surrogate_grad``: computed in float64 and
    rounded once to float32 (as a kernel's float argument), as SpikingJelly's torch expressions
    round their Python-float scalars against a float32 tensor (csrc: ``neuron_params``). The
    half-width is 0.5/alpha (Rect), 1/alpha (PiecewiseQuadratic), 0 for the others."""
    a = float(surrogate_alpha)
    bound = 0.5 / a if surrogate == 2 else (1.0 / a if surrogate == 3 else 0.0)
    return a * a, bound


@triton.jit
def surrogate_grad(x, alpha, alpha_sq, bound, SURROGATE: tl.constexpr):
    """g'(x) at x = H - th: 0 = ATan alpha/2 / (1+(pi/2 alpha x)^2), 1 = Sigmoid alpha*s(1-s),
    2 = Rect alpha where |x| < bound (strict), 3 = PiecewiseQuadratic alpha - alpha_sq |x| where
    |x| <= bound (non-strict); 0 outside the window (``surrogate_constants``: alpha_sq, bound)."""
    if SURROGATE == 0:
        z = x * (1.5707963267948966 * alpha)
        g = tl.div_rn(alpha * 0.5, 1.0 + z * z)
    elif SURROGATE == 1:
        sig = tl.div_rn(1.0, 1.0 + _expf(-alpha * x))
        g = (1.0 - sig) * sig * alpha
    elif SURROGATE == 2:
        g = tl.where(tl.abs(x) < bound, alpha, 0.0)
    else:
        ax = tl.abs(x)
        g = tl.where(ax > bound, 0.0, -alpha_sq * ax + alpha)
    return g


@triton.jit
def lif_backward_step(grad_spike, grad_v, h, tau, v_threshold, v_reset, surrogate_alpha,
                      surrogate_alpha_sq, surrogate_bound, HARD: tl.constexpr,
                      DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr):
    """One BPTT step: dL/dS[t], the carried dL/dV[t] and H[t] -> (dL/dH[t], dL/dV[t-1]).

    dL/dH = dL/dS g' + dL/dV dV/dH with dV/dH = hard: (1-S) [+ (vr-H) g'], soft: 1 [- th g']
    (bracket: the path through S[t], unless detach_reset); dL/dV[t-1] = dL/dH (1 - 1/tau)."""
    sg = surrogate_grad(h - v_threshold, surrogate_alpha, surrogate_alpha_sq, surrogate_bound,
                        SURROGATE)
    if HARD:
        s = ((h - v_threshold) >= 0).to(tl.float32)
        dv_dh = 1.0 - s
        if not DETACH_RESET:
            dv_dh += (v_reset - h) * sg
    else:
        if DETACH_RESET:
            dv_dh = tl.full(h.shape, 1.0, tl.float32)
        else:
            dv_dh = 1.0 - v_threshold * sg
    grad_h = grad_spike * sg + grad_v * dv_dh
    return grad_h, grad_h * (1.0 - tl.div_rn(1.0, tau))


@triton.jit
def bn_invstd(var, eps):
    """1 / sqrt(var + eps) rounded as in csrc (``bn_invstd`` / ``invstd_of``: IEEE sqrt, then an
    IEEE division), never the approximate ``rsqrt``."""
    return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def lif_input_grad(grad_h, tau, DECAY_INPUT: tl.constexpr):
    """dL/dX[t] from dL/dH[t]: dH/dX = 1/tau (decay_input) or 1."""
    if DECAY_INPUT:
        g = tl.div_rn(grad_h, tau)
    else:
        g = grad_h
    return g
