"""Which algorithms the C++ CPU kernels use: one configuration, set through a context manager.

The CPU kernels choose per call, by measured rules (``csrc/cpu/cpu_algos.cpp``), between

* ``isa``: the instruction-set path, ``"scalar"``, ``"popcnt"``, ``"avx2"`` or ``"avx512"``
  (the best this CPU runs; ``binslt.ops.library.cpu_info()["kernel_isa"]`` says which);
* ``conv``: the forward of ``bconv_lif``, ``"dense"`` (AND + popcount over every input word) or
  ``"event"`` (the sum of the weight columns of the input spikes, faster at low firing rates),
  or, for inference (``bconv_lif_infer``) on a CPU with AMX-INT8, ``"onednn"`` (the exact
  integer counts from oneDNN's int8 convolution; the training forward then takes ``"dense"``;
  forcing it elsewhere raises RuntimeError; ``"auto"`` takes it there for maps of at least 4x4);
* ``grad_x``: the input gradient of ``bconv_lif_bwd``, ``"dense"`` (ATen's transposed
  convolution), ``"ternary"`` (add/subtract of dZ rows; AVX-512 and stride 1), ``"combo"`` (the
  same over signed sums of four dZ rows; its per-thread buffer grows with the feature map, about
  65 MB at 224x224) or ``"unfold"`` (the whole conv as one [Co*Ho*Wo, Ci*H*W] matrix, one GEMM:
  for small maps, where a 3x3 kernel mostly meets zero padding -- 9x fewer products at 1x1,
  2.25x at 2x2; its matrix grows with the square of the map);
* ``grad_w``: the weight gradient of ``bconv_lif_bwd``, ``"event"`` (sums of dZ rows over the
  input's set bits: its work follows the spikes) or ``"dense"`` (ATen's weight-gradient
  convolution of the unpacked input, a GEMM: faster above a firing rate, and for deep layers
  whose gradient does not fit a per-thread copy in L2) or ``"unfold"`` (the unfold form's GEMM
  over the map's pixel pairs, folded into the taps) or ``"taps"`` (the dense form as one GEMM
  per tap over the channel-last pixel pairs that tap joins: no zero padding multiplied; "auto"
  takes it for the dense form on maps of at most 4x4 output pixels).

``"auto"`` takes the unfold form for both gradients where a kernel has at least twice as many
taps as the input has pixels (3x3 over 1x1, 1x2 or 2x2) and its matrix is at most 64 MiB.

``"auto"`` in a field restores the measured rule. Forcing a choice is for tests and benchmarks;
every choice gives the same counts and spikes, and gradients within float rounding.

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
    "grad_x": ("auto", "dense", "ternary", "combo", "unfold", "int8"),
    "grad_w": ("auto", "event", "dense", "unfold", "taps", "int8"),
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
