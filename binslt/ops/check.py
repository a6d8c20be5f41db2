"""``binslt check``: every op of each kernel backend against the pure-torch reference, here.

The comparison rules are the test suite's (``tests/helpers.py`` imports them from here):

* packed words and integer counts exactly;
* spikes equal to the reference outside a tie band (``TIE_BAND``) around the threshold, judged on
  the float64 membrane potential; a neuron is dropped from its first near-tie step on;
* BN statistics to 1e-5 relative (1e-6 absolute), gradients to ``GRAD_RTOL`` (normwise relative)
  of a float64 evaluation of the reference, on data with no near-tie (where one flipped spike
  would change the gradients legitimately).

A cross-backend check runs the eval forward ops of the bit-exact backends (cpu, triton, cuda: the
same float32 operations in the same order) on input planted within a few ulps of the threshold
and asks for the same spikes by ``torch.equal``.

``run_check`` returns a :class:`Report`; its verdict (keyed by torch, Triton, the device and the
build, see ``binslt.ops.fallback.verdict_key``) is what ``backend='auto'`` reads.
"""

from __future__ import annotations

import os
import time

import torch

from . import fallback as fb
from . import library as _ext
from .check_cases import (  # noqa: F401  (re-exported: the names this module has always offered)
    BN_CASES,
    CONV_CASES,
    INF,
    BnCase,
    ConvCase,
    _bn_data,
    _check_bn_case,
    _check_conv_case,
    _conv_data,
    _cross_outputs,
    _h,
    _planted,
    _pooled_ok,
    _to,
    _ulps,
    _untied,
)
from .check_rules import (  # noqa: F401
    BIT_EXACT,
    GRAD_RTOL,
    STAT_ATOL,
    STAT_RTOL,
    TIE_BAND,
    Report,
    Result,
    _Lines,
    _Op,
    close_rel,
    rel_error,
    spike_mismatch,
    tie_mask,
)
from .schemas import SCHEMAS

# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class CheckError(ValueError):
    """Bad arguments to run_check (the command line prints one line, exit status 2)."""


def usable_backends(device: str) -> list[str]:
    """The kernel backends ``binslt check`` runs by default on ``device``."""
    st = _ext.load()
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device == "cuda":
        return [b for b in ("cuda", "triton") if st[b]["built"]]
    out = ["cpu"] if st["cpu"]["built"] else []
    if st["triton"]["built"] and interp:
        out.append("triton")
    return out


def _validate(device: str | None, backends) -> tuple[str, list[str]]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise CheckError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckError("--device cuda: no CUDA device is visible (torch.cuda.is_available() "
                         "is False)")
    if backends is None:
        backends = usable_backends(device)
        if not backends:
            raise CheckError(f"no kernel backend is built for {device}; see `binslt info`")
        return device, backends
    if isinstance(backends, str):
        backends = [b.strip() for b in backends.split(",") if b.strip()]
    st = _ext.load()
    for b in backends:
        if b not in BIT_EXACT:
            raise CheckError(f"--backend: unknown kernel backend {b!r} (choose from "
                             f"{', '.join(BIT_EXACT)}; 'torch' is the reference itself)")
        if b == "cuda" and device != "cuda":
            raise CheckError("--backend cuda needs --device cuda")
        if b == "cpu" and device != "cpu":
            raise CheckError("--backend cpu needs --device cpu")
        if not st[b]["built"]:
            raise CheckError(f"--backend {b}: not available here ({st[b]['reason']})")
        if b == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise CheckError("--backend triton on the CPU needs TRITON_INTERPRET=1 in the "
                             "environment (set before binslt starts)")
    if not backends:
        raise CheckError("--backend: give at least one backend")
    return device, list(dict.fromkeys(backends))


def op_getter(backend: str):
    """name -> the callable of schema ``name`` on ``backend`` (what the layers call)."""
    from .. import ops

    if backend == "triton":
        err = ops.load_triton()
        if err:
            raise RuntimeError(f"Triton ops failed to load: {err}")
    return lambda name: ops.get_op(name, backend)


def run_check(device: str | None = None, backends=None, progress=None) -> Report:
    """Check every schema of each backend against the reference on ``device`` ('cpu' / 'cuda';
    default: cuda when visible), plus the cross-backend spike equality of the bit-exact
    backends. ``progress(line)`` is called with each finished line. Raises CheckError for bad
    arguments."""
    device, backends = _validate(device, backends)
    t0 = time.perf_counter()
    rep = Report(device, backends)
    dev = torch.device(device)
    for be in backends:
        lines = _Lines((name, _Op(be, name)) for name in SCHEMAS)
        try:
            op_of = op_getter(be)
        except Exception as exc:
            for L in lines.values():
                L.fail("load", str(exc), 1.0)
            op_of = None
        if op_of is not None:
            runs = [(_check_conv_case, c, 11 + i) for i, c in enumerate(CONV_CASES)]
            runs += [(_check_bn_case, c, 31 + i) for i, c in enumerate(BN_CASES)]
            for fn, case, seed in runs:
                fn(op_of, lines, case, dev, seed)
        for L in lines.values():
            rep.results.append(L.r)
            if progress:
                progress(L.r.line())
    _cross(rep, backends, dev, progress)
    rep.seconds = time.perf_counter() - t0
    return rep


def _cross(rep: Report, backends: list[str], dev: torch.device, progress) -> None:
    """Spikes of the bit-exact backends on planted near-threshold input, by torch.equal. On a
    GPU the C++ CPU backend (on CPU copies) is the anchor when it is built."""
    runs = [(b, dev) for b in backends]
    if dev.type == "cuda" and _ext.load()["cpu"]["built"] and "cpu" not in backends:
        runs.insert(0, ("cpu", torch.device("cpu")))
    if len(runs) < 2:
        return
    outs = {}
    for be, d in runs:
        try:
            outs[be] = _cross_outputs(op_getter(be), d)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            outs[be] = f"{type(exc).__name__}: {first}"
    base, _ = runs[0]
    for be, _ in runs[1:]:
        pair = f"{base}={be}"
        for op in ("bn_lif", "bconv_lif", "bconv_lif_infer"):
            L = _Op(pair, f"{op}[planted]")
            L.r.cases = 1
            a, b = outs[base], outs[be]
            if isinstance(a, str) or isinstance(b, str):
                L.fail("planted", a if isinstance(a, str) else b, 1.0)
            else:
                for key in a:
                    if key.split("[")[0] == op:
                        L.exact("planted", key, b[key], a[key])
            rep.results.append(L.r)
            if progress:
                progress(L.r.line())


def write_report(rep: Report, json_path=None, save: bool = True) -> tuple[dict, list]:
    """The verdict of ``rep`` and where it was written (``json_path``; the cache file that
    backend='auto' reads unless ``save`` is False)."""
    import json
    from pathlib import Path

    verdict = rep.verdict(fb.verdict_key(torch.device(rep.device)))
    written = []
    if json_path is not None:
        p = Path(json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(verdict, indent=1, sort_keys=True))
        written.append(p)
    if save:
        written.append(fb.write_verdict(verdict))
    return verdict, written
