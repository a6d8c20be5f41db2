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

import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    machine_info,
    print_table,
    result_stem,
    set_mmap_threshold,
    time_many_ms,
    write_csv,
)

COLUMNS = ["T", "N", "C_in", "C_out", "H", "W", "prune_rate", "rate", "isa", "part", "algo", "ms", "auto_ms",
           "auto_closest", "same_result"]


def parse_args(argv=None) -> argparse.Namespace:
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
    return p.parse_args(argv)


def time_algos(run, knob: str, algos: list[str], checked: list[str], same, device,
               repeats: int) -> tuple[dict[str, float], str, bool]:
    """``(times, auto_closest, agree)``: ``run`` timed under ``cpu_algorithms(knob=a)`` for each
    of ``algos`` and ``auto`` (interleaved), the algorithm whose time is nearest to auto's, and
    whether each of ``checked`` gives what ``dense`` gives (``same(out, dense_out)``)."""
    from binslt.ops import cpu_algorithms

    def under(algo):
        with cpu_algorithms(**{knob: algo}):
            return run()

    fns = {a: functools.partial(under, a) for a in [*algos, "auto"]}
    outs = {a: fns[a]() for a in ["dense", *checked]}
    agree = all(same(outs[a], outs["dense"]) for a in checked)
    times = time_many_ms(fns, device, repeats=repeats)
    picks = min(algos, key=lambda a: abs(times[a] - times["auto"]))
    return times, picks, agree


def _exact(out, ref) -> bool:  # spikes and counts, bit for bit
    return all(torch.equal(a, b) for a, b in zip(out[:2], ref[:2]))


def _close(i: int):
    def close(out, ref) -> bool:
        return float((out[i] - ref[i]).norm() / ref[i].norm()) < 1e-5
    return close


def main(argv=None) -> int:
    args = parse_args(argv)
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
    # The int8 input gradient (oneDNN's int8 convolution) where it runs forced: AMX-INT8 or VNNI.
    int8_gx = ["int8"] if binslt.ops.library.cpu_info()["features"].get("onednn_int8_forced") \
        else []
    rows = []
    with contextlib.ExitStack() as stack:
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
            # The weight gradient alone (need_grad_x=False): event sums, ATen's GEMM, one GEMM
            # per tap, or the int8 limb products.
            run_gw = functools.partial(bwd, *run_bwd.args[:-1], False)
            for isa in isas:
                stack.enter_context(cpu_algorithms(isa=isa))
                # margined: the dense conv channel-last, from the weight gradient's copy of dZ
                gx = (["dense", "margined"] + (["ternary", "combo"] if isa == "avx512" else [])
                      + unfold + int8_gx)
                # int8: the limb form (ATen's _int_mm), forced on any CPU; "auto" takes it on AMX
                gw = ["event", "dense", "taps", "int8"] + unfold
                parts = (("forward", run_fwd, "conv", ["dense", "event"], ["event", "auto"],
                          _exact),
                         ("backward", run_bwd, "grad_x", gx, gx, _close(0)),
                         ("weight_grad", run_gw, "grad_w", gw, gw, _close(1)))
                for part, run, knob, algos, checked, same in parts:
                    times, picks, ok = time_algos(run, knob, algos, checked, same, device,
                                                  args.repeats)
                    rows += [dict(T=T, N=N, C_in=ci, C_out=co, H=hw, W=hw, rate=rate, isa=isa,
                                  prune_rate=args.prune_rate, part=part, algo=algo,
                                  ms=times[algo], auto_ms=times["auto"], auto_closest=picks,
                                  same_result=ok) for algo in algos]
    print_table(rows, ["rate", "isa", "part", "algo", "ms", "auto_ms", "auto_closest",
                       "same_result"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{result_stem('cpu_algos', device, args.tag)}.csv"
    write_csv(out / name, rows, COLUMNS, info)
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
