"""``binslt sweep``: the Fig. 2 grid over prune rate, T and lambda, and optionally the surrogate
gradient (resumable), its CSVs, summary over seeds, paired differences and figure; the seed and
pairing helpers shared with ``compare``."""

from __future__ import annotations

import argparse
import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io.artifacts import (
    RunDir,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
)
from ..ops.schemas import DEFAULT_SURROGATE_ALPHA
from ..training import loop as train
from ..training import stats
from ..training.loop import METHODS, RunConfig, RunError
from .common import METHOD_LABELS, CLIError, is_main_process, progress_enabled
from .run import DEFAULTS, _CrashPlan, _slug, explicit_options, make_config

# ---------------------------------------------------------------------------------------------
# Seeds (sweep and compare)
# ---------------------------------------------------------------------------------------------


def _seed_list(args: argparse.Namespace, base: RunConfig) -> tuple[list[int], bool]:
    """``(seeds, multi)``: the seeds of ``--seeds`` (``multi=True``), else ``[base.seed]``."""
    seeds = getattr(args, "seeds", None)
    if seeds is None:
        return [base.seed], False
    if hasattr(args, "seed"):
        raise CLIError("give --seed or --seeds, not both")
    if not seeds:
        raise CLIError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise CLIError(f"--seeds lists a seed twice: {seeds}")
    if any(x < 0 for x in seeds):
        raise CLIError(f"--seeds must be >= 0, got {seeds}")
    return list(seeds), True


def _fmt_ms(mean: float | None, sd: float | None, spec: str = ".2f") -> str:
    """``mean +- sd`` (just the mean for one seed)."""
    if mean is None:
        return "-"
    return format(mean, spec) + ("" if sd is None else f" ± {format(sd, spec)}")


PAIR_FIELDS = ("a", "b", "metric", "n_seeds", "seeds", "mean_diff", "std_diff", "level", "t",
               "ci_low", "ci_high", "diffs")


