"""Statistics over seeds for ``binslt sweep`` and ``binslt compare``.

Every figure here is over seeds (one value per seed and configuration):

- the standard deviation is the *sample* standard deviation (``ddof=1``, divisor n - 1); it is
  ``None`` for fewer than two seeds;
- a comparison of two configurations is *paired* by seed (the same seed gives both runs the same
  initial weights and the same batch order): its differences ``a[s] - b[s]``, their mean, and the
  two-sided Student-t confidence interval ``mean +- t(1 - (1 - level)/2, n - 1) * sd / sqrt(n)``.

The t quantile comes from SciPy, which scikit-learn (a dependency of binslt) requires.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["STD_KIND", "aggregate", "mean_std", "paired_difference", "t_quantile"]

#: How the standard deviations are computed, for the files that carry them.
STD_KIND = "sample standard deviation over seeds (ddof=1)"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, sample std with ddof=1)``; the std is None for fewer than two values."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    n = len(vals)
    mean = math.fsum(vals) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_quantile needs df >= 1, got {df}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], *,
                      level: float = 0.95) -> dict[str, Any]:
    """``a - b`` paired by seed, over the seeds both have.

    Returns ``n``, ``seeds``, ``diffs`` (per seed), ``mean``, ``std`` (ddof=1), ``level``,
    ``t`` (the quantile used) and ``ci_low`` / ``ci_high``; the last four are None with fewer
    than two common seeds."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired_difference: the two sides have no seed in common")
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    mean, sd = mean_std(diffs)
    out: dict[str, Any] = {"n": len(seeds), "seeds": seeds, "diffs": diffs, "mean": mean,
                           "std": sd, "level": level, "t": None, "ci_low": None, "ci_high": None}
    if len(seeds) >= 2:
        t = t_quantile(1.0 - (1.0 - level) / 2.0, len(seeds) - 1)
        half = t * sd / math.sqrt(len(seeds))
        out.update(t=t, ci_low=mean - half, ci_high=mean + half)
    return out


def aggregate(rows: Iterable[Mapping[str, Any]], key_fields: Sequence[str],
              value_fields: Sequence[str], *, seed_field: str = "seed") -> list[dict[str, Any]]:
    """One summary per distinct ``key_fields`` tuple of ``rows`` (one row per run), in order of
    first appearance: the key fields, ``n_seeds``, ``seeds`` ("0;1;2") and for every value field
    ``F``: ``F_mean``, ``F_std`` (ddof=1; None for one seed) and ``F_s<seed>`` per seed.

    Two rows with the same key and seed are an error (a seed counted twice)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key_fields), []).append(r)
    out = []
    for key, grp in groups.items():
        seeds = [int(r[seed_field]) for r in grp]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seed counted twice for {dict(zip(key_fields, key))}: {seeds}")
        order = sorted(range(len(grp)), key=lambda i: seeds[i])
        summ: dict[str, Any] = dict(zip(key_fields, key))
        summ["n_seeds"] = len(grp)
        summ["seeds"] = ";".join(str(seeds[i]) for i in order)
        for f in value_fields:
            vals = [grp[i][f] for i in order]
            if any(v is None for v in vals):
                summ[f"{f}_mean"] = summ[f"{f}_std"] = None
            else:
                summ[f"{f}_mean"], summ[f"{f}_std"] = mean_std(vals)
            for i in order:
                summ[f"{f}_s{seeds[i]}"] = grp[i][f]
        out.append(summ)
    return out
