#!/usr/bin/env python
"""Time ``binslt.BinSpikeConv2d`` against dense SpikingJelly (Conv2d + BatchNorm2d + LIFNode).

For each shape and each binslt backend this measures, in one run on one machine:

- ``eval_fwd``: eval mode, ``torch.no_grad()``, one forward over the whole [T, N, C, H, W] input;
- ``train_fwdbwd``: train mode (batch-statistics BN), forward + backward of a fixed random
  weighting of the output spikes. Spike inputs require grad, as in a middle layer of a network;
  the first (real-input) layer does not;
- ``eval_frozen``: as ``eval_fwd``, with the binslt layer switched to ``mode='frozen'`` (a
  searched ticket: packed weight bits, no mask to build); SpikingJelly's time is its eval_fwd.

and the same for SpikingJelly dense, step mode 'm', with identical neuron settings (defaults:
the paper's tau=100 i.e. decay 0.99, decay_input=False, v_threshold=1, hard reset to 0, ATan(2),
detach_reset=True) and the same BatchNorm (non-affine unless ``--bn-affine``).

On the CPU the implementations are timed interleaved, call by call, so that background load on a
shared machine hits them alike (``common.time_many_ms``).

Memory: bytes autograd saves for backward (distinct storages, train mode) and the peak memory of
the call (CUDA: max allocated beyond what was allocated before; CPU: resident high-water mark
beyond the RSS before, see ``common.PeakMemory``).

Each binslt backend is also checked against the pure-torch reference on the same weights:
``spike_mismatch`` is the fraction of eval-mode output spikes that differ (ties at the threshold
can flip a few), ``grad_rel_err`` the relative L2 error of the score gradient in train mode.

Examples::

    python benchmarks/conv_lif.py --quick                 # anchor shape, < 1 min on 2 cores
    python benchmarks/conv_lif.py                          # CPU: anchor, VGG-11 convs, sweeps
    python benchmarks/conv_lif.py --device cuda            # GPU: reference layer first

Writes ``<out>/conv_lif_<device-slug>[_<tag>].csv`` and a ``.png`` plot of the speedups.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    PeakMemory,
    SavedTensorBytes,
    add_run_options,
    import_spikingjelly,
    print_table,
    result_stem,
    run_record,
    saved_figure,
    setup_run,
    sj_baseline,
    sync,
    time_many_ms,
    torch_and_kernels,
    write_csv,
)

MODES = ("eval_fwd", "train_fwdbwd", "eval_frozen")

COLUMNS = [
    "shape", "T", "N", "C_in", "C_out", "H", "W", "k", "pad", "rate", "input", "gmac",
    "backend", "mode", "ms", "sj_ms", "speedup",
    "saved_bytes", "sj_saved_bytes", "saved_ratio",
    "peak_bytes", "sj_peak_bytes", "peak_kind",
    "out_rate", "sj_out_rate", "spike_mismatch", "grad_rel_err",
]


@dataclasses.dataclass(frozen=True)
class Shape:
    """One conv layer: input [T, N, C_in, H, W], k x k kernel, stride 1, padding ``pad``."""

    name: str
    T: int
    N: int
    C_in: int
    C_out: int
    H: int
    W: int
    k: int = 3
    pad: int = 1
    rate: float = 0.15
    input: str = "spike"  # 'spike' (Bernoulli at `rate`) or 'real' (first layer, images)

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.H + 2 * self.pad - self.k + 1, self.W + 2 * self.pad - self.k + 1

    @property
    def gmac(self) -> float:
        ho, wo = self.out_hw
        return self.T * self.N * self.C_out * ho * wo * self.C_in * self.k * self.k / 1e9


ANCHOR = Shape("anchor", 4, 16, 128, 128, 16, 16)
GPU_REF = Shape("gpu_ref", 4, 64, 256, 256, 32, 32)

# VGG-11 (the paper's Conv-8) conv layers at CIFAR size (DESIGN.md section 4).
VGG11 = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8),
         (256, 256, 8), (256, 512, 4), (512, 512, 4)]


# Conv-4's spike-input conv layers on scikit-learn digits (8x8 images; the default `binslt
# search`, batch 64).
CONV4_DIGITS = [(64, 64, 8), (64, 128, 4), (128, 128, 4)]


def shape_sets(device_type: str, vgg_batch: int | None) -> dict[str, list[Shape]]:
    """The named shape groups. On the GPU the sweeps run around the reference layer."""
    base = GPU_REF if device_type == "cuda" else ANCHOR
    nb = vgg_batch or (64 if device_type == "cuda" else 8)
    vgg = [Shape(f"vgg11_{ci}-{co}@{hw}", 4, nb, ci, co, hw, hw,
                 input="real" if ci == 3 else "spike") for ci, co, hw in VGG11]
    rates = [dataclasses.replace(base, name=f"{base.name}_rate{round(r * 100)}", rate=r)
             for r in (0.05, 0.15, 0.30)]
    steps = [dataclasses.replace(base, name=f"{base.name}_T{t}", T=t) for t in (1, 2, 4, 8)]
    conv4 = [Shape(f"conv4_digits_{ci}-{co}@{hw}", 4, 64, ci, co, hw, hw)
             for ci, co, hw in CONV4_DIGITS]
    return {"anchor": [ANCHOR], "gpu_ref": [GPU_REF], "vgg11": vgg, "rates": rates,
            "timesteps": steps, "conv4_digits": conv4}


# ---------------------------------------------------------------------------------------------
# Layers under test
# ---------------------------------------------------------------------------------------------


def neuron_kwargs(args) -> dict:
    return dict(tau=args.tau, decay_input=args.decay_input, v_threshold=1.0, v_reset=0.0,
                detach_reset=True)


def build_sj(shape: Shape, args, device):
    """SpikingJelly dense: layer.Conv2d -> layer.BatchNorm2d -> neuron.LIFNode, step mode 'm'."""
    import torch

    functional, layer, neuron, surrogate = import_spikingjelly()
    net = torch.nn.Sequential(
        layer.Conv2d(shape.C_in, shape.C_out, shape.k, padding=shape.pad, bias=False,
                     step_mode="m"),
        layer.BatchNorm2d(shape.C_out, affine=args.bn_affine, step_mode="m"),
        neuron.LIFNode(surrogate_function=surrogate.ATan(alpha=2.0), step_mode="m",
                       **neuron_kwargs(args)),
    ).to(device)
    return net, functional.reset_net


def build_binslt(shape: Shape, args, device, backend: str):
    import binslt

    return binslt.BinSpikeConv2d(
        shape.C_in, shape.C_out, shape.k, padding=shape.pad, prune_rate=args.prune_rate,
        surrogate="atan", surrogate_alpha=2.0, bn=True, bn_affine=args.bn_affine,
        input=shape.input, backend=backend, **neuron_kwargs(args)).to(device)


def make_input(shape: Shape, device, gen):
    import torch

    if shape.input == "real":  # direct encoding: the same image at every step
        img = torch.randn(shape.N, shape.C_in, shape.H, shape.W, generator=gen)
        x = img.unsqueeze(0).expand(shape.T, -1, -1, -1, -1).contiguous()
    else:
        x = torch.bernoulli(torch.full((shape.T, shape.N, shape.C_in, shape.H, shape.W),
                                       shape.rate), generator=gen)
    return x.to(device)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _clear_grads(module, x) -> None:
    for p in module.parameters():
        p.grad = None
    x.grad = None


def make_step(module, reset, x, grad_out, mode: str, input_grad: bool):
    """(step, xin): one call of ``module`` in ``mode``, and the input tensor it uses."""
    import torch

    if mode in ("eval_fwd", "eval_frozen"):
        module.eval()

        def step():
            reset(module)
            with torch.no_grad():
                return module(x)

        return step, x
    module.train()
    xin = x.detach().requires_grad_(input_grad)

    def step():
        reset(module)
        _clear_grads(module, xin)
        out = module(xin)
        out.backward(grad_out)
        return out

    return step, xin


def measure_memory(module, reset, xin, grad_out, mode: str, step, device) -> dict:
    """Saved-for-backward bytes (train), peak memory and output rate of one call."""
    gc.collect()
    sync(device)
    saved = SavedTensorBytes()
    with PeakMemory(device) as peak:
        if mode == "train_fwdbwd":
            reset(module)
            _clear_grads(module, xin)
            with saved:
                out = module(xin)
            out.backward(grad_out)
        else:
            out = step()
        sync(device)
    rate = float(out.detach().float().mean())
    del out
    return {"saved": saved.nbytes if mode == "train_fwdbwd" else None, "peak": peak.nbytes,
            "peak_kind": peak.kind, "rate": rate}


def check_against_reference(shape: Shape, args, device, backend: str, ref_module, x,
                            grad_out) -> tuple[float, float]:
    """(eval spike mismatch fraction, train score-grad relative error) vs the torch backend.

    On CUDA the reference's convolution runs with TF32 off: binslt's kernels are exact, and a
    TF32 reference would flip spikes near the threshold by itself.
    """
    import torch

    if device.type == "cuda":
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return _check(shape, args, device, backend, ref_module, x, grad_out)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return _check(shape, args, device, backend, ref_module, x, grad_out)


def _check(shape, args, device, backend, ref_module, x, grad_out):
    import torch

    mod = build_binslt(shape, args, device, backend)
    mod.load_state_dict(ref_module.state_dict())
    out = {}
    for name, m in (("ref", ref_module), ("test", mod)):
        m.eval()
        with torch.no_grad():
            ev = m(x)
        m.train()
        m.scores.grad = None
        xin = x.detach().requires_grad_(args._input_grad)
        tr = m(xin)
        tr.backward(grad_out)
        out[name] = (ev, m.scores.grad.detach().clone())
        m.scores.grad = None
    mismatch = float((out["ref"][0] != out["test"][0]).float().mean())
    g_ref, g_test = out["ref"][1].double(), out["test"][1].double()
    rel = float((g_test - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
    return mismatch, rel


def run_shape(shape: Shape, args, device, backends: list[str]) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    x = make_input(shape, device, gen)
    ho, wo = shape.out_hw
    grad_out = torch.randn(shape.T, shape.N, shape.C_out, ho, wo, generator=gen).to(device)
    args._input_grad = shape.input == "spike"

    torch.manual_seed(args.seed)
    sj, sj_reset = (None, None) if args.no_sj else build_sj(shape, args, device)
    torch.manual_seed(args.seed)
    ref_module = build_binslt(shape, args, device, "torch")
    mods = {}
    for be in backends:
        mods[be] = build_binslt(shape, args, device, be)
        mods[be].load_state_dict(ref_module.state_dict())  # the same ticket on every backend

    def noop(_m):
        return None

    # SpikingJelly has no frozen form: its eval_fwd time stands in eval_frozen rows.
    sj_modes = {m for m in args.modes if m != "eval_frozen"}
    if "eval_frozen" in args.modes and "eval_fwd" not in sj_modes:
        sj_modes.add("eval_frozen")
    res: dict[str, dict[str, dict]] = {"sj": {}, **{be: {} for be in backends}}
    for mode in [m for m in MODES if m in args.modes]:  # eval_frozen (one way) comes last
        impls = {be: (m, noop) for be, m in mods.items()}
        if mode in sj_modes and sj is not None:
            impls["sj"] = (sj, sj_reset)
        if mode == "eval_frozen":
            for m in mods.values():
                m.mode = "frozen"
        steps = {k: make_step(m, r, x, grad_out, mode, shape.input == "spike")
                 for k, (m, r) in impls.items()}
        times = time_many_ms({k: st for k, (st, _) in steps.items()}, device,
                             warmup=args.warmup, repeats=args.repeats)
        for k, (m, r) in impls.items():
            step, xin = steps[k]
            res[k][mode] = {"ms": times[k],
                            **measure_memory(m, r, xin, grad_out, mode, step, device)}
        del steps
    if sj is not None and "eval_frozen" in args.modes and "eval_frozen" not in res["sj"]:
        res["sj"]["eval_frozen"] = res["sj"]["eval_fwd"]
    sj_res = res["sj"]
    del sj, mods
    gc.collect()

    rows = []
    for be in backends:
        mismatch = rel = None
        if args.check and be != "torch":
            mismatch, rel = check_against_reference(shape, args, device, be, ref_module, x,
                                                    grad_out)
        for m in args.modes:
            r = res[be][m]
            # Without SpikingJelly (--no-sj) its columns stay empty.
            s = sj_res.get(m, {"ms": "", "saved": None, "peak": "", "rate": ""})
            rows.append({
                **{f.name: getattr(shape, f.name) for f in dataclasses.fields(Shape)
                   if f.name != "name"},
                "shape": shape.name, "gmac": shape.gmac, "backend": be, "mode": m,
                "ms": r["ms"], "sj_ms": s["ms"], "speedup": s["ms"] / r["ms"] if s["ms"] != "" else "",
                "saved_bytes": r["saved"] if r["saved"] is not None else "",
                "sj_saved_bytes": s["saved"] if s["saved"] is not None else "",
                "saved_ratio": (s["saved"] / r["saved"]) if r["saved"] and s["saved"] else "",
                "peak_bytes": r["peak"], "sj_peak_bytes": s["peak"], "peak_kind": r["peak_kind"],
                "out_rate": r["rate"], "sj_out_rate": s["rate"],
                "spike_mismatch": "" if mismatch is None else mismatch,
                "grad_rel_err": "" if rel is None else rel,
            })
    return rows


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def plot(rows: list[dict], path: Path, title: str) -> None:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    series = list(dict.fromkeys((r["backend"], r["mode"]) for r in rows))
    width = 0.8 / max(len(series), 1)
    with saved_figure(path, (max(6.0, 0.9 * len(shapes) + 2), 4.5), xlabels=shapes,
                      ylabel="speedup over SpikingJelly dense (x)", title=title, title_size=9,
                      rotation=35, ha="right") as ax:
        for i, (be, mode) in enumerate(series):
            ys = []
            for s in shapes:
                hit = [r["speedup"] for r in rows
                       if r["shape"] == s and r["backend"] == be and r["mode"] == mode]
                ys.append(hit[0] if hit else math.nan)
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(shapes))]
            ax.bar(xs, ys, width, label=f"{be} {mode}")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def timing_defaults(args: argparse.Namespace, quick_sets: str = "anchor") -> None:
    """--quick: the anchor set, 3 timed repeats, 1 warm-up; otherwise 10 and 2 (where not given).
    Also plan_check.py's."""
    if args.quick:
        args.sets = quick_sets if args.sets is None else args.sets
        args.repeats = args.repeats or 3
        args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = args.repeats or 10
    args.warmup = 2 if args.warmup is None else args.warmup


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p, backends_help="comma list of binslt backends (torch,cpu,triton,cuda); "
                    "default: every usable one for the device plus 'torch' (Triton's CPU "
                    "interpreter never)")
    p.add_argument("--sets", default=None,
                   help="comma list of shape sets: anchor, gpu_ref, vgg11, rates, timesteps, conv4_digits "
                        "(default CPU: anchor,vgg11,rates,timesteps; CUDA: gpu_ref,anchor,vgg11,"
                        "rates,timesteps)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median); default "
                   "10, 3 with --quick")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="anchor shape only, 3 repeats, 1 warm-up (under a minute on 2 cores)")
    p.add_argument("--vgg-batch", type=int, default=None,
                   help="N for the VGG-11 layers (default 8 on CPU, 64 on CUDA)")
    p.add_argument("--tau", type=float, default=100.0, help="LIF tau (100 = decay 0.99)")
    p.add_argument("--decay-input", action="store_true", help="decay_input=True (default False)")
    p.add_argument("--prune-rate", type=float, default=0.5)
    p.add_argument("--bn-affine", action="store_true", help="affine BatchNorm on both sides")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the agreement check of each backend with the torch reference")
    p.add_argument("--no-tf32", action="store_true",
                   help="CUDA: disable TF32 in cuDNN/cuBLAS (default: torch's defaults)")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="CUDA: keep torch.backends.cudnn.benchmark off (default: on)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-sj", action="store_true",
                   help="time the binslt backends without the SpikingJelly baseline (where it "
                        "is not installed; the sj_* and ratio columns stay empty)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes:
        p.error("--modes is empty")
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {MODES}")
    timing_defaults(args)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.tau <= 1.0:
        p.error("--tau must be > 1 (SpikingJelly's LIFNode requires it)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device, st, backends = setup_run(args, torch_and_kernels, check_device=True,
                                         cudnn_benchmark=not args.no_cudnn_benchmark)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda" and args.no_tf32:
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    sets = shape_sets(device.type, args.vgg_batch)
    names = args.sets.split(",") if args.sets else (
        ["gpu_ref", "anchor", "vgg11", "rates", "timesteps"] if device.type == "cuda"
        else ["anchor", "vgg11", "rates", "timesteps"])
    shapes: list[Shape] = []
    seen: set[Shape] = set()
    for n in names:
        if n.strip() not in sets:
            print(f"error: unknown shape set {n!r}; choose from {sorted(sets)}", file=sys.stderr)
            return 2
        for s in sets[n.strip()]:
            key = dataclasses.replace(s, name="")
            if key not in seen:  # the sweeps repeat the base shape: time it once
                seen.add(key)
                shapes.append(s)

    if args.no_sj:
        print("# --no-sj: SpikingJelly baseline not run; the sj_* and ratio columns stay empty",
              file=sys.stderr, flush=True)
    meta = run_record(
        device, st, backends, argv, benchmark="conv_lif",
        sj_lif_impl="not run (--no-sj)" if args.no_sj else sj_baseline(device),
        neuron=f"LIF tau={args.tau:g} decay_input={args.decay_input} v_threshold=1 "
               f"v_reset=0 ATan(2) detach_reset=True",
        bn=f"BatchNorm2d affine={args.bn_affine}",
        prune_rate=f"{args.prune_rate:g}",
        repeats=f"{args.repeats} (median), warmup {args.warmup}")
    out_dir = Path(args.out)
    stem = result_stem("conv_lif", device, args.tag)
    csv_path = out_dir / f"{stem}.csv"
    print(f"# {meta['device']} | torch {meta['torch']} threads {meta['torch_threads']} | "
          f"SJ {meta['spikingjelly']} LIF={meta['sj_lif_impl']} | binslt {meta['binslt']} "
          f"({meta['git_commit']}) | backends {backends}", flush=True)

    rows: list[dict] = []
    for shape in shapes:
        print(f"# {shape.name}: T={shape.T} N={shape.N} {shape.C_in}->{shape.C_out} "
              f"{shape.H}x{shape.W} rate={shape.rate:g} ({shape.gmac:.2f} GMAC)", flush=True)
        rows.extend(run_shape(shape, args, device, backends))
        meta["load_avg_1m_end"] = f"{os.getloadavg()[0]:.2f}"
        write_csv(csv_path, rows, COLUMNS, meta)  # after every shape: a timeout keeps the rest

    show = ["shape", "backend", "mode", "ms", "sj_ms", "speedup", "saved_ratio",
            "spike_mismatch", "grad_rel_err"]
    print_table(rows, show)
    print(f"wrote {csv_path}")
    if not args.no_plot and not args.no_sj:
        png = out_dir / f"{stem}.png"
        plot(rows, png, f"BinSpikeConv2d vs SpikingJelly dense: {meta['device']}, "
                        f"torch {meta['torch']}, {meta['git_commit']}")
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
