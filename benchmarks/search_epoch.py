#!/usr/bin/env python
"""One epoch of the Conv-4 BinW-SLT search on scikit-learn digits: binslt against a baseline.

binslt: ``binslt.models.build('conv4', 'binwslt', in_channels=1, input_size=8, ...)``, once per
binslt backend.

Baseline: the same network from SpikingJelly dense layers (``sj_models.build_sj('conv4',
masked=True)``: ``layer.SeqToANNContainer`` around a score-masked conv/linear in plain
PyTorch, ``layer.BatchNorm2d/1d``, ``neuron.LIFNode``, ``layer.MaxPool2d``, step mode 'm'). The masked modules follow biprop:
mask = the entries with the largest |s| (floor(prune_rate * numel) removed),
``W_eff = alpha * sign(w) * M`` with ``alpha = sum(|w| M) / sum(M)``, and the straight-through
score gradient ``dL/ds = dL/dW_eff * w * sign(s)``. It is written independently of binslt; the
only thing copied across is the initial weights and scores, so that both start from the same
point (``init_logit_diff`` / ``init_grad_rel_err`` in the CSV check that they compute the same
function and the same score gradient).

Both train the scores with the same SGD (momentum 0.9) on the same batches; the data is the
stratified 80/20 split of ``sklearn.datasets.load_digits`` (pixels / 16, normalised with the
training split's statistics). Epochs of the implementations are interleaved, so that load on a
shared machine hits them alike; the median epoch time is reported with the ratio to the
baseline.

Example::

    python benchmarks/search_epoch.py                 # 3 timed epochs each
    python benchmarks/search_epoch.py --max-batches 2 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    add_run_options,
    print_table,
    result_stem,
    run_record,
    setup_run,
    sj_baseline,
    sync,
    torch_and_kernels,
    write_csv,
)
from sj_models import build_sj, copy_init, masked_layers  # noqa: E402
from torch import nn  # noqa: E402

COLUMNS = ["impl", "backend", "epoch_s", "sj_epoch_s", "speedup", "eval_s", "sj_eval_s",
           "eval_speedup", "batches", "batch_size", "T", "train_loss", "test_acc",
           "init_logit_diff", "init_grad_rel_err"]


# ---------------------------------------------------------------------------------------------
# Data, training
# ---------------------------------------------------------------------------------------------


def load_digits_split(device) -> tuple[torch.Tensor, ...]:
    """Stratified 80/20 split of sklearn's digits, [N, 1, 8, 8] float32, normalised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=0.2, random_state=0,
                                      stratify=d.target)
    xtr, xte, ytr, yte = x[idx_tr], x[idx_te], y[idx_tr], y[idx_te]
    mean, std = xtr.mean(), xtr.std()
    return ((xtr - mean) / std).to(device), ytr.to(device), ((xte - mean) / std).to(device), \
        yte.to(device)


def batches(n: int, batch_size: int, epoch: int, seed: int, max_batches: int | None):
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    return out[:max_batches] if max_batches else out


def train_epoch(model, opt, xtr, ytr, order, device) -> tuple[float, float]:
    """(wall seconds, mean loss) of one pass over ``order`` batches."""
    model.train()
    sync(device)
    t0 = time.perf_counter()
    total = 0.0
    for idx in order:
        idx = idx.to(xtr.device)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    sync(device)
    return time.perf_counter() - t0, total / max(len(order), 1)


@torch.no_grad()
def evaluate(model, xte, yte, batch_size, device, max_batches) -> tuple[float, float]:
    """(wall seconds, accuracy) over the test split."""
    model.eval()
    sync(device)
    t0 = time.perf_counter()
    correct = seen = 0
    for i, s in enumerate(range(0, len(yte), batch_size)):
        if max_batches and i >= max_batches:
            break
        pred = model(xte[s:s + batch_size]).argmax(1)
        correct += int((pred == yte[s:s + batch_size]).sum())
        seen += len(pred)
    sync(device)
    return time.perf_counter() - t0, correct / max(seen, 1)


