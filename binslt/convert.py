"""Conversion of a user's SpikingJelly model into a BinW-SLT search model.

``convert(model, prune_rate=...)`` walks every ``nn.Sequential`` in the model (recursively) and
replaces each run

* ``Conv2d`` [+ ``BatchNorm2d``] + ``LIFNode``  ->  ``BinSpikeConv2d``
* ``Linear`` [+ ``BatchNorm1d``] + ``LIFNode``  ->  ``BinSpikeLinear``

where the conv / linear / BN may be SpikingJelly layers in step mode 'm', plain ``torch.nn``
layers, or ``torch.nn`` layers wrapped in a ``layer.SeqToANNContainer`` (SpikingJelly's idiom for
multi-step models), and the ``LIFNode`` is a plain ``neuron.LIFNode`` in step mode 'm'. The new
layer carries the neuron settings (tau, decay_input, v_threshold, v_reset, detach_reset, the ATan
or Sigmoid surrogate and its alpha), the original weights as the frozen ``w`` (search mode: fresh
scores are trained) and the BN's running statistics, affine parameters, eps and momentum. It takes
the place of the first replaced module; the others become ``nn.Identity`` so that the remaining
module names (and state-dict keys) do not move.

Everything else is left alone, and the report says why: a conv with a bias, groups or dilation
other than 1, a non-square kernel / stride / padding, a non-zero padding mode, a ``LIFNode`` in
single-step mode (the caller steps it over T and it carries state between calls) or holding state
from an earlier call, a ``LIFNode`` that stores its membrane sequence, a surrogate other than
ATan / Sigmoid, layers outside an ``nn.Sequential`` (their execution order is unknown), and a
``Linear`` not followed by a neuron (typically the logits layer, which stays dense).

Input kind: the fused layers need to know whether their input is spikes ({0, 1}, the fast packed
path) or real values (images; ``input='real'``). With ``example_input`` the original model is run
once (eval mode, no grad, states reset) and each layer gets what it actually saw. Without it, the
first converted layer in module order gets ``'real'`` (direct encoding) and the others
``'spike'``; a spike layer that receives non-binary input raises a ValueError naming the fix.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _contract as C
from .layers import BinSpikeConv2d, BinSpikeLinear

__all__ = ["ConversionReport", "convert"]


@dataclass
class ConversionReport:
    """What ``convert`` did. ``converted``: dicts with the replaced module paths, the new layer's
    type and settings. ``skipped``: dicts ``{'path', 'type', 'reason'}`` for convs, linears and
    LIF neurons left alone."""

    converted: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s), left {len(self.skipped)} alone"]
        for c in self.converted:
            lines.append(f"  + {' + '.join(c['paths'])} -> {c['new']} (input={c['input']}, "
                         f"bn={c['bn']}, tau={c['tau']:g}, surrogate={c['surrogate']}"
                         f"({c['surrogate_alpha']:g}))")
        for s in self.skipped:
            lines.append(f"  - {s['path']} ({s['type']}): {s['reason']}")
        return "\n".join(lines)


def _sj():
    from spikingjelly.activation_based import layer, neuron, surrogate

    return layer, neuron, surrogate


def _is_seq2ann(m: nn.Module) -> bool:
    layer, _, _ = _sj()
    return isinstance(m, layer.SeqToANNContainer)


def _step_mode(m: nn.Module):
    return getattr(m, "step_mode", None)


def _kind(m: nn.Module) -> str:
    """'conv' / 'linear' / 'bn2d' / 'bn1d' / 'lif' / 'other' for the pattern matcher."""
    layer, neuron, _ = _sj()
    if type(m) in (nn.Conv2d, layer.Conv2d):
        return "conv"
    if type(m) in (nn.Linear, layer.Linear):
        return "linear"
    if type(m) in (nn.BatchNorm2d, layer.BatchNorm2d):
        return "bn2d"
    if type(m) in (nn.BatchNorm1d, layer.BatchNorm1d):
        return "bn1d"
    if isinstance(m, neuron.LIFNode):
        return "lif"
    return "other"


def _pair_square(v, name: str):
    """int from an int or a square pair; None (and a reason) otherwise."""
    if isinstance(v, str):
        return None, f"{name}={v!r} (string padding) is not supported; give explicit ints"
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            return None, f"non-square {name} {tuple(v)}"
        v = v[0]
    return int(v), ""


def _conv_problem(m: nn.Module) -> str:
    if m.bias is not None:
        return "has a bias (binslt layers have none; fold it into the BN or drop it)"
    if m.groups != 1:
        return f"groups={m.groups} (only groups=1 is supported)"
    if tuple(m.dilation) != (1, 1):
        return f"dilation={tuple(m.dilation)} (only 1 is supported)"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only 'zeros' is supported)"
    for name in ("kernel_size", "stride", "padding"):
        _, why = _pair_square(getattr(m, name), name)
        if why:
            return why
    return ""


def _lif_problem(m: nn.Module) -> str:
    _, neuron, surrogate = _sj()
    if type(m) is not neuron.LIFNode:
        return f"{type(m).__name__} is a LIFNode subclass with its own dynamics"
    if _step_mode(m) != "m":
        return ("LIFNode in single-step mode 's': the caller steps it over T and it carries "
                "state between calls (stateful use); binslt layers are multi-step")
    if getattr(m, "store_v_seq", False):
        return "store_v_seq=True: the model reads membrane potentials that binslt does not keep"
    if isinstance(getattr(m, "v", None), torch.Tensor):
        return ("holds membrane state from an earlier call (stateful use); call "
                "spikingjelly functional.reset_net(model) first if the calls are independent")
    sg = m.surrogate_function
    if type(sg) not in (surrogate.ATan, surrogate.Sigmoid):
        return f"surrogate {type(sg).__name__} is not supported (ATan or Sigmoid)"
    if not getattr(sg, "spiking", True):
        return "surrogate in non-spiking mode (spiking=False)"
    if not (float(m.tau) >= 1.0):
        return f"tau={m.tau} < 1"
    return ""


def _neuron_settings(m: nn.Module) -> dict:
    _, _, surrogate = _sj()
    sg = m.surrogate_function
    return dict(tau=float(m.tau), decay_input=bool(m.decay_input),
                v_threshold=float(m.v_threshold),
                v_reset=None if m.v_reset is None else float(m.v_reset),
                detach_reset=bool(m.detach_reset),
                surrogate="atan" if type(sg) is surrogate.ATan else "sigmoid",
                surrogate_alpha=float(sg.alpha))


@dataclass
class _Elem:
    """One module of a Sequential's stream; ``owner`` is its child index in the Sequential,
    ``inner`` whether it sits inside a SeqToANNContainer."""

    module: nn.Module
    owner: int
    inner: bool
    path: str


def _stream(seq: nn.Sequential, prefix: str) -> list[_Elem]:
    out = []
    for i, (name, child) in enumerate(seq.named_children()):
        p = f"{prefix}.{name}" if prefix else name
        if _is_seq2ann(child):
            for sub_name, sub in child.named_children():
                out.append(_Elem(sub, i, True, f"{p}.{sub_name}"))
        else:
            out.append(_Elem(child, i, False, p))
    return out


def _mode_problem(e: _Elem) -> str:
    """The multi-step convention: inside a SeqToANNContainer a module sees [T*N, ...] (single
    step); outside, SpikingJelly layers must be in step mode 'm'."""
    sm = _step_mode(e.module)
    if e.inner and sm == "m":
        return "step mode 'm' inside a SeqToANNContainer"
    if not e.inner and sm is not None and sm != "m":
        return (f"step mode {sm!r}: the model is stepped over T by the caller (stateful use); "
                "set step mode 'm' (functional.set_step_mode(model, 'm'))")
    return ""


def _match(stream: list[_Elem], i: int):
    """(elements, reason) of a conv/linear [+BN] + LIF run starting at stream[i]."""
    first = stream[i]
    kind = _kind(first.module)
    bn_kind = "bn2d" if kind == "conv" else "bn1d"
    run = [first]
    j = i + 1
    if j < len(stream) and _kind(stream[j].module) == bn_kind:
        run.append(stream[j])
        j += 1
    if j >= len(stream) or _kind(stream[j].module) != "lif":
        nxt = "the end of its Sequential" if j >= len(stream) else type(stream[j].module).__name__
        return None, f"not followed by a LIFNode (next: {nxt}); left dense"
    run.append(stream[j])
    # the run must cover whole children: a SeqToANNContainer is replaced entirely or not at all
    owners = {e.owner for e in run}
    for e in stream:
        if e.owner in owners and e not in run:
            return None, (f"shares a SeqToANNContainer with {type(e.module).__name__} "
                          f"({e.path}), which is not part of the pattern")
    for e in run:
        why = _mode_problem(e) if e is not run[-1] else ""
        if why:
            return None, f"{e.path}: {why}"
    if kind == "conv":
        why = _conv_problem(first.module)
    else:
        why = "has a bias (binslt layers have none)" if first.module.bias is not None else ""
    if not why:
        why = _lif_problem(run[-1].module)
        if why:
            why = f"its neuron {run[-1].path}: {why}"
    if not why and len(run) == 3:
        bn = run[1].module
        c = first.module.out_channels if kind == "conv" else first.module.out_features
        if bn.num_features != c:
            why = f"BatchNorm has {bn.num_features} features, the layer {c} outputs"
    return (run, "") if not why else (None, why)


def _new_layer(run: list[_Elem], prune_rate: float, input_kind: str, backend: str,
               per_channel_gain: bool) -> nn.Module:
    lin = run[0].module
    bn = run[1].module if len(run) == 3 else None
    lif = run[-1].module
    kw = dict(prune_rate=prune_rate, bn=bn is not None, input=input_kind, backend=backend,
              per_channel_gain=per_channel_gain, **_neuron_settings(lif))
    if bn is not None:
        kw.update(bn_affine=bn.affine, bn_eps=bn.eps,
                  bn_momentum=bn.momentum if bn.momentum is not None else 0.1)
    if _kind(lin) == "conv":
        k, _ = _pair_square(lin.kernel_size, "kernel_size")
        s, _ = _pair_square(lin.stride, "stride")
        p, _ = _pair_square(lin.padding, "padding")
        new = BinSpikeConv2d(lin.in_channels, lin.out_channels, k, s, p, **kw)
        bn_cls = nn.BatchNorm2d
    else:
        new = BinSpikeLinear(lin.in_features, lin.out_features, **kw)
        bn_cls = nn.BatchNorm1d
    w = lin.weight.detach()
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
    if bn is not None:
        # a plain torch BN with the same settings and state (momentum None = cumulative average)
        fresh = bn_cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                       track_running_stats=bn.track_running_stats).to(device=w.device,
                                                                      dtype=w.dtype)
        fresh.load_state_dict(bn.state_dict())
        fresh.train(bn.training)
        new.bn = fresh
    new.train(lin.training)
    return new


@torch.no_grad()
def _observe_inputs(model: nn.Module, example_input, modules: dict[int, nn.Module]) -> dict:
    """Run ``model`` once and record, per module id, whether every input it saw was binary."""
    from spikingjelly.activation_based import functional

    seen: dict[int, bool] = {}

    def pre(mod, args):
        x = args[0]
        binary = bool(((x == 0) | (x == 1)).all()) if isinstance(x, torch.Tensor) else False
        seen[id(mod)] = seen.get(id(mod), True) and binary

    hooks = [m.register_forward_pre_hook(pre) for m in modules.values()]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        functional.reset_net(model)
        if isinstance(example_input, (tuple, list)):
            model(*example_input)
        else:
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        functional.reset_net(model)
        for m, t in modes.items():
            m.training = t
    return seen


def convert(model: nn.Module, prune_rate: float = 0.5, *, example_input=None,
            inplace: bool = False, backend: str = "auto", per_channel_gain: bool = False
            ) -> tuple[nn.Module, ConversionReport]:
    """Replace SpikingJelly conv/linear [+BN] + LIFNode runs with BinW-SLT search layers.

    Args:
        model: a SpikingJelly model in step mode 'm' (inputs [T, N, ...]).
        prune_rate: fraction of weights the mask removes, in [0, 1).
        example_input: optional input for one eval-mode pass that tells which layers receive
            spikes and which real values (see the module docstring).
        inplace: modify ``model`` itself; by default a deep copy is converted.
        backend: ``backend`` of the new layers.
        per_channel_gain: per-output-channel alpha instead of one scalar per layer.

    Returns:
        (model, report): the converted model (search mode) and a ``ConversionReport``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    prune_rate = C.check_prune_rate(prune_rate)
    C.check_backend(backend)
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()

    # 1. find the runs in every Sequential (not inside SeqToANNContainers, which are expanded)
    runs: list[tuple[nn.Sequential, list[_Elem]]] = []
    handled: set[int] = set()  # ids of modules that are part of a run or were reported
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or _is_seq2ann(seq):
            continue
        stream = _stream(seq, seq_name)
        i = 0
        while i < len(stream):
            e = stream[i]
            if _kind(e.module) in ("conv", "linear") and id(e.module) not in handled:
                run, why = _match(stream, i)
                if run is not None:
                    runs.append((seq, run))
                    handled.update(id(x.module) for x in run)
                    i += len(run)
                    continue
                report.skipped.append(dict(path=e.path, type=type(e.module).__name__,
                                           reason=why))
                handled.add(id(e.module))
            i += 1

    # 2. what each converted layer receives
    firsts = {id(run[0].module): run[0].module for _, run in runs}
    observed = _observe_inputs(model, example_input, firsts) if example_input is not None \
        else None

    # 3. replace
    for n, (seq, run) in enumerate(runs):
        if observed is not None:
            input_kind = "spike" if observed.get(id(run[0].module), False) else "real"
        else:
            input_kind = "real" if n == 0 else "spike"
        new = _new_layer(run, prune_rate, input_kind, backend, per_channel_gain)
        owners = sorted({e.owner for e in run})
        seq[owners[0]] = new
        for o in owners[1:]:
            seq[o] = nn.Identity()
        settings = _neuron_settings(run[-1].module)
        report.converted.append(dict(paths=[e.path for e in run], new=type(new).__name__,
                                     input=input_kind, bn=len(run) == 3, **settings))

    # 4. anything else worth reporting: convs/linears/LIFs not reached through a Sequential
    for name, m in model.named_modules():
        k = _kind(m)
        if k in ("conv", "linear", "lif") and id(m) not in handled:
            if k == "lif":
                why = _lif_problem(m)
                reason = ("LIFNode not preceded by a convertible conv/linear [+BN] in an "
                          "nn.Sequential" + (f"; also: {why}" if why else ""))
            else:
                reason = "not inside an nn.Sequential: its execution order is unknown"
            report.skipped.append(dict(path=name, type=type(m).__name__, reason=reason))
    return model, report
