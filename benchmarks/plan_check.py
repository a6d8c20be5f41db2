#!/usr/bin/env python
"""Is "auto" within 10 % of the best forced CPU algorithm on every shape of the layer benchmark?

For each shape of ``conv_lif.py`` (its shape sets: anchor, the VGG-11 convs, the rate and
time-step sweeps) and each mode (``eval_fwd``: ``torch.no_grad()`` forward; ``train_fwdbwd``:
forward + backward), one ``binslt.BinSpikeConv2d`` on the ``cpu`` backend is timed, interleaved
call by call (``common.time_many_ms``: medians), under

* ``auto_table``: ``"auto"`` with measuring off (``binslt.ops.plan.measure(False)``): the
  rules' table;
* ``auto_measured``: ``"auto"`` with measuring on (forward and backward): the warm-up calls time
  the candidates, the timed calls take the cached winners;
* ``<field>=<name>``: each algorithm of each field forced in turn (``binslt.ops.cpu_algorithms``;
  the other fields by the table): ``conv`` in both modes, ``grad_x`` and ``grad_w`` in
  ``train_fwdbwd``. A forced name that cannot run the layer (ValueError) is left out, and so
  are the ``int8`` gradients on a CPU without AMX-INT8 (ATen's int8 products without it take
  seconds per call, and auto never considers them there; ``--all-forced`` keeps them).

The verdict per (shape, mode) compares each auto variant with the fastest forced one: within
10 % (``--tolerance``) passes; where auto's plan is the fastest forced variant's plan (the same
algorithm in every field: the same code), a larger gap is the machine's timing noise, and the
verdict says ``same plan`` (counted apart in the summary). The measured winners start from an
empty cache (a temporary ``BINSLT_CACHE_DIR``) unless ``--keep-cache``.

Examples::

    python benchmarks/plan_check.py --quick          # anchor only, 3 repeats: a smoke run
    python benchmarks/plan_check.py                  # every shape, 10 repeats (quiet machine)

Writes ``<out>/plan_check_<device-slug>[_<tag>].csv`` (the machine record in its header) and
prints the table and the verdict; exits 1 where a variant missed on some shape.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CsvAppender,
    command_line,
    machine_info,
    print_table,
    result_stem,
    time_many_ms,
)

MODES = ("eval_fwd", "train_fwdbwd")
AUTO = ("auto_table", "auto_measured")
COLUMNS = ["shape", "T", "N", "C_in", "C_out", "H", "W", "k", "rate", "mode", "variant", "ms",
           "best_forced", "best_forced_ms", "ratio", "verdict", "plan"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="anchor,vgg11,rates,timesteps",
                   help="comma list of conv_lif.py's shape sets (default: every CPU set)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (median); default "
                   "10, 3 with --quick")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls of each variant "
                   "first (default 2; at least 1: the measured variant times its candidates "
                   "there)")
    p.add_argument("--quick", action="store_true", help="the anchor shape only, 3 repeats, 1 "
                   "warm-up")
    p.add_argument("--vgg-batch", type=int, default=None, help="N of the VGG-11 layers "
                   "(default: conv_lif.py's, 8)")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="how much slower than the best forced algorithm auto may be (0.10)")
    p.add_argument("--prune-rate", type=float, default=0.5)
    p.add_argument("--tau", type=float, default=100.0)
    p.add_argument("--keep-cache", action="store_true",
                   help="measure into the usual BINSLT_CACHE_DIR (winners already there are "
                        "taken as they are) instead of an empty temporary one")
    p.add_argument("--all-forced", action="store_true",
                   help="also time the int8 gradients on a CPU without AMX-INT8")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the CSV's name")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if not args.modes or bad:
        p.error(f"--modes must name some of {MODES}, got {args.modes}")
    if args.quick:
        args.sets = None  # --quick times the anchor shape only (conv_lif.timing_defaults in main)
    if (args.repeats is not None and args.repeats < 1) or (args.warmup is not None
                                                           and args.warmup < 1):
        p.error("--repeats and --warmup must be >= 1")
    if not 0.0 <= args.tolerance < 10.0:
        p.error("--tolerance must be in [0, 10)")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def _shape_key(s) -> str:
    """What a plan's key says about the layer's shapes (binslt's conv_shapes)."""
    return f"x={s.T}x{s.N}x{s.C_in}x{s.H}x{s.W} w={s.C_out}x{s.C_in}x{s.k}x{s.k} "


def variants(shape, mode: str, ops, all_forced: bool) -> dict[str, dict]:
    """name -> cpu_algorithms(**kw) of each forced variant that can run the layer."""
    from binslt.ops import cpu_algos

    features = ops._ext.cpu_info()["features"]
    # the split forms run on a matrix engine; elsewhere they are slower float forms
    engine = {"int8": features.get("onednn_int8", False),
              "bf16x3": features.get("bf16_matrix", False)}
    fields = ["conv"] + (["grad_x", "grad_w"] if mode == "train_fwdbwd" else [])
    x = (shape.T, shape.N, shape.C_in, shape.H, shape.W)
    w = (shape.C_out, shape.C_in, shape.k, shape.k)
    out = {}
    for field in fields:
        for name in cpu_algos.CHOICES[field][1:]:
            if not engine.get(name, True) and not all_forced:
                continue
            try:
                with ops.cpu_algorithms(**{field: name}):
                    if field == "conv":
                        ops.plan.forward_plan(x, w, 1, shape.pad, rate=shape.rate,
                                              infer=mode == "eval_fwd")
                    else:
                        ops.plan.backward_plan(x, w, 1, shape.pad, rate=shape.rate,
                                               weight_density=0.5)
            except (ValueError, RuntimeError):  # cannot run this layer / this CPU
                continue
            out[f"{field}={name}"] = {field: name}
    return out


def table_plan(shape, mode: str, ops) -> str:
    x = (shape.T, shape.N, shape.C_in, shape.H, shape.W)
    w = (shape.C_out, shape.C_in, shape.k, shape.k)
    fwd = ops.plan.forward_plan(x, w, 1, shape.pad, rate=shape.rate, infer=mode == "eval_fwd")
    text = f"forward={fwd['forward']}"
    if mode == "train_fwdbwd":
        bwd = ops.plan.backward_plan(x, w, 1, shape.pad, rate=shape.rate, weight_density=0.5)
        text += f" grad_x={bwd['grad_x']} grad_w={bwd['grad_w']}"
    return text


def plan_fields(text: str) -> dict[str, str]:
    """{'forward', 'grad_x', 'grad_w'} of a plan text: table_plan's "forward=... grad_x=..." or
    measured_plan's "<op>[.part]=<winner>" (over the table's plan for the fields not
    measured)."""
    out = {}
    for tok in text.split():
        key, _, name = tok.partition("=")
        if key in ("forward", "bconv_lif", "bconv_lif_infer"):
            out["forward"] = name
        elif key.endswith("grad_x") or key.endswith("grad_w"):
            out[key[-6:]] = name
    return out


def measured_plan(shape, mode: str, ops) -> str:
    """The winners measured for this layer's ops: "<op>[ part]=<winner>" each."""
    ops_of_mode = ("bconv_lif_infer",) if mode == "eval_fwd" else ("bconv_lif", "bconv_lif_bwd")
    found = []
    for key, e in ops.plan.measured().items():
        op, rest = key.split(" ", 1)
        part = rest.split(" ", 1)[0] if rest.startswith("grad_") else ""
        if op in ops_of_mode and _shape_key(shape) in key:
            found.append(f"{op}{'.' + part if part else ''}={e['plan']}")
    return " ".join(sorted(set(found)))


def run_shape(shape, mode: str, args, ops, conv_lif) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(0)
    build_args = argparse.Namespace(prune_rate=args.prune_rate, bn_affine=False, tau=args.tau,
                                    decay_input=False)
    module = conv_lif.build_binslt(shape, build_args, torch.device("cpu"), "cpu")
    x = conv_lif.make_input(shape, torch.device("cpu"), gen)
    grad_out = torch.randn(shape.T, shape.N, shape.C_out, *shape.out_hw, generator=gen)
    step, _ = conv_lif.make_step(module, lambda m: None, x, grad_out, mode,
                                 input_grad=shape.input == "spike")

    def under(measure, **forced):
        def call():
            with contextlib.ExitStack() as stack:
                stack.enter_context(ops.plan.measure(measure))
                if forced:
                    stack.enter_context(ops.cpu_algorithms(**forced))
                return step()
        return call

    fns = {"auto_table": under(False), "auto_measured": under(True)}
    kinds = variants(shape, mode, ops, args.all_forced)
    for name, kw in kinds.items():
        fns[name] = under(False, **kw)
    times = time_many_ms(fns, torch.device("cpu"), warmup=args.warmup, repeats=args.repeats)
    forced = {k: v for k, v in times.items() if k not in AUTO}
    best = min(forced, key=forced.get)
    base = {"shape": shape.name, "T": shape.T, "N": shape.N, "C_in": shape.C_in,
            "C_out": shape.C_out, "H": shape.H, "W": shape.W, "k": shape.k, "rate": shape.rate,
            "mode": mode, "best_forced": best, "best_forced_ms": forced[best]}
    with ops.plan.measure(False), ops.cpu_algorithms(**kinds[best]):
        best_plan = plan_fields(table_plan(shape, mode, ops))
    table = table_plan(shape, mode, ops)
    rows = []
    for name, ms in times.items():
        ratio = ms / forced[best]
        plan = (table if name == "auto_table"
                else measured_plan(shape, mode, ops) if name == "auto_measured" else "")
        verdict = ""
        if name in AUTO:
            fields = {**plan_fields(table), **plan_fields(plan)}
            verdict = ("pass" if ratio <= 1.0 + args.tolerance
                       else "same plan" if fields == best_plan else "MISS")
        rows.append({**base, "variant": name, "ms": ms, "ratio": ratio, "plan": plan,
                     "verdict": verdict})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.keep_cache:  # before binslt loads the measured plans
        os.environ["BINSLT_CACHE_DIR"] = tempfile.mkdtemp(prefix="binslt-plan-check-")
    import conv_lif  # noqa: I001  (after BINSLT_CACHE_DIR is set)
    import torch

    conv_lif.timing_defaults(args)

    from binslt import ops

    if ops._ext.module("cpu") is None:
        print("plan_check: the C++ CPU extension (binslt._C) is not built", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    sets = conv_lif.shape_sets("cpu", args.vgg_batch)
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [n for n in names if n not in sets or n == "gpu_ref"]
    if not names or unknown:
        print(f"plan_check: unknown shape set(s) {unknown or names}; choose from anchor, vgg11, "
              "rates, timesteps", file=sys.stderr)
        return 2
    shapes = []
    for n in names:
        shapes += [s for s in sets[n] if s.name not in {t.name for t in shapes}]
    meta = {**machine_info(device), "benchmark": "plan_check", "command": command_line(argv),
            "repeats": str(args.repeats), "warmup": str(args.warmup),
            "tolerance": f"{args.tolerance:g}", "prune_rate": f"{args.prune_rate:g}",
            "plan_cache": "kept" if args.keep_cache else "empty at start"}
    out = Path(args.out) / f"{result_stem('plan_check', device, args.tag)}.csv"
    csv = CsvAppender(out, COLUMNS, meta)
    rows = []
    for shape in shapes:
        for mode in args.modes:
            print(f"# {shape.name} {mode}", flush=True)
            got = run_shape(shape, mode, args, ops, conv_lif)
            csv.add(got)
            rows += got
    csv.finish(rows, meta)
    print_table(rows, ["shape", "mode", "variant", "ms", "ratio", "verdict", "plan"])
    failed = 0
    for name in AUTO:
        mine = [r for r in rows if r["variant"] == name]
        miss = [f"{r['shape']}/{r['mode']} ({r['ratio']:.2f}x {r['best_forced']})"
                for r in mine if r["verdict"] == "MISS"]
        same = [f"{r['shape']}/{r['mode']} ({r['ratio']:.2f}x)"
                for r in mine if r["verdict"] == "same plan"]
        failed += bool(miss)
        noise = (f"; the best forced variant's own plan, slower by timing noise, on {len(same)}: "
                 + "; ".join(same)) if same else ""
        print(f"{name}: " + (f"within {args.tolerance:.0%} of the best forced algorithm on "
                             f"{len(mine) - len(same)} of {len(mine)} shape/mode pairs{noise}"
                             if not miss else
                             f"MISSED on {len(miss)} of {len(mine)}: " + "; ".join(miss) + noise))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
