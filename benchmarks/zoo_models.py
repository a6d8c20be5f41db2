"""SpikingJelly zoo models as benchmarks/zoo_check.py, benchmarks/network.py and tests/test_zoo.py
build them: the VGGs with a CIFAR-sized classifier, and the firing calibration of the initial
state.

* :func:`shrunk_vgg`: ``spiking_vgg*`` with the 4096-wide classifier (25088 inputs after a 7x7
  average pool, 100 M weights) swapped for 512 -> 64 -> 64 -> 10 layers of the same types in the
  same places (1x1 average pool); the convolutional part is the zoo's.
* :func:`sj_vgg11_bn`: benchmarks/network.py's ``sj-vgg11-bn`` (the paper's neuron).
* :func:`scale_to_fire`: LSUV-style weight scales for the BN-less VGGs.
* :func:`calibrate_firing`: one training-mode forward over the example batch that raises the BN
  shift (beta) or the weight scale in front of every neuron whose input stays below its threshold,
  and drives the neurons whose spikes a SEW ``AND`` connection multiplies into the identity path
  to a high rate. It changes the SpikingJelly model before conversion, so the converted model and
  the unconverted one start from the same parameters.

Why the zoo needs it on a CIFAR-shaped batch of uniform noise (T=2, N=8), measured with a
``monitor.OutputMonitor`` on the unconverted SpikingJelly models (binslt's converted layers are
silent exactly where the SpikingJelly model carrying binslt's sign weights is):

* SEW ResNet with ``cnf='AND'``: a block's output is ``out * identity``; at the zoo's
  initialisation ``out`` fires at a few per cent (LIF) to ~16 % (IF), so the identity path's rate
  shrinks geometrically with the blocks until a whole stage receives no spike; its convs then see
  zeros, BN maps a constant to beta = 0, and every later layer is silent. The AND block is an
  identity mapping only where ``out`` fires (Fang et al. 2021, SEW ResNet, section 3.2): the
  calibration sets the BN shift before the multiplied neurons (the residual branch's last neuron
  and ``downsample_sn``) so that they fire at ``and_rate``.
* Linear layers without BN before a neuron (the PLIF CIFAR-10 net's two dense layers, VGG's
  classifier): PyTorch's default init gives pre-activations far below threshold; the calibration
  scales weight and bias so that a ``floor`` fraction of the inputs reaches threshold.
* MS-ResNet: its blocks are built for its own neuron (tau = 4/3, v_threshold = 0.5, no input
  decay, Rect surrogate) with BN weights 0.5; passing ``spiking_neuron=LIFNode`` drops those
  settings (SpikingJelly then builds ``LIFNode()`` with its defaults, threshold 1 against an input
  of std 0.5, which is silent in the last stage). :func:`ms_neuron_kwargs` passes them back, with
  LIFNode and with IFNode (threshold 0.5, Rect surrogate); likewise Max-ResNet's (tau 2, detached
  reset).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

# benchmarks/ on the path: loaded by file (``binslt search --model benchmarks/zoo_models.py:...``,
# ``build_user_model``), this module still imports its neighbours
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: (model family, neuron kind) -> the neuron settings ``spikingjelly...model.ms_resnet`` builds
#: its blocks with when no ``spiking_neuron`` is given (``_MSBlock._make_lif``,
#: ``_MaxResNetBlock._make_lif``), the LIF-only ones left out for IFNode
MS_NEURON_KWARGS = {
    ("ms_resnet", "lif"): dict(tau=4.0 / 3.0, v_threshold=0.5, detach_reset=True,
                               decay_input=False),
    ("ms_resnet", "if"): dict(v_threshold=0.5, detach_reset=True),
    ("max_resnet", "lif"): dict(tau=2.0, detach_reset=True),
    ("max_resnet", "if"): dict(detach_reset=True),
}


def _sj():
    from spikingjelly.activation_based import functional, layer, neuron

    return functional, layer, neuron


def ms_neuron_kwargs(name: str, spiking_neuron) -> dict:
    """The own neuron settings of ``ms_resnet.<name>`` (an MS-ResNet: with its Rect surrogate, or
    a Max-ResNet) for the neuron class ``spiking_neuron`` (``IFNode``: the IF ones, any other:
    the LIF ones)."""
    from spikingjelly.activation_based import surrogate

    family = "max_resnet" if name.startswith("max_") else "ms_resnet"
    kind = "if" if spiking_neuron.__name__ == "IFNode" else "lif"
    out = dict(MS_NEURON_KWARGS[family, kind])
    if family == "ms_resnet":
        out["surrogate_function"] = surrogate.Rect(alpha=2.0)
    return out


def shrunk_vgg(name: str, spiking_neuron, num_classes: int = 10, **neuron_kwargs) -> nn.Module:
    """SpikingJelly's ``spiking_vgg.<name>`` with the classifier shrunk to 512 -> 64 -> 64 ->
    ``num_classes`` (layer types and places kept, dense layers initialised N(0, 0.3): no BN is
    in front of their neurons), the zoo's own initialisation of every other layer, BN running
    statistics reset. Built on the meta device first, so the 100 M-weight classifier is never
    allocated."""
    _, layer, _ = _sj()
    from spikingjelly.activation_based.model import spiking_vgg

    with torch.device("meta"):
        m = getattr(spiking_vgg, name)(spiking_neuron=spiking_neuron, num_classes=num_classes,
                                       **neuron_kwargs)
        m.avgpool = layer.AdaptiveAvgPool2d((1, 1))
        m.classifier[0] = layer.Linear(512, 64)
        m.classifier[3] = layer.Linear(64, 64)
        m.classifier[6] = layer.Linear(64, num_classes)
    m = m.to_empty(device="cpu")
    m._initialize_weights()
    with torch.no_grad():
        for i in (0, 3):
            m.classifier[i].weight.normal_(0, 0.3)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):  # to_empty left them unset
                mod.reset_running_stats()
    return m


def sj_vgg11_bn(num_classes: int = 10) -> nn.Module:
    """network.py's ``sj-vgg11-bn``: :func:`shrunk_vgg` ``spiking_vgg11_bn`` with the paper's
    neuron, the settings of ``sj_models.sj_resnet18`` (LIFNode tau=100, decay_input=False, hard
    reset 0, ATan(2), detach_reset), step mode 'm'."""
    from common import import_spikingjelly
    from sj_models import PAPER_TAU

    import_spikingjelly()
    from spikingjelly.activation_based import functional, neuron, surrogate

    net = shrunk_vgg("spiking_vgg11_bn", neuron.LIFNode, num_classes, tau=PAPER_TAU,
                     decay_input=False, v_threshold=1.0, v_reset=0.0, detach_reset=True,
                     surrogate_function=surrogate.ATan())
    functional.set_step_mode(net, "m")
    return net


def sj_vgg_layer_types() -> tuple:
    """The SpikingJelly VGG's modules that sj-memopt checkpoints: its convs and linears (the VGG
    has no blocks; a conv's or linear's saved input is spikes, which memopt compresses, except
    the first conv's images)."""
    from spikingjelly.activation_based import layer

    return (layer.Conv2d, layer.Linear)


