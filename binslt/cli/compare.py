"""``binslt compare``: Tables 1 and 2 (ANN, SNN, BNN-BinAct, BinW-SLT at T=4 and T=1), with
mean ± std over seeds and paired differences."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

from ..analysis import energy
from ..io.artifacts import (
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
)
from ..training import loop as train
from ..training import stats
from ..training.loop import RunConfig, RunError
from .common import CLIError, is_main_process, load_model, progress_enabled
from .run import DEFAULTS, _CrashPlan, _slug, explicit_options, make_config
from .sweep import (
    PAIR_FIELDS,
    _fmt_ms,
    _lam,
    _quiet,
    _seed_list,
    _summary_fields,
    pair_rows,
    pairs_table,
)

# ---------------------------------------------------------------------------------------------
# compare (Tables 1 and 2)
# ---------------------------------------------------------------------------------------------

COMPARE_ROWS = (("ann", "ANN", {}), ("snn", "SNN", {}), ("bnn", "BNN-BinAct", {}),
                ("binwslt", "BinW-SLT", {}), ("binwslt", "BinW-SLT (T=1)", {"timesteps": 1}))
COMPARE_FIELDS = ("method", "label", "arch", "dataset", "timesteps", "prune_rate", "seed",
                  "test_acc", "best_test_acc", "delta_vs_bnn", "params", "ops_g", "energy_mj",
                  "wall_time_s", "dir")
COMPARE_KEYS = ("method", "label", "arch", "dataset", "timesteps", "prune_rate", "params")
COMPARE_VALUES = ("test_acc", "best_test_acc", "ops_g", "energy_mj", "wall_time_s")
#: The paper's comparisons: BinW-SLT (both rows) against BNN-BinAct and against the dense SNN.
COMPARE_PAIRS = (("BinW-SLT", "BNN-BinAct"), ("BinW-SLT", "SNN"),
                 ("BinW-SLT (T=1)", "BNN-BinAct"), ("BinW-SLT (T=1)", "SNN"))


def _energy(out: Path, cfg: RunConfig) -> tuple[float, float]:
    """(OPs in G, energy in mJ) per image of the run's ticket, over up to 8 batches of 128 test
    images (its test subset)."""
    from .energy import image_batches

    model, _ = load_model(out, backend=cfg.backend)
    images = image_batches(model, cfg.dataset, cfg.data_dir, cfg.image_size, "test", 128, 8,
                           cfg.download, cfg.seed, limit=cfg.test_subset)
    rep = energy.report(model, images)
    return float(rep["total_ops_g"]), float(rep["total_energy_mj"])


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _row_lead(r: dict[str, Any]) -> list[str]:
    """The first three cells of a Table 1/2 row: architecture (params), method, T."""
    params = r.get("params")
    pstr = f"{params / 1e6:.2f}M" if isinstance(params, (int, float)) else "?"
    t = r["timesteps"] if r["method"] in train.SPIKING else "-"
    return [f"{r['arch']} ({pstr})", r["label"], str(t)]


def compare_table(rows: list[dict[str, Any]]) -> str:
    """A Table 1/2-style markdown table."""
    has_energy = any(r.get("ops_g") is not None for r in rows)
    head = ["Architecture (params)", "Method", "T", "Acc (%)", "best (%)", "vs BNN-BinAct"]
    if has_energy:
        head += ["OPs (G)", "Energy (mJ)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = "" if r.get("delta_vs_bnn") is None else f"{r['delta_vs_bnn']:+.2f}"
        cells = [*_row_lead(r), f"{r['test_acc']:.2f}", f"{r['best_test_acc']:.2f}", delta]
        if has_energy:
            cells += [_fmt(r.get("ops_g"), ".4f"), _fmt(r.get("energy_mj"), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_pairs(rows: list[dict[str, Any]], level: float = 0.95) -> list[dict[str, Any]]:
    """:data:`COMPARE_PAIRS` present in ``rows`` (one row per run): the paired difference of the
    final and of the best test accuracy, A - B, over the seeds both rows ran, with its two-sided
    Student-t confidence interval (:func:`binslt.training.stats.paired_difference`)."""
    out = []
    for a, b in COMPARE_PAIRS:
        out += pair_rows(a, [r for r in rows if r["label"] == a],
                         b, [r for r in rows if r["label"] == b], level)
    return out


def compare_seed_table(summary: list[dict[str, Any]]) -> str:
    """The Table 1/2-style markdown table over seeds: mean ± sample std (ddof=1) and the
    per-seed final accuracies."""
    has_energy = any(r.get("ops_g_mean") is not None for r in summary)
    head = ["Architecture (params)", "Method", "T", "Acc (%) mean ± std", "per seed",
            "best (%) mean ± std"]
    if has_energy:
        head += ["OPs (G)", "Energy (mJ)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        seeds = str(r["seeds"]).split(";")
        per = " / ".join(f"{r[f'test_acc_s{x}']:.2f}" for x in seeds)
        cells = [*_row_lead(r),
                 _fmt_ms(r["test_acc_mean"], r["test_acc_std"]), per,
                 _fmt_ms(r["best_test_acc_mean"], r["best_test_acc_std"])]
        if has_energy:
            cells += [_fmt(r.get("ops_g_mean"), ".4f"), _fmt(r.get("energy_mj_mean"), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    explicit = explicit_options(args)
    base = make_config(DEFAULTS, explicit, method="binwslt", mode="search")
    seeds, multi = _seed_list(args, base)
    out = (Path(args.out) if args.out
           else Path("runs") / f"compare-{base.arch}-{_slug(base.dataset)}")
    main = is_main_process()
    chosen = [r for r in COMPARE_ROWS if r[0] in args.methods]
    crash = _CrashPlan(args.crash_after)
    rows = []
    for seed in seeds:
        for method, label, over in chosen:
            cfg = dataclasses.replace(base, method=method, seed=seed,
                                      mode="train" if method in ("ann", "snn") else "search",
                                      **over)
            try:
                cfg.validate()
            except RunError as exc:
                raise CLIError(str(exc)) from None
            slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()
            # One seed without --seeds keeps the single-run layout (OUT/<row>).
            rdir = out / (f"{slug}-s{seed}" if multi else slug)
            if main:
                print(f"== {label}, seed {seed} -> {rdir}")
            res = train.run(cfg, rdir, resume=True, progress=progress_enabled(args),
                            hooks=crash.next_hooks(), log=print if args.verbose else _quiet)
            row = {"method": method, "label": label, "arch": cfg.arch, "dataset": res["dataset"],
                   "timesteps": cfg.timesteps, "prune_rate": cfg.prune_rate, "seed": seed,
                   "test_acc": res["test_acc"], "best_test_acc": res["best_test_acc"],
                   "params": res.get("params"), "wall_time_s": res["wall_time_s"],
                   "dir": str(rdir), "ops_g": None, "energy_mj": None}
            if main:
                row["ops_g"], row["energy_mj"] = _energy(rdir, cfg)
                print(f"   {label}: {res['test_acc']:.2f}% ({res['wall_time_s']:.1f} s)")
            rows.append(row)
    for r in rows:  # against BNN-BinAct of the same seed
        bnn = next((b["test_acc"] for b in rows if b["method"] == "bnn" and b["seed"] == r["seed"]),
                   None)
        r["delta_vs_bnn"] = (r["test_acc"] - bnn if bnn is not None and r["method"] == "binwslt"
                             else None)
    if main:
        summary = stats.aggregate(rows, COMPARE_KEYS, COMPARE_VALUES)
        pairs = compare_pairs(rows)
        ds = rows[0]["dataset"] if rows else base.dataset
        seed_text = (f"seeds {', '.join(map(str, seeds))} (mean ± sample std, ddof=1; the "
                     "same seed gives every row the same initial weights and batch order)"
                     if multi else f"seed {seeds[0]}")
        lines = [f"# {base.arch} on {ds}", "",
                 f"prune rate {base.prune_rate:g} (fraction removed), T={base.timesteps}, "
                 f"lambda={_lam(base):g}, decay_input={base.decay_input}, {base.epochs} epochs, "
                 f"{seed_text}. Accuracy: test set, final epoch. Params counted as "
                 "binslt.models.count_parameters. OPs/energy: binslt.analysis.energy.report "
                 "per image (MACs at 4.6 pJ, SOPs at 0.9 pJ).", ""]
        table = compare_seed_table(summary) if multi else compare_table(rows)
        lines += [table, ""]
        if multi and pairs:
            lines += ["Paired differences over seeds (A - B, percentage points; 95% two-sided "
                      "Student-t interval of the mean difference, df = seeds - 1):", "",
                      pairs_table(pairs), ""]
        atomic_write_bytes(out / "compare.md", "\n".join(lines).encode())
        atomic_write_csv(rows, out / "compare.csv", COMPARE_FIELDS)
        atomic_write_json(rows, out / "compare.json")
        atomic_write_csv(summary, out / "compare_summary.csv",
                         _summary_fields(summary, COMPARE_KEYS, COMPARE_VALUES))
        atomic_write_csv(pairs, out / "compare_pairs.csv", PAIR_FIELDS)
        atomic_write_json({"kind": "compare", "seeds": seeds, "std": stats.STD_KIND,
                           "runs": rows, "rows": summary, "pairs": pairs}, out / "results.json")
        print(table)
        if multi and pairs:
            print(pairs_table(pairs))
        print(f"wrote {out / 'compare.md'}, compare.csv, compare.json, compare_summary.csv, "
              "compare_pairs.csv, results.json")
    return 0
