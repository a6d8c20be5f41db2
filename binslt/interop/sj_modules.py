"""What a SpikingJelly module is for ``binslt.convert``: its kind (conv, linear, BN, LIF, IF,
another neuron), whether it emits or passes spikes, whether binslt can take it (and why not),
its neuron settings, and module paths (get, set, a weightless prototype)."""

from __future__ import annotations

import copy
import inspect
import math
from typing import Optional

import torch
from torch import nn

from ..nn.base import conv_padding
from ..nn.layers import (
    BinSpikeConv2d,
)
from ..nn.neuron import resolve_surrogate
from ..nn.neuron import sj_surrogate_name as _surrogate_name


def _sj():
    from spikingjelly.activation_based import layer, neuron, surrogate

    return layer, neuron, surrogate


def _is_seq2ann(m: nn.Module) -> bool:
    layer, _, _ = _sj()
    return isinstance(m, layer.SeqToANNContainer)


def _step_mode(m: nn.Module):
    return getattr(m, "step_mode", None)


def _kind(m: nn.Module) -> str:
    """'conv' / 'linear' / 'bn2d' / 'bn1d' / 'lif' / 'if' / 'node' (another spiking neuron) /
    'other'."""
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
    if isinstance(m, neuron.IFNode):
        return "if"
    if isinstance(m, neuron.BaseNode):
        return "node"
    return "other"


def _is_neuron(m: nn.Module) -> bool:
    return _kind(m) in ("lif", "if", "node")


def _spiking(m: nn.Module) -> bool:
    """Whether ``m`` emits 0/1 spikes: a SpikingJelly neuron whose surrogate is in spiking mode
    (the example runs confirm the values)."""
    _, neuron, _ = _sj()
    sg = getattr(m, "surrogate_function", None)
    return isinstance(m, neuron.BaseNode) and getattr(sg, "spiking", True) is not False


_PASSING = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Flatten,
            nn.Unflatten, nn.Identity)


def _passes(m: nn.Module) -> bool:
    """Modules whose output holds their input's values, rearranged or max-pooled (SpikingJelly's
    layer.MaxPool2d / Flatten are these torch classes)."""
    return isinstance(m, _PASSING) and not getattr(m, "return_indices", False)


def _dropout_p(m: nn.Module) -> Optional[float]:
    """p of a dropout that zeroes elements and scales the rest by 1/(1-p) (torch's and
    SpikingJelly's Dropout / Dropout2d; not alpha dropout), else None."""
    layer, _, _ = _sj()
    if type(m) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, layer.Dropout,
                   layer.Dropout2d):
        return float(m.p)
    return None


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
    if m.groups != 1:
        return f"groups={m.groups} (only groups=1 is supported)"
    if tuple(m.dilation) != (1, 1):
        return f"dilation={tuple(m.dilation)} (only 1 is supported)"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only 'zeros' is supported)"
    for name in ("kernel_size", "stride", "padding"):
        if name == "padding" and m.padding in ("same", "valid"):
            k, s = _pair_square(m.kernel_size, "")[0], _pair_square(m.stride, "")[0]
            try:
                conv_padding(type(m).__name__, m.padding, k, s)
            except ValueError as exc:
                return str(exc)
            continue
        _, why = _pair_square(getattr(m, name), name)
        if why:
            return why
    return ""


def conv_module_padding(m: nn.Module) -> int | str:
    """A convertible conv's padding as binslt's convs take it: an int, or torch's 'same' /
    'valid'."""
    return m.padding if m.padding in ("same", "valid") else _pair_square(m.padding, "padding")[0]


def _layer_problem(m: nn.Module) -> str:
    return _conv_problem(m) if _kind(m) == "conv" else ""


def _if_supported() -> bool:
    return "neuron" in inspect.signature(BinSpikeConv2d.__init__).parameters


def _neuron_problem(m: nn.Module) -> str:
    _, neuron, _ = _sj()
    k = _kind(m)
    if k == "node" or type(m) not in (neuron.LIFNode, neuron.IFNode):
        return (f"{type(m).__name__} is not binslt's LIF or IF neuron (its own dynamics, e.g. a "
                "learnt tau); left as it is")
    name = type(m).__name__
    if k == "if" and not _if_supported():
        return "IFNode needs binslt layers with neuron='if', which this build lacks"
    if _step_mode(m) != "m":
        return (f"{name} in single-step mode 's': the caller steps it over T and it carries "
                "state between calls (stateful use); binslt layers are multi-step")
    if getattr(m, "store_v_seq", False):
        return "store_v_seq=True: the model reads membrane potentials that binslt does not keep"
    if isinstance(getattr(m, "v", None), torch.Tensor):
        return ("holds membrane state from an earlier call (stateful use); call "
                "spikingjelly functional.reset_net(model) first if the calls are independent")
    try:  # the layers' own rule for a SpikingJelly surrogate object
        resolve_surrogate(m.surrogate_function, None, name)
    except ValueError as exc:
        return str(exc)
    if k == "lif" and not (float(m.tau) >= 1.0):
        return f"tau={m.tau} < 1"
    return ""


def _neuron_settings(m: nn.Module) -> dict:
    """The report's view of a neuron: kind, tau (inf for IF) and the shared settings."""
    _, _, surrogate = _sj()
    sg = m.surrogate_function
    k = _kind(m)
    return dict(neuron=k, tau=float(m.tau) if k == "lif" else math.inf,
                decay_input=bool(m.decay_input) if k == "lif" else False,
                v_threshold=float(m.v_threshold),
                v_reset=None if m.v_reset is None else float(m.v_reset),
                detach_reset=bool(m.detach_reset),
                surrogate=_surrogate_name(sg),
                surrogate_alpha=float(sg.alpha))


def _layer_neuron_kwargs(m: nn.Module) -> dict:
    s = _neuron_settings(m)
    kind = s.pop("neuron")
    if kind == "if":
        s.pop("tau")
        s.pop("decay_input")
        s["neuron"] = "if"
    return s


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(model, parent), name, new)


def _proto(m: nn.Module) -> nn.Module:
    """A weightless copy (meta device) that ``to_spikingjelly`` rebuilds the module from."""
    p = copy.deepcopy(m).to("meta")
    if hasattr(p, "reset"):
        try:
            p.reset()
        except Exception:  # noqa: BLE001 -- a meta copy only needs its settings
            pass
    return p
