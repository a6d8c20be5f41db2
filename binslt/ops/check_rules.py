"""The comparison rules of ``binslt check`` and of the test suite (``tests/helpers.py`` imports
them): the tie band around the threshold, the tolerances, spike and relative-error comparisons,
and the per-op results a check collects (:class:`Result`, :class:`Report`, one :class:`_Op` per
backend and op)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

TIE_BAND = 1e-5
"""Half-width of the tie band around the firing threshold, in units of the membrane potential H.

The kernels compute H in float32, the references in float64. On the currents the checks use
(|H| of order 1-10, a few timesteps) float32 rounding moves H by about 1e-6 at most (a few ulps
of 1.2e-7 relative), so outside ``|H - v_th| < TIE_BAND`` both take the same spike decision;
inside it either decision is correct. The band is no wider because a spike comparison excludes
the neurons inside it: a wider band compares fewer neurons. The same width serves as the "no
near-tie in the data" pre-condition of the gradient comparisons (where one flipped spike would
change the gradients legitimately)."""

GRAD_RTOL = 1e-5
STAT_RTOL, STAT_ATOL = 1e-5, 1e-6
BIT_EXACT = ("cpu", "triton", "cuda")


# ---------------------------------------------------------------------------------------------
# The comparison rules
# ---------------------------------------------------------------------------------------------


def tie_mask(h: torch.Tensor, v_threshold: float, band: float = TIE_BAND) -> torch.Tensor:
    """True where a spike comparison is meaningful: the neuron has not come within ``band`` of
    the threshold at this or any earlier timestep (after a near-tie, trajectories may diverge).
    h: [T, ...] membrane potential before firing (float64 preferred)."""
    near = (h - v_threshold).abs() < band
    return ~(torch.cummax(near.to(torch.int8), dim=0).values.bool())


def spike_mismatch(actual: torch.Tensor, expected: torch.Tensor, h: torch.Tensor | None = None,
                   v_threshold: float = 1.0, min_compared: float = 0.5,
                   ok: torch.Tensor | None = None) -> str:
    """'' if ``actual`` equals ``expected`` wherever ``tie_mask(h, v_threshold)`` (or ``ok``)
    holds and more than ``min_compared`` of the neurons are compared; else why not."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if ok is None:
        ok = tie_mask(h, v_threshold)
    a, e = actual.detach().cpu().double()[ok.cpu()], expected.detach().cpu().double()[ok.cpu()]
    mism = int((a != e).sum())
    if mism:
        return f"{mism} spikes differ outside the tie band (of {int(ok.sum())} compared)"
    if not float(ok.float().mean()) > min_compared:
        return "too few neurons outside the tie band to compare"
    return ""


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise relative error ||a - e|| / ||e|| (in float64)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    return (a - e).norm().item() / max(e.norm().item(), 1e-30)


def close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> bool:
    """||a - e|| <= rtol * ||e|| (+ a tiny absolute floor)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    return (a - e).norm().item() <= rtol * e.norm().item() + 1e-12


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    backend: str  # 'cpu' | 'triton' | 'cuda', or 'a=b' for the cross-backend check
    op: str
    ok: bool
    reason: str = ""  # the first failed comparison (case: what)
    worst: float = 0.0  # the largest relative error / mismatch fraction seen
    cases: int = 0

    def line(self) -> str:
        head = f"{self.backend:12s} {self.op:25s}"
        if self.ok:
            return f"{head} ok    ({self.cases} case(s), worst error {self.worst:.2e})"
        return f"{head} FAIL  {self.reason} (worst error {self.worst:.2e})"


@dataclass
class Report:
    device: str
    backends: list[str]
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def failed_ops(self, backend: str) -> list[str]:
        return [r.op for r in self.results if not r.ok and backend in r.backend.split("=")]

    def verdict(self, key: dict) -> dict:
        return {
            "key": key,
            "ok": self.ok,
            "backends": {b: {"ok": not self.failed_ops(b), "failed": self.failed_ops(b)}
                         for b in self.backends},
            "results": [{"backend": r.backend, "op": r.op, "ok": r.ok, "reason": r.reason,
                         "worst_error": r.worst, "cases": r.cases} for r in self.results],
            "seconds": round(self.seconds, 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


class _Lines(dict):
    """{op: _Op} of one backend."""

    @contextlib.contextmanager
    def op(self, op: str, case: str):
        """Check one op on one case; an exception fails that line with the error."""
        line = self[op]
        line.r.cases += 1
        try:
            yield line
        except Exception as exc:  # a kernel that raises fails its line; the others still run
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            line.fail(case, f"{type(exc).__name__}: {first}", 1.0)


class _Op:
    """Accumulates one (backend, op) line over the cases."""

    def __init__(self, backend: str, op: str):
        self.r = Result(backend, op, True)

    def fail(self, case: str, why: str, worst: float = float("nan")) -> None:
        if self.r.ok:
            self.r.ok, self.r.reason = False, f"{case}: {why}"
        if not math.isnan(worst):
            self.r.worst = max(self.r.worst, worst)

    def rel(self, case: str, what: str, actual, expected, rtol=GRAD_RTOL) -> None:
        if actual.shape != expected.shape:
            return self.fail(case, f"{what} shape {tuple(actual.shape)} != "
                             f"{tuple(expected.shape)}", 1.0)
        err = rel_error(actual, expected)
        err = float("inf") if math.isnan(err) else err
        self.r.worst = max(self.r.worst, err)
        if not close_rel(actual, expected, rtol):
            self.fail(case, f"{what} relative error {err:.3e} > {rtol:g}")

    def exact(self, case: str, what: str, actual, expected) -> None:
        a, e = actual.detach().cpu(), expected.detach().cpu()
        if a.shape != e.shape or a.dtype != e.dtype:
            return self.fail(case, f"{what}: {a.dtype} {tuple(a.shape)} != {e.dtype} "
                             f"{tuple(e.shape)}", 1.0)
        diff = float((a != e).float().mean()) if a.numel() else 0.0
        self.r.worst = max(self.r.worst, diff)
        if diff:
            self.fail(case, f"{what}: {int((a != e).sum())} of {a.numel()} values differ")

    def spikes(self, case: str, what: str, actual, expected, h=None, v_th=1.0, ok=None) -> None:
        why = spike_mismatch(actual, expected, h, v_th, ok=ok)
        if actual.shape == expected.shape:
            m = ok if ok is not None else tie_mask(h, v_th)
            d = (actual.detach().cpu() != expected.detach().cpu()) & m.cpu()
            self.r.worst = max(self.r.worst, float(d.float().mean()))
        if why:
            self.fail(case, f"{what}: {why}")

    def stats(self, case: str, what: str, actual, expected) -> None:
        a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
        if a.shape != e.shape:
            return self.fail(case, f"{what} shape {tuple(a.shape)} != {tuple(e.shape)}", 1.0)
        if a.numel():  # relative error, with the absolute floor as the smallest scale
            err = float(((a - e).abs() / e.abs().clamp_min(STAT_ATOL / STAT_RTOL)).max())
            self.r.worst = max(self.r.worst, float("inf") if math.isnan(err) else err)
        if not torch.allclose(a, e, rtol=STAT_RTOL, atol=STAT_ATOL):
            self.fail(case, f"{what} differs beyond rtol {STAT_RTOL:g}, atol {STAT_ATOL:g}")
