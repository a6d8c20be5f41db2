"""Which algorithms the C++ CPU conv kernels run for a call (its *plan*), and a log of them.

Each call of a CPU conv op is turned into one named plan by one decision point in C++
(``plan_forward`` / ``plan_backward`` in ``csrc/cpu/cpu_algos.cpp``, where the rules and their
measured thresholds are written down), and the kernels execute that plan:

* forward (``bconv_lif``, ``bconv_lif_infer``): ``"dense"``, ``"event"`` or ``"onednn"``
  (inference on a CPU with AMX-INT8);
* backward (``bconv_lif_bwd``, ``bconv_lif_bwd_pool2``): ``grad_x`` one of ``"none"``
  (dL/dx not wanted), ``"dense"``, ``"margined"``, ``"ternary"``, ``"combo"``, ``"unfold"``,
  ``"int8"``, ``"pointwise"``; ``grad_w`` one of ``"event"``, ``"dense"``, ``"taps"``,
  ``"unfold"``, ``"int8"``, ``"pointwise"``.

The plan follows the configuration of :func:`binslt.ops.cpu_algorithms`: a forced name runs
exactly that algorithm, and a call it cannot run raises ValueError saying why (from the op, and
from :func:`forward_plan` / :func:`backward_plan`).

    >>> from binslt.ops import plan
    >>> plan.forward_plan((4, 16, 128, 16, 16), (128, 128, 3, 3), 1, 1, rate=0.15)
    {'forward': 'event', 'isa': 'avx2'}                    # doctest: +SKIP
    >>> with plan.verbose():
    ...     layer(x)                                          # doctest: +SKIP
    binslt_verbose,cpu,bconv_lif,x=4x16x128x16x16 w=128x128x3x3 stride=1 padding=1,isa=avx2 forward=event,3.214

The log (``BINSLT_VERBOSE=1`` in the environment, read at each call, or :func:`verbose`) is one
line per CPU conv op call on stderr, ``binslt_verbose,cpu,<op>,<shapes>,<plan>,<ms>``, like
oneDNN's ``ONEDNN_VERBOSE``; :func:`parse_verbose` reads such lines back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from . import library as _ext

__all__ = ["backward_plan", "forward_plan", "parse_verbose", "verbose"]

PREFIX = "binslt_verbose,cpu,"


def _module():
    mod = _ext.module("cpu")
    if mod is None:
        raise RuntimeError(
            "binslt: the C++ CPU extension (binslt._C) is not built, so there are no CPU "
            "plans; reinstall with `pip install -e .`"
        )
    return mod


def _dims(name: str, shape: Sequence[int], lengths: tuple[int, ...]) -> list[int]:
    try:
        dims = [int(d) for d in shape]
    except (TypeError, ValueError):
        raise ValueError(
            f"binslt.ops.plan: {name} must be a sequence of ints, got {shape!r}") from None
    if len(dims) not in lengths or any(isinstance(d, bool) for d in shape):
        raise ValueError(f"binslt.ops.plan: {name} must have {' or '.join(map(str, lengths))} "
                         f"dimensions, got {shape!r}")
    return dims


def _conv_shapes(x_shape, weight_shape, stride, padding):
    """[T, N, Ci, H, W] and [Co, Ci, kh, kw]; a linear layer ([T, N, F], [Co, F]) is the 1x1
    conv over a 1x1 map it runs as."""
    x = _dims("x_shape", x_shape, (3, 5))
    w = _dims("weight_shape", weight_shape, (2, 4))
    if (len(x) == 3) != (len(w) == 2):
        raise ValueError("binslt.ops.plan: a linear layer has x_shape [T, N, F] and "
                         f"weight_shape [Co, F], got {x_shape!r} and {weight_shape!r}")
    if len(x) == 3:
        if (stride, padding) != (1, 0):
            raise ValueError("binslt.ops.plan: a linear layer has stride 1 and padding 0, got "
                             f"stride {stride!r}, padding {padding!r}")
        x, w = x + [1, 1], w + [1, 1]
    return x, w


def _fraction(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"binslt.ops.plan: {name} must be a fraction in [0, 1], got {v!r}")
    return float(v)


def forward_plan(x_shape: Sequence[int], weight_shape: Sequence[int], stride: int = 1,
                 padding: int = 0, *, rate: float = 0.15, infer: bool = False) -> dict[str, str]:
    """The plan the CPU forward would take: ``{"isa", "forward"}``.

    ``x_shape`` is ``[T, N, Ci, H, W]`` (``[T, N, F]`` for a linear layer), ``weight_shape``
    ``[Co, Ci, kh, kw]`` (``[Co, F]``), ``rate`` the input's fraction of spikes (the kernels
    count it among the packed words' bits, ``rate * Ci / (32 * ceil(Ci / 32))``), ``infer`` the
    inference op ``bconv_lif_infer`` on float spikes (else the training forward ``bconv_lif``,
    which reads packed words). Under the
    configuration in force (:func:`binslt.ops.cpu_algorithms`); ValueError where a forced
    algorithm cannot run this call, or for a bad shape.
    """
    x, w = _conv_shapes(x_shape, weight_shape, stride, padding)
    out = _module()._plan_forward(x, w, int(stride), int(padding), _fraction("rate", rate),
                                  bool(infer))
    return dict(out)


def backward_plan(x_shape: Sequence[int], weight_shape: Sequence[int], stride: int = 1,
                  padding: int = 0, *, rate: float = 0.15, weight_density: float = 0.5,
                  need_grad_x: bool = True) -> dict[str, str]:
    """The plan the CPU backward would take: ``{"isa", "grad_x", "grad_w"}``.

    As :func:`forward_plan`; ``weight_density`` is the fraction of nonzero (unpruned) weights
    (1 - prune rate), ``need_grad_x`` whether dL/dx is wanted (``grad_x`` is ``"none"``
    otherwise).
    """
    x, w = _conv_shapes(x_shape, weight_shape, stride, padding)
    out = _module()._plan_backward(x, w, int(stride), int(padding), _fraction("rate", rate),
                                   _fraction("weight_density", weight_density),
                                   bool(need_grad_x))
    return dict(out)


@contextlib.contextmanager
def verbose(on: bool = True) -> Iterator[None]:
    """Log each CPU conv op call's plan to stderr inside a ``with`` block (as
    ``BINSLT_VERBOSE=1`` does); the previous setting returns on exit. Process-wide."""
    mod = _module()
    before = _verbose_flag[0]
    mod._set_plan_verbose(bool(on))
    _verbose_flag[0] = bool(on)
    try:
        yield
    finally:
        mod._set_plan_verbose(before)
        _verbose_flag[0] = before


_verbose_flag = [False]  # the setting of verbose() (BINSLT_VERBOSE is read by the kernels)


def parse_verbose(text: str) -> list[dict[str, str]]:
    """The plan-log lines in ``text`` (other lines skipped) as dicts: ``op``, ``shapes``,
    ``ms`` and the plan's fields (``isa``, ``forward`` or ``grad_x`` / ``grad_w``)."""
    out = []
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        op, shapes, plan, ms = line[len(PREFIX):].split(",")
        rec = {"op": op, "shapes": shapes, "ms": ms}
        for field in plan.split(" "):
            if "=" in field:
                k, v = field.split("=", 1)
                rec[k] = v
        out.append(rec)
    return out