def pair_rows(a: str, rows_a: list[dict[str, Any]], b: str, rows_b: list[dict[str, Any]],
              level: float = 0.95) -> list[dict[str, Any]]:
    """``A - B`` of the final and of the best test accuracy, paired by seed over the seeds both
    sides ran (:func:`binslt.training.stats.paired_difference`; none when they share no seed),
    as :data:`PAIR_FIELDS` rows labelled ``a`` and ``b``."""
    out = []
    for metric in ("test_acc", "best_test_acc"):
        va = {r["seed"]: r[metric] for r in rows_a}
        vb = {r["seed"]: r[metric] for r in rows_b}
        if not (set(va) & set(vb)):
            continue
        d = stats.paired_difference(va, vb, level=level)
        out.append({"a": a, "b": b, "metric": metric, "n_seeds": d["n"],
                    "seeds": ";".join(map(str, d["seeds"])), "mean_diff": d["mean"],
                    "std_diff": d["std"], "level": d["level"], "t": d["t"],
                    "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                    "diffs": ";".join(f"{x:.4f}" for x in d["diffs"])})
    return out


def pairs_table(pairs: list[dict[str, Any]]) -> str:
    """The paired comparisons as a markdown table."""
    lines = ["| comparison | accuracy | seeds | mean difference | sd | 95% CI (paired t) |",
             "|---|---|---|---|---|---|"]
    for q in pairs:
        ci = ("-" if q["ci_low"] is None else
              f"[{q['ci_low']:+.2f}, {q['ci_high']:+.2f}] (t={q['t']:.3f}, df={q['n_seeds'] - 1})")
        sd = "-" if q["std_diff"] is None else f"{q['std_diff']:.2f}"
        what = "final" if q["metric"] == "test_acc" else "best"
        lines.append(f"| {q['a']} - {q['b']} | {what} | {q['seeds'].replace(';', ',')} | "
                     f"{q['mean_diff']:+.2f} | {sd} | {ci} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# sweep (Fig. 2)
# ---------------------------------------------------------------------------------------------


def _lam(cfg: RunConfig) -> float:
    if cfg.neuron == "if":
        return 1.0  # no leak: H = 1 * V + X
    return cfg.decay if cfg.decay is not None else 1.0 - 1.0 / float(cfg.tau)


_DEFAULT_SURROGATE = (RunConfig.surrogate, RunConfig.surrogate_alpha)


def _surrogate_of(cfg: RunConfig) -> tuple[str, float]:
    return cfg.surrogate, float(cfg.surrogate_alpha)


def _row_surrogate(r: dict[str, Any]) -> tuple[str, float]:
    """(surrogate, alpha) of a sweep.csv row."""
    return r["surrogate"], float(r["surrogate_alpha"])


def _surrogate_label(surrogate: str, alpha: float) -> str:
    """``rect`` at SpikingJelly's default alpha, else ``rect(alpha=0.5)``."""
    return surrogate if DEFAULT_SURROGATE_ALPHA[surrogate] == alpha else (
        f"{surrogate}(alpha={alpha:g})")


def _point_name(cfg: RunConfig) -> str:
    """The run directory of a grid point: method, arch and the axes that apply to the method;
    the surrogate and its alpha when they are not the defaults (ATan, 2)."""
    parts = [cfg.method, cfg.arch]
    if cfg.method in train.MASKED:
        parts.append(f"p{cfg.prune_rate:g}")
    if cfg.method in train.SPIKING:
        parts += [f"T{cfg.timesteps}", f"l{_lam(cfg):g}"]
        if _surrogate_of(cfg) != _DEFAULT_SURROGATE:
            parts.append(f"{cfg.surrogate}{cfg.surrogate_alpha:g}")
    parts.append(f"s{cfg.seed}")
    return "-".join(parts)


def sweep_points(base: RunConfig, methods: list[str], archs: list[str], prune_rates: list[float],
                 timesteps: list[int], decays: list[float], full: bool,
                 surrogates: Sequence[str] = ()) -> list[RunConfig]:
    """The grid. ``full=False`` (the paper's layout): each axis varied alone around ``base``
    (plus the prune-rate axis at T=1 for BinW-SLT when 1 is among ``timesteps``).
    ``full=True``: the Cartesian product of the axes that apply to each method.

    ``surrogates`` is the surrogate-gradient axis of the spiking methods: each at SpikingJelly's
    default alpha (:data:`binslt.ops.schemas.DEFAULT_SURROGATE_ALPHA`), except ``base``'s own
    surrogate, which keeps ``base.surrogate_alpha``."""
    pts: dict[str, RunConfig] = {}

    def add(cfg: RunConfig) -> None:
        pts.setdefault(_point_name(cfg), cfg)

    def lam_kw(lam: float) -> dict[str, Any]:
        return {"decay": lam, "tau": None}

    def sg_kw(sg: str) -> dict[str, Any]:
        alpha = base.surrogate_alpha if sg == base.surrogate else DEFAULT_SURROGATE_ALPHA[sg]
        return {"surrogate": sg, "surrogate_alpha": alpha}

    for arch in archs:
        for m in methods:
            b = dataclasses.replace(base, arch=arch, method=m,
                                    mode="train" if m in ("ann", "snn") else "search")
            prs = prune_rates if m in train.MASKED else []
            ts = timesteps if m in train.SPIKING else []
            ls = decays if m in train.SPIKING else []
            sgs = list(surrogates) if m in train.SPIKING else []
            if full:
                for p in prs or [b.prune_rate]:
                    for t in ts or [b.timesteps]:
                        for lam in ls or [None]:
                            for sg in sgs or [None]:
                                kw = lam_kw(lam) if lam is not None else {}
                                kw.update(sg_kw(sg) if sg is not None else {})
                                add(dataclasses.replace(b, prune_rate=p, timesteps=t, **kw))
                continue
            add(b)
            for p in prs:
                add(dataclasses.replace(b, prune_rate=p))
            for t in ts:
                add(dataclasses.replace(b, timesteps=t))
            for lam in ls:
                add(dataclasses.replace(b, **lam_kw(lam)))
            for sg in sgs:
                add(dataclasses.replace(b, **sg_kw(sg)))
            if m == "binwslt" and 1 in timesteps and b.timesteps != 1:
                for p in prs:
                    add(dataclasses.replace(b, prune_rate=p, timesteps=1))
    return list(pts.values())


SWEEP_FIELDS = ("method", "arch", "dataset", "prune_rate", "timesteps", "decay", "decay_input",
                "surrogate", "surrogate_alpha", "seed", "epochs", "test_acc", "best_test_acc",
                "params", "wall_time_s", "mean_epoch_time_s", "dir")


def _row(cfg: RunConfig, res: dict[str, Any], out: Path) -> dict[str, Any]:
    return {"method": cfg.method, "arch": cfg.arch, "dataset": cfg.dataset,
            "prune_rate": cfg.prune_rate, "timesteps": cfg.timesteps, "decay": _lam(cfg),
            "decay_input": cfg.decay_input, "surrogate": cfg.surrogate,
            "surrogate_alpha": float(cfg.surrogate_alpha), "seed": cfg.seed, "epochs": cfg.epochs,
            "test_acc": res["test_acc"], "best_test_acc": res["best_test_acc"],
            "params": res.get("params"), "wall_time_s": res["wall_time_s"],
            "mean_epoch_time_s": res["mean_epoch_time_s"], "dir": str(out)}


def _close(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) < 1e-9


def _seed_points(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """(one point per grid point: the mean accuracy over its seeds and ``test_acc_std``, the
    largest number of seeds of a point)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["method"], r["arch"], round(float(r["prune_rate"]), 9), int(r["timesteps"]),
               round(float(r["decay"]), 9), r["surrogate"], round(float(r["surrogate_alpha"]), 9))
        groups.setdefault(key, []).append(r)
    points = []
    for grp in groups.values():
        mean, sd = stats.mean_std([g["test_acc"] for g in grp])
        points.append({**grp[0], "test_acc": mean, "test_acc_std": sd or 0.0})
    return points, max((len(g) for g in groups.values()), default=1)


def _on_axis(r: dict[str, Any], axis: str, fixed: dict[str, float], t_fixed: int,
             m: str, surrogate: tuple[str, float] | None = None) -> bool:
    """Whether run ``r`` of method ``m`` lies on the panel of ``axis``: the other axes at their
    fixed values (those that apply to the method; T at ``t_fixed``; a spiking method's surrogate
    at ``surrogate`` where given)."""
    if (surrogate is not None and m in train.SPIKING and axis != "surrogate"
            and _row_surrogate(r) != surrogate):
        return False
    for other, val in fixed.items():
        if other == axis:
            continue
        if other == "prune_rate" and m not in train.MASKED:
            continue
        if other in ("timesteps", "decay") and m not in train.SPIKING:
            continue
        want = t_fixed if other == "timesteps" else val
        if not _close(r[other], want):
            return False
    return True


def _draw_series(ax, pts: list, axis: str, lab: str, color, applies: bool, n_seeds: int) -> None:
    """One method's points on a panel: a line with error bars where the axis applies to it, a
    dotted horizontal line (and a std band) where it does not."""
    style = "--" if lab.endswith("(T=1)") else "-"
    xs = [x * 100 if axis == "prune_rate" else x for x, _, _ in pts]
    ys = [y for _, y, _ in pts]
    err = [e for _, _, e in pts] if n_seeds > 1 else None
    if applies and len({p[0] for p in pts}) > 1:
        ax.errorbar(xs, ys, yerr=err, fmt=style, marker="o", color=color, label=lab, capsize=3)
    elif not applies:
        ax.axhline(ys[0], linestyle=":", color=color, label=lab)
        if err and err[0] > 0:
            ax.axhspan(ys[0] - err[0], ys[0] + err[0], color=color, alpha=0.12)
    else:
        ax.errorbar(xs[:1], ys[:1], yerr=err[:1] if err else None, fmt="o", color=color,
                    label=lab, capsize=3)


def plot_sweep(rows: list[dict[str, Any]], base: RunConfig, path: Path) -> None:
    """Fig. 2 layout: (a) accuracy vs prune rate, (b) vs T, (c) vs lambda, and (d) per surrogate
    gradient where the rows hold more than one (then only the panels among (a)-(c) whose axis
    takes more than one value are drawn). A method to which an axis does not apply is
    drawn as a dotted horizontal line at its default-point accuracy. Panels (a)-(c) show the
    spiking methods at ``base``'s surrogate.

    ``rows`` holds one row per run; the runs of one grid point over several seeds are drawn as
    their mean with an error bar of one sample standard deviation (ddof=1; a shaded band for
    the horizontal lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_lam = _lam(base)
    points, n_seeds = _seed_points(rows)
    base_sg = _surrogate_of(base)
    sg_order: list[tuple[str, float]] = []
    for r in rows:
        sg = _row_surrogate(r)
        if r["method"] in train.SPIKING and sg not in sg_order:
            sg_order.append(sg)
    series_keys = sorted({(r["method"], r["arch"]) for r in rows},
                         key=lambda k: (METHODS.index(k[0]), k[1]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [("prune_rate", "(a) pruning rate (%)", train.MASKED),
              ("timesteps", "(b) timestep T", train.SPIKING),
              ("decay", "(c) decay rate $\\lambda$", train.SPIKING)]
    fixed = {"prune_rate": base.prune_rate, "timesteps": base.timesteps, "decay": base_lam}
    multi_arch = len({k[1] for k in series_keys}) > 1
    surrogate_panel = len(sg_order) > 1
    if surrogate_panel:  # a grid over the surrogate alone: no panels of one point each
        panels = [p for p in panels if len({round(float(r[p[0]]), 9) for r in rows
                                            if r["method"] in p[2]}) > 1]
    n_panels = len(panels) + surrogate_panel
    fig, axes = plt.subplots(1, n_panels, figsize=(max(5 * n_panels, 9), 4.2), squeeze=False)
    axes = axes[0]
    for ax, (axis, title, applies) in zip(axes, panels):
        for i, (m, arch) in enumerate(series_keys):
            label = METHOD_LABELS[m] + (f" {arch}" if multi_arch else "")
            mine = [r for r in points if r["method"] == m and r["arch"] == arch]
            variants = [(label, base.timesteps)]
            if axis == "prune_rate" and m == "binwslt" and base.timesteps != 1:
                variants.append((label + " (T=1)", 1))
            for lab, t_fixed in variants:
                pts = sorted((float(r[axis]), float(r["test_acc"]), float(r["test_acc_std"]))
                             for r in mine if _on_axis(r, axis, fixed, t_fixed, m, base_sg))
                if pts:
                    _draw_series(ax, pts, axis, lab, colors[i % len(colors)], m in applies,
                                 n_seeds)
        ax.set_xlabel(title)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if axis == "decay":
            ax.invert_xaxis()  # the paper goes from 0.99 down
        ax.legend(fontsize=8)
    if surrogate_panel:
        _surrogate_panel(axes[-1], points, series_keys, sg_order, fixed, base.timesteps,
                         colors, multi_arch, n_seeds)
    ds = rows[0]["dataset"] if rows else base.dataset
    seeds_note = (f"; mean ± sample std over {n_seeds} seeds" if n_seeds > 1 else "")
    fig.suptitle(f"{ds}: prune rate {base.prune_rate:g}, T={base.timesteps}, "
                 f"$\\lambda$={base_lam:g} unless varied{seeds_note}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _surrogate_panel(ax, points: list[dict[str, Any]], series_keys: list, sg_order: list,
                     fixed: dict[str, float], t_fixed: int, colors: list, multi_arch: bool,
                     n_seeds: int) -> None:
    """Panel (d): accuracy per surrogate gradient (categories in the order the grid ran them),
    the other axes at their fixed values; methods without a surrogate as dotted lines."""
    xs = {sg: i for i, sg in enumerate(sg_order)}
    spiking = [k for k in series_keys if k[0] in train.SPIKING]
    for i, (m, arch) in enumerate(series_keys):
        label = METHOD_LABELS[m] + (f" {arch}" if multi_arch else "")
        mine = [r for r in points if r["method"] == m and r["arch"] == arch
                and _on_axis(r, "surrogate", fixed, t_fixed, m)]
        if not mine:
            continue
        color = colors[i % len(colors)]
        if m not in train.SPIKING:
            _draw_series(ax, [(0.0, float(mine[0]["test_acc"]), float(mine[0]["test_acc_std"]))],
                         "surrogate", label, color, False, n_seeds)
            continue
        shift = (spiking.index((m, arch)) - (len(spiking) - 1) / 2) * 0.08
        pts = sorted((xs[_row_surrogate(r)] + shift,
                      float(r["test_acc"]), float(r["test_acc_std"])) for r in mine)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                    yerr=[p[2] for p in pts] if n_seeds > 1 else None, fmt="o", color=color,
                    label=label, capsize=3)
    ax.set_xticks(range(len(sg_order)), [_surrogate_label(*sg) for sg in sg_order])
    ax.set_xlabel("(d) surrogate gradient")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


SUMMARY_KEYS = ("method", "arch", "dataset", "prune_rate", "timesteps", "decay", "decay_input",
                "surrogate", "surrogate_alpha", "epochs")
SUMMARY_VALUES = ("test_acc", "best_test_acc", "wall_time_s")


def sweep_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid point over its seeds: mean, sample std (ddof=1) and per-seed values of
    the final and best test accuracy and of the wall time
    (:func:`binslt.training.stats.aggregate`)."""
    return stats.aggregate(rows, SUMMARY_KEYS, SUMMARY_VALUES)


def _summary_fields(summary: list[dict[str, Any]], keys: tuple[str, ...],
                    values: tuple[str, ...]) -> list[str]:
    """The CSV columns of :func:`binslt.training.stats.aggregate`'s rows, per-seed columns
    included."""
    fields = list(keys) + ["n_seeds", "seeds"]
    seeds = sorted({int(x) for r in summary for x in str(r["seeds"]).split(";")})
    for f in values:
        fields += [f"{f}_mean", f"{f}_std"] + [f"{f}_s{x}" for x in seeds]
    return fields


SWEEP_PAIR_FIELDS = ("method", "arch", "prune_rate", "timesteps", "decay") + PAIR_FIELDS


def surrogate_pairs(rows: list[dict[str, Any]], base: RunConfig,
                    level: float = 0.95) -> list[dict[str, Any]]:
    """Each spiking grid point at another surrogate minus the same point at ``base``'s surrogate,
    paired by seed (:func:`pair_rows`: final and best test accuracy, Student-t interval)."""
    base_sg = _surrogate_of(base)

    def point(r: dict[str, Any]) -> tuple:
        return (r["method"], r["arch"], round(float(r["prune_rate"]), 9), int(r["timesteps"]),
                round(float(r["decay"]), 9), bool(r["decay_input"]))

    groups: dict[tuple, dict[tuple[str, float], list[dict[str, Any]]]] = {}
    for r in rows:
        if r["method"] in train.SPIKING:
            groups.setdefault(point(r), {}).setdefault(_row_surrogate(r), []).append(r)
    compared = [k for k, by_sg in groups.items() if base_sg in by_sg and len(by_sg) > 1]
    out = []
    for key in compared:
        by_sg = groups[key]
        m, arch, p, t, lam, _ = key
        where = f" ({arch}, p{p:g}, T{t}, λ{lam:g})" if len(compared) > 1 else ""
        b = f"{METHOD_LABELS[m]} {_surrogate_label(*base_sg)}{where}"
        for sg, rs in by_sg.items():
            if sg == base_sg:
                continue
            a = f"{METHOD_LABELS[m]} {_surrogate_label(*sg)}{where}"
            for q in pair_rows(a, rs, b, by_sg[base_sg], level):
                out.append({"method": m, "arch": arch, "prune_rate": p, "timesteps": t,
                            "decay": lam, **q})
    return out


def cmd_sweep(args: argparse.Namespace) -> int:
    explicit = explicit_options(args)
    base = make_config(DEFAULTS, explicit, method="binwslt", mode="search")
    seeds, multi = _seed_list(args, base)
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{_slug(base.dataset)}"
    if args.surrogates and not set(args.methods) & set(train.SPIKING):
        raise CLIError(f"--surrogates varies the spiking methods ({', '.join(train.SPIKING)}), "
                       f"and --methods has none: {','.join(args.methods)}")
    if len(set(args.surrogates)) != len(args.surrogates):
        raise CLIError(f"--surrogates lists a surrogate twice: {','.join(args.surrogates)}")
    points = sweep_points(base, args.methods, args.archs, args.prune_rates, args.timesteps_list,
                          args.decays, args.full_grid, args.surrogates)
    for p in points:
        try:
            p.validate()
        except RunError as exc:
            raise CLIError(f"grid point {_point_name(p)}: {exc}") from None
    # Seed-major order: the first pass is the single-seed sweep of seeds[0], whose point
    # directories (named with their seed) an earlier single-seed sweep may already hold.
    runs = [dataclasses.replace(p, seed=sd) for sd in seeds for p in points]
    main = is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"sweep: {len(points)} grid points x {len(seeds)} seed(s) -> {out}")
    crash = _CrashPlan(args.crash_after)
    rows = []
    for i, cfg in enumerate(runs):
        pdir = out / _point_name(cfg)
        res = RunDir(pdir).read_results()
        if res is not None:
            if main:
                print(f"[{i + 1}/{len(runs)}] {pdir.name}: done earlier "
                      f"({res['test_acc']:.2f}%)")
        else:
            if main:
                print(f"[{i + 1}/{len(runs)}] {pdir.name}")
            res = train.run(cfg, pdir, resume=True, progress=progress_enabled(args),
                            hooks=crash.next_hooks(), log=print if args.verbose else _quiet)
            if main:
                print(f"    test {res['test_acc']:.2f}% (best {res['best_test_acc']:.2f}%), "
                      f"{res['wall_time_s']:.1f} s")
        rows.append(_row(cfg, res, pdir))
        if main:
            atomic_write_csv(rows, out / "sweep.csv", SWEEP_FIELDS)
    if main:
        summary = sweep_summary(rows)
        atomic_write_csv(summary, out / "sweep_summary.csv",
                         _summary_fields(summary, SUMMARY_KEYS, SUMMARY_VALUES))
        pairs = surrogate_pairs(rows, base)
        record: dict[str, Any] = {"kind": "sweep", "seeds": seeds, "std": stats.STD_KIND,
                                  "runs": rows, "points": summary}
        written = ""
        if pairs:
            atomic_write_csv(pairs, out / "sweep_pairs.csv", SWEEP_PAIR_FIELDS)
            record["pairs"] = pairs
            written = ", sweep_pairs.csv (paired by seed)"
            print(pairs_table(pairs))
        atomic_write_json(record, out / "results.json")
        plot_sweep(rows, base, out / "fig2.png")
        extra = " (mean ± std over seeds)" if multi else ""
        print(f"wrote {out / 'sweep.csv'}, sweep_summary.csv{extra}{written}, results.json and "
              f"{out / 'fig2.png'}")
    return 0


def _quiet(_msg: str) -> None:
    pass
