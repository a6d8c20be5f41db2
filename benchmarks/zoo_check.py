"""SpikingJelly's model zoo through binslt: convert, search, fire, save the ticket, load it.

For every model of ``spikingjelly.activation_based.model`` (each with ``neuron.LIFNode`` and
with ``neuron.IFNode``, step mode 'm', CIFAR-shaped input ``[T, N, 3, 32, 32]``):

0. the SpikingJelly model is calibrated to fire on the example batch
   (``zoo_models.calibrate_firing``: BN shifts or dense-layer scales in front of the neurons that
   would stay silent, SEW ``AND`` branches driven to a high rate; the ``calibrated`` column counts
   the changed layers) before conversion, so that the converted and the unconverted model start
   from the same parameters; see benchmarks/zoo_models.py for why each family needs it;
1. ``binslt.convert(net, prune_rate=0.5, example_input=...)`` (strict: a failed example run is
   an error);
2. one search step in training mode (dropouts active): SGD on the parameters that require grad
   (the scores), cross-entropy of the logits averaged over T; the step must change the scores;
3. the firing check: a SpikingJelly ``monitor.OutputMonitor`` on the binslt spiking layers
   (``binslt.interop.sj_tools.SPIKING_LAYERS``) records that step; every converted spiking layer
   must emit at least one spike, so that a silent network cannot pass;
4. ``binslt.export_ticket`` of the stepped model, ``binslt.load_ticket(path, model=factory())``
   (the factory's model calibrated the same way) and the eval logits of both on a fresh batch:
   ``equal`` is bit equality.

The convolutional families run every depth: VGG-11/13/16/19 with and without BN, spiking
ResNet-18/34/50/101/152 and the wide ResNets, SEW ResNets with ADD, AND and IAND, MS-ResNet-18/34
and Max-ResNet-18 (the MS-ResNets with their own neuron settings, ``zoo_models.ms_neuron_kwargs``).
The VGGs' 4096-wide classifier (25088 inputs) is shrunk to 512 -> 64 -> 64 -> 10 layers of the
same types in the same places (``zoo_models.shrunk_vgg``, as tests/test_zoo.py builds them); the
BN-less VGGs' convs and linears are rescaled layer by layer (LSUV-style, output std 1.5 with sign
weights, ``zoo_models.scale_to_fire``) so that they fire at all (at the zoo's own initialisation
every layer stays below threshold on this input). The transformers and
the other architectures (Spikformer, QKFormer, Spike-driven Transformer, MaxFormer at CIFAR
size with LIF / IF; the PLIF CIFAR-10 net with LIF and with its own ``ParametricLIFNode``, which
binslt does not model) are converted as far as they go: the row says how many layers converted, what
stays (``left``: type and reason counts) and where a step failed (``error``).

Writes ``results/zoo_check_<device-slug>_<date>[_<tag>].csv`` (one row per model, appended as it
goes; the machine record first) with a tqdm progress bar. ``--quick``: the smallest depth of each
family only (what tests/test_zoo.py runs); ``--models`` (or ``--only``): model and/or family
names.

    python benchmarks/zoo_check.py --quick --threads 2
    python benchmarks/zoo_check.py --only sew_AND,ms_resnet --tag refire
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, CsvAppender, device_slug, machine_info  # noqa: E402
from zoo_models import (  # noqa: E402
    calibrate_firing,
    ms_neuron_kwargs,
    scale_to_fire,
    shrunk_vgg,
    vgg_scaled_layers,
)

COLUMNS = ["model", "family", "neuron", "params_m", "calibrated", "converted", "fused", "plain", "left",
           "kinds", "step", "scores_changed", "spiking_layers", "silent", "min_rate",
           "ticket_bytes", "equal", "max_abs_diff", "seconds", "error"]


def _sj():
    from spikingjelly.activation_based import functional, layer, model, neuron

    return functional, layer, model, neuron


# ---------------------------------------------------------------------------------------------
# The zoo: name -> (family, factory(neuron class) -> model)
# ---------------------------------------------------------------------------------------------


def _vgg(name: str) -> Callable:
    def make(n):
        m = shrunk_vgg(name, n)
        if not name.endswith("_bn"):
            scale_to_fire(m, vgg_scaled_layers(m))
        return m

    return make


def _resnet(name: str) -> Callable:
    def make(n):
        from spikingjelly.activation_based.model import spiking_resnet

        return getattr(spiking_resnet, name)(spiking_neuron=n, num_classes=10)

    return make


def _sew(name: str, cnf: str) -> Callable:
    def make(n):
        from spikingjelly.activation_based.model import sew_resnet

        return getattr(sew_resnet, name)(spiking_neuron=n, cnf=cnf, num_classes=10)

    return make


def _ms(name: str, timesteps: int) -> Callable:
    def make(n):
        from spikingjelly.activation_based.model import ms_resnet

        return getattr(ms_resnet, name)(T=timesteps, num_classes=10, spiking_neuron=n,
                                        **ms_neuron_kwargs(name, n))

    return make


def _other(name: str, timesteps: int) -> Callable:
    """The transformers at CIFAR size, and the PLIF CIFAR-10 net."""
    def make(n):
        from spikingjelly.activation_based.model import (
            maxformer,
            parametric_lif_net,
            qkformer,
            spike_driven_transformer,
            spikformer,
        )

        kw = dict(T=timesteps, num_classes=10, spiking_neuron=n)
        if name == "spikformer_cifar10":
            return spikformer.spikformer_cifar10(**kw)
        if name == "qkformer_10_384":
            return qkformer.qkformer_10_384(**kw)
        if name == "sdt_8_384":
            return spike_driven_transformer.sdt_8_384(**kw)
        if name == "maxformer_cifar":
            return maxformer.maxformer_cifar(**kw)
        if name == "plif_cifar10net":
            return parametric_lif_net.CIFAR10Net(channels=32, spiking_neuron=n)
        raise KeyError(name)

    return make


def zoo(timesteps: int) -> dict[str, tuple[str, Callable, bool]]:
    """name -> (family, factory, smallest depth of its family)."""
    out: dict[str, tuple[str, Callable, bool]] = {}
    for bn in ("_bn", ""):
        for d in (11, 13, 16, 19):
            out[f"spiking_vgg{d}{bn}"] = (f"vgg{bn}", _vgg(f"spiking_vgg{d}{bn}"), d == 11)
    for d in (18, 34, 50, 101, 152):
        out[f"spiking_resnet{d}"] = ("spiking_resnet", _resnet(f"spiking_resnet{d}"), d == 18)
    for d in ("50_2", "101_2"):
        out[f"spiking_wide_resnet{d}"] = ("spiking_wide_resnet",
                                          _resnet(f"spiking_wide_resnet{d}"), d == "50_2")
    for cnf in ("ADD", "AND", "IAND"):
        for d in (18, 34, 50, 101, 152):
            out[f"sew_resnet{d}_{cnf}"] = (f"sew_{cnf}", _sew(f"sew_resnet{d}", cnf), d == 18)
    out["ms_resnet18"] = ("ms_resnet", _ms("ms_resnet18", timesteps), True)
    out["ms_resnet34"] = ("ms_resnet", _ms("ms_resnet34", timesteps), False)
    out["max_resnet18"] = ("max_resnet", _ms("max_resnet18", timesteps), True)
    for name in ("spikformer_cifar10", "qkformer_10_384", "sdt_8_384", "maxformer_cifar",
                 "plif_cifar10net"):
        out[name] = ("other", _other(name, timesteps), True)
    return out


#: the neuron classes by --neurons name; 'plif' (ParametricLIFNode, a learnt tau: a neuron
#: binslt does not model) runs on the PLIF net only
NEURON_CLASSES = {"lif": "LIFNode", "if": "IFNode", "plif": "ParametricLIFNode"}


def build(factory: Callable, nkind: str, seed: int = 0,
          x: torch.Tensor | None = None) -> tuple[nn.Module, list[str]]:
    """The SpikingJelly model in step mode 'm' and, given the example batch ``x``, calibrated to
    fire on it (``zoo_models.calibrate_firing``; the list of changes)."""
    functional, _, _, neuron = _sj()
    torch.manual_seed(seed)
    m = factory(getattr(neuron, NEURON_CLASSES[nkind]))
    functional.set_step_mode(m, "m")
    changes = calibrate_firing(m, x) if x is not None else []
    return m, changes


# ---------------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------------


def _logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional, _, _, _ = _sj()
    functional.reset_net(net)
    with torch.no_grad():
        y = net(x)
    functional.reset_net(net)
    return y.mean(0) if y.dim() == 3 else y


def _search_step(conv: nn.Module, x: torch.Tensor, row: dict) -> None:
    """One SGD step on the trainable parameters, the spiking layers monitored; fills the step,
    score and firing columns."""
    functional, _, _, _ = _sj()
    from spikingjelly.activation_based import monitor

    from binslt.interop.sj_tools import SPIKING_LAYERS
    from binslt.nn.layers import _MaskedSignWeight

    conv.train()
    params = [p for p in conv.parameters() if p.requires_grad]
    scores = {id(m.scores): m.scores.detach().clone() for m in conv.modules()
              if isinstance(m, _MaskedSignWeight)}
    opt = torch.optim.SGD(params, lr=0.5)
    mon = monitor.OutputMonitor(conv, SPIKING_LAYERS)
    try:
        functional.reset_net(conv)
        y = conv(x)
        y = y.mean(0) if y.dim() == 3 else y
        target = torch.arange(y.shape[0]) % y.shape[-1]
        loss = nn.functional.cross_entropy(y, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        functional.reset_net(conv)
        rates = {name: float(s.detach().float().mean()) for name, s in zip(mon.monitored_layers,
                                                                   mon.records)}
    finally:
        mon.remove_hooks()
    row["step"] = "ok" if torch.isfinite(loss).item() else f"loss {loss.item()}"
    row["scores_changed"] = sum(
        not torch.equal(m.scores.detach(), scores[id(m.scores)]) for m in conv.modules()
        if isinstance(m, _MaskedSignWeight) and m.scores.requires_grad)
    row["spiking_layers"] = len(rates)
    row["silent"] = " ".join(n for n, r in rates.items() if r == 0.0)
    row["min_rate"] = min(rates.values()) if rates else ""


def check_model(name: str, factory: Callable, nkind: str, *, timesteps: int = 2,
                batch: int = 8, ticket_dir: str | None = None) -> dict:
    """The row of one model (see the module docstring); exceptions go to ``error``."""
    import binslt

    t0 = time.perf_counter()
    row: dict = {"model": name, "neuron": nkind}
    stage = "build"
    try:
        g = torch.Generator().manual_seed(1)
        x = torch.rand(timesteps, batch, 3, 32, 32, generator=g)
        net, changes = build(factory, nkind, x=x)
        row["calibrated"] = len(changes)
        row["params_m"] = sum(p.numel() for p in net.parameters()) / 1e6
        stage = "convert"
        conv, report = binslt.convert(net, prune_rate=0.5, example_input=x[:, :1])
        del net
        new = Counter(c["new"] for c in report.converted)
        row["converted"] = len(report.converted)
        row["fused"] = new["BinSpikeConv2d"] + new["BinSpikeLinear"]
        row["plain"] = new["BinConv2d"] + new["BinLinear"]
        left = Counter(f"{s['type']}: {s['reason'].split(';')[0][:60]}" for s in report.skipped)
        row["left"] = " | ".join(f"{n}x {k}" for k, n in left.most_common())
        row["kinds"] = " ".join(f"{k}={n}" for k, n in sorted(Counter(
            c["input"] for c in report.converted if c.get("input")).items()))
        stage = "search step"
        _search_step(conv, x, row)
        stage = "export"
        with tempfile.TemporaryDirectory(dir=ticket_dir) as d:
            path = os.path.join(d, "ticket.safetensors")
            info = binslt.export_ticket(conv, path)
            row["ticket_bytes"] = info["ticket_bytes"]
            stage = "load"
            loaded = binslt.load_ticket(path, model=build(factory, nkind, seed=123, x=x)[0])
        stage = "eval"
        xe = torch.rand(timesteps, batch, 3, 32, 32, generator=g)
        a, b = _logits(conv.eval(), xe), _logits(loaded, xe)
        row["equal"] = bool(torch.equal(a, b))
        row["max_abs_diff"] = float((a - b).abs().max())
        row["error"] = ""
    except Exception as exc:  # noqa: BLE001 -- the row records where and why a model stops
        msg = (str(exc).strip().splitlines() or [""])[0][:300]
        row["error"] = f"{stage}: {type(exc).__name__}: {msg}"
        if os.environ.get("ZOO_CHECK_DEBUG"):
            traceback.print_exc()
    row["seconds"] = time.perf_counter() - t0
    gc.collect()
    return row


def passed(row: dict) -> bool:
    """Whether a row passes every check (converted, stepped, all layers fired, equal logits)."""
    return (row.get("error") == "" and row.get("step") == "ok" and not row.get("silent")
            and row.get("scores_changed", 0) > 0 and row.get("equal") is True)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _cases(args, table: dict, p: argparse.ArgumentParser) -> list[tuple[str, str]]:
    names = [n for n, (_, _, small) in table.items() if small or not args.quick]
    if args.models:
        want = set(args.models.split(","))
        families = {fam for fam, _, _ in table.values()}
        unknown = want - set(table) - families
        if unknown:
            p.error(f"unknown --models {sorted(unknown)}; known models: {', '.join(table)}; "
                    f"families: {', '.join(sorted(families))}")
        names = [n for n in names if n in want or table[n][0] in want]
    if args.skip_other:
        names = [n for n in names if table[n][0] != "other"]
    cases = []
    for n in names:
        kinds = args.neurons.split(",") + (["plif"] if n == "plif_cifar10net" else [])
        cases += [(n, k) for k in kinds]
    # the smallest depths of every family first, then the deeper ones (a stopped run keeps
    # one row per family)
    return sorted(cases, key=lambda c: not table[c[0]][2])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the smallest depth of each family")
    p.add_argument("--models", "--only", default="",
                   help="comma-separated model and/or family names, e.g. sew_AND,ms_resnet34 "
                        "(default: all)")
    p.add_argument("--neurons", default="lif,if", help="lif,if (default both)")
    p.add_argument("--skip-other", action="store_true",
                   help="leave out the transformers and the other architectures")
    p.add_argument("-T", "--timesteps", type=int, default=2)
    p.add_argument("-N", "--batch", type=int, default=8,
                   help="batch size (default 8: with fewer, batch statistics over the 1x1 maps of "
                        "the deepest ResNet stages can keep every LIF of a layer below threshold "
                        "in the step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS), help="results folder (default %(default)s)")
    p.add_argument("--tag", default="", help="suffix for the CSV name")
    args = p.parse_args(argv)
    if args.timesteps < 1 or args.batch < 1 or args.threads < 1:
        p.error("-T, -N and --threads must be positive")
    bad = set(args.neurons.split(",")) - {"lif", "if"}
    if bad:
        p.error(f"--neurons takes lif and/or if, got {sorted(bad)}")
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    table = zoo(args.timesteps)
    cases = _cases(args, table, p)
    date = datetime.date.today().isoformat()
    stem = f"zoo_check_{device_slug(device)}_{date}" + (f"_{args.tag}" if args.tag else "")
    path = Path(args.out) / f"{stem}.csv"
    meta = {**machine_info(device), "T": str(args.timesteps), "N": str(args.batch),
            "input": "[T, N, 3, 32, 32] uniform [0, 1)", "prune_rate": "0.5",
            "command": " ".join(["zoo_check.py", *(argv if argv is not None else sys.argv[1:])])}
    out = CsvAppender(path, COLUMNS, meta)
    rows = []
    bar = tqdm(cases, unit="model", dynamic_ncols=True)
    for name, nkind in bar:
        bar.set_description(f"{name} {nkind}")
        family, factory, _ = table[name]
        row = {"family": family, **check_model(name, factory, nkind, timesteps=args.timesteps,
                                               batch=args.batch)}
        rows.append(row)
        out.add([row])
        bar.write(f"{name:28s} {nkind:4s} {'pass' if passed(row) else 'FAIL'} "
                  f"{row['seconds']:.0f}s {row.get('error') or row.get('silent') or ''}")
    out.finish(rows, meta)
    print(f"wrote {path}: {sum(map(passed, rows))}/{len(rows)} pass")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
