"""Shared pieces of the Triton kernels: interpreter switch, launch helpers, LIF device functions.

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests only) every kernel runs one tiny configuration:
the interpreter executes programs one by one (~10 ms each), so autotuning there is useless and
slow. On a GPU the conv kernels autotune over configurations aimed at H100/H200.
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

#: True when Triton runs kernels with its numpy interpreter (must be set before triton imports).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

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


def launch(kernel, grid, *args, **kwargs) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)``.

    On a GPU, wrap_triton turns the launch into a higher-order op that FakeTensorMode and
    torch.compile trace. Under the interpreter wrap_triton returns the raw kernel, which would try
    to read the storage of fake tensors; there the launch is skipped for fake/meta tensors, so that
    ``triton_op``'s derived fake kernel (the op body itself) still produces the output metadata.
    """
    if INTERPRET and any(isinstance(a, torch.Tensor) and (a.device.type == "meta" or is_fake(a))
                         for a in args):
        modes = _get_current_dispatch_mode_stack()
        if any(not isinstance(m, FakeTensorMode) for m in modes):
            # AOT tracing would record the op body without its (interpreted) kernels.
            raise RuntimeError(
                "torch.compile / AOT tracing of the binslt Triton ops is not supported under "
                "TRITON_INTERPRET=1 (CPU); compile them on a GPU, or use backend='cpu' on the CPU")
        return
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
    """triton.Config list: the GPU sweep, or the single interpreter config."""
    if INTERPRET:
        return [triton.Config(dict(interp), num_warps=1, num_stages=1)]
    out = []
    for c in gpu:
        c = dict(c)
        nw, ns = c.pop("num_warps"), c.pop("num_stages")
        out.append(triton.Config(c, num_warps=nw, num_stages=ns))
    return out


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


HALF_PI: float = math.pi / 2


# ----------------------------------------------------------------------------------------------
# LIF device functions (SpikingJelly's float operation order, see binslt.reference.lif_multistep)
# ----------------------------------------------------------------------------------------------


@triton.jit
def lif_charge(v, x, tau, v_reset, DECAY_INPUT: tl.constexpr):
    """H[t] from V[t-1] and X[t]. ``v_reset`` is 0 for a soft reset.

    div_rn: IEEE round-to-nearest division like torch's (plain ``/`` is approximate on CUDA)."""
    if DECAY_INPUT:
        h = v + tl.div_rn(x - (v - v_reset), tau)
    else:
        h = v - tl.div_rn(v - v_reset, tau) + x
    return h


@triton.jit
def lif_fire_reset(h, v_threshold, v_reset, HARD: tl.constexpr):
    """(S[t], V[t]) from H[t]: S = (H - th >= 0); hard: V = S*vr + (1-S)*H; soft: V = H - S*th."""
    s = ((h - v_threshold) >= 0).to(tl.float32)
    if HARD:
        v = s * v_reset + (1.0 - s) * h
    else:
        v = h - s * v_threshold
    return s, v


@triton.jit
def surrogate_grad(x, alpha, SURROGATE: tl.constexpr):
    """g'(x): 0 = ATan alpha/(2(1+(pi/2 alpha x)^2)), 1 = Sigmoid alpha*sig(alpha x)(1-sig)."""
    if SURROGATE == 0:
        z = x * (1.5707963267948966 * alpha)
        g = (alpha / 2) / (1 + z * z)
    else:
        sg = tl.sigmoid(alpha * x)
        g = (1 - sg) * sg * alpha
    return g
