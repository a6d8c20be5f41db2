"""``binslt info``: versions, CPU features, backends, device."""

from __future__ import annotations

import argparse
import os

from .. import ops
from ..ops import fallback as fb
from ..ops import library as _ext
from ..training import loop as train


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import binslt

    v = train.versions()
    st = binslt.backends()
    print(f"binslt {v['binslt']}  torch {v['torch']}  triton {v['triton']}  "
          f"CUDA (torch build) {v['cuda']}  python {v['python']}")
    ci = _ext.cpu_info()
    if ci is None:
        kernel = "kernel path unknown (binslt._C is not built)"
    else:
        have = ",".join(k for k, on in ci["features"].items() if on) or "none"
        kernel = (f"kernel path {ci['kernel_isa']} (features: {have}"
                  f"{', openmp' if ci['openmp'] else ''})")
    print(f"CPU: {platform.machine()} {platform.processor() or ''}".rstrip()
          + f", {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
          + kernel)
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"device: cuda ({', '.join(names)})")
    else:
        print("device: cpu (no CUDA device visible)")
    print("backends:")
    for name, s in st.items():
        flag = "usable" if s["usable"] else ("built, not usable" if s["built"] else "not built")
        print(f"  {name:7s} {flag:17s} {s['reason']}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"backend 'auto' on {dev.type}: {ops.resolve_backend('auto', dev)}")
    env = fb.settings()
    print(f"{fb.ENV_BACKEND}={env['forced'] or ''}  {fb.ENV_DISABLE}={env['raw']}")
    key = fb.verdict_key(dev)
    mine = [v for v in fb.read_verdicts() if v.get("key") == key]
    if mine:
        bad = [b for b, r in mine[-1].get("backends", {}).items() if not r.get("ok")]
        said = f"failing: {', '.join(bad)}" if bad else "all ok"
        print(f"binslt check verdict for this machine and build: {said} ({fb.verdict_path()})")
    else:
        print(f"binslt check verdict: none for this machine and build (run `binslt check`; it is "
              f"stored in {fb.verdict_path()})")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("info", help="versions, CPU features, backends, device")
    s.set_defaults(func=cmd_info)
