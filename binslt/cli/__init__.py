"""The ``binslt`` command line.

Subcommands (one module each under ``binslt/cli/``):

- ``info`` (:mod:`.info`): versions, CPU features, backends, device.
- ``check`` (:mod:`.check`): every kernel backend against the reference here; writes the
  verdict that ``backend='auto'`` reads.
- ``search``, ``train {ann,snn,bnn}``, ``finetune --from RUN``, ``sweep``, ``compare``
  (:mod:`.run`): one training run through :func:`binslt.training.loop.run`, a Fig. 2 grid, a
  Table 1/2 comparison. With no options ``search`` runs the embedded default: Conv-4 on
  scikit-learn digits, prune rate 0.5, T=4, lambda=0.99.
- ``export`` / ``eval`` (:mod:`.tickets`): packed tickets.
- ``energy``, ``plot energy|activations`` (:mod:`.energy`): operation counts, energy, figures.

Every training command accepts the same run options (see ``binslt search --help``); each writes
``OUT/results.json``, ``OUT/metrics.csv``, ``OUT/checkpoint.pt`` (every epoch) and the packed
``OUT/ticket.safetensors`` (see :mod:`binslt.artifacts`). ``torchrun --nproc_per_node=K -m
binslt search ...`` trains with DistributedDataParallel (gloo on the CPU, nccl on CUDA).

The library modules raise exceptions; this package alone parses arguments and turns errors in
options, data, files or the model (a layer refusing its input, NaN/inf in a layer, a ``--model``
model's code failing inside a run) into exit status 2 and one line ``binslt CMD: error: ...``
naming the layer and the fix. ``binslt --debug CMD ...`` (or ``BINSLT_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..interop.nir import NIRDependencyError, NIRError
from ..io.artifacts import ArtifactError
from ..nn.layers import NonFiniteError
from ..ops.fallback import BackendSettingError
from ..training.data import DatasetError
from ..training.loop import RunError
from . import check, energy, info, run, tickets
from .common import CLIError
from .run import DEFAULTS, _point_name, compare_table, explicit_options, make_config, sweep_points

__all__ = ["CLIError", "DEFAULTS", "build_parser", "compare_table", "explicit_options", "main",
           "make_config", "sweep_points", "_point_name"]

#: What a command raises for bad input: one line on stderr, exit status 2.
USER_ERRORS = (CLIError, RunError, DatasetError, ArtifactError, NIRError, NIRDependencyError,
               BackendSettingError, OSError, NonFiniteError)


class _VersionAction(argparse.Action):
    """``--version``: one line ``binslt X  torch Y  triton Z``, exit 0 (Triton is imported only
    when asked)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..training.loop import versions

        v = versions()
        print(f"binslt {v['binslt']}  torch {v['torch']}  triton {v['triton']}")
        parser.exit(0)


class _Parser(argparse.ArgumentParser):
    """An option error as one line (the message and where the options are listed), exit 2;
    the subcommands' parsers are of this class too (``add_subparsers``' default)."""

    def error(self, message: str):  # type: ignore[override]
        msg = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {msg} (options: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="binslt", description="Binary-weight spiking lottery tickets (BinW-SLT): search, "
        "baselines and experiments.")
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full traceback instead of one line (also "
                   "accepted after the command)")
    p.add_argument("--version", action=_VersionAction,
                   help="print the binslt, torch and Triton versions and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    info.add_parser(sub)
    check.add_parser(sub)
    run.add_parsers(sub)
    tickets.add_parsers(sub)
    energy.add_parsers(sub)
    return p


def _command_parser(parser: argparse.ArgumentParser,
                    args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub)command parser that ``args`` went through (``binslt plot energy``'s
    for ``plot energy``)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name is None or name not in subs[0].choices:
            return parser
        parser = subs[0].choices[name]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``binslt`` console script."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere before a bare "--" (the global flag, also after the command's name)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for i, a in enumerate(argv) if not (i < end and a == "--debug")]
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command they were given to, not by the top-level parser
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    debug = debug or bool(os.environ.get("BINSLT_DEBUG"))
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    cmd = " ".join(str(c) for c in (args.command, getattr(args, "plot_kind", None)) if c)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if debug:
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"binslt {cmd}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"binslt {cmd}: interrupted (the last finished epoch is in the checkpoint; "
              "continue with --resume)", file=sys.stderr)
        return 130
