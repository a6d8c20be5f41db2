"""Which algorithms the C++ CPU kernels use: one configuration, set through a context manager.

Per call, the CPU conv ops turn the configuration and the call's shapes into one named plan
(``binslt.ops.plan``: ``forward_plan`` / ``backward_plan`` say which a call takes; the rules,
with their measured thresholds, are written down once at ``plan_forward`` / ``plan_backward`` in
``csrc/cpu/cpu_algos.cpp``). The fields:

* ``isa``: the instruction-set path, ``"scalar"``, ``"popcnt"``, ``"avx2"`` or ``"avx512"``
  (the best this CPU runs; ``binslt.ops.library.cpu_info()["kernel_isa"]`` says which);
* ``conv``: the forward, ``"dense"`` (AND + popcount over every input word), ``"event"`` (the sum
  of the weight columns of the input spikes; int16 counts only) or ``"onednn"`` (oneDNN's int8
  convolution on a CPU with AMX-INT8: inference, and the training forward's counts);
  ``bconv_affine_infer`` (BinConv2d's no-grad op, which has no bit kernels) runs ``"onednn"`` or
  its plan ``"aten"`` (ATen's float conv of the 0/1 spikes), which a forced ``"dense"`` /
  ``"event"`` runs there;
* ``grad_x``: the input gradient, ``"dense"`` (ATen's transposed convolution, NCHW),
  ``"margined"`` (the same conv from dZ channel-last with zero margins; stride 1, padding <=
  kernel - 1), ``"ternary"`` / ``"combo"`` (add/subtract of dZ rows, plain or over signed sums of
  four rows; AVX-512, stride 1), ``"unfold"`` (the conv as one [Co*Ho*Wo, Ci*H*W] matrix, for
  maps of a few pixels), ``"int8"`` (oneDNN's int8 conv of dZ's int8 limbs; AMX-INT8, any stride),
  ``"bf16x3"`` (the dense conv as three products of bf16-exact parts of alpha * dZ, see
  :func:`bf16_split`, under oneDNN's bf16 precision: the bf16 matrix engine of an AMX-BF16
  CPU, where it is a measured candidate; elsewhere float32 products, same result) or
  ``"pointwise"`` (one matrix product: 1x1 kernel, stride 1, no padding);
* ``grad_w``: the weight gradient, ``"event"`` (sums of dZ rows over the input's set bits),
  ``"dense"`` (ATen's weight-gradient convolution of the unpacked input), ``"taps"`` (one GEMM
  per tap over the pixel pairs it joins), ``"unfold"``, ``"int8"`` (exact int8 products of dZ's
  limbs and the unfolded 0/1 input), ``"bf16x3"`` (three products of dZ's bf16-exact parts and
  the 0/1 input) or ``"pointwise"``.

``"auto"`` in a field restores the plan's choice: the rules' table, or the fastest candidate
timed on the call's shapes (:func:`binslt.ops.plan.measure`). A forced name runs exactly that
algorithm (and is never measured); a call it cannot run raises ValueError saying why. Forcing
is for tests and benchmarks: every algorithm gives the same counts and spikes, and gradients
within float rounding.

    >>> from binslt.ops import cpu_algorithms
    >>> with cpu_algorithms(conv="event", grad_x="dense"):
    ...     out = layer(x)          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import library as _ext

CHOICES: dict[str, tuple[str, ...]] = {
    "isa": ("auto", "scalar", "popcnt", "avx2", "avx512"),
    "conv": ("auto", "dense", "event", "onednn"),
    "grad_x": ("auto", "dense", "ternary", "combo", "unfold", "int8", "margined", "pointwise",
               "bf16x3"),
    "grad_w": ("auto", "event", "dense", "unfold", "taps", "int8", "pointwise", "bf16x3"),
}


def _module():
    mod = _ext.module("cpu")
    if mod is None:
        raise RuntimeError(
            "binslt: the C++ CPU extension (binslt._C) is not built, so there are no CPU "
            "algorithms to choose; reinstall with `pip install -e .`"
        )
    return mod


def _check(field: str, name) -> str:
    if name not in CHOICES[field]:
        raise ValueError(f"cpu_algorithms: {field} must be one of {CHOICES[field]}, got {name!r}")
    return name


def current() -> dict[str, str]:
    """The configuration now: {'isa', 'conv', 'grad_x', 'grad_w'} -> name ('auto' if unset)."""
    return dict(_module()._cpu_algorithms())


@contextlib.contextmanager
def cpu_algorithms(isa: str | None = None, conv: str | None = None,
                   grad_x: str | None = None,
                   grad_w: str | None = None) -> Iterator[dict[str, str]]:
    """Force CPU kernel algorithms inside a ``with`` block; the previous configuration returns
    on exit (also on an exception).

    Each argument is a name from ``CHOICES`` (``"auto"`` = the measured rule) or None to keep the
    current choice. Raises ValueError for an unknown name and RuntimeError for a path this CPU
    cannot run (``isa="avx512"`` without AVX-512, ``grad_x="ternary"``/``"combo"`` without
    AVX-512) or when the CPU extension is not built. Yields the configuration in force.

    The configuration is process-wide (the kernels read it on every call), not per thread.
    """
    want = {"isa": isa, "conv": conv, "grad_x": grad_x, "grad_w": grad_w}
    for field, name in want.items():
        if name is not None:
            _check(field, name)
    mod = _module()
    before = dict(mod._cpu_algorithms())
    now = {f: (before[f] if n is None else n) for f, n in want.items()}
    mod._set_cpu_algorithms(now["isa"], now["conv"], now["grad_x"], now["grad_w"])
    try:
        yield dict(now)
    finally:
        mod._set_cpu_algorithms(before["isa"], before["conv"], before["grad_x"], before["grad_w"])


def runnable_isas() -> list[str]:
    """The ISA paths this CPU runs, from the baseline up (``"scalar"`` first): each name
    ``cpu_algorithms(isa=...)`` accepts here."""
    out = []
    for name in CHOICES["isa"][1:]:
        try:
            with cpu_algorithms(isa=name):
                out.append(name)
        except RuntimeError:  # this CPU cannot run it
            pass
    return out


def bf16_split(x) -> tuple:
    """``(parts, e)``: a float32 CPU tensor ``x`` as three tensors exact in bfloat16, stacked in
    ``parts`` (shape ``[3, *x.shape]``), with ``x == (parts[0] + parts[1] + parts[2]) * 2**e``.

    This is the split of the ``"bf16x3"`` gradient forms: ``x`` is scaled by ``2**-e`` (``e`` the
    exponent of its largest magnitude, 0 for all zeros), then ``parts[0]`` is each value with its
    significand cut to bfloat16's 8 bits, ``parts[1]`` the remainder cut the same way and
    ``parts[2]`` what is left (at most 8 bits: float32's 24 in three). Exact for every value
    above ``2**(e - 100)`` in magnitude; smaller ones keep float32's absolute precision at that
    scale. Raises ValueError for NaN or inf (no exact parts), TypeError for another dtype or
    device.

    >>> import torch
    >>> from binslt.ops.cpu_algos import bf16_split
    >>> x = torch.tensor([1 / 3, -2.5e-7, 7.0, 0.0])
    >>> parts, e = bf16_split(x)
    >>> bool((parts.bfloat16().float() == parts).all())
    True
    >>> bool(((parts.double().sum(0) * 2.0 ** e) == x.double()).all())
    True
    """
    return tuple(_module()._bf16_split(x))


def cpu_cache_info() -> dict[str, int]:
    """The CPU kernels' block cache: ``{"held", "limit", "hits", "misses"}``.

    The CPU kernels take their large outputs and scratch (4 MiB and more: spike maps, counts,
    dL/dZ, input gradients) from a cache of freed blocks of the same size, so a training step
    reuses the memory of the step before instead of having the OS map and zero it afresh.
    ``held`` is the bytes of freed blocks kept now, ``limit`` the most it keeps (live tensors
    are not counted), ``hits`` / ``misses`` the large allocations served from the cache / from
    the C allocator since the process started.
    """
    return dict(_module()._cpu_cache_info())


def set_cpu_cache_limit(mib: int | None) -> None:
    """Keep at most ``mib`` MiB of freed blocks in the CPU kernels' cache (0 turns it off and
    frees what it held; None: ``BINSLT_CPU_CACHE_MB`` from the environment again, default 256).
    Raises ValueError for a negative or non-integer value."""
    if mib is None:
        _module()._set_cpu_cache_limit(-1)
        return
    if isinstance(mib, bool) or not isinstance(mib, int) or mib < 0:
        raise ValueError(f"set_cpu_cache_limit: mib must be an int >= 0 or None, got {mib!r}")
    _module()._set_cpu_cache_limit(mib << 20)


def empty_cpu_cache() -> None:
    """Free every block the CPU kernels' cache holds (as ``torch.cuda.empty_cache`` does for
    CUDA's); the limit stays."""
    _module()._empty_cpu_cache()
