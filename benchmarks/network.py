#!/usr/bin/env python
"""Whole networks: binslt's BinW-SLT search step, frozen-ticket eval and training memory against
SpikingJelly, for the paper's Conv-4, VGG-11 and ResNet-19 at CIFAR shape (32x32x3, 10 classes),
and SpikingJelly's own zoo models with the paper's neuron, converted by ``binslt.convert``
(``build_user_model``, as ``binslt search --model`` does) against the same model unconverted
(sj-dense, sj-dense-compiled, sj-memopt; no sj-biprop): ``sj-resnet18`` (``spiking_resnet18``,
memopt over its residual blocks) and ``sj-vgg11-bn`` (``spiking_vgg11_bn`` with the classifier
shrunk to 512 -> 64 -> 64 -> 10, ``zoo_models.shrunk_vgg``; memopt over its convs and linears).

Modes (each candidate on the same random CIFAR-shaped batch, in one run):

- ``search``: one full search step: forward, cross-entropy loss, backward, SGD step (lr 0.1,
  momentum 0.9). binslt: ``binslt.models.build(arch, 'binwslt')`` in search mode, the SGD steps
  the scores (the mask of the next step is selected from the new scores in that step's
  forward). Anchors: ``sj-dense`` (the same layout from SpikingJelly layers, dense weights
  trained normally, ``sj_models.build_sj(masked=False)``) and ``sj-biprop`` (SpikingJelly plus
  the biprop mask in plain PyTorch, the scores trained, ``masked=True``; it starts from binslt's
  weights and scores). Before timing, one step of every candidate is checked to change its
  trainable parameters (``check``: the fraction of entries changed), so a broken step is never
  timed.
- ``eval``: a frozen ticket: the binslt network is exported with ``binslt.io.tickets.export_ticket``
  and loaded back with ``load_ticket`` (packed weights only), then timed under
  ``torch.no_grad()`` in eval mode (``check``: max |logit difference| against the network it
  was exported from). Anchors: ``sj-dense`` in eval mode, and ``sj-dense-compiled``, the same
  module under ``torch.compile`` (``--compile-backend``; compiled and warmed up before timing,
  so compile time is excluded; a failure to compile is recorded in ``error``). BatchNorm running
  statistics of every network are first set by two training-mode forwards of the batch.
- ``memory``: peak training memory of ``--memory-steps`` search/training steps, each candidate in
  a fresh process (``--_memory-child``). CPU: resident-set high-water mark above the process's
  footprint just before the first step (``common.PeakMemory``); CUDA:
  ``torch.cuda.max_memory_allocated`` above the allocation before it. Anchors: ``sj-dense`` and
  ``sj-memopt``, SpikingJelly dense after ``spikingjelly.activation_based.memopt.optimize_memory``
  over its per-layer modules (level 1 on the CPU, checkpointing plus spike compression; levels
  above 1 search with CUDA peak-memory trials, so CUDA uses level 4 unless ``--memopt-level``).
  Every child runs one untimed no-grad forward first (memopt's own probe is a forward too).
  ``--memory-repeats K``: K fresh processes per candidate in interleaved rounds, the row holding
  the median (its ``detail`` every round's figure).

``ratio`` is the candidate's value over the reference binslt candidate's (the first of
``--backends``): for SpikingJelly rows, SpikingJelly time / binslt time, or SpikingJelly bytes /
binslt bytes; > 1 means binslt is faster / smaller.

Examples::

    python benchmarks/network.py --quick               # Conv-4, batch 2: well under a minute
    python benchmarks/network.py                       # CPU: conv4, vgg11, resnet19 at N=32
    python benchmarks/network.py --arch vgg11 --batch 16 --modes search,eval
    python benchmarks/network.py --device cuda         # N=64

Writes ``<out>/network_<device-slug>[_<tag>].csv`` (machine record first; each arch x mode's
rows appended as measured, so a stopped run keeps them, then rewritten whole with ``ratio`` and
``complete: yes``) and a ``.png`` of the ratios per network and mode; prints a table; one progress line per measurement on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CsvAppender,
    PeakMemory,
    add_run_options,
    command_line,
    import_spikingjelly,
    kernel_backends,
    machine_info,
    print_table,
    result_stem,
    set_mmap_threshold,
    setup_run,
    sj_lif_implementation,
    sync,
    time_many_ms,
)
from network_steps import (  # noqa: E402
    LR,
    MOMENTUM,
    SJ_ARCHS,
    build_anchor,
    build_binslt,
    calibrate_bn,
    checked_step,
    input_rates,
    make_batch,
    make_optimizer,
    make_train_step,
    rate_summary,
    sj_arch_part,
)

from binslt.ops.schemas import DEFAULT_SURROGATE_ALPHA, SURROGATES  # noqa: E402

ARCHS = ("conv4", "vgg11", "resnet19", *SJ_ARCHS)
MODES = ("search", "eval", "memory")
ANCHORS = {"search": ("sj-dense", "sj-biprop"),
           "eval": ("sj-dense", "sj-dense-compiled"),
           "memory": ("sj-dense", "sj-memopt")}


def anchors(arch: str, mode: str) -> tuple[str, ...]:
    """The SpikingJelly candidates of ``arch`` in ``mode``."""
    return tuple(a for a in ANCHORS[mode] if not (arch in SJ_ARCHS and a == "sj-biprop"))
COLUMNS = ["arch", "mode", "candidate", "backend", "N", "T", "ms", "bytes", "ref", "ratio",
           "peak_kind", "check", "detail", "error"]
CHILD_TAG = "NETBENCH_MEMORY "


def log(msg: str) -> None:
    print(f"[network {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)




# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def _row(arch, mode, candidate, backend, args, **kw) -> dict:
    return {"arch": arch, "mode": mode, "candidate": candidate, "backend": backend,
            "N": args.batch, "T": args.timesteps, **kw}


def run_search(arch: str, args, backends, device, x, y) -> list[dict]:
    models_ = {}
    first = None
    for be in backends:
        m = build_binslt(arch, args, be, device)
        if first is None:
            first = m
        else:
            m.load_state_dict(first.state_dict())
        models_[f"binslt-{be}"] = (be, m)
    models_["sj-dense"] = ("", build_anchor(arch, args, False, device, like=first))
    if "sj-biprop" in anchors(arch, "search"):
        models_["sj-biprop"] = ("", build_anchor(arch, args, True, device, like=first))
    steps, checks = {}, {}
    for name, (_, m) in models_.items():
        m.train()
        steps[name] = make_train_step(m, make_optimizer(m), x, y)
        checks[name] = checked_step(name, m, steps[name])
    log(f"{arch} search: timing {list(steps)} ({args.warmup} warm-up, {args.repeats} repeats)")
    ms = time_many_ms(steps, device, warmup=args.warmup, repeats=args.repeats)
    rows = [_row(arch, "search", name, be, args, ms=ms[name], check=checks[name],
                 detail=f"SGD lr={LR} momentum={MOMENTUM}")
            for name, (be, _) in models_.items()]
    log(f"{arch} search: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))
    return rows


def _compile_failure(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"torch.compile failed: {type(exc).__name__}: {first[:300]}"


def run_eval(arch: str, args, backends, device, x, y) -> list[dict]:
    import torch

    from binslt.io.tickets import export_ticket, load_ticket

    source = build_binslt(arch, args, backends[0], device)
    calibrate_bn(source, x)
    rates = rate_summary(input_rates(source, x))
    log(f"{arch} eval: {rates}")
    fns, checks, details, rows = {}, {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{arch}.safetensors"
        info = export_ticket(source, path)
        with torch.no_grad():
            want = source(x)
        for be in backends:
            ticket = load_ticket(path, device=device, backend=be)
            ticket.eval()
            with torch.no_grad():
                checks[f"binslt-{be}"] = float((ticket(x) - want).abs().max())
            fns[f"binslt-{be}"] = _no_grad_call(ticket, x)
            details[f"binslt-{be}"] = f"ticket {info['ticket_bytes']} bytes; {rates}"
    sj = build_anchor(arch, args, False, device, like=source)
    calibrate_bn(sj, x)
    fns["sj-dense"] = _no_grad_call(sj, x)
    compiled_error = ""
    details["sj-dense-compiled"] = f"torch.compile backend={args.compile_backend}"
    try:
        compiled = torch.compile(sj, backend=args.compile_backend)
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(3):  # compile, then the recompile SpikingJelly's reset cache causes
                compiled(x)
        sync(device)
        details["sj-dense-compiled"] += f"; compile+3 calls {time.perf_counter() - t0:.1f} s"
        fns["sj-dense-compiled"] = _no_grad_call(compiled, x)
    except Exception as exc:  # recorded in the CSV instead of a time
        compiled_error = _compile_failure(exc)
        log(f"{arch} eval: {compiled_error}")
    log(f"{arch} eval: timing {list(fns)} ({args.warmup} warm-up, {args.repeats} repeats)")
    ms = time_many_ms(fns, device, warmup=args.warmup, repeats=args.repeats)
    for be in backends:
        name = f"binslt-{be}"
        rows.append(_row(arch, "eval", name, be, args, ms=ms[name], check=checks[name],
                         detail=details[name]))
    rows.append(_row(arch, "eval", "sj-dense", "", args, ms=ms["sj-dense"]))
    rows.append(_row(arch, "eval", "sj-dense-compiled", "", args,
                     ms=ms.get("sj-dense-compiled", ""), detail=details["sj-dense-compiled"],
                     error=compiled_error))
    log(f"{arch} eval: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))
    return rows


def _no_grad_call(model, x):
    import torch

    def fn():
        with torch.no_grad():
            return model(x)

    return fn


def run_memory(arch: str, args, backends, device) -> list[dict]:
    """Each candidate in its own fresh process; ``--memory-jobs`` of them at a time, in
    ``--memory-repeats`` interleaved rounds (each candidate once per round). A row holds the
    median of its rounds; its ``detail`` lists every round's figure."""
    # binslt-<be>-recompute: the same under ops.keep_counts(False) (counts recomputed in the
    # backward instead of saved).
    cands = ([(f"binslt-{be}", be) for be in backends]
             + [(f"binslt-{be}-recompute", be) for be in backends if be != "torch"]
             + [(a, "") for a in anchors(arch, "memory")])
    rounds: dict[str, list[dict]] = {name: [] for name, _ in cands}
    for r in range(args.memory_repeats):
        for i in range(0, len(cands), args.memory_jobs):
            batch = cands[i:i + args.memory_jobs]
            procs = [(name, _spawn_memory_child({
                "arch": arch, "candidate": name, "backend": be, "batch": args.batch,
                "timesteps": args.timesteps, "prune_rate": args.prune_rate, "seed": args.seed,
                "device": args.device, "threads": args.threads, "steps": args.memory_steps,
                "memopt_level": args.memopt_level, "sj_lif": args.sj_lif,
                "surrogate": args.surrogate})) for name, be in batch]
            for name, proc in procs:
                res = _memory_child_result(proc)
                rounds[name].append(res)
                got = f"{res['bytes'] / 2**20:.1f} MiB" if "bytes" in res else res.get("error")
                tag = f" (round {r + 1}/{args.memory_repeats})" if args.memory_repeats > 1 else ""
                log(f"{arch} memory: {name} {got}{tag}")
    rows = []
    for name, be in cands:
        res = _median_memory(rounds[name])
        rows.append(_row(arch, "memory", name, be, args, bytes=res.get("bytes", ""),
                         peak_kind=res.get("peak_kind", ""), detail=res.get("detail", ""),
                         error=res.get("error", "")))
    return rows


