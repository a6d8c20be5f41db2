"""``binslt search`` / ``train`` / ``finetune`` (one run), ``sweep`` (Fig. 2) and ``compare``
(Tables 1 and 2): their options, and how they map onto :func:`binslt.training.loop.run`."""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
from pathlib import Path
from typing import Any, Callable

from ..analysis import energy
from ..io.artifacts import (
    RunDir,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    load_source,
)
from ..training import data as data_mod
from ..training import loop as train
from ..training import stats
from ..training.loop import METHODS, RunConfig, RunError
from .common import METHOD_LABELS, CLIError, is_main_process, load_model, progress_enabled

DEFAULTS = RunConfig()

#: The paper's Fig. 2 grid (prune rates, T and lambda) with the default point included.
SWEEP_PRUNE_RATES = "0.2,0.4,0.5,0.6,0.8,0.9"
SWEEP_TIMESTEPS = "1,2,4,6,8"
SWEEP_DECAYS = "0.2,0.4,0.6,0.8,0.9,0.99"


# ---------------------------------------------------------------------------------------------
# Option parsing
# ---------------------------------------------------------------------------------------------


def _v_reset(s: str) -> float | None:
    if s.lower() in ("none", "soft"):
        return None
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none' (soft reset), got {s!r}"
                                         ) from None


def _crash_spec(s: str) -> tuple[int, ...]:
    m = re.fullmatch(r"(\d+):(\d+)(?::(\d+))?", s)
    if not m:
        raise argparse.ArgumentTypeError(f"expected EPOCH:BATCHES[:RUN], got {s!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


class _CrashPlan:
    """The test hook ``--_crash-after-batches EPOCH:BATCHES[:RUN]`` of a command that starts
    several runs (sweep, compare): the process dies in the RUN-th run it starts (counted from 1,
    finished points it skips do not count; default the first)."""

    def __init__(self, spec: tuple[int, ...] | None):
        self.spec = spec
        self.started = 0

    def next_hooks(self) -> train.RunHooks:
        self.started += 1
        if self.spec is None:
            return train.RunHooks()
        run_no = self.spec[2] if len(self.spec) > 2 else 1
        return train.RunHooks(crash_after=self.spec[:2] if run_no == self.started else None)


def _number_list(kind: Callable[[str], Any], what: str) -> Callable[[str], list]:
    """argparse type: comma-separated values of ``kind``; empty or 'none' is no values."""
    def parse(s: str) -> list:
        if s.strip().lower() in ("", "none"):
            return []
        try:
            return [kind(v) for v in s.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}"
                                             ) from None
    return parse


_floats = _number_list(float, "numbers")
_ints = _number_list(int, "integers")


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(s: str) -> list[str]:
        vals = [v.strip() for v in s.split(",") if v.strip()]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {allowed}, "
                                             f"got {s!r}")
        return vals
    return parse


