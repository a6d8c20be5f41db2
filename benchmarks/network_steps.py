"""The networks and steps ``benchmarks/network.py`` times: the binslt candidates and the
SpikingJelly anchors of each architecture, the CIFAR-shaped batch, the optimizer and the train
step, the BatchNorm calibration and the input spike rates of every spike-input layer."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


#: SpikingJelly's own zoo models with the paper's neuron, each converted by binslt.convert (the
#: binslt candidates) against the same model unconverted (the sj-* anchors; no sj-biprop anchor):
#: arch -> (benchmarks module, model factory, the module types sj-memopt checkpoints).
#: sj-resnet18: spiking_resnet18; sj-vgg11-bn: spiking_vgg11_bn, classifier shrunk to 512 -> 64
#: -> 64 -> 10 (zoo_models.shrunk_vgg, as tests/test_zoo.py and zoo_check.py build it).
SJ_ARCHS = {"sj-resnet18": ("sj_models", "sj_resnet18", "sj_resnet18_block_types"),
            "sj-vgg11-bn": ("zoo_models", "sj_vgg11_bn", "sj_vgg_layer_types")}
LR, MOMENTUM = 0.1, 0.9


def build_binslt(arch: str, args, backend: str, device):
    import torch

    import binslt.nn.models as models

    torch.manual_seed(args.seed)
    if arch in SJ_ARCHS:
        import importlib

        from binslt.interop.convert import build_user_model

        module, factory, _ = SJ_ARCHS[arch]
        path = Path(importlib.import_module(module).__file__).resolve()
        net = build_user_model(f"{path}:{factory}",
                               num_classes=10, input_shape="3,32,32",
                               timesteps=args.timesteps, prune_rate=args.prune_rate,
                               backend=backend)
        return models.set_mode(net, "search").to(device)
    from binslt.ops.schemas import DEFAULT_SURROGATE_ALPHA

    sg = getattr(args, "surrogate", "atan")
    net = models.build(arch, "binwslt", num_classes=10, in_channels=3, input_size=32,
                       timesteps=args.timesteps, prune_rate=args.prune_rate, decay=0.99,
                       decay_input=False, v_threshold=1.0, v_reset=0.0, detach_reset=True,
                       surrogate=sg, surrogate_alpha=DEFAULT_SURROGATE_ALPHA[sg], bn=True,
                       bn_affine=False, backend=backend)
    return models.set_mode(net, "search").to(device)


def sj_arch_part(arch: str, i: int):
    """Of a SpikingJelly zoo arch (:data:`SJ_ARCHS`): the model factory (``i=1``) or the
    memopt module-types function (``i=2``)."""
    import importlib

    return getattr(importlib.import_module(SJ_ARCHS[arch][0]), SJ_ARCHS[arch][i])


def build_anchor(arch: str, args, masked: bool, device, like=None):
    """SpikingJelly's ``arch``; checked against binslt's layout (``like``: copy its init)."""
    import torch
    from sj_models import SJImages, build_sj, check_same_layout, copy_init

    torch.manual_seed(args.seed)
    if arch in SJ_ARCHS:
        if masked:
            raise ValueError(f"{arch} has no sj-biprop anchor")
        return SJImages(sj_arch_part(arch, 1)(10), args.timesteps).to(device)
    net = build_sj(arch, masked=masked, timesteps=args.timesteps, prune_rate=args.prune_rate,
                   surrogate_name=getattr(args, "surrogate", "atan"))
    if like is not None:
        check_same_layout(like, net, arch)
        if masked:
            copy_init(like, net)
    return net.to(device)


def make_batch(args, device):
    import torch

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    return x.to(device), y.to(device)


def make_optimizer(model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"{type(model).__name__} has no trainable parameters")
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def make_train_step(model, opt, x, y):
    """One step: forward, loss, backward, optimiser step (binslt: the scores)."""
    import torch.nn.functional as F

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def checked_step(name: str, model, step) -> float:
    """Run ``step`` once; the fraction of trainable entries it changed (must be > 0)."""

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss = float(step().detach())
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
    total = sum(b.numel() for b in before)
    if not math.isfinite(loss) or changed == 0:
        raise RuntimeError(f"{name}: one training step left its trainable parameters unchanged "
                           f"(loss {loss}); refusing to time a broken step")
    return changed / total


def calibrate_bn(model, x) -> None:
    """BatchNorm running statistics = this batch's own, so eval mode sees training's activity.

    Every BN is reset and given ``momentum=None`` (a cumulative average) for one training-mode
    forward, then its momentum is restored. (Two forwards at momentum 0.1 kept 81 % of the initial
    unit variance: VGG-11's normalised currents were too small and every layer from the fourth on
    fell silent, so the eval timed a network without spikes.)
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None
    model.train()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for b, m in zip(bns, saved):
            b.momentum = m
    model.eval()


def input_rates(model, x) -> dict[str, float]:
    """Fraction of nonzero inputs of each binslt layer whose input is spikes (0./1. only)."""
    import torch

    from binslt.nn.layers import _MaskedSignWeight

    rates: dict[str, float] = {}

    def hook(name):
        def fn(mod, inp, out):
            v = inp[0]
            if bool(((v == 0) | (v == 1)).all()):
                rates[name] = float((v != 0).float().mean())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, _MaskedSignWeight)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return rates


def rate_summary(rates: dict[str, float]) -> str:
    if not rates:
        return "no spike-input layers"
    v = list(rates.values())
    silent = [n for n, r in rates.items() if r == 0.0]
    text = (f"spike-input rate of {len(v)} layers: min {min(v):.3f}, mean {sum(v) / len(v):.3f}, "
            f"max {max(v):.3f}")
    return text + (f"; SILENT: {', '.join(silent)}" if silent else "")