def vgg_scaled_layers(m: nn.Module) -> list:
    """The layers :func:`scale_to_fire` rescales in a BN-less VGG: every conv and the two hidden
    dense layers."""
    return [c for c in m.features if isinstance(c, nn.Conv2d)] + [m.classifier[0],
                                                                  m.classifier[3]]


@torch.no_grad()
def scale_to_fire(m: nn.Module, layers: list, target: float = 1.5) -> None:
    """Layer by layer (LSUV-style), scales each conv / linear of ``layers`` so that its output
    has standard deviation ``target`` on a fixed CIFAR-shaped batch, measured with the weights
    as a search at prune rate 0.5 starts them (mean |w| * sign(w) on a random half): without
    BN, the zoo's own initialisation leaves SpikingJelly's VGGs silent (pre-activations ~0.2
    against a threshold of 1)."""
    functional, _, _ = _sj()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 8, 3, 32, 32, generator=g)
    orig = [lin.weight.detach().clone() for lin in layers]
    signs = [w.abs().mean() * torch.sign(w) * (torch.rand(w.shape, generator=g) < 0.5)
             for w in orig]
    scale = [1.0] * len(layers)
    functional.set_step_mode(m, "m")
    for i, lin in enumerate(layers):
        for j, other in enumerate(layers):
            other.weight.copy_(scale[j] * signs[j])
        seen: list = []
        h = lin.register_forward_hook(lambda mod, a, o, seen=seen: seen.append(float(o.std())))
        functional.reset_net(m)
        m(x)
        h.remove()
        if seen and seen[0] > 0:
            scale[i] = target / seen[0]
    for lin, w, c in zip(layers, orig, scale):
        lin.weight.copy_(c * w)
        if lin.bias is not None:
            lin.bias.mul_(c)
    functional.reset_net(m)


def _input_threshold(n: nn.Module) -> float:
    """The input a neuron at rest needs to spike in one step: v_threshold, times tau for a LIF
    that decays its input (v = v + (x - v) / tau, reset 0)."""
    vth = float(n.v_threshold)
    if not getattr(n, "decay_input", False):
        return vth
    if hasattr(n, "tau"):
        return vth * float(n.tau)
    return vth / float(torch.sigmoid(n.w.detach()))  # ParametricLIFNode: tau = 1 / sigmoid(w)