def add_run_options(p: argparse.ArgumentParser, *, with_out: bool = True) -> None:
    """The options shared by search / train / finetune / sweep / compare.

    Every default is ``argparse.SUPPRESS``: only options given on the command line land in the
    namespace, so that they can override a saved config (``--resume``, ``finetune``)."""
    S = argparse.SUPPRESS
    d = DEFAULTS
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", choices=train.ARCHS, default=S, help=f"network (default {d.arch})")
    g.add_argument("--dataset", default=S, metavar="SPEC",
                   help=f"{data_mod.DATASETS_HELP} (default {d.dataset})")
    g.add_argument("--data-dir", default=S, help=f"torchvision dataset root (default {d.data_dir})")
    g.add_argument("--download", action="store_true", default=S,
                   help="let torchvision download CIFAR if it is missing")
    g.add_argument("--image-size", type=int, default=S,
                   help=f"imagefolder: resize/crop to this size (default {d.image_size})")
    g.add_argument("--train-subset", type=int, default=S, metavar="N",
                   help="use only the first N training examples (quick runs; default all)")
    g.add_argument("--test-subset", type=int, default=S, metavar="N",
                   help="use only the first N test examples (default all)")
    g.add_argument("--prune-rate", type=float, default=S,
                   help=f"fraction of weights REMOVED by the mask, in [0, 1) (default "
                   f"{d.prune_rate}; biprop's code calls the kept fraction prune_rate)")
    g.add_argument("--timesteps", "-T", type=int, default=S, help=f"T (default {d.timesteps})")
    g.add_argument("--bn-affine", action="store_true", default=S,
                   help="BatchNorm with affine weight/bias (default off, as biprop)")
    n = p.add_argument_group("neuron (spiking models; defaults are the paper's)")
    n.add_argument("--neuron", choices=train.NEURONS, default=S,
                   help="lif, or if: SpikingJelly's IFNode, H = V + X, no --decay/--tau "
                   f"(default {d.neuron})")
    lam = n.add_mutually_exclusive_group()
    lam.add_argument("--decay", "--lambda", dest="decay", type=float, default=S,
                     help=f"decay rate lambda = 1 - 1/tau (default {d.decay})")
    lam.add_argument("--tau", type=float, default=S, help="membrane time constant (instead of "
                     "--decay)")
    n.add_argument("--decay-input", action=argparse.BooleanOptionalAction, default=S,
                   help="SpikingJelly's decay_input: H = V + (X - V)/tau instead of the paper's "
                   "H = lambda V + X (default off)")
    n.add_argument("--v-threshold", type=float, default=S, help=f"(default {d.v_threshold})")
    n.add_argument("--v-reset", type=_v_reset, default=S,
                   help=f"hard reset value, or 'none' for soft reset (default {d.v_reset})")
    n.add_argument("--detach-reset", action=argparse.BooleanOptionalAction, default=S,
                   help="no gradient through the reset (default on)")
    n.add_argument("--surrogate", choices=train.SURROGATES, default=S,
                   help=f"(default {d.surrogate})")
    n.add_argument("--surrogate-alpha", type=float, default=S,
                   help=f"(default {d.surrogate_alpha}; SpikingJelly's defaults: atan 2, "
                   "sigmoid 4, rect 1, piecewise_quadratic 1)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=S, help=f"(default {d.epochs})")
    o.add_argument("--optimizer", choices=train.OPTIMIZERS, default=S,
                   help=f"(default {d.optimizer})")
    o.add_argument("--lr", type=float, default=S,
                   help=f"initial learning rate, cosine schedule to 0 (default {d.lr})")
    o.add_argument("--momentum", type=float, default=S, help=f"SGD momentum (default {d.momentum})")
    o.add_argument("--weight-decay", type=float, default=S,
                   help=f"on every trained tensor, scores included, as biprop (default "
                   f"{d.weight_decay})")
    o.add_argument("--batch-size", type=int, default=S,
                   help=f"global batch size, split across processes (default {d.batch_size})")
    o.add_argument("--seed", type=int, default=S, help=f"(default {d.seed})")
    r = p.add_argument_group("running")
    r.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:N (default auto)")
    r.add_argument("--backend", choices=("auto", "torch", "cpu", "triton", "cuda"), default=S,
                   help="binslt kernels; auto = the fastest built for the device (default auto)")
    r.add_argument("--workers", type=int, default=S, help="DataLoader workers (default 0)")
    if with_out:
        r.add_argument("--out", default=None, help="output directory (default runs/<name>)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    r.add_argument("--overwrite", action="store_true",
                   help="start again even if --out already holds a run")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars (default: when stderr is a terminal)")
    r.add_argument("--_crash-after-batches", dest="crash_after", type=_crash_spec, default=None,
                   help=argparse.SUPPRESS)  # test hook: os._exit after batch K of epoch E


def add_early_time_options(p: argparse.ArgumentParser) -> None:
    """``binslt search``'s early-time ticket options (defaults suppressed, as above)."""
    S = argparse.SUPPRESS
    g = p.add_argument_group("early-time tickets (Kim et al., ECCV 2022)")
    g.add_argument("--early-time", action="store_true", default=S,
                   help="search the scores at a smaller T' and evaluate at T: T' is the smallest "
                   "T' < T whose KL divergence (output averaged over T' vs over T, one training "
                   "batch at initialisation), divided by the largest over the T', is under "
                   "--early-time-threshold; the last --early-time-tune-epochs run at T")
    g.add_argument("--early-time-threshold", type=float, default=S,
                   help=f"(default {DEFAULTS.early_time_threshold}, Kim et al.'s)")
    g.add_argument("--early-time-tune-epochs", type=int, default=S, metavar="N",
                   help="final epochs of the search at the full T (default: epochs // 10)")


_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def explicit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields given on the command line."""
    ex = {k: v for k, v in vars(args).items() if k in _FIELDS}
    if ex.get("neuron") == "if" and "decay" not in ex and "tau" not in ex:
        ex["decay"] = ex["tau"] = None  # IF has no leak: the default decay does not apply
    if "decay" in ex:  # the two are exclusive: the one given replaces the other's default
        ex["tau"] = None
    elif "tau" in ex:
        ex["decay"] = None
    return ex


def make_config(base: RunConfig, explicit: dict[str, Any], **fixed: Any) -> RunConfig:
    cfg = dataclasses.replace(base, **{**explicit, **fixed})
    try:
        cfg.validate()
    except RunError as exc:
        raise CLIError(str(exc)) from None
    return cfg


def _slug(s: str) -> str:
    if ":" in s:
        kind, path = s.split(":", 1)
        s = f"{kind}_{Path(path).stem or Path(path).name}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "data"


def default_out(cfg: RunConfig) -> Path:
    tag = "finetune" if cfg.mode == "finetune" else cfg.method
    arch = cfg.arch if cfg.model is None else _slug(cfg.model.rsplit(":", 1)[-1])
    return Path("runs") / f"{tag}-{arch}-{_slug(cfg.dataset)}"


def _run_one(cfg: RunConfig, out: Path, args: argparse.Namespace,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    hooks = _CrashPlan(getattr(args, "crash_after", None)).next_hooks()
    return train.run(cfg, out, resume=args.resume, overwrite=args.overwrite,
                     progress=progress_enabled(args), hooks=hooks, log=log)


def _summary(res: dict[str, Any], out: Path) -> str:
    return (f"{METHOD_LABELS.get(res['method'], res['method'])} {res['arch']} on "
            f"{res['dataset']}: test accuracy {res['test_acc']:.2f}% (best "
            f"{res['best_test_acc']:.2f}%) after {res['epochs']} epochs, "
            f"{res['wall_time_s']:.1f} s ({res['mean_epoch_time_s']:.2f} s/epoch, backend "
            f"{res['backend']}); results in {out}/results.json")


def _train_command(args: argparse.Namespace, method: str, mode: str) -> int:
    explicit = explicit_options(args)
    if explicit.get("model") is not None:  # the network is the user's model
        if "arch" in explicit:
            raise CLIError("--model and --arch exclude each other (the network is the model "
                           "FILE.py:FACTORY returns)")
        explicit["arch"] = "custom"
    base = DEFAULTS
    probe = make_config(base, explicit, method=method, mode=mode)
    out = Path(args.out) if args.out else default_out(probe)
    if args.resume:
        saved = RunDir(out).saved_config()
        if saved is not None:
            try:
                base = RunConfig.from_dict(saved)
            except (RunError, TypeError) as exc:
                raise CLIError(f"{out}: the saved config is unusable ({exc})") from None
    cfg = make_config(base, explicit, method=method, mode=mode)
    res = _run_one(cfg, out, args)
    if is_main_process():
        print(_summary(res, out))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    return _train_command(args, "binwslt", "search")


def cmd_train(args: argparse.Namespace) -> int:
    return _train_command(args, args.method, "train" if args.method in ("ann", "snn")
                          else "search")


def cmd_finetune(args: argparse.Namespace) -> int:
    source = load_source(args.source)
    saved = dict(source["config"])
    if not saved:
        raise CLIError(f"{source['path']} carries no run config; fine-tune the output "
                       "directory of `binslt search`")
    # Fine-tuning trains the found ticket at its full T, also after an early-time search.
    saved.update(mode="finetune", init_from=source["path"], early_time=False)
    try:
        base = RunConfig.from_dict(saved)
    except (RunError, TypeError) as exc:
        raise CLIError(f"{source['path']}: the saved config is unusable ({exc})") from None
    explicit = explicit_options(args)
    for k in ("arch", "neuron", "prune_rate", "timesteps", "decay", "tau", "decay_input",
              "v_threshold",
              "v_reset", "surrogate", "surrogate_alpha", "bn_affine"):
        if k in explicit and explicit[k] != getattr(base, k):
            raise CLIError(f"--{k.replace('_', '-')} cannot change in finetune: the network "
                           f"comes from {source['path']}")
    cfg = make_config(base, explicit)
    src_path = Path(source["path"])
    out = Path(args.out) if args.out else src_path.parent.with_name(
        src_path.parent.name + "-finetune")
    if args.resume:
        saved_ft = RunDir(out).saved_config()
        if saved_ft is not None:
            cfg = make_config(RunConfig.from_dict(saved_ft), explicit)
    res = _run_one(cfg, out, args)
    if is_main_process():
        print(_summary(res, out))
    return 0


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


# ---------------------------------------------------------------------------------------------
# sweep (Fig. 2)
# ---------------------------------------------------------------------------------------------


def _lam(cfg: RunConfig) -> float:
    if cfg.neuron == "if":
        return 1.0  # no leak: H = 1 * V + X
    return cfg.decay if cfg.decay is not None else 1.0 - 1.0 / float(cfg.tau)


def _point_name(cfg: RunConfig) -> str:
    parts = [cfg.method, cfg.arch]
    if cfg.method in train.MASKED:
        parts.append(f"p{cfg.prune_rate:g}")
    if cfg.method in train.SPIKING:
        parts += [f"T{cfg.timesteps}", f"l{_lam(cfg):g}"]
    parts.append(f"s{cfg.seed}")
    return "-".join(parts)


def sweep_points(base: RunConfig, methods: list[str], archs: list[str], prune_rates: list[float],
                 timesteps: list[int], decays: list[float], full: bool) -> list[RunConfig]:
    """The grid. ``full=False`` (the paper's layout): each axis varied alone around ``base``
    (plus the prune-rate axis at T=1 for BinW-SLT when 1 is among ``timesteps``).
    ``full=True``: the Cartesian product of the axes that apply to each method."""
    pts: dict[str, RunConfig] = {}

    def add(cfg: RunConfig) -> None:
        pts.setdefault(_point_name(cfg), cfg)

    def lam_kw(lam: float) -> dict[str, Any]:
        return {"decay": lam, "tau": None}

    for arch in archs:
        for m in methods:
            b = dataclasses.replace(base, arch=arch, method=m,
                                    mode="train" if m in ("ann", "snn") else "search")
            prs = prune_rates if m in train.MASKED else []
            ts = timesteps if m in train.SPIKING else []
            ls = decays if m in train.SPIKING else []
            if full:
                for p in prs or [b.prune_rate]:
                    for t in ts or [b.timesteps]:
                        for lam in ls or [None]:
                            kw = lam_kw(lam) if lam is not None else {}
                            add(dataclasses.replace(b, prune_rate=p, timesteps=t, **kw))
                continue
            add(b)
            for p in prs:
                add(dataclasses.replace(b, prune_rate=p))
            for t in ts:
                add(dataclasses.replace(b, timesteps=t))
            for lam in ls:
                add(dataclasses.replace(b, **lam_kw(lam)))
            if m == "binwslt" and 1 in timesteps and b.timesteps != 1:
                for p in prs:
                    add(dataclasses.replace(b, prune_rate=p, timesteps=1))
    return list(pts.values())


SWEEP_FIELDS = ("method", "arch", "dataset", "prune_rate", "timesteps", "decay", "decay_input",
                "seed", "epochs", "test_acc", "best_test_acc", "params", "wall_time_s",
                "mean_epoch_time_s", "dir")


def _row(cfg: RunConfig, res: dict[str, Any], out: Path) -> dict[str, Any]:
    return {"method": cfg.method, "arch": cfg.arch, "dataset": cfg.dataset,
            "prune_rate": cfg.prune_rate, "timesteps": cfg.timesteps, "decay": _lam(cfg),
            "decay_input": cfg.decay_input, "seed": cfg.seed, "epochs": cfg.epochs,
            "test_acc": res["test_acc"], "best_test_acc": res["best_test_acc"],
            "params": res.get("params"), "wall_time_s": res["wall_time_s"],
            "mean_epoch_time_s": res["mean_epoch_time_s"], "dir": str(out)}


def _close(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) < 1e-9


def plot_sweep(rows: list[dict[str, Any]], base: RunConfig, path: Path) -> None:
    """Fig. 2 layout: (a) accuracy vs prune rate, (b) vs T, (c) vs lambda. A method to which an
    axis does not apply is drawn as a dotted horizontal line at its default-point accuracy.

    ``rows`` holds one row per run; the runs of one grid point over several seeds are drawn as
    their mean with an error bar of one sample standard deviation (ddof=1; a shaded band for
    the horizontal lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_lam = _lam(base)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["method"], r["arch"], round(float(r["prune_rate"]), 9), int(r["timesteps"]),
               round(float(r["decay"]), 9))
        groups.setdefault(key, []).append(r)
    points = []
    for grp in groups.values():
        mean, sd = stats.mean_std([g["test_acc"] for g in grp])
        points.append({**grp[0], "test_acc": mean, "test_acc_std": sd or 0.0})
    n_seeds = max((len(g) for g in groups.values()), default=1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series_keys = sorted({(r["method"], r["arch"]) for r in rows},
                         key=lambda k: (METHODS.index(k[0]), k[1]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [("prune_rate", "(a) pruning rate (%)", train.MASKED),
              ("timesteps", "(b) timestep T", train.SPIKING),
              ("decay", "(c) decay rate $\\lambda$", train.SPIKING)]
    fixed = {"prune_rate": base.prune_rate, "timesteps": base.timesteps, "decay": base_lam}
    multi_arch = len({k[1] for k in series_keys}) > 1
    for ax, (axis, title, applies) in zip(axes, panels):
        for i, (m, arch) in enumerate(series_keys):
            label = METHOD_LABELS[m] + (f" {arch}" if multi_arch else "")
            color = colors[i % len(colors)]
            mine = [r for r in points if r["method"] == m and r["arch"] == arch]
            variants = [(label, base.timesteps)]
            if axis == "prune_rate" and m == "binwslt" and base.timesteps != 1:
                variants.append((label + " (T=1)", 1))
            for lab, t_fixed in variants:
                def keep(r, axis=axis, t_fixed=t_fixed, m=m):
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
                pts = sorted((float(r[axis]), float(r["test_acc"]), float(r["test_acc_std"]))
                             for r in mine if keep(r))
                if not pts:
                    continue
                style = "--" if lab.endswith("(T=1)") else "-"
                xs = [x * 100 if axis == "prune_rate" else x for x, _, _ in pts]
                ys = [y for _, y, _ in pts]
                err = [e for _, _, e in pts] if n_seeds > 1 else None
                if m in applies and len({p[0] for p in pts}) > 1:
                    ax.errorbar(xs, ys, yerr=err, fmt=style, marker="o", color=color, label=lab,
                                capsize=3)
                elif m not in applies:
                    ax.axhline(ys[0], linestyle=":", color=color, label=lab)
                    if err and err[0] > 0:
                        ax.axhspan(ys[0] - err[0], ys[0] + err[0], color=color, alpha=0.12)
                else:
                    ax.errorbar(xs[:1], ys[:1], yerr=err[:1] if err else None, fmt="o",
                                color=color, label=lab, capsize=3)
        ax.set_xlabel(title)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if axis == "decay":
            ax.invert_xaxis()  # the paper goes from 0.99 down
        ax.legend(fontsize=8)
    ds = rows[0]["dataset"] if rows else base.dataset
    seeds_note = (f"; mean ± sample std over {n_seeds} seeds" if n_seeds > 1 else "")
    fig.suptitle(f"{ds}: prune rate {base.prune_rate:g}, T={base.timesteps}, "
                 f"$\\lambda$={base_lam:g} unless varied{seeds_note}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


SUMMARY_KEYS = ("method", "arch", "dataset", "prune_rate", "timesteps", "decay", "decay_input",
                "epochs")
SUMMARY_VALUES = ("test_acc", "best_test_acc", "wall_time_s")


def sweep_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid point over its seeds: mean, sample std (ddof=1) and per-seed values of
    the final and best test accuracy and of the wall time (:func:`binslt.training.stats.aggregate`)."""
    return stats.aggregate(rows, SUMMARY_KEYS, SUMMARY_VALUES)


def _summary_fields(summary: list[dict[str, Any]], keys: tuple[str, ...],
                    values: tuple[str, ...]) -> list[str]:
    """The CSV columns of :func:`binslt.training.stats.aggregate`'s rows, per-seed columns included."""
    fields = list(keys) + ["n_seeds", "seeds"]
    seeds = sorted({int(x) for r in summary for x in str(r["seeds"]).split(";")})
    for f in values:
        fields += [f"{f}_mean", f"{f}_std"] + [f"{f}_s{x}" for x in seeds]
    return fields


def cmd_sweep(args: argparse.Namespace) -> int:
    explicit = explicit_options(args)
    base = make_config(DEFAULTS, explicit, method="binwslt", mode="search")
    seeds, multi = _seed_list(args, base)
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{_slug(base.dataset)}"
    points = sweep_points(base, args.methods, args.archs, args.prune_rates, args.timesteps_list,
                          args.decays, args.full_grid)
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
        atomic_write_json({"kind": "sweep", "seeds": seeds, "std": stats.STD_KIND,
                           "runs": rows, "points": summary}, out / "results.json")
        plot_sweep(rows, base, out / "fig2.png")
        extra = " (mean ± std over seeds)" if multi else ""
        print(f"wrote {out / 'sweep.csv'}, sweep_summary.csv{extra}, results.json and "
              f"{out / 'fig2.png'}")
    return 0


def _quiet(_msg: str) -> None:
    pass


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
PAIR_FIELDS = ("a", "b", "metric", "n_seeds", "seeds", "mean_diff", "std_diff", "level", "t",
               "ci_low", "ci_high", "diffs")


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
        for metric in ("test_acc", "best_test_acc"):
            va = {r["seed"]: r[metric] for r in rows if r["label"] == a}
            vb = {r["seed"]: r[metric] for r in rows if r["label"] == b}
            if not (set(va) & set(vb)):
                continue
            d = stats.paired_difference(va, vb, level=level)
            out.append({"a": a, "b": b, "metric": metric, "n_seeds": d["n"],
                        "seeds": ";".join(map(str, d["seeds"])), "mean_diff": d["mean"],
                        "std_diff": d["std"], "level": d["level"], "t": d["t"],
                        "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                        "diffs": ";".join(f"{x:.4f}" for x in d["diffs"])})
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


def cmd_compare(args: argparse.Namespace) -> int:
    explicit = explicit_options(args)
    base = make_config(DEFAULTS, explicit, method="binwslt", mode="search")
    seeds, multi = _seed_list(args, base)
    out = Path(args.out) if args.out else Path("runs") / f"compare-{base.arch}-{_slug(base.dataset)}"
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
                 "binslt.models.count_parameters. OPs/energy: binslt.analysis.energy.report per image "
                 "(MACs at 4.6 pJ, SOPs at 0.9 pJ).", ""]
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


# ---------------------------------------------------------------------------------------------
# The parsers
# ---------------------------------------------------------------------------------------------


def add_parsers(sub) -> None:
    """Register search, train, finetune, sweep and compare."""
    s = sub.add_parser(
        "search", help="BinW-SLT search (Algorithm 1); no options: Conv-4 on digits",
        description="Train the scores of a binwslt network (weights stay at their random "
        "signs; the mask keeps the top-|score| weights). With no options: Conv-4 on "
        "scikit-learn digits, prune rate 0.5, T=4, lambda=0.99, 30 epochs.")
    add_run_options(s)
    u = s.add_argument_group("your own SpikingJelly model (instead of --arch)")
    u.add_argument("--model", default=argparse.SUPPRESS, metavar="FILE.py:FACTORY",
                   help="import FILE.py and call FACTORY() (with num_classes= if it takes it); "
                   "the SpikingJelly model it returns is converted by binslt.convert (its own "
                   "neurons and forward; the neuron options above do not apply) and searched. "
                   "The conversion report is printed and saved as OUT/report.txt and .json")
    u.add_argument("--input-shape", default=argparse.SUPPRESS, metavar="C,H,W",
                   help="image shape of the example run that finds the model's graph "
                   "(default: the dataset's)")
    add_early_time_options(s)
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("train", help="baselines: ann, snn (dense), bnn (BNN-BinAct)",
                       description="Train a baseline on the same architecture and options.")
    s.add_argument("method", choices=("ann", "snn", "bnn"))
    add_run_options(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("finetune", help="train a found ticket's weights with its mask fixed",
                       description="Keep the mask of a searched ticket and train the latent "
                       "weights through sign (straight-through estimator). Options not given "
                       "come from the source run.")
    s.add_argument("--from", dest="source", required=True, metavar="RUN",
                   help="run directory of `binslt search`, or its checkpoint.pt")
    add_run_options(s)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("sweep", help="grid over prune rate, T, lambda -> CSV + Fig. 2 PNG",
                       description="Run a grid (resumable: finished points are skipped) and "
                       "write OUT/sweep.csv and OUT/fig2.png laid out like the paper's Fig. 2. "
                       "Run options set the fixed values of the axes not being varied.")
    s.add_argument("--methods", type=_names(METHODS), default=["binwslt", "snn", "bnn", "ann"],
                   help="comma-separated (default binwslt,snn,bnn,ann)")
    s.add_argument("--archs", type=_names(train.ARCHS), default=["conv4"],
                   help="comma-separated (default conv4)")
    s.add_argument("--prune-rates", type=_floats, default=_floats(SWEEP_PRUNE_RATES),
                   help=f"values for panel (a) (default {SWEEP_PRUNE_RATES}; 'none' skips)")
    s.add_argument("--timesteps-list", type=_ints, default=_ints(SWEEP_TIMESTEPS),
                   help=f"values for panel (b) (default {SWEEP_TIMESTEPS})")
    s.add_argument("--decays", type=_floats, default=_floats(SWEEP_DECAYS),
                   help=f"lambda values for panel (c) (default {SWEEP_DECAYS})")
    s.add_argument("--full-grid", action="store_true",
                   help="the Cartesian product instead of one axis at a time")
    s.add_argument("--seeds", type=_ints, default=None, metavar="S,S,...",
                   help="run every grid point once per seed (instead of --seed); "
                   "OUT/sweep_summary.csv gets mean, sample std (ddof=1) and per-seed values, "
                   "fig2.png error bars")
    s.add_argument("--verbose", action="store_true", help="print every epoch")
    add_run_options(s)
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("compare", help="Table 1/2: ANN, SNN, BNN-BinAct, BinW-SLT (T=4, T=1)",
                       description="Train (or reuse) the five rows and write OUT/compare.md, "
                       ".csv and .json with accuracy, parameters, OPs and energy.")
    s.add_argument("--methods", type=_names(METHODS), default=list(METHODS),
                   help="which rows (default all: binwslt,snn,bnn,ann)")
    s.add_argument("--seeds", type=_ints, default=None, metavar="S,S,...",
                   help="run every row once per seed (instead of --seed; rows in OUT/<row>-s<S>): "
                   "mean ± sample std (ddof=1) per row and paired differences with Student-t "
                   "intervals (BinW-SLT vs BNN-BinAct and vs the SNN)")
    s.add_argument("--verbose", action="store_true", help="print every epoch")
    add_run_options(s)
    s.set_defaults(func=cmd_compare)
