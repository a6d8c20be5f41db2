#!/usr/bin/env python
"""The backward's product forms on the paper's layer shapes: time, and error against float64.

For every binary-input conv shape of Conv-4, VGG-11 and ResNet-19 at CIFAR size (and their 1x1
shortcuts), one ``binslt::bconv_lif_bwd`` call (batch-statistics BN, ATan surrogate, input
firing rate 0.15, half the weights pruned) under each product form that runs the layer:
``auto``, the float32 ``dense`` forms, the split-precision ``bf16x3`` forms, and ``int8`` where
oneDNN's int8 convolution runs (AMX-INT8, or AVX-512 VNNI forced: ``onednn_int8_forced``; both
gradients forced to the form). Each is timed interleaved with the
others (medians), and each gradient's error is measured against float64 maths
(``||g - g64|| / ||g64||``, the tests' measure): dL/dX, dL/dW_eff and the search's score
gradient dL/ds = dL/dW_eff * w * sign(s). The BN shift is nudged until no float64 membrane
potential lies within the tie band of the threshold, so float32 and float64 take the same spike
decisions.

The split forms are meant for matrix engines (AMX-BF16 / AMX-INT8, ``bf16_matrix`` /
``onednn_int8`` in ``binslt info``'s features); elsewhere they run as float32 products, so their
times there say nothing about the engine.

    python benchmarks/split_precision.py --threads 2                # T=4, N=8
    python benchmarks/split_precision.py --layers 256x256x8 --n 32 --repeats 10

Writes ``<out>/split_precision_<device-slug>[_<tag>].csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    machine_info,
    print_table,
    result_stem,
    time_many_ms,
    write_csv,
)

ARCHS = ("conv4", "vgg11", "resnet19")


def paper_layers() -> list[tuple[int, ...]]:
    """(C_in, C_out, H, stride, kernel, padding) of every binary-input conv of the paper's
    networks at 32x32 input (Conv-4, VGG-11, ResNet-19 with its 1x1 shortcuts), each once."""
    from binslt.nn.counting import binary_conv_shapes
    from binslt.nn.models import build
    out: list[tuple[int, ...]] = []
    for arch in ARCHS:
        out += [s for s in binary_conv_shapes(build(arch, "binwslt", input_size=32))
                if s not in out]
    return out


COLUMNS = ["layer", "T", "N", "C_in", "C_out", "H", "stride", "k", "form", "plan", "ms",
           "err_grad_x", "err_grad_w", "err_score"]
NEURON = dict(tau=2.0, decay_input=False, v_threshold=0.5, v_reset=0.0)
TIE_BAND = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t", type=int, default=4, help="time steps (default 4)")
    p.add_argument("--n", type=int, default=8, help="batch (default 8)")
    p.add_argument("--layers", default="", help="comma list of CinxCoutxH[xstride[xk]] (default: "
                   "every layer of the paper's networks)")
    p.add_argument("--rate", type=float, default=0.15, help="input firing rate (default 0.15)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.t < 1 or args.n < 1 or args.repeats < 1 or not 0.0 < args.rate < 1.0:
        p.error("--t, --n and --repeats must be >= 1 and --rate in (0, 1)")
    args.layers = parse_layers(p, args.layers)
    return args


def parse_layers(p: argparse.ArgumentParser, spec: str) -> list[tuple[int, ...]]:
    if not spec:
        return paper_layers()
    out = []
    for item in spec.split(","):
        try:
            v = [int(t) for t in item.strip().split("x")]
        except ValueError:
            v = []
        if not 3 <= len(v) <= 5 or min(v) < 1:
            p.error(f"--layers: {item!r} is not CinxCoutxH[xstride[xk]]")
        ci, co, h = v[:3]
        stride = v[3] if len(v) > 3 else 1
        k = v[4] if len(v) > 4 else 3
        out.append((ci, co, h, stride, k, k // 2))
    return out


def case(layer, T, N, rate, seed):
    """Inputs of one layer: packed 0/1 input, ternary weight, alpha, BN (scale, shift)."""
    from binslt.ops import reference as ref
    ci, co, h, stride, k, pad = layer
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T * N, ci, h, h, generator=g) < rate).float()
    w = torch.randint(-1, 2, (co, ci, k, k), generator=g).float()
    wm, wp = ref.pack_weight_reference(w)
    return dict(x=x, w=w, xp=ref.pack_spikes_reference(x), wm=wm, wp=wp,
                alpha=torch.rand(co, generator=g) * 0.2 + 0.05, scale=torch.ones(co),
                shift=torch.zeros(co), T=T, stride=stride, padding=pad, Ci=ci,
                latent=torch.randn(co, ci, k, k, generator=g),
                scores=torch.randn(co, ci, k, k, generator=g),
                gs=None, g=g)


def untie(c) -> torch.Tensor:
    """A BN shift near 0 with no float64 membrane potential within TIE_BAND of the threshold."""
    from binslt.ops import reference as ref
    counts = ref.bconv_count_reference(c["xp"], c["wm"], c["wp"], c["stride"], c["padding"])
    z = counts.double().view(c["T"], -1, *counts.shape[1:]) * c["alpha"].double().view(
        1, 1, -1, 1, 1)
    shift = c["shift"]
    for _ in range(50):
        xin, _, _ = ref.epilogue(z, c["scale"].double(), shift.double(), None, True, 1e-5)
        _, hh = ref.lif_multistep(xin, **NEURON, return_h=True)
        if not bool(((hh - NEURON["v_threshold"]).abs() < TIE_BAND).any()):
            return shift
        shift = shift + (torch.rand(shift.shape, generator=c["g"]) - 0.5) * 1e-2
    raise RuntimeError("no tie-free BN shift found for this layer; try another --seed")


def reference64(c, shift):
    """dL/dX, dL/dW_eff and the score gradient in float64."""
    from binslt.ops import reference as ref
    g_x, g_w, _, _, _ = ref.bconv_lif_bwd_float64(
        c["gs"], c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], shift, None, c["Ci"],
        c["stride"], c["padding"], True, 1e-5, NEURON["tau"], NEURON["decay_input"],
        NEURON["v_threshold"], NEURON["v_reset"], True, 0, 2.0)
    return g_x, g_w, ref.search_score_grad(g_w, c["latent"].double(), c["scores"].double())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


def forms_of(features: dict) -> list[str]:
    out = ["auto", "dense", "bf16x3"]
    if features.get("onednn_int8_forced", False):  # (AMX-INT8 or VNNI)
        out.append("int8")
    return out


def run_layer(layer, args, features) -> list[dict]:
    from binslt.ops import cpu_algorithms, plan
    ops = torch.ops.binslt
    ci, co, h, stride, k, pad = layer
    c = case(layer, args.t, args.n, args.rate, args.seed)
    shift = untie(c)
    fwd = ops.bconv_lif(c["xp"], c["wm"], c["wp"], c["alpha"], c["scale"], shift, None, c["T"],
                        stride, pad, True, 1e-5, NEURON["tau"], False, NEURON["v_threshold"],
                        0.0)
    c["gs"] = torch.randn(fwd[0].shape, generator=c["g"])
    want = reference64(c, shift)

    def bwd():
        return ops.bconv_lif_bwd(c["gs"], fwd[1], c["xp"], c["wm"], c["wp"], c["alpha"],
                                 c["scale"], shift, fwd[2], fwd[3], None, ci, stride, pad, True,
                                 1e-5, NEURON["tau"], False, NEURON["v_threshold"], 0.0, True, 0,
                                 2.0, True)

    def under(form):
        kw = {} if form == "auto" else {"grad_x": form, "grad_w": form}
        def call():
            with cpu_algorithms(**kw):
                return bwd()
        return call

    runnable, plans = {}, {}
    for form in forms_of(features):
        kw = {} if form == "auto" else {"grad_x": form, "grad_w": form}
        try:
            with cpu_algorithms(**kw):
                p = plan.backward_plan((c["T"], args.n, ci, h, h), (co, ci, k, k), stride, pad,
                                       rate=float(c["x"].mean()))
        except ValueError:  # the form cannot run this layer (e.g. int8 at stride 2)
            continue
        runnable[form] = under(form)
        plans[form] = f"grad_x={p['grad_x']} grad_w={p['grad_w']}"
    times = time_many_ms(runnable, torch.device("cpu"), warmup=1, repeats=args.repeats)
    rows = []
    for form, fn in runnable.items():
        out = fn()
        score = torch.ops.binslt.search_score_grad(out[1], c["latent"], c["scores"])
        rows.append({"layer": f"{ci}x{co}x{h}" + (f"/s{stride}" if stride > 1 else "")
                     + ("/1x1" if k == 1 else ""), "T": args.t, "N": args.n, "C_in": ci,
                     "C_out": co, "H": h, "stride": stride, "k": k, "form": form,
                     "plan": plans[form], "ms": times[form],
                     "err_grad_x": rel(out[0], want[0]), "err_grad_w": rel(out[1], want[1]),
                     "err_score": rel(score, want[2])})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from binslt.ops import library
    info = library.cpu_info()
    if info is None:
        print("split_precision: the C++ CPU extension is not built (pip install -e .)",
              file=sys.stderr)
        return 2
    device = torch.device("cpu")
    rows = []
    for layer in args.layers:
        new = run_layer(layer, args, info["features"])
        print_table(new, COLUMNS)
        rows += new
    meta = machine_info(device)
    meta.update({"kernel_isa": info["kernel_isa"],
                 "features": ",".join(k for k, v in sorted(info["features"].items()) if v),
                 "command": " ".join(["python", "benchmarks/split_precision.py",
                                      *(argv if argv is not None else sys.argv[1:])])})
    path = Path(args.out) / f"{result_stem('split_precision', device, args.tag)}.csv"
    write_csv(path, rows, COLUMNS, meta)
    worst = max(max(r["err_grad_x"], r["err_grad_w"], r["err_score"]) for r in rows)
    print(f"largest relative error against float64: {worst:.2e}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