def init_agreement(binslt_model, baseline, x, y) -> tuple[float, float]:
    """(max |logit difference|, relative L2 error of all score grads) from the same start."""
    out = []
    for m in (binslt_model, baseline):
        m.train()
        for p in m.parameters():
            p.grad = None
        logits = m(x)
        F.cross_entropy(logits, y).backward()
        g = torch.cat([mm.scores.grad.flatten() for mm in masked_layers(m)])
        out.append((logits.detach(), g.double()))
        for p in m.parameters():
            p.grad = None
    diff = float((out[0][0] - out[1][0]).abs().max())
    rel = float((out[0][1] - out[1][1]).norm() / out[1][1].norm().clamp_min(1e-30))
    return diff, rel


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(p, backends_help="comma list of binslt backends; default torch plus the "
                    "device's kernels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--timesteps", type=int, default=4)
    p.add_argument("--prune-rate", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per implementation")
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop each epoch (and the test pass) after this many batches (smoke runs)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.timesteps < 1:
        p.error("--repeats, --batch-size and --timesteps must be >= 1")
    if args.max_batches is not None and args.max_batches < 1:
        p.error("--max-batches must be >= 1")
    return args


def build_impls(args, backends: list[str], device: torch.device
                ) -> tuple[dict[str, nn.Module], nn.Module, nn.Module]:
    """``(impls, first, base)``: Conv-4 BinW-SLT on each binslt backend, all from the same
    initial state (``first``'s), and the SpikingJelly biprop network ``base`` copied from it
    (``impls['sj-biprop']``)."""
    import binslt.nn.models as models

    torch.manual_seed(args.seed)
    impls: dict[str, nn.Module] = {}
    first = None
    for be in backends:
        torch.manual_seed(args.seed)
        m = models.build("conv4", "binwslt", num_classes=10, in_channels=1, input_size=8,
                         timesteps=args.timesteps, prune_rate=args.prune_rate, decay=0.99,
                         decay_input=False, v_threshold=1.0, v_reset=0.0, detach_reset=True,
                         surrogate="atan", surrogate_alpha=2.0, bn=True, bn_affine=False,
                         backend=be).to(device)
        if first is None:
            first = m
        else:
            m.load_state_dict(first.state_dict())
        impls[f"binslt-{be}"] = m
    base = build_sj("conv4", masked=True, in_channels=1, input_size=8,
                    timesteps=args.timesteps, prune_rate=args.prune_rate).to(device)
    copy_init(first, base)
    impls["sj-biprop"] = base
    return impls, first, base


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device, st, backends = setup_run(args, torch_and_kernels, cudnn_benchmark=None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    sj_impl = sj_baseline(device)  # fails fast if SJ's LIF cannot run here
    xtr, ytr, xte, yte = load_digits_split(device)

    impls, first, base = build_impls(args, backends, device)

    # Same start: the two networks must compute the same function and score gradient.
    probe = min(args.batch_size, len(ytr))
    agree = {name: init_agreement(m, base, xtr[:probe], ytr[:probe])
             for name, m in impls.items() if name != "sj-biprop"}

    opts = {name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=args.lr,
                                  momentum=0.9)
            for name, m in impls.items()}
    # Warm-up: two batches each, not timed (first-call allocations, oneDNN primitive creation).
    for name, m in impls.items():
        train_epoch(m, opts[name], xtr, ytr, batches(len(ytr), args.batch_size, -1, args.seed, 2),
                    device)
    times = {name: [] for name in impls}
    losses = {name: math.nan for name in impls}
    for ep in range(args.repeats):
        order = batches(len(ytr), args.batch_size, ep, args.seed, args.max_batches)
        for name, m in impls.items():  # interleaved: A B C, A B C, ...
            dt, loss = train_epoch(m, opts[name], xtr, ytr, order, device)
            times[name].append(dt)
            losses[name] = loss
        print(f"# epoch {ep}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()),
              flush=True)
    evals = {name: evaluate(m, xte, yte, args.batch_size, device, args.max_batches)
             for name, m in impls.items()}

    sj_t = statistics.median(times["sj-biprop"])
    sj_e = evals["sj-biprop"][0]
    n_batches = len(batches(len(ytr), args.batch_size, 0, args.seed, args.max_batches))
    rows = []
    for name in impls:
        t = statistics.median(times[name])
        rows.append({
            "impl": name, "backend": name.split("-", 1)[1] if name.startswith("binslt") else "",
            "epoch_s": t, "sj_epoch_s": sj_t, "speedup": sj_t / t,
            "eval_s": evals[name][0], "sj_eval_s": sj_e, "eval_speedup": sj_e / evals[name][0],
            "batches": n_batches, "batch_size": args.batch_size, "T": args.timesteps,
            "train_loss": losses[name], "test_acc": evals[name][1],
            "init_logit_diff": agree[name][0] if name in agree else "",
            "init_grad_rel_err": agree[name][1] if name in agree else "",
        })

    meta = run_record(
        device, st, backends, argv,
        benchmark="search_epoch (Conv-4 BinW-SLT on sklearn digits, 1437 train / 360 test)",
        sj_lif_impl=sj_impl,
        load_avg_1m_end=f"{os.getloadavg()[0]:.2f}",
        neuron="LIF decay 0.99 (tau 100) decay_input=False v_threshold=1 v_reset=0 ATan(2) "
               "detach_reset=True; non-affine BN",
        optimizer=f"SGD lr={args.lr} momentum=0.9 on the scores",
        prune_rate=f"{args.prune_rate:g}",
        repeats=f"{args.repeats} epochs each, interleaved (median)")
    stem = result_stem("search_epoch", device, args.tag)
    path = Path(args.out) / f"{stem}.csv"
    write_csv(path, rows, COLUMNS, meta)
    print_table(rows, ["impl", "epoch_s", "sj_epoch_s", "speedup", "eval_speedup", "train_loss",
                       "test_acc", "init_logit_diff", "init_grad_rel_err"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