def _median_memory(results: list[dict]) -> dict:
    """One candidate's memory rounds -> one result: the median bytes (the lower middle of an
    even count, a figure that was measured) and every round's MiB in ``detail``; the first
    error where any round failed."""
    failed = [r for r in results if "bytes" not in r]
    if failed:
        return failed[0]
    if len(results) == 1:
        return results[0]
    ranked = sorted(results, key=lambda r: r["bytes"])
    med = dict(ranked[(len(ranked) - 1) // 2])
    each = ", ".join(f"{r['bytes'] / 2**20:.1f}" for r in results)
    med["detail"] = "; ".join(d for d in (f"median of {len(results)} rounds: {each} MiB",
                                          med.get("detail", "")) if d)
    return med


def _spawn_memory_child(cfg: dict) -> subprocess.Popen:
    env = dict(os.environ)
    env["SJ_LIF_CUDA_IMPLEMENTATION"] = cfg["sj_lif"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", json.dumps(cfg)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _memory_child_result(proc: subprocess.Popen, timeout: float = 3600) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"memory child timed out after {timeout:.0f} s"}
    for line in stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"memory child exited {proc.returncode}: {tail[:300]}"}


def memory_child(cfg: dict) -> int:
    """One configuration's peak training memory; prints one ``NETBENCH_MEMORY {json}`` line."""
    import torch

    args = argparse.Namespace(seed=cfg["seed"], batch=cfg["batch"], timesteps=cfg["timesteps"],
                              prune_rate=cfg["prune_rate"], surrogate=cfg["surrogate"])
    device = torch.device(cfg["device"])
    if device.type == "cpu":
        set_mmap_threshold(32 << 20)
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
    out: dict = {}
    try:
        x, y = make_batch(args, device)
        name, arch = cfg["candidate"], cfg["arch"]
        if name.startswith("binslt-"):
            model = build_binslt(arch, args, cfg["backend"], device)
        else:
            model = build_anchor(arch, args, False, device)
        model.train()
        detail = ""
        if name == "sj-memopt":
            import torch.nn.functional as F
            from sj_models import LAYER_TYPES
            from spikingjelly.activation_based.memopt import optimize_memory

            level = cfg["memopt_level"]
            types = sj_arch_part(arch, 2)() if arch in SJ_ARCHS else LAYER_TYPES
            optimize_memory(model, types,
                            example_forward=lambda m: F.cross_entropy(m(x), y), level=level)
            wrapped = [m for m in model.modules() if hasattr(m, "_checkpoint_wrapped_module")]
            packed = sum(getattr(getattr(m, "checkpoint_fn", None), "keywords", {})
                         .get("compressor") is not None for m in wrapped)
            detail = (f"optimize_memory level={level}: {len(wrapped)} checkpointed modules, "
                      f"{packed} with a spike compressor")
        step = make_train_step(model, make_optimizer(model), x, y)
        with torch.no_grad():
            model(x)
        gc.collect()
        from binslt import ops

        with ops.keep_counts(not name.endswith("-recompute")), PeakMemory(device) as peak:
            for _ in range(cfg["steps"]):
                loss = step()
            sync(device)
        out = {"bytes": int(peak.nbytes), "peak_kind": peak.kind,
               "detail": "; ".join(d for d in (detail, f"{cfg['steps']} steps, final loss "
                                                        f"{float(loss):.4g}") if d)}
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}
    print(CHILD_TAG + json.dumps(out), flush=True)
    return 0 if "bytes" in out else 1


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def add_ratios(rows: list[dict], ref: str) -> None:
    """ratio = value / the reference binslt candidate's value, per (arch, mode)."""
    for r in rows:
        key = "bytes" if r["mode"] == "memory" else "ms"
        base = [q[key] for q in rows if q["arch"] == r["arch"] and q["mode"] == r["mode"]
                and q["candidate"] == ref]
        r["ref"] = ref
        v = r.get(key, "")
        if base and isinstance(base[0], (int, float)) and base[0] > 0 and \
                isinstance(v, (int, float)) and v != "":
            r["ratio"] = v / base[0]
        else:
            r["ratio"] = ""


def plot(rows: list[dict], path: Path, ref: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["arch"], r["mode"]) for r in rows))
    series = list(dict.fromkeys(r["candidate"] for r in rows if r["candidate"] != ref))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.5))
    for i, cand in enumerate(series):
        ys = []
        for arch, mode in groups:
            hit = [r["ratio"] for r in rows if (r["arch"], r["mode"]) == (arch, mode)
                   and r["candidate"] == cand and r["ratio"] != ""]
            ys.append(hit[0] if hit else math.nan)
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, ys, width, label=cand)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{a}\n{m}" for a, m in groups], fontsize=8)
    ax.set_ylabel(f"candidate / {ref} (time or bytes; > 1: binslt better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def default_backends(device_type: str, status: dict | None = None) -> list[str]:
    """The device's kernel backends (the first is the reference of the ratios)."""
    import binslt

    st = status if status is not None else binslt.backends()
    return kernel_backends(device_type, st, ("cuda", "triton")) or ["torch"]


def _csv_list(text: str, allowed, what: str, p) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        p.error(f"{what} is empty")
    bad = [s for s in items if s not in allowed]
    if bad:
        p.error(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=None,
                   help=f"comma list of {', '.join(ARCHS)} (default all; conv4 with --quick)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    add_run_options(p, backends_help="comma list of binslt backends (torch,cpu,triton,cuda); "
                    "default the device's kernel backends. The first is the reference of the "
                    "ratios")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size N (default 32 on the CPU, 64 on CUDA, 2 with --quick)")
    p.add_argument("--timesteps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per candidate (median; default 3, 2 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--memory-steps", type=int, default=2,
                   help="training steps inside the memory measurement (default 2: the second "
                        "has the optimiser's momentum buffers)")
    p.add_argument("--memory-repeats", type=int, default=1,
                   help="fresh processes per memory candidate, in interleaved rounds (median; "
                        "default 1). A process's peak RSS moves ~10 %% between runs")
    p.add_argument("--memory-jobs", type=int, default=None,
                   help="memory children run at a time (default 1; all of an arch's with "
                        "--quick). Each measures its own process, so concurrency changes no "
                        "figure, only the wall time")
    p.add_argument("--memopt-level", type=int, default=None, choices=(1, 2, 3, 4),
                   help="SpikingJelly memopt level (default 1 on the CPU, 4 on CUDA)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the sj-dense-compiled eval anchor (default "
                        "inductor; aot_eager with --quick, whose cold inductor compile takes "
                        "a minute or more on a small CPU)")
    p.add_argument("--prune-rate", type=float, default=0.5)
    p.add_argument("--surrogate", default="atan", choices=tuple(SURROGATES),
                   help="the spike's surrogate gradient of binslt and of the SpikingJelly "
                        "anchors alike, at SpikingJelly's default alpha (default atan; the "
                        "zoo archs keep their own)")
    p.add_argument("--quick", action="store_true",
                   help="conv4, batch 2, 2 repeats: a smoke run well under a minute")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child is not None:
        return args
    args.arch = _csv_list(args.arch or ("conv4" if args.quick else ",".join(ARCHS)), ARCHS,
                          "--arch", p)
    args.modes = _csv_list(args.modes, MODES, "--modes", p)
    quick = {"batch": 2, "repeats": 2, "memory_jobs": 8} if args.quick else {}
    full = {"batch": 64 if args.device == "cuda" else 32, "repeats": 3, "memory_jobs": 1}
    for k, v in full.items():
        if getattr(args, k) is None:
            setattr(args, k, quick.get(k, v))
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.quick else "inductor"
    if args.memopt_level is None:
        args.memopt_level = 4 if args.device == "cuda" else 1
    if args.device == "cpu" and args.memopt_level > 1:
        p.error("--memopt-level above 1 needs CUDA (SpikingJelly measures CUDA peak memory)")
    for k in ("batch", "timesteps", "repeats", "memory_steps", "memory_repeats", "memory_jobs"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not 0.0 <= args.prune_rate < 1.0:
        p.error("--prune-rate must be in [0, 1)")
    zoo = [a for a in args.arch if a in SJ_ARCHS]
    if args.surrogate != "atan" and zoo:
        p.error(f"--surrogate {args.surrogate}: the zoo archs ({', '.join(zoo)}) keep their "
                "own neurons; give --arch from conv4, vgg11, resnet19")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["SJ_LIF_CUDA_IMPLEMENTATION"] = args.sj_lif
    if args.memory_child is not None:
        return memory_child(json.loads(args.memory_child))
    try:
        device, st, backends = setup_run(args, default_backends)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ref = f"binslt-{backends[0]}"
    import_spikingjelly(args.sj_lif)
    sj_impl = sj_lif_implementation(device)
    x, y = make_batch(args, device)

    meta = machine_info(device)
    meta.update({
        "benchmark": "network (whole networks at CIFAR shape 3x32x32, 10 classes: binslt "
                     "binwslt search step, frozen-ticket eval, peak training memory, against "
                     "SpikingJelly)",
        "sj_lif_impl": sj_impl,
        "binslt_backends": "; ".join(f"{b}: {st[b]['reason']}" for b in backends),
        "ratio": f"candidate value / {ref} value (SpikingJelly / binslt; > 1: binslt faster or "
                 "smaller)",
        "neuron": "LIF decay 0.99 (tau 100) decay_input=False v_threshold=1 v_reset=0 "
                  f"{args.surrogate}({DEFAULT_SURROGATE_ALPHA[args.surrogate]:g}) "
                  "detach_reset=True; non-affine BN",
        "optimizer": f"SGD lr={LR} momentum={MOMENTUM} (binslt, sj-biprop: the scores; "
                     "sj-dense: the weights)",
        "prune_rate": f"{args.prune_rate:g}",
        "timing": f"{args.warmup} warm-up + {args.repeats} timed calls per candidate, "
                  "interleaved on the CPU (median)",
        "memory": f"{args.memory_steps} steps per fresh process ({args.memory_jobs} at a time), "
                  f"median of {args.memory_repeats} interleaved rounds; memopt level "
                  f"{args.memopt_level}",
        "compile_backend": args.compile_backend,
        "command": command_line(argv),
    })
    stem = result_stem("network", device, args.tag)
    path = Path(args.out) / f"{stem}.csv"
    # Each arch x mode's rows go to the CSV as soon as they are measured (ratio filled at the
    # end), so a run stopped early keeps them.
    out = CsvAppender(path, COLUMNS, meta)
    rows: list[dict] = []
    t_start = time.perf_counter()
    for arch in args.arch:
        for mode in args.modes:
            t0 = time.perf_counter()
            if mode == "search":
                new = run_search(arch, args, backends, device, x, y)
            elif mode == "eval":
                new = run_eval(arch, args, backends, device, x, y)
            else:
                new = run_memory(arch, args, backends, device)
            out.add(new)
            rows += new
            gc.collect()
            log(f"{arch} {mode}: done in {time.perf_counter() - t0:.1f} s")
    add_ratios(rows, ref)
    meta["wall_s"] = f"{time.perf_counter() - t_start:.1f}"
    meta["load_avg_1m_end"] = f"{os.getloadavg()[0]:.2f}"
    out.finish(rows, meta)
    if not args.no_plot:
        plot(rows, path.with_suffix(".png"), ref,
             f"binslt vs SpikingJelly, whole networks: {meta['device']}, N={args.batch}, "
             f"T={args.timesteps}")
    table = [{**r, "MiB": r["bytes"] / 2**20 if r.get("bytes", "") != "" else ""}
             for r in rows]
    print_table(table, ["arch", "mode", "candidate", "N", "ms", "MiB", "ratio", "check",
                        "error"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
