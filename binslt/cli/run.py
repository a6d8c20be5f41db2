"""``binslt search`` / ``train`` / ``finetune`` (one run), ``sweep`` (Fig. 2) and ``compare``
(Tables 1 and 2): their options, and how they map onto :func:`binslt.training.loop.run`."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

from ..io.artifacts import (
    RunDir,
    load_source,
)
from ..training import data as data_mod
from ..training import loop as train
from ..training.loop import METHODS, RunConfig, RunError
from .common import METHOD_LABELS, CLIError, add_command, is_main_process, progress_enabled

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
    for key in ("train_subset", "test_subset"):  # (0 is RunConfig's "the whole split")
        if key in ex and ex[key] < 1:
            raise CLIError(f"--{key.replace('_', '-')} must be >= 1, got {ex[key]} (leave it "
                           "out for the whole split)")
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
            f"{res['best_test_acc']:.2f}%) after {res['epochs']} "
            f"epoch{'' if res['epochs'] == 1 else 's'}, "
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
    for key in ("early_time_threshold", "early_time_tune_epochs"):
        if key in explicit and not cfg.early_time:
            raise CLIError(f"--{key.replace('_', '-')} goes with --early-time")
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
# The parsers
# ---------------------------------------------------------------------------------------------


def _search_options(s: argparse.ArgumentParser) -> None:
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


def _train_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("method", choices=("ann", "snn", "bnn"))
    add_run_options(s)


def _finetune_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--from", dest="source", required=True, metavar="RUN",
                   help="run directory of `binslt search`, or its checkpoint.pt")
    add_run_options(s)


def _sweep_axes(s: argparse.ArgumentParser) -> None:
    s.add_argument("--archs", type=_names(train.ARCHS), default=["conv4"],
                   help="comma-separated (default conv4)")
    s.add_argument("--prune-rates", type=_floats, default=_floats(SWEEP_PRUNE_RATES),
                   help=f"values for panel (a) (default {SWEEP_PRUNE_RATES}; 'none' skips)")
    s.add_argument("--timesteps-list", type=_ints, default=_ints(SWEEP_TIMESTEPS),
                   help=f"values for panel (b) (default {SWEEP_TIMESTEPS})")
    s.add_argument("--decays", type=_floats, default=_floats(SWEEP_DECAYS),
                   help=f"lambda values for panel (c) (default {SWEEP_DECAYS})")
    s.add_argument("--surrogates", type=_names(train.SURROGATES), default=[],
                   help="surrogate gradients of the spiking methods, comma-separated, each at "
                   "SpikingJelly's default alpha (--surrogate keeps --surrogate-alpha); "
                   "OUT/sweep_pairs.csv: each minus --surrogate's point, paired by seed, and "
                   "fig2.png panel (d) (default: --surrogate alone)")
    s.add_argument("--full-grid", action="store_true",
                   help="the Cartesian product instead of one axis at a time")


def _multi_run_options(methods_help: str, seeds_help: str,
                       axes: Callable[[argparse.ArgumentParser], None] | None = None):
    """The options of a command that starts several runs (sweep, compare): ``--methods``, its
    own ``axes``, ``--seeds``, ``--verbose`` and the run options."""
    def options(s: argparse.ArgumentParser) -> None:
        s.add_argument("--methods", type=_names(METHODS), default=list(METHODS),
                       help=methods_help)
        if axes is not None:
            axes(s)
        s.add_argument("--seeds", type=_ints, default=None, metavar="S,S,...", help=seeds_help)
        s.add_argument("--verbose", action="store_true", help="print every epoch")
        add_run_options(s)
    return options


def _commands() -> tuple:
    """(name, function, summary, description, options) of each command this module registers
    (sweep and compare are imported at the end of the module)."""
    return (
        ("search", cmd_search, "BinW-SLT search (Algorithm 1); no options: Conv-4 on "
         "digits", "Train the scores of a binwslt network (weights stay at their random signs; the "
         "mask keeps the top-|score| weights). With no options: Conv-4 on scikit-learn digits, "
         "prune rate 0.5, T=4, lambda=0.99, 30 epochs.", _search_options),
        ("train", cmd_train, "baselines: ann, snn (dense), bnn (BNN-BinAct)",
         "Train a baseline on the same architecture and options.", _train_options),
        ("finetune", cmd_finetune, "train a found ticket's weights with its mask fixed",
         "Keep the mask of a searched ticket and train the latent weights through sign "
         "(straight-through estimator). Options not given come from the source run.",
         _finetune_options),
        ("sweep", cmd_sweep, "grid over prune rate, T, lambda (, surrogate) -> CSV + Fig. 2 PNG",
         "Run a grid (resumable: finished points are skipped) and write OUT/sweep.csv and "
         "OUT/fig2.png laid out like the paper's Fig. 2. Run options set the fixed values of the "
         "axes not being varied.", _multi_run_options(
             "comma-separated (default binwslt,snn,bnn,ann)",
             "run every grid point once per seed (instead of --seed); OUT/sweep_summary.csv gets "
             "mean, sample std (ddof=1) and per-seed values, fig2.png error bars", _sweep_axes)),
        ("compare", cmd_compare, "Table 1/2: ANN, SNN, BNN-BinAct, BinW-SLT (T=4, T=1)",
         "Train (or reuse) the five rows and write OUT/compare.md, .csv and .json with accuracy, "
         "parameters, OPs and energy.", _multi_run_options(
             "which rows (default all: binwslt,snn,bnn,ann)",
             "run every row once per seed (instead of --seed; rows in OUT/<row>-s<S>): mean ± "
             "sample std (ddof=1) per row and paired differences with Student-t intervals "
             "(BinW-SLT vs BNN-BinAct and vs the SNN)")),
    )


def add_parsers(sub) -> None:
    """Register search, train, finetune, sweep and compare."""
    for spec in _commands():
        add_command(sub, *spec)


# sweep and compare, at their old paths (binslt.cli.run.NAME); they import this module
from .compare import (  # noqa: E402, F401
    COMPARE_FIELDS,
    COMPARE_KEYS,
    COMPARE_PAIRS,
    COMPARE_ROWS,
    COMPARE_VALUES,
    PAIR_FIELDS,
    _energy,
    _fmt,
    _row_lead,
    cmd_compare,
    compare_pairs,
    compare_seed_table,
    compare_table,
    pairs_table,
)
from .sweep import (  # noqa: E402, F401
    SUMMARY_KEYS,
    SUMMARY_VALUES,
    SWEEP_FIELDS,
    _close,
    _draw_series,
    _fmt_ms,
    _lam,
    _on_axis,
    _point_name,
    _quiet,
    _row,
    _seed_list,
    _seed_points,
    _summary_fields,
    cmd_sweep,
    plot_sweep,
    sweep_points,
    sweep_summary,
)
