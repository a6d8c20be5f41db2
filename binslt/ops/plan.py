"""Which algorithms the C++ CPU conv kernels run for a call (its *plan*), and a log of them.

Each call of a CPU conv op is turned into one named plan by one decision point in C++
(``plan_forward`` / ``plan_backward`` in ``csrc/cpu/cpu_algos.cpp``, where the rules and their
measured thresholds are written down), and the kernels execute that plan:

* forward (``bconv_lif``, ``bconv_lif_infer``): ``"dense"``, ``"event"`` or ``"onednn"``
  (oneDNN's int8 convolution on a CPU with AMX-INT8); ``bconv_affine_infer`` (BinConv2d's
  no-grad op) ``"onednn"`` or ``"aten"`` (ATen's float conv of the 0/1 spikes);
* backward (``bconv_lif_bwd``, ``bconv_lif_bwd_pool2``): ``grad_x`` one of ``"none"``
  (dL/dx not wanted), ``"dense"``, ``"margined"``, ``"ternary"``, ``"combo"``, ``"unfold"``,
  ``"int8"``, ``"bf16x3"``, ``"pointwise"``; ``grad_w`` one of ``"event"``, ``"dense"``,
  ``"taps"``, ``"unfold"``, ``"int8"``, ``"bf16x3"``, ``"pointwise"``.

The plan follows the configuration of :func:`binslt.ops.cpu_algorithms`: a forced name runs
exactly that algorithm, and a call it cannot run raises ValueError saying why (from the op, and
from :func:`forward_plan` / :func:`backward_plan`).

    >>> from binslt.ops import plan
    >>> plan.forward_plan((4, 16, 128, 16, 16), (128, 128, 3, 3), 1, 1, rate=0.15)
    {'forward': 'event', 'isa': 'avx2', 'source': 'table'}  # doctest: +SKIP
    >>> with plan.verbose():
    ...     layer(x)                                          # doctest: +SKIP
    binslt_verbose,cpu,bconv_lif,x=4x16x128x16x16 w=128x128x3x3 stride=1 padding=1,isa=avx2 forward=event source=measured,3.214

The log (``BINSLT_VERBOSE=1`` in the environment, read at each call, or :func:`verbose`) is one
line per CPU conv op call on stderr, ``binslt_verbose,cpu,<op>,<shapes>,<plan>,<ms>``, like
oneDNN's ``ONEDNN_VERBOSE``; :func:`parse_verbose` reads such lines back. The plan ends with
``source=``: ``table`` (the rules), ``forced`` (:func:`binslt.ops.cpu_algorithms`),
``measuring`` (this call timed the candidates) or ``measured`` (a cached winner); a backward
whose two gradients differ writes ``<grad_x's>/<grad_w's>``.

Measuring, as ``torch.backends.cudnn.benchmark`` does: where a field is ``"auto"``, the first
call of each key (the op, its shapes, input dtype and layout, output kind, the ISA path, the
thread count and a coarse bucket of the input's firing rate) runs every candidate algorithm of
that field inside the op's C++ implementation (so torch.compile / torch.export graphs measure as
eager calls do), returns the fastest one's output and caches it as the key's plan (the table's
choice stays unless another is more than 5 % faster); later calls take it. Every candidate is
exact: the forward algorithms give bit-identical outputs, the gradient algorithms agree within
float rounding (as forced ones do). The modes
(:func:`measure`, or ``BINSLT_PLAN_MEASURE``, read at each call):

* ``"forward"`` (the default; ``BINSLT_PLAN_MEASURE`` unset or ``forward``): the forward ops
  ``bconv_lif``, ``bconv_lif_infer`` and ``bconv_affine_infer`` measure; their outputs are the
  same bits whatever wins, so measuring costs only the first call's time;
* ``"all"`` (``1``): the backward too, each gradient under its own key; which algorithm wins
  then decides the gradients' float rounding (a cached file keeps it the same across runs);
* ``"off"`` (``0``): the table only.

The winners persist in ``$BINSLT_CACHE_DIR/plans-<id>.json`` (else
``${XDG_CACHE_HOME:-~/.cache}/binslt/``, beside ``binslt check``'s check.json), one file per CPU
(model name and the kernels' ISA features) and build (binslt's version and the extension file):
JSON only, written whole to a temporary file renamed over it, read once at import (a corrupt
file is ignored with one warning). :func:`measured` lists the winners and their times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import library as _ext

__all__ = ["backward_plan", "cache_path", "forward_plan", "measure", "measure_mode", "measured",
           "parse_verbose", "reload", "verbose"]

PREFIX = "binslt_verbose,cpu,"
ENV_MEASURE = "BINSLT_PLAN_MEASURE"
FORWARD_OPS = ("bconv_lif", "bconv_lif_infer", "bconv_affine_infer")
# Every algorithm name a cached winner may carry (a key's candidates are a subset).
PLAN_NAMES = frozenset({"dense", "event", "onednn", "aten", "margined", "ternary", "combo",
                        "unfold", "int8", "pointwise", "taps", "bf16x3"})


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
                 padding: int = 0, *, rate: float = 0.15, infer: bool = False,
                 op: str | None = None, packed_out: bool = False) -> dict[str, str]:
    """The plan the table (or the forced configuration) gives the CPU forward:
    ``{"isa", "forward", "source"}`` (``source`` ``"table"`` or ``"forced"``; a call that
    measures may take another candidate: :func:`measured`).

    ``x_shape`` is ``[T, N, Ci, H, W]`` (``[T, N, F]`` for a linear layer), ``weight_shape``
    ``[Co, Ci, kh, kw]`` (``[Co, F]``), ``rate`` the input's fraction of spikes (the kernels
    count it among the packed words' bits, ``rate * Ci / (32 * ceil(Ci / 32))``), ``infer`` the
    inference op ``bconv_lif_infer`` on float spikes (else the training forward ``bconv_lif``,
    which reads packed words); ``op`` names the op instead (``"bconv_affine_infer"``:
    BinConv2d's no-grad op, ``"onednn"`` or ``"aten"``, ATen's float conv); ``packed_out``
    the inference op writing packed spike words (a frozen ticket's layers chained inside a
    network) instead of float spikes. Under the
    configuration in force (:func:`binslt.ops.cpu_algorithms`); ValueError where a forced
    algorithm cannot run this call, or for a bad shape.
    """
    if op is None:
        op = "bconv_lif_infer" if infer else "bconv_lif"
    if op not in FORWARD_OPS:
        raise ValueError(f"binslt.ops.plan: op must be one of {FORWARD_OPS}, got {op!r}")
    x, w = _conv_shapes(x_shape, weight_shape, stride, padding)
    if not isinstance(packed_out, bool):
        raise ValueError(f"binslt.ops.plan: packed_out must be a bool, got {packed_out!r}")
    out = _module()._plan_forward(x, w, int(stride), int(padding), _fraction("rate", rate), op,
                                  packed_out)
    return dict(out)


def backward_plan(x_shape: Sequence[int], weight_shape: Sequence[int], stride: int = 1,
                  padding: int = 0, *, rate: float = 0.15, weight_density: float = 0.5,
                  need_grad_x: bool = True) -> dict[str, str]:
    """The plan the table (or the forced configuration) gives the CPU backward:
    ``{"isa", "grad_x", "grad_w", "source"}``.

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


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

