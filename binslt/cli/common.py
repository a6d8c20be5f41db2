"""What every ``binslt`` command shares: the error type, option types, labels, model loading."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import artifacts, tickets
from ..io.artifacts import RunDir

METHOD_LABELS = {"ann": "ANN", "snn": "SNN", "bnn": "BNN-BinAct", "binwslt": "BinW-SLT"}


class CLIError(Exception):
    """A user-facing error; printed as one line, exit status 2."""


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def progress_enabled(args: argparse.Namespace) -> bool:
    """``--progress`` / ``--no-progress``, else bars when stderr is a terminal."""
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


def add_command(sub, name: str, func, summary: str, description: str = "",
                options=None) -> argparse.ArgumentParser:
    """Register subcommand ``name``: ``summary`` in the command list, ``description`` in its
    ``--help``, ``options(parser)`` adds its arguments, ``func(args) -> int`` runs it."""
    p = sub.add_parser(name, help=summary, description=description or None)
    if options is not None:
        options(p)
    p.set_defaults(func=func)
    return p


def pos_int(s: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_model_option(p: argparse.ArgumentParser) -> None:
    """``--model FILE.py:FACTORY`` of the commands that read a ticket."""
    p.add_argument("--model", default=None, metavar="FILE.py:FACTORY",
                   help="the ticket's structure from your code: for a ticket of a model "
                   "converted by binslt.convert in Python, the function returning the "
                   "unconverted SpikingJelly model (as `binslt search --model` takes it); for a "
                   "`binslt search --model` run's ticket it replaces the recorded factory")


def ticket_model(ticket: Path, factory: str | None, device, backend) -> nn.Module:
    """The network of a packed ticket file in eval mode; ``factory`` (``--model``) gives the
    structure of a SpikingJelly model's ticket (``load_user_ticket``)."""
    meta = tickets.read_ticket_metadata(ticket, verify=False)
    if factory is None and meta["config"].get("arch") != "converted":
        return tickets.load_ticket(ticket, device=device, backend=backend)
    from ..interop.user_model import FactoryError, load_user_ticket

    try:
        return load_user_ticket(ticket, factory, device=device, backend=backend)
    except FactoryError as exc:
        raise CLIError(str(exc)) from None


def load_model(src: str | Path, device: torch.device | str = "cpu", backend: str | None = None,
               factory: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, source)`` from a run directory, a packed ticket or a checkpoint, in eval mode.

    A run directory gives its ``ticket.safetensors`` (its checkpoint while the run is
    unfinished). ``source`` holds the run's ``config`` (a ticket inside a run directory takes
    that run's), the ``build_config`` and the ``path`` read. ``factory`` (``--model``): the
    structure of a SpikingJelly model's ticket (``load_user_ticket``)."""
    p = Path(src).expanduser()
    if not p.exists():
        raise CLIError(f"{str(src)!r}: no such run directory, ticket or checkpoint")
    ticket = p / RunDir.TICKET if p.is_dir() else p
    if ticket.suffix == ".safetensors" and ticket.is_file():
        model = ticket_model(ticket, factory, device, backend)
        config = RunDir(ticket.parent).saved_config() or {}
        return model, {"config": config, "build_config": model.build_config,
                       "path": str(ticket)}
    if factory is not None:
        raise CLIError(f"--model: {str(src)!r} is not a ticket; --model gives the structure of "
                       "a .safetensors ticket")
    model, source = artifacts.load_model(p, backend)
    return model.to(device), source
