"""The search step of a binslt network under ``torch.compile`` against eager.

One search step: forward, cross-entropy loss, backward, SGD step (lr 0.1, momentum 0.9) of
``binslt.models.build(arch, 'binwslt')`` in search mode on random images and labels. The
candidates are the eager step and the step whose forward and loss run compiled with
``torch.compile(fullgraph=True, backend=B)`` for each ``--compile-backends`` entry (the loss's
``backward()`` then runs the backward graph AOTAutograd compiled with it; the optimiser step
is eager in every candidate). Each compiled candidate is first compiled and checked against
eager on one step of an identical copy of the model (``check``: the largest difference of the
loss and of any gradient); ``compile_s`` is that first call. A backend whose first call takes
longer than ``--compile-limit`` seconds (default 300) or fails is recorded with its ``error``
and left out of the timing.

Timing: after ``--warmup`` untimed steps of each candidate, ``--repeats`` rounds that run every
candidate's step once in turn (interleaved, so that load on a shared machine hits all alike);
the median of each candidate's step times is ``ms`` and ``ratio`` is eager's median over its
own (> 1: faster than eager).

    python benchmarks/compile_step.py --threads 2                 # Conv-4, CIFAR shape, N=16, T=4
    python benchmarks/compile_step.py --arch conv4 --batch 4 --timesteps 2 --repeats 5 --no-plot
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    device_slug,
    machine_info,
    print_table,
    saved_figure,
    time_many_ms,
    write_csv,
)

COLUMNS = ["arch", "candidate", "batch", "timesteps", "ms", "ratio", "compile_s", "check",
           "error"]


class _Timeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise _Timeout()


def build(arch: str, batch: int, timesteps: int, seed: int):
    from binslt.nn import models

    torch.manual_seed(seed)
    net = models.build(arch, "binwslt", num_classes=10, in_channels=3, input_size=32,
                       timesteps=timesteps).train()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    return net, x, y


def make_step(net, forward_loss):
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = forward_loss(x, y)
        loss.backward()
        opt.step()
        return loss

    return step


def first_call_check(net, compiled, x, y) -> float:
    """The largest difference of loss and gradients between eager and the compiled forward
    on one step of two identical copies (no optimiser step)."""
    ref = copy.deepcopy(net)
    le = F.cross_entropy(ref(x), y)
    le.backward()
    lc = compiled(x, y)
    lc.backward()
    diff = (le - lc).abs().item()
    for p, q in zip(ref.parameters(), net.parameters()):
        if p.grad is not None or q.grad is not None:
            diff = max(diff, (p.grad - q.grad).abs().max().item())
    net.zero_grad(set_to_none=True)
    return diff


def plot(rows: list[dict], path: Path, title: str) -> None:
    timed = [r for r in rows if r["ms"] != ""]
    with saved_figure(path, (max(4.0, 1.4 * len(timed) + 1.5), 4.0),
                      xlabels=[r["candidate"] for r in timed],
                      ylabel="median search step (ms)", title=title) as ax:
        bars = ax.bar(range(len(timed)), [r["ms"] for r in timed], color="C0")
        for b, r in zip(bars, timed):
            ax.annotate(f"{r['ms']:.0f} ms\n(x{r['ratio']:.2f})", (b.get_x() + b.get_width() / 2,
                        b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.margins(y=0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="conv4")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--timesteps", type=int, default=4)
    p.add_argument("--compile-backends", default="inductor,aot_eager")
    p.add_argument("--compile-limit", type=float, default=300.0,
                   help="seconds a backend's first (compiling) call may take")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    net, x, y = build(args.arch, args.batch, args.timesteps, args.seed)
    base = dict(arch=args.arch, batch=args.batch, timesteps=args.timesteps)
    rows = [dict(base, candidate="eager", compile_s="", check="", error="")]
    steps = {"eager": make_step(net, lambda a, b: F.cross_entropy(net(a), b))}
    signal.signal(signal.SIGALRM, _alarm)
    for be in [b for b in args.compile_backends.split(",") if b]:
        cnet = copy.deepcopy(net)

        def fl(a, b, m=cnet):
            return F.cross_entropy(m(a), b)

        compiled = torch.compile(fl, fullgraph=True, backend=be)
        row = dict(base, candidate=f"compiled-{be}", compile_s="", check="", error="")
        t0 = time.perf_counter()
        signal.alarm(int(args.compile_limit))
        try:
            row["check"] = first_call_check(cnet, compiled, x, y)
            steps[row["candidate"]] = make_step(cnet, compiled)
        except _Timeout:
            row["error"] = f"first call over {args.compile_limit:.0f} s"
        except Exception as exc:  # noqa: BLE001 - recorded in the CSV
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            signal.alarm(0)
        row["compile_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{row['candidate']}: first call {row['compile_s']:.1f} s, check {row['check']}, "
              f"{row['error'] or 'ok'}", flush=True)
    ms = time_many_ms({k: (lambda f=f: f(x, y)) for k, f in steps.items()}, dev,
                      warmup=args.warmup, repeats=args.repeats)
    for r in rows:
        if r["candidate"] in ms:
            r["ms"] = ms[r["candidate"]]
            r["ratio"] = ms["eager"] / ms[r["candidate"]]
    meta = machine_info(dev)
    meta.update(mode="search step: forward, loss, backward, SGD step",
                command=" ".join(["python", *sys.argv]))
    name = f"compile_step_{device_slug(dev)}{'_' + args.tag if args.tag else ''}"
    path = Path(args.out) / f"{name}.csv"
    write_csv(path, rows, COLUMNS, meta)
    print_table(rows, COLUMNS)
    if not args.no_plot:
        title = (f"{args.arch} search step, N={args.batch}, T={args.timesteps}, "
                 f"{meta['cpu_model']}, {meta['torch_threads']} threads\n"
                 f"median of {args.repeats} interleaved repeats")
        plot(rows, path.with_suffix(".png"), title)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
