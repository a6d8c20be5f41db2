#!/usr/bin/env python
"""How sparse the backward of one BinW-SLT search step is, per layer and per surrogate.

One search step (forward, cross-entropy, backward; no optimizer update) of
``binslt.models.build(arch, 'binwslt', ...)`` on random images, once per surrogate, from the same
initial weights, scores and batch. The backward ops of the fused conv/linear + LIF layers are
wrapped so that each layer's backward also records, from the same tensors:

* ``gs``: dL/dS, the gradient reaching the layer's spikes (before the fused 2x2 pool's routing
  for the pooled layers: after ``spike_pool2_bwd``);
* ``gx``: dL/dX, the gradient of the LIF input X = BN(Z) (+ residual); the surrogate derivative
  decides its zeros;
* ``gz``: dL/dZ, the gradient of the conv output Z that the input- and weight-gradient convs
  consume; with BN in training mode it is ``k (gx - mean(gx) - xhat mean(gx xhat))`` per channel,
  so its zeros are only where a whole channel's gx is zero.

``gx`` and ``gz`` are recomputed with ``binslt::bn_lif_bwd`` (need_grad_current=True) on
Z = counts * alpha, the layer's own current; the step's own outputs are unchanged. Each column is
the fraction of nonzero entries (``dead_ch``: the fraction of channels whose gx is zero
everywhere). The first layer (real input, a ``bn_lif_bwd`` layer) is recorded the same way.

Example (2 threads, as the project's CPU measurements)::

    OMP_NUM_THREADS=2 python benchmarks/grad_sparsity.py --arch vgg11 --batch 32 --timesteps 4 \
        --csv benchmarks/results/grad_sparsity_cpu-amd-epyc_vgg11.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import machine_info, print_table, write_csv  # noqa: E402

import binslt  # noqa: E402
from binslt.ops import autograd as _autograd  # noqa: E402
from binslt.ops.schemas import DEFAULT_SURROGATE_ALPHA, SURROGATES  # noqa: E402

COLUMNS = ["surrogate", "alpha", "layer", "op", "shape", "gs_nonzero", "gx_nonzero",
           "gz_nonzero", "dead_ch"]


def _frac(t: torch.Tensor) -> float:
    return float((t != 0).sum()) / max(1, t.numel())


class _Recorder:
    """Wraps the backward ops of ``binslt.ops.autograd`` for one step; ``rows`` in backward
    order (last layer first)."""

    def __init__(self):
        self.rows: list[dict] = []

    def _record(self, op, g, z, scale, shift, mean, var, res, cfg):
        g_z, g_cur, _, _ = torch.ops.binslt.bn_lif_bwd(
            g, z, scale, shift, mean, var, res, *cfg, True)
        per_ch = g_cur.transpose(0, 2).reshape(g_cur.shape[2], -1)
        self.rows.append(dict(op=op, shape="x".join(map(str, g.shape)), gs_nonzero=_frac(g),
                              gx_nonzero=_frac(g_cur), gz_nonzero=_frac(g_z),
                              dead_ch=float((per_ch == 0).all(1).float().mean())))

    def _conv(self, op, g, rest):
        counts, alpha, scale, shift, mean, var, res = (rest[0], *rest[4:10])
        cfg = rest[13:22]  # bn_train, bn_eps, tau, decay_input, v_th, v_reset, detach, sur, a
        z = counts.float().view(g.shape) * alpha.view(1, 1, -1, *([1] * (g.dim() - 3)))
        self._record(op, g, z, scale, shift, mean, var, res, cfg)

    def __enter__(self):
        self._op = _autograd._backward_op
        self._pool2 = torch.ops.binslt.bconv_lif_bwd_pool2

        def backward_op(name, ctx, *args):
            if name == "bconv_lif_bwd":
                self._conv(name, args[0], args[1:])
            elif name == "bn_lif_bwd":
                g, z, scale, shift, mean, var, res = args[:7]
                self._record(name, g, z, scale, shift, mean, var, res, args[7:16])
            return self._op(name, ctx, *args)

        def pool2(g_pooled, pool_bits, *rest):
            counts = rest[0]  # [T, N, Co, Ho, Wo]
            g = torch.ops.binslt.spike_pool2_bwd(pool_bits, g_pooled.flatten(0, 1).contiguous(),
                                                 counts.shape[2]).view(counts.shape)
            self._conv("bconv_lif_bwd_pool2", g, rest)
            return self._pool2(g_pooled, pool_bits, *rest)

        _autograd._backward_op = backward_op
        torch.ops.binslt.bconv_lif_bwd_pool2 = pool2
        return self

    def __exit__(self, *exc):
        _autograd._backward_op = self._op
        torch.ops.binslt.bconv_lif_bwd_pool2 = self._pool2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vgg11")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--size", type=int, default=32, help="image side (3 channels)")
    ap.add_argument("--surrogates", default="atan,rect,piecewise_quadratic",
                    help="comma-separated names; each with SpikingJelly's default alpha")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "torch"],
                    help="the layers' backend (CPU tensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--csv", default=None, help="write the rows to this CSV file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [s for s in args.surrogates.split(",") if s]
    bad = [s for s in names if s not in SURROGATES]
    if bad:
        print(f"grad_sparsity: unknown surrogate(s) {bad}; choose from {tuple(SURROGATES)}",
              file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    rows, state = [], None
    for name in names:
        torch.manual_seed(args.seed)
        net = binslt.models.build(args.arch, "binwslt", num_classes=10, in_channels=3,
                                  input_size=args.size, timesteps=args.timesteps,
                                  surrogate=name, surrogate_alpha=DEFAULT_SURROGATE_ALPHA[name],
                                  backend=args.backend)
        if state is None:
            state = net.state_dict()
        net.load_state_dict(state)  # the same initial weights and scores for every surrogate
        net.train()
        t0 = time.perf_counter()
        with _Recorder() as rec:
            loss = F.cross_entropy(net(x), y)
            loss.backward()
        dt = time.perf_counter() - t0
        n = len(rec.rows)
        for i, r in enumerate(reversed(rec.rows)):  # forward order
            rows.append(dict(surrogate=name, alpha=DEFAULT_SURROGATE_ALPHA[name], layer=i,
                             **{k: (f"{v:.4f}" if isinstance(v, float) else v)
                                for k, v in r.items()}))
        print(f"{name}: loss {loss.item():.4f}, {n} recorded layers, step with recording "
              f"{dt:.1f} s", flush=True)
    print_table(rows, COLUMNS)
    if args.csv:
        meta = machine_info(torch.device("cpu"))
        meta.update(command="python " + " ".join(sys.argv),
                    setup=f"{args.arch} binwslt N={args.batch} T={args.timesteps} "
                          f"{args.size}x{args.size}x3 random images, one step from the same "
                          "initial weights/scores/batch per surrogate; models.build's neuron "
                          "defaults (decay 0.99, decay_input=False, hard reset 0, "
                          "detach_reset=True, BN in training mode)")
        write_csv(Path(args.csv), rows, COLUMNS, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