_MODES = {True: "all", False: "off", "all": "all", "forward": "forward", "off": "off"}
_measure_flag: list[str] = ["env"]  # the setting of measure() ("env": BINSLT_PLAN_MEASURE)


def measure_mode() -> str:
    """What the CPU conv ops measure now: ``"off"``, ``"forward"`` or ``"all"``."""
    return str(_module()._plan_measure_mode())


@contextlib.contextmanager
def measure(mode: bool | str = True) -> Iterator[str]:
    """Measure inside a ``with`` block: ``True`` / ``"all"`` (forward and backward),
    ``"forward"``, ``False`` / ``"off"`` (the table only); the previous setting returns on exit.
    Process-wide, over ``BINSLT_PLAN_MEASURE``. Yields the mode in force."""
    if isinstance(mode, bool) or mode in ("all", "forward", "off"):
        name = _MODES[mode]
    else:
        raise ValueError("binslt.ops.plan.measure: mode must be True, False, 'all', 'forward' "
                         f"or 'off', got {mode!r}")
    mod = _module()
    before = _measure_flag[0]
    mod._set_plan_measure(name)
    _measure_flag[0] = name
    try:
        yield name
    finally:
        mod._set_plan_measure(before)
        _measure_flag[0] = before


def measured() -> dict[str, dict]:
    """The measured plans in this process (those loaded from the file and those timed since):
    ``{key: {"plan": winner, "ms": {candidate: best time}}}``."""
    mod = _module()
    times = mod._plan_cache_entries()
    return {k: {"plan": w, "ms": dict(times.get(k, {}))}
            for k, w in mod._plan_cache_winners().items()}


