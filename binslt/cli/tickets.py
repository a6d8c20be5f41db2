"""``binslt export`` (a packed ticket from a run) and ``binslt eval`` (a ticket's accuracy)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..io import artifacts
from ..io.tickets import TicketError, export_ticket
from ..training import data
from .common import CLIError, add_command, add_model_option, ticket_model


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "nir":
        from ..interop import nir

        print(nir.export_cli(args.source, args.output, maxpool=args.maxpool))
        return 0
    model, src = artifacts.load_model(args.source)
    out = args.output
    if out is None:
        sp = Path(src["path"])
        # A run directory's ticket is its ticket.safetensors; another file gets its own name.
        out = (Path(args.source) / artifacts.RunDir.TICKET if Path(args.source).is_dir()
               else sp.with_name(sp.stem + ".safetensors"))
    try:
        info = export_ticket(model, out)
    except (OSError, TypeError) as exc:
        raise CLIError(f"cannot write {str(out)!r}: {artifacts.first_line(exc)}") from None
    ratio_pt = info["torch_save_bytes"] / info["ticket_bytes"]
    print(f"wrote {info['path']}: {_fmt_bytes(info['ticket_bytes'])} "
          f"({len(info['packed_layers'])} packed layers, {len(info['dense_tensors'])} other "
          "tensors)")
    print(f"fp32 state dict (weights once, no scores): {_fmt_bytes(info['fp32_bytes'])} -> "
          f"{info['ratio']:.1f}x smaller")
    print(f"torch.save of the searched state dict (weights + scores): "
          f"{_fmt_bytes(info['torch_save_bytes'])} -> {ratio_pt:.1f}x smaller")
    return 0


def _eval_nir(args: argparse.Namespace) -> int:
    from ..interop import nir

    res = nir.eval_nir_file(args.ticket, args.data, split=args.split, limit=args.limit,
                            batch_size=args.batch_size, data_dir=args.data_dir,
                            download=args.download, backend=args.backend or "auto")
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.ticket}: NIR graph on {res['dataset']} ({args.split}): accuracy "
              f"{res['accuracy']:.2f}% ({res['correct']}/{res['examples']}), "
              f"loss {res['loss']:.4f}")
    return 0


def _num_classes(model, cfg: dict, want: tuple, device) -> int:
    """The classes a model predicts: its config's, else the width of its output."""
    if cfg.get("num_classes") is not None:
        return int(cfg["num_classes"])
    with torch.no_grad():
        return int(model(torch.zeros(1, *want, device=device)).shape[-1])


def cmd_eval(args: argparse.Namespace) -> int:
    if str(args.ticket).endswith(".nir"):
        return _eval_nir(args)
    device = artifacts.resolve_device(args.device)
    model = ticket_model(Path(args.ticket), args.model, device, args.backend)
    cfg = model.build_config
    want = (model.in_channels, *model.input_hw)  # type: ignore[attr-defined]
    bundle = data.load(args.data, data_dir=args.data_dir, download=args.download,
                       image_size=int(want[1]))
    ds = data.evaluation_split(bundle, args.split, args.limit)
    x0, _ = ds[0]
    if tuple(x0.shape) != tuple(want):
        raise TicketError(f"the ticket takes images {list(want)} but dataset {args.data!r} "
                          f"gives {list(x0.shape)}")
    classes = _num_classes(model, cfg, want, device)
    if bundle.num_classes > classes:
        raise TicketError(f"dataset {args.data!r} has {bundle.num_classes} classes, the "
                          f"ticket predicts {classes}")
    t0 = time.perf_counter()
    loss, correct, total = artifacts.evaluate_counts(
        model, DataLoader(ds, batch_size=args.batch_size, shuffle=False), device)
    dt = time.perf_counter() - t0
    acc = 100.0 * correct / total
    res = {"ticket": str(args.ticket), "dataset": bundle.name, "split": args.split,
           "examples": total, "correct": correct, "accuracy": acc, "loss": loss / total,
           "seconds": dt, "arch": cfg["arch"], "variant": cfg["variant"]}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.ticket}: {cfg['arch']}/{cfg['variant']} on {bundle.name} ({args.split}): "
              f"accuracy {acc:.2f}% ({correct}/{total}), loss {loss / total:.4f}, {dt:.1f} s")
    return 0


def _export_options(ex: argparse.ArgumentParser) -> None:
    ex.add_argument("source", help="a run directory of `binslt search`, or its checkpoint.pt "
                    "(with --format nir also a .safetensors ticket)")
    ex.add_argument("-o", "--output", default=None,
                    help="file to write (default: RUN/ticket.safetensors, or RUN/ticket.nir "
                    "with --format nir, for a run directory; else SOURCE's name with the "
                    "format's suffix)")
    ex.add_argument("--format", choices=("ticket", "nir"), default="ticket",
                    help="ticket: binslt's packed safetensors ticket; nir: a NIR graph "
                    "(needs `pip install 'binslt[nir]'`; see docs/nir.md)")
    ex.add_argument("--maxpool", choices=("threshold", "lif"), default="threshold",
                    help="with --format nir: 2x2 spike max-pooling as Threshold(SumPool2d - "
                    "0.5) (exact), or AvgPool2d + a memoryless LIF (for importers without "
                    "Threshold, e.g. snnTorch)")


def _eval_options(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("ticket", help="a .safetensors ticket (a run's ticket.safetensors or what "
                    "`binslt export` wrote) or a .nir file (`binslt export --format nir`, or "
                    "SpikingJelly's export_to_nir)")
    ev.add_argument("--data", default="digits", help="dataset spec (digits, cifar10, cifar100, "
                    "imagefolder:PATH, npz:PATH)")
    ev.add_argument("--data-dir", default="data", help="where torchvision datasets live")
    ev.add_argument("--download", action="store_true", help="download the dataset if missing")
    ev.add_argument("--split", choices=("test", "train"), default="test")
    ev.add_argument("--limit", type=int, default=0, help="only the first N examples (0 = all)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--backend", default=None,
                    help="override the ticket's backend (auto, torch, cpu, triton, cuda)")
    ev.add_argument("--json", action="store_true", help="print the result as one JSON line")
    add_model_option(ev)


def add_parsers(subparsers) -> None:
    """Register export and eval."""
    add_command(subparsers, "export", cmd_export,
                "write a packed ticket file (2 bits per weight) from a run",
                "Export a searched network as a packed ticket: safetensors with each binslt "
                "layer's mask and sign bit planes, its gain, BN statistics, dense weights and the "
                "config. Prints its size against the fp32 state dict. (search, train and "
                "finetune write RUN/ticket.safetensors themselves; this rewrites it, or exports "
                "a checkpoint.)", _export_options)
    add_command(subparsers, "eval", cmd_eval, "evaluate a packed ticket on a dataset",
                "Load a packed ticket (frozen, eval mode) and report its accuracy.",
                _eval_options)
