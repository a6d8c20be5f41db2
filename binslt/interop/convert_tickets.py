"""A converted model's ticket: ``convert`` records its settings as the model's ``build_config``
(arch ``'converted'``, JSON: the user's model class, the example input's shapes and dtypes, the
prune rate, ``keep_dense``, backend, gain, strictness, ``train_bn``, ``spike_input``), so that
:func:`binslt.export_ticket` writes the model as it writes any binslt network: packed planes,
BN statistics, neuron settings, and that config. No code is stored.

The structure comes from the user's code, as for any PyTorch state dict:
``binslt.load_ticket(path, model=factory())`` converts the given (unconverted) model again with
the recorded settings and an example input of the recorded shapes, then loads the file into it.
An already converted model of the same structure is taken as it is. A ``binslt search --model``
run records its factory instead (``build_user_model``), so its tickets load without ``model=``.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from ..io.tickets import STRUCTURE_FROM_MODEL, TicketError
from .sj_graph import _tensors

ARCH = "converted"


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def conversion_config(user_type: type, example_input, **settings: Any) -> dict[str, Any]:
    """The ``build_config`` of a converted model (JSON values only)."""
    if example_input is None:
        example = None
    else:
        tensors = _tensors(example_input)
        example = dict(tuple=isinstance(example_input, (tuple, list)), tensors=[
            dict(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
            for t in tensors])
    return dict(arch=ARCH, variant="binwslt", model=_type_name(user_type),
                example_input=example, **settings)


def example_from_config(config: dict[str, Any], device: torch.device | None = None):
    """An example input of the recorded shapes and dtypes (on ``device``): uniform [0, 1) values
    (0/1 spikes for ``spike_input`` models) from a fixed seed; None when the conversion had
    none."""
    ex = config.get("example_input")
    if ex is None:
        return None
    g = torch.Generator().manual_seed(0)
    out = []
    for t in ex["tensors"]:
        dtype = getattr(torch, t["dtype"])
        x = torch.rand(t["shape"], generator=g)
        if config.get("spike_input"):
            x = (x < 0.5).float()
        out.append(x.to(device=device, dtype=dtype))
    return tuple(out) if ex["tuple"] else out[0]


def structure_for_ticket(config: dict[str, Any], model: Optional[nn.Module],
                         backend: Optional[str], path) -> nn.Module:
    """The network a converted model's ticket loads into: ``model`` converted again with the
    recorded settings (a copy; ``model`` is not changed), or ``model`` itself where it is
    already converted."""
    p = repr(str(path))
    want = config.get("model", "?")
    if model is None:
        raise TicketError(f"{p} holds a converted SpikingJelly model ({want}); its structure "
                          "comes from your code: load_ticket(path, model=factory()) with the "
                          "unconverted model")
    if not isinstance(model, nn.Module):
        raise TicketError(f"{p}: model= must be an nn.Module (the unconverted {want}), got "
                          f"{type(model).__name__}")
    if model.__dict__.get("_binslt_conversion") is not None:
        return model
    if _type_name(type(model)) != want:
        raise TicketError(f"{p} was exported from a converted {want}, but model= is a "
                          f"{_type_name(type(model))}; give the model the ticket was found on")
    from .convert import convert

    settings = {k: config[k] for k in ("prune_rate", "keep_dense", "per_channel_gain", "strict",
                                       "train_bn", "spike_input") if k in config}
    try:
        device = next(iter(model.parameters()), torch.empty(0)).device
        out, _ = convert(copy.deepcopy(model), example_input=example_from_config(config, device),
                         backend=backend or config.get("backend", "auto"), inplace=True,
                         **settings)
    except (TypeError, ValueError) as exc:
        msg = (str(exc).strip().splitlines() or [""])[0]
        raise TicketError(f"{p}: model= does not convert as at export ({msg})") from None
    return out


STRUCTURE_FROM_MODEL[ARCH] = structure_for_ticket
