"""``binslt check``: every op of each kernel backend against the reference on this machine."""

from __future__ import annotations

import argparse

from .common import CLIError


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    from ..ops import check
    from ..ops import fallback as fb

    try:
        rep = check.run_check(args.device, args.backend, progress=print)
    except check.CheckError as exc:
        raise CLIError(str(exc)) from None
    verdict, written = check.write_report(rep, args.json, save=not args.no_save)
    key = verdict["key"]
    failed = sorted({r.backend for r in rep.results if not r.ok})
    status = "all ok" if rep.ok else f"FAILED ({', '.join(failed)})"
    print(f"binslt check on {rep.device} ({key['device_name']}), torch {key['torch']}, triton "
          f"{key['triton']}, build {key['build']['binslt']}/{key['build']['files']}: {status} "
          f"in {rep.seconds:.1f} s")
    for p in written:
        print(f"verdict written to {p}" + (" (backend 'auto' reads it)"
                                           if p == fb.verdict_path() else ""))
    if not rep.ok and rep.device == "cuda" and torch.cuda.is_available():
        print("backend 'auto' skips the failing backends on this machine while the verdict "
              "matches; please report the lines above")
    return 0 if rep.ok else 1


def add_parser(sub) -> None:
    s = sub.add_parser("check", help="check every kernel backend against the reference here "
                       "(run it first on a GPU machine)")
    s.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    s.add_argument("--backend", default=None,
                   help="comma list of kernel backends (cpu, triton, cuda); default: every "
                   "backend usable on the device (on the CPU: cpu, and triton under "
                   "TRITON_INTERPRET=1)")
    s.add_argument("--json", default=None, metavar="PATH", help="also write the verdict here")
    s.add_argument("--no-save", action="store_true",
                   help="do not store the verdict where backend='auto' reads it "
                   "($BINSLT_CACHE_DIR/check.json or ~/.cache/binslt/check.json)")
    s.set_defaults(func=cmd_check)