def _and_neurons(m: nn.Module) -> set:
    """The neurons whose spikes a SEW ``AND`` block multiplies: the residual branch's last neuron
    (``sn2`` / ``sn3``) and ``downsample_sn``."""
    out = set()
    for blk in m.modules():
        if getattr(blk, "cnf", None) != "AND":
            continue
        last = "sn3" if hasattr(blk, "sn3") else "sn2"
        out.add(id(getattr(blk, last)))
        if getattr(blk, "downsample_sn", None) is not None:
            out.add(id(blk.downsample_sn))
    return out


def _forward_with(m: nn.Module, x: torch.Tensor, hooks: list) -> None:
    """One forward of ``m`` over ``x`` from a reset state (dropout masks seeded), then the
    ``hooks`` removed and the state reset."""
    functional, _, _ = _sj()
    try:
        functional.reset_net(m)
        torch.manual_seed(0)
        m(x)
    finally:
        for h in hooks:
            h.remove()
        functional.reset_net(m)


@torch.no_grad()
def calibrate_firing(m: nn.Module, x: torch.Tensor, floor: float = 0.01,
                     dense_floor: float = 0.1, and_rate: float = 0.9) -> list[str]:
    """Raise every neuron of ``m`` (step mode 'm') that a forward over ``x`` in training mode
    would leave (nearly) silent, in forward order: a neuron fed directly by a BN gets its BN's
    beta raised, so that a ``floor`` fraction of its inputs reaches the neuron's one-step
    threshold (v_threshold, times tau for an input-decaying LIF); one fed directly by a conv /
    linear without BN gets that layer's weight and bias scaled so that a ``dense_floor``
    fraction does (a wider margin: binslt's sign weights at prune rate 0.5 change the scale of
    such a layer's output, while a BN normalises it away). Neurons already at or above their
    floor are left alone. The neurons multiplied in a SEW ``AND`` block are raised to ``and_rate`` the same way
    (see the module doc). Each change applies during the forward, so later layers are calibrated
    on the calibrated activity. Returns one line per change ('path: what')."""
    _, _, neuron = _sj()
    was_training = m.training
    bn_state = {k: v.clone() for k, v in m.state_dict().items()
                if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    m.train()
    names = {id(mod): p for p, mod in m.named_modules()}
    feeds = (nn.BatchNorm2d, nn.BatchNorm1d, nn.Conv2d, nn.Linear)
    # pass 1: which module's output is each neuron's input (the same tensor object)
    produced: dict = {}
    feeder: dict = {}

    def record(mod, a, o):
        produced[id(o)] = (mod, o)  # the tensor kept alive, so that its id stays unique

    def source(n, a):
        feeder.setdefault(id(n), produced.get(id(a[0]), (None,))[0])

    _forward_with(m, x, [mod.register_forward_hook(record) for mod in m.modules()
                         if isinstance(mod, feeds)]
                  + [n.register_forward_pre_hook(source) for n in m.modules()
                     if isinstance(n, neuron.BaseNode)])
    produced.clear()
    targets = {}
    high = _and_neurons(m)
    for n in m.modules():
        src = feeder.get(id(n))
        if isinstance(n, neuron.BaseNode) and src is not None and id(src) not in targets:
            dense = isinstance(src, (nn.Conv2d, nn.Linear))
            targets[id(src)] = (n, and_rate if id(n) in high else dense_floor if dense else floor)
    # pass 2: change each feeding module as its output goes by
    changes: list[str] = []

    def adjust(mod, a, o):
        n, rate = targets[id(mod)]
        thr = _input_threshold(n)
        flat = o.detach().flatten().float()
        k = max(1, min(flat.numel(), round((1.0 - rate) * flat.numel())))
        q = float(flat.kthvalue(k).values)
        if q >= thr:
            return None
        if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)) and mod.affine:
            shift = thr - q
            mod.bias.add_(shift)
            changes.append(f"{names[id(mod)]}: beta += {shift:.3g} (rate {rate:g})")
            return o + shift
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and q > 0:
            c = thr / q
            mod.weight.mul_(c)
            if mod.bias is not None:
                mod.bias.mul_(c)
            changes.append(f"{names[id(mod)]}: weight x {c:.3g} (rate {rate:g})")
            return o * c
        changes.append(f"{names[id(mod)]}: left below threshold (no BN shift or positive "
                       "output to scale)")
        return None

    _forward_with(m, x, [mod.register_forward_hook(adjust) for mod in m.modules()
                         if id(mod) in targets])
    # the calibration forwards do not count as training: BN running statistics as before
    m.load_state_dict(bn_state, strict=False)
    m.train(was_training)
    return changes