def _identity() -> tuple[str, str]:
    """(CPU, build): the CPU model and the kernels' feature flags; binslt's version and the CPU
    extension file (name, size, mtime)."""
    from .. import __version__
    from .fallback import cpu_model

    info = _ext.cpu_info() or {}
    feats = ",".join(sorted(k for k, v in info.get("features", {}).items() if v))
    cpu = f"{cpu_model()} [{feats}]"
    f = Path(_module().__file__)
    st = f.stat()
    digest = hashlib.sha256(f"{f.name} {st.st_size} {st.st_mtime_ns}".encode()).hexdigest()
    return cpu, f"binslt {__version__} {f.name} {digest[:16]}"


def cache_path() -> Path:
    """The measured plans' file for this CPU and build."""
    from .fallback import verdict_path

    cpu, build = _identity()
    tag = hashlib.sha256(f"{cpu}\n{build}".encode()).hexdigest()[:16]
    return verdict_path().parent / f"plans-{tag}.json"


def _read(path: Path, cpu: str, build: str) -> dict[str, tuple[str, dict[str, float]]]:
    """The file's plans (ValueError where it is not what write_cache in cpu_algos.cpp writes,
    for this CPU and build)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != 1:
        raise ValueError("not a format-1 plan file")
    if data.get("cpu") != cpu or data.get("build") != build:
        raise ValueError("it holds for another CPU or build")
    plans = data.get("plans")
    if not isinstance(plans, dict):
        raise ValueError("no 'plans' object")
    out = {}
    for key, e in plans.items():
        ms = e.get("ms") if isinstance(e, dict) else None
        if (not isinstance(e, dict) or e.get("plan") not in PLAN_NAMES or not isinstance(ms, dict)
                or not all(isinstance(k, str) and isinstance(v, (int, float))
                           and not isinstance(v, bool) for k, v in ms.items())):
            raise ValueError(f"a bad entry for {key!r}")
        out[key] = (e["plan"], {k: float(v) for k, v in ms.items()})
    return out


def reload() -> Path | None:
    """Forget the measured plans in memory and read them again from :func:`cache_path` (which
    follows ``BINSLT_CACHE_DIR``), where new ones will be written. Done once at import; a
    corrupt or foreign file is ignored with a warning (and replaced at the next measurement).
    Returns the path (None without the CPU extension, or with one built without measuring)."""
    mod = _ext.module("cpu")
    if mod is None or not hasattr(mod, "_plan_cache_configure"):  # none, or built before
        return None
    cpu, build = _identity()
    path = cache_path()
    mod._plan_cache_clear()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # the C++ side warns when it cannot write
    mod._plan_cache_configure(str(path), cpu, build)
    if path.exists():
        try:
            plans = _read(path, cpu, build)
        except (OSError, ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError
            warnings.warn(f"binslt: ignoring the measured CPU plans in {path} ({e}); they are "
                          "measured again", RuntimeWarning, stacklevel=2)
            return path
        for key, (winner, ms) in plans.items():
            mod._plan_cache_insert(key, winner, ms)
    return path


reload()
