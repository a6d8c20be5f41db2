"""``binslt energy`` (per-layer counts and energy of one model) and ``binslt plot energy`` /
``binslt plot activations`` (the paper's Fig. 3 and Fig. 1) over saved runs or fresh builds."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..analysis.energy import E_MAC_PJ, E_SOP_PJ, format_table, last_hidden_activations, report
from ..io import artifacts
from ..nn import models
from ..training import data
from .common import METHOD_LABELS, CLIError, add_model_option, load_model, pos_int


def image_batches(model: nn.Module, dataset: str, data_dir: str, image_size: int, split: str,
                  batch_size: int, batches: int, download: bool, seed: int, limit: int = 0,
                  ) -> list[torch.Tensor]:
    """Up to ``batches`` image batches of ``dataset`` (its first ``limit`` examples when
    given; ``random``: standard normal images of the model's input shape, for MAC counts;
    their firing rates mean nothing)."""
    if dataset == "random":
        cfg = getattr(model, "build_config", None) or {}
        c, s = cfg.get("in_channels"), cfg.get("input_size")
        if c is None or s is None:
            raise CLIError("--dataset random needs a binslt model (build_config with "
                           "in_channels and input_size)")
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(batch_size, c, h, w, generator=g) for _ in range(batches)]
    bundle = data.load(dataset, data_dir=data_dir, download=download, image_size=image_size)
    ds = bundle.test if split == "test" else bundle.train
    if limit:
        ds = Subset(ds, range(min(limit, len(ds))))
    out = []
    for i, (x, _y) in enumerate(DataLoader(ds, batch_size=batch_size, shuffle=False)):
        if i >= batches:
            break
        out.append(x)
    if not out:
        raise CLIError(f"the {split} split of {dataset!r} is empty")
    return out


def _label(model: nn.Module, fallback: str) -> str:
    cfg = getattr(model, "build_config", None) or {}
    v = cfg.get("variant")
    return METHOD_LABELS.get(v, fallback) if v else fallback


def _run_settings(args: argparse.Namespace, source: dict[str, Any]) -> dict[str, Any]:
    """Where a saved run's images come from: the options given, else the run's own config."""
    cfg = source.get("config") or {}
    size = (source.get("build_config") or {}).get("input_size")
    return {"dataset": args.dataset or cfg.get("dataset") or "random",
            "data_dir": args.data_dir or cfg.get("data_dir") or "data",
            "image_size": cfg.get("image_size", size if isinstance(size, int) else 32)}


def _models_from_args(args: argparse.Namespace, methods: Sequence[str], device: torch.device,
                      ) -> list[tuple[str, nn.Module, dict[str, Any]]]:
    """(label, model, data settings) from --runs, else fresh --arch builds per method."""
    out = []
    runs = _run_sources(args)
    if runs:
        for src in runs:
            model, source = load_model(src, device, args.backend)
            out.append((_label(model, Path(src).name), model, _run_settings(args, source)))
        return out
    dataset = args.dataset or "random"
    if dataset == "random":
        shape = {"num_classes": 10, "in_channels": args.in_channels,
                 "input_size": args.input_size}
    else:
        b = data.load(dataset, data_dir=args.data_dir or "data", download=args.download,
                      image_size=args.input_size)
        shape = {"num_classes": b.num_classes, "in_channels": b.in_channels,
                 "input_size": b.input_size}
    for meth in methods:
        torch.manual_seed(args.seed)
        try:
            model = models.build(args.arch, meth, timesteps=args.timesteps,
                                 prune_rate=args.prune_rate, backend=args.backend or "auto",
                                 **shape)
        except ValueError as exc:
            raise CLIError(f"cannot build {args.arch}/{meth}: {exc}") from None
        out.append((METHOD_LABELS.get(meth, meth), model.to(device),
                    {"dataset": dataset, "data_dir": args.data_dir or "data",
                     "image_size": args.input_size}))
    return out


def _run_sources(args: argparse.Namespace) -> list[str]:
    """The saved runs a plot shows: its positional sources, then --runs."""
    return [*(getattr(args, "sources", None) or []), *(getattr(args, "runs", None) or [])]


def _add_source_args(p: argparse.ArgumentParser, *, methods_default: Sequence[str]) -> None:
    p.add_argument("sources", nargs="*", metavar="SRC",
                   help="run directories / ticket / checkpoint files (else fresh --arch "
                        "builds); --runs SRC ... says the same")
    p.add_argument("--runs", nargs="+", metavar="SRC",
                   help="run directories / ticket / checkpoint files (else fresh --arch builds)")
    p.add_argument("--arch", default="conv4",
                   help="architecture of the fresh (untrained) models (default conv4)")
    p.add_argument("--methods", nargs="+", default=list(methods_default),
                   choices=tuple(METHOD_LABELS),
                   help=f"variants to build fresh (default {' '.join(methods_default)})")
    _add_data_args(p)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None,
                   help="dataset spec for the firing rates (binslt.data: digits, cifar10, "
                        "cifar100, imagefolder:PATH, npz:PATH) or 'random' (normal noise, MAC "
                        "counts only); default: the run's own dataset, else random")
    p.add_argument("--data-dir", default=None, help="dataset root (default: the run's, or data)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--batch-size", type=pos_int, default=64)
    p.add_argument("--batches", type=pos_int, default=2,
                   help="number of batches to average the firing rates over (default 2)")
    p.add_argument("--input-size", type=pos_int, default=32,
                   help="fresh builds with --dataset random / imagefolder: image size")
    p.add_argument("--in-channels", type=pos_int, default=3,
                   help="fresh builds with --dataset random: image channels")
    p.add_argument("--timesteps", type=pos_int, default=4, help="fresh builds: T")
    p.add_argument("--prune-rate", type=float, default=0.5,
                   help="fresh builds: fraction of weights removed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:K | auto (default cpu)")
    p.add_argument("--backend", default=None, help="binslt layer backend (default: the saved one)")
    p.add_argument("--e-mac", type=float, default=E_MAC_PJ, help="pJ per MAC (default 4.6)")
    p.add_argument("--e-sop", type=float, default=E_SOP_PJ, help="pJ per SOP (default 0.9)")


def _report_for(model: nn.Module, settings: dict[str, Any], args: argparse.Namespace,
                ) -> dict[str, Any]:
    images = image_batches(model, settings["dataset"], settings["data_dir"],
                           settings["image_size"], args.split, args.batch_size, args.batches,
                           args.download, args.seed)
    try:
        rep = report(model, images, e_mac_pj=args.e_mac, e_sop_pj=args.e_sop)
    except ValueError as exc:  # wrong image shape for the model, bad energy constants
        raise CLIError(artifacts.first_line(exc)) from None
    rep["dataset"] = settings["dataset"]
    rep["split"] = args.split
    return rep


def _write_json(obj: Any, path: str) -> None:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2) + "\n")


def cmd_energy(args: argparse.Namespace) -> int:
    device = artifacts.resolve_device(args.device)
    if args.source:
        model, source = load_model(args.source, device, args.backend, factory=args.model)
        settings = _run_settings(args, source)
        label = source["path"]
    else:
        if args.model:
            raise CLIError("--model gives the structure of a ticket: give the ticket too")
        if not args.arch or not args.method:
            raise CLIError("give a run directory / ticket / checkpoint, or --arch and "
                           "--method for a freshly built model")
        args.runs = args.sources = None
        (label, model, settings), = _models_from_args(args, [args.method], device)
        label = f"fresh {args.arch}/{args.method}"
    rep = _report_for(model, settings, args)
    rep["source"] = label
    print(f"{label}: dataset {settings['dataset']} ({args.split}), {rep['samples']} samples")
    print(format_table(rep))
    if args.json:
        _write_json(rep, args.json)
        print(f"wrote {args.json}")
    return 0


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cmd_plot_energy(args: argparse.Namespace) -> int:
    device = artifacts.resolve_device(args.device)
    entries = _models_from_args(args, args.methods, device)
    reps = [(label, _report_for(model, settings, args)) for label, model, settings in entries]
    energies = [r["total_energy_mj"] for _, r in reps]
    labels = [lab for lab, _ in reps]
    ref_i = labels.index("ANN") if "ANN" in labels else max(range(len(energies)),
                                                           key=energies.__getitem__)
    if energies[ref_i] <= 0:
        raise CLIError(f"{labels[ref_i]} has zero energy; nothing to normalise by")
    norm = [e / energies[ref_i] for e in energies]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(reps), 3.6))
    bars = ax.bar(labels, norm, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52",
                                        "#8172b3"][: len(reps)] or None)
    for b, e, nv in zip(bars, energies, norm):
        saving = energies[ref_i] / e if e > 0 else float("inf")
        ax.annotate(f"{e:.3g} mJ\n{saving:.2f}x", (b.get_x() + b.get_width() / 2, nv),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"compute energy / {labels[ref_i]}")
    ax.set_ylim(0, max(norm) * 1.3)
    ax.set_title("Normalised compute energy (eq. 7)")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    for (label, r), nv in zip(reps, norm):
        print(f"{label:12s} OPs {r['total_ops_g']:.4f} G  energy {r['total_energy_mj']:.4f} mJ  "
              f"normalised {nv:.4f}")
    print(f"wrote {out}")
    if args.json:
        _write_json({label: r for label, r in reps}, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_plot_activations(args: argparse.Namespace) -> int:
    device = artifacts.resolve_device(args.device)
    entries = _models_from_args(args, args.methods, device)
    maps = []
    for label, model, settings in entries:
        images = image_batches(model, settings["dataset"], settings["data_dir"],
                               settings["image_size"], args.split, args.num_inputs, 1,
                               args.download, args.seed)[0]
        try:
            acts = last_hidden_activations(model, images)
        except ValueError as exc:
            raise CLIError(artifacts.first_line(exc)) from None
        if args.neurons:
            acts = acts[:, : args.neurons]
        maps.append((label, acts))
    plt = _plt()
    k = maps[0][1].shape[0]
    fig, axes = plt.subplots(k, len(maps), figsize=(2.3 * len(maps), 2.1 * k + 0.9),
                             squeeze=False, constrained_layout=True)
    for j, (label, acts) in enumerate(maps):
        f = acts.shape[1]
        side = math.ceil(math.sqrt(f))
        grid = torch.full((acts.shape[0], side * side), float("nan"))
        grid[:, :f] = acts
        lo, hi = float(acts.min()), float(acts.max())
        if hi <= lo:
            hi = lo + 1.0
        for i in range(k):
            ax = axes[i][j]
            im = ax.imshow(grid[i].view(side, side).numpy(), cmap="viridis", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{label}\n({f} neurons)", fontsize=9)
        fig.colorbar(im, ax=axes[:, j].tolist(), location="bottom", shrink=0.8)
    what = "saved runs" if _run_sources(args) else f"fresh untrained {args.arch} models"
    fig.suptitle(f"Last hidden layer activations, {what}\n(spiking: spike counts over T)",
                 fontsize=10)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    for label, acts in maps:
        nz = float((acts != 0).float().mean())
        print(f"{label:12s} {tuple(acts.shape)} nonzero fraction {nz:.3f}")
    print(f"wrote {out}")
    return 0


def add_parsers(subparsers) -> None:
    """Register ``energy`` and ``plot`` (``plot energy``, ``plot activations``) on a
    subparsers object. Each parser's ``func(args) -> int`` runs the command."""
    p = subparsers.add_parser(
        "energy", help="per-layer MACs, firing rates, SOPs and energy (paper eq. 6-7)",
        description="Count MACs / SOPs and estimate compute energy (4.6 pJ per MAC, 0.9 pJ per "
                    "SOP) of a saved run, ticket or checkpoint, or of a freshly built model, "
                    "with firing rates measured on a dataset. Prints a table; --json writes it.")
    p.add_argument("source", nargs="?", default=None,
                   help="run directory, ticket.safetensors or checkpoint.pt")
    p.add_argument("--arch", default=None, help="without SOURCE: build this arch fresh")
    p.add_argument("--method", default=None, choices=tuple(METHOD_LABELS),
                   help="without SOURCE: the variant to build fresh")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    add_model_option(p)
    _add_data_args(p)
    p.set_defaults(func=cmd_energy, runs=None)

    plot = subparsers.add_parser("plot", help="figures: energy bars (Fig. 3), activations "
                                              "(Fig. 1)")
    sub = plot.add_subparsers(dest="plot_kind", metavar="{energy,activations}")
    sub.required = True
    pe = sub.add_parser("energy", help="normalised compute energy of ANN / SNN / BinW-SLT",
                        description="Bar chart of compute energy normalised to the ANN "
                                    "(the paper's Fig. 3, left).")
    _add_source_args(pe, methods_default=("ann", "snn", "binwslt"))
    pe.add_argument("-o", "--out", default="energy.png", help="PNG path (default energy.png)")
    pe.add_argument("--json", default=None, metavar="PATH", help="also write the reports")
    pe.add_argument("--dpi", type=pos_int, default=150)
    pe.set_defaults(func=cmd_plot_energy)
    pa = sub.add_parser("activations", help="last hidden layer maps of ANN / BNN / BinW-SLT",
                        description="Last hidden layer activations (spike counts for spiking "
                                    "models) of a few inputs, one column per model (Fig. 1).")
    _add_source_args(pa, methods_default=("ann", "bnn", "binwslt"))
    pa.add_argument("--num-inputs", type=pos_int, default=4)
    pa.add_argument("--neurons", type=pos_int, default=None,
                    help="show only the first K neurons (the paper shows 128)")
    pa.add_argument("-o", "--out", default="activations.png")
    pa.add_argument("--dpi", type=pos_int, default=150)
    pa.set_defaults(func=cmd_plot_activations)
