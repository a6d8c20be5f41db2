#!/usr/bin/env python
"""The CPU kernel's algorithm choices, op against op: which one ``auto`` should take where.

``binslt::bconv_lif`` on the CPU has two forward algorithms (``dense``: AND + popcount over
every packed input word; ``event``: the sum of the int8 weight columns of the input spikes) and
``auto`` picks by the fraction of set input bits; ``binslt::bconv_lif_bwd`` has three input-gradient
algorithms (``dense``: oneDNN's transposed convolution; ``ternary``: add/subtract of dZ rows,
AVX-512, stride 1; ``combo``: the same over precomputed signed sums of four dZ rows) and two
weight-gradient algorithms (``event``: sums of dZ rows over the input's set bits; ``dense``:
ATen's weight-gradient convolution of the unpacked input, part ``weight_grad``, timed with
``need_grad_x=False``). This times each of them on the same inputs, interleaved call by call, for
each available popcount path (ISA) and input firing rate, and reports ``auto``'s time with them
(``auto_closest``: the algorithm whose time is nearest to auto's, a hint of what it chose).
Op only: packed input, training-mode BN, no autograd; the choices are forced with
``binslt.ops.cpu_algorithms``. Every forward algorithm is checked to give
the same spikes and counts as ``dense``, every input gradient to be within 1e-5 of ``dense``'s,
the event weight gradient within 1e-5 of the dense one.

Example::

    python benchmarks/cpu_algos.py                     # rates 0.05..0.5, every ISA, 2 threads
    python benchmarks/cpu_algos.py --threads 1 --rates 0.15 --isas avx512
    python benchmarks/cpu_algos.py --shape 4,32,256,256,8 --isas avx512   # a deep VGG layer

Writes ``<out>/cpu_algos_<device-slug>[_<tag>].csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS,
    device_slug,
    machine_info,
    print_table,
    set_mmap_threshold,
    time_many_ms,
    write_csv,
)

COLUMNS = ["T", "N", "C_in", "C_out", "H", "W", "prune_rate", "rate", "isa", "part", "algo", "ms", "auto_ms",
           "auto_closest", "same_result"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4,16,128,128,16",
                   help="T,N,C_in,C_out,H (square maps, 3x3, pad 1; default: the anchor)")
    p.add_argument("--rates", default="0.05,0.15,0.3,0.5")
    p.add_argument("--isas", default=None, help="comma list (default: every one this CPU runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prune-rate", type=float, default=0.5,
                   help="fraction of zero weights (default 0.5, the paper's)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)

    import torch

    import binslt
    from binslt import ops
    from binslt.ops import cpu_algorithms
    from binslt.ops import reference as ref
    from binslt.ops.cpu_algos import runnable_isas

    C = binslt.ops.library.module("cpu")
    if C is None:
        print("cpu_algos: the C++ CPU extension is not built (pip install -e .)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    set_mmap_threshold(32 << 20)
    T, N, ci, co, hw = (int(v) for v in args.shape.split(","))
    isas = args.isas.split(",") if args.isas else runnable_isas()
    device = torch.device("cpu")
    info = machine_info(device)
    print(f"# {info['device']} | torch {torch.__version__} threads {torch.get_num_threads()} | "
          f"binslt {binslt.__version__} ({info['git_commit']})")
    gen = torch.Generator().manual_seed(0)
    # Ternary weights at the paper's prune rate 0.5: half zero, the rest +-1.
    w = torch.sign(torch.randn(co, ci, 3, 3, generator=gen))
    w = w * (torch.rand(co, ci, 3, 3, generator=gen) >= args.prune_rate)
    wm, wp = ref.pack_weight_reference(w)
    alpha = torch.rand(co, generator=gen) * 0.1 + 0.05
    scale, shift = torch.ones(co), torch.zeros(co)
    fwd, bwd = ops.get_op("bconv_lif", "cpu"), ops.get_op("bconv_lif_bwd", "cpu")
    # The unfold form of both gradients where its [Co*H*W, Ci*H*W] matrix stays small (the
    # few-pixel maps "auto" gives it; on larger maps it only costs memory).
    unfold = ["unfold"] if co * ci * hw ** 4 * 4 <= 64 << 20 else []
    rows = []
    with contextlib.ExitStack() as stack:
        def force(**kw):
            stack.enter_context(cpu_algorithms(**kw))

        for rate in (float(r) for r in args.rates.split(",")):
            x = (torch.rand(T * N, ci, hw, hw, generator=gen) < rate).float()
            xp = ops.get_op("pack_spikes", "cpu")(x)

            run_fwd = functools.partial(fwd, xp, wm, wp, alpha, scale, shift, None, T, 1, 1,
                                        True, 1e-5, 100.0, False, 1.0, 0.0)
            s, counts, mean, var = run_fwd()
            gs = torch.randn(s.shape, generator=gen)
            run_bwd = functools.partial(bwd, gs, counts, xp, wm, wp, alpha, scale, shift, mean,
                                        var, None, ci, 1, 1, True, 1e-5, 100.0, False, 1.0, 0.0,
                                        True, 0, 2.0, True)

            def add(part, algos, times, picks, same, rate=rate):
                for algo in algos:
                    rows.append(dict(T=T, N=N, C_in=ci, C_out=co, H=hw, W=hw, rate=rate,
                                     isa=isa, prune_rate=args.prune_rate, part=part, algo=algo,
                                     ms=times[algo], auto_ms=times["auto"], auto_closest=picks,
                                     same_result=same))

            for isa in isas:
                force(isa=isa)
                fns, outs = {}, {}
                for algo in ("dense", "event", "auto"):
                    def f(a=algo, run=run_fwd):
                        with cpu_algorithms(conv=a):
                            return run()
                    fns[algo] = f
                    outs[algo] = f()
                times = time_many_ms(fns, device, repeats=args.repeats)
                same = all(torch.equal(a, b) for algo in ("event", "auto")
                           for a, b in zip(outs[algo][:2], outs["dense"][:2]))
                picks = min(("dense", "event"), key=lambda a: abs(times[a] - times["auto"]))
                add("forward", ("dense", "event"), times, picks, same)
                gx = ["dense"] + (["ternary", "combo"] if isa == "avx512" else []) + unfold
                fns = {}
                for algo in gx + ["auto"]:
                    def g(a=algo, run=run_bwd):
                        with cpu_algorithms(grad_x=a):
                            return run()
                    fns[algo] = g
                ref_gx = fns["dense"]()[0]
                close = all(float((fns[a]()[0] - ref_gx).norm() / ref_gx.norm()) < 1e-5
                            for a in gx)
                times = time_many_ms(fns, device, repeats=args.repeats)
                picks = min(gx, key=lambda a: abs(times[a] - times["auto"]))
                add("backward", gx, times, picks, close)
                # The weight gradient alone (need_grad_x=False): event sums, ATen's GEMM, or one
                # GEMM per tap.
                run_gw = functools.partial(bwd, *run_bwd.args[:-1], False)
                fns = {}
                gw = ["event", "dense", "taps"] + unfold
                for algo in gw + ["auto"]:
                    def h(a=algo, run=run_gw):
                        with cpu_algorithms(grad_w=a):
                            return run()
                    fns[algo] = h
                ref_gw = fns["dense"]()[1]
                close = all(float((fns[a]()[1] - ref_gw).norm() / ref_gw.norm()) < 1e-5
                            for a in gw)
                times = time_many_ms(fns, device, repeats=args.repeats)
                picks = min(gw, key=lambda a: abs(times[a] - times["auto"]))
                add("weight_grad", gw, times, picks, close)
    print_table(rows, ["rate", "isa", "part", "algo", "ms", "auto_ms", "auto_closest",
                       "same_result"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"cpu_algos_{device_slug(device)}{'_' + args.tag if args.tag else ''}.csv"
    write_csv(out / name, rows, COLUMNS, info)
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
