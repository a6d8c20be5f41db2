"""Conversion of a user's SpikingJelly model into a BinW-SLT search model.

``convert(model, prune_rate=..., example_input=...)`` finds every conv / linear whose output
reaches a spiking neuron through an optional BatchNorm and an optional residual add, and fuses
the three into one masked sign-weight layer:

* ``Conv2d`` [+ ``BatchNorm2d``] [+ residual] + ``LIFNode`` / ``IFNode`` -> ``BinSpikeConv2d``
* ``Linear`` [+ ``BatchNorm1d``] [+ residual] + ``LIFNode`` / ``IFNode`` -> ``BinSpikeLinear``

Every other conv / linear (1x1 shortcuts, the classifier, one in front of a neuron binslt does not
model) becomes a masked sign layer without a neuron (``BinConv2d`` / ``BinLinear``), as biprop
does for every layer, unless ``keep_dense`` names it. The conv / linear / BN may be SpikingJelly
layers in step mode 'm', plain ``torch.nn`` layers, or ``torch.nn`` layers inside a
``layer.SeqToANNContainer``.

How the graph is found. With ``example_input`` the model runs twice (no grad, states reset
before and after; once in eval mode, once in training mode with the model's state, BN
statistics and random number state restored after) while module hooks and a
``TorchFunctionMode`` record every module call and every tensor operation of the user's forward,
each tensor known by its identity and version (so that an in-place ``out += identity`` counts as
a new value). A chain is followed from each conv's output:
the value must go to exactly one consumer at each step (a BN, a reshape, one add with a tensor of
the same shape, then the neuron). Without ``example_input`` the fall-back looks only at runs of
consecutive children of each ``nn.Sequential`` (no residuals), and the report says so.

How the user's forward is kept. The model stays the user's object with the user's ``forward``:
modules are swapped at their paths, nothing is re-traced or generated.

* direct chain (no residual; only the reshapes of the ``SeqToANNContainer`` idiom): the new layer
  takes the conv's place (or its container's) and the BN and neuron become ``nn.Identity``, so
  that the remaining module names and state-dict keys do not move;
* staged chain (a residual add, or reshapes in the user's code): the conv's place gets a
  parameter-free ``InputTap`` that keeps its input and returns zeros of the conv's output shape,
  the BN becomes ``nn.Identity``, and the neuron's place gets a ``SpikeStage`` holding the new
  layer. The user's ``out += identity`` then computes ``0 + identity`` (exact), and the stage calls
  the layer with the kept input and ``residual=`` what arrived. It needs that no value of the
  chain is used anywhere else, which the recorded run checks.

Bias. A conv / linear bias is folded exactly: into the BN's running mean where a BN follows (in
training the batch mean absorbs it), otherwise into a ``BiasShift``: an eval-only, frozen
BatchNorm with scale 1 and shift ``b`` (running mean 0, variance 1, eps 0), which the fused
epilogue applies as its per-channel shift. A ``BinLinear`` with a bias is followed by a ``Bias``
module in an ``nn.Sequential``.

Neurons. ``LIFNode`` and ``IFNode`` in step mode 'm' with the ATan, Sigmoid, Rect or
PiecewiseQuadratic surrogate carry their settings over (IF needs a build whose layers take
``neuron='if'``). Other neuron types
(``ParametricLIFNode`` with a learnt tau, ...) and unsupported settings are left alone and the
report says why; their conv still becomes a ``BinConv2d``.

Input kind (``InputKind``), decided in one place (``_decide_kinds``) from what produces each
layer's input in the recorded graph, not from the values: a spiking neuron, through max-pools,
flattens and reshapes (and SEW's AND / IAND of spikes), makes ``spike`` (the packed path); a
dropout after those makes ``spike-dropout``; an add of spikes (SEW ADD) makes ``spike-sum``
(small integers, the exact real-input path, ``input='real'``); anything else (images, average
pools) is ``real``. The values both example runs gave each layer must agree with its kind, or
``convert`` stops naming the layer. Without ``example_input`` the kind comes from the module
before the layer in its ``nn.Sequential``.

Dropout. A dropout (SpikingJelly's ``layer.Dropout`` / ``Dropout2d``, torch's ``Dropout*``)
whose output goes only to converted spiking layers becomes a ``SpikeDropout``: the same mask
(the same random calls; ``layer.Dropout`` keeps one over T until reset, ``nn.Dropout`` draws one
per call) applied to the spikes as 0/1, and 1/(1-p) as the layers' ``input_gain``, folded into
their weights' gain: the packed path stays, the result is the dropout's. Otherwise the layers
after it take real input.

Strictness. A failed example run, or SpikingJelly modules holding state from an earlier run,
stop ``convert`` with one line naming the fix (``ExampleRunError``); ``strict=False`` converts as
far as it can (the ``nn.Sequential`` fall-back, stateful neurons left alone) and reports it.

Search mode trains the scores only: every other parameter is frozen (BN affine parameters train
with ``train_bn=True``); ``report.trainable`` / ``report.frozen`` say which, and
``to_spikingjelly`` unfreezes them again.

Tickets. The converted model carries its conversion's settings as ``build_config`` (arch
``'converted'``; ``convert_tickets``): ``binslt.export_ticket`` saves it like any binslt
network, and ``binslt.load_ticket(path, model=factory())`` converts the user's model again with
those settings and loads the file into it.

``to_spikingjelly(model)`` turns a converted model (its ticket) back into a plain SpikingJelly
model whose layers carry ``alpha * sign(w) * M``, rebuilt from meta-device copies of the original
modules that ``convert`` keeps (no weights).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..nn.layers import BinConv2d, _MaskedSignWeight, name_layers
from ..ops import contract as C
from .convert_modules import (
    _REAL,
    Bias,
    BiasShift,
    ConversionReport,
    ExampleRunError,
    InputKind,
    InputTap,
    SpikeDropout,
    SpikeStage,
    _Val,
)
from .convert_swap import _find_chains, _report_left, _swap_chain, _swap_plain
from .convert_tickets import conversion_config
from .sj_graph import (
    _MAX_LEVELS,
    _copy,
    _dropout_takers,
    _example_runs,
    _fits,
    _input_of,
    _Recorder,
    _refuse_held_state,
    _value_kinds,
)
from .sj_modules import (
    _dropout_p,
    _get,
    _is_neuron,
    _kind,
    _neuron_problem,
    _set,
)

__all__ = ["Bias", "BiasShift", "ConversionReport", "ExampleRunError", "FactoryError", "InputKind",
           "InputTap", "SpikeDropout", "SpikeStage", "SpikingJellyRun", "build_user_model",
           "convert", "load_factory", "to_spikingjelly"]

# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


def _decide_kinds(chains: list, rec: Optional[_Recorder], rec_train: Optional[_Recorder],
                  mods: dict, cons: dict, inputs: _Val, strict: bool,
                  report: ConversionReport) -> dict:
    """Sets each chain's input kind and the new layer's ``input``; returns the dropouts to
    replace by ``SpikeDropout`` (dropout path -> conv paths taking its output).

    With recorded runs the kind comes from the graph of each run (joined) and must agree with
    the values the conv saw in both runs; a disagreement stops ``convert`` (``strict``) or makes
    the layer real-input with a note. Dropout spikes keep the packed spike path only where the
    dropout's output goes to converted spiking layers alone (else: real input)."""
    fused = {ch.conv for ch in chains}
    if rec is not None:
        runs = [r for r in (rec, rec_train) if r is not None]
        value_kinds = [_value_kinds(r, mods, inputs) for r in runs]
        for ch in chains:
            v = _input_of(runs[0], value_kinds[0], ch.conv)
            for r, k in zip(runs[1:], value_kinds[1:]):
                v = v.join(_input_of(r, k, ch.conv))
            p = _dropout_p(mods[v.dropout]) if v.dropout else None
            bad = [("training" if r is rec_train else "eval") for r in runs
                   if not _fits(v, r.levels.get(ch.conv), p)]
            if bad:
                seen = runs[0].levels.get(ch.conv) if "eval" in bad else rec_train.levels.get(
                    ch.conv)
                what = (f"values {sorted(seen)}" if seen is not None
                        else f"more than {_MAX_LEVELS} distinct values")
                msg = (f"the graph says {ch.conv}'s input holds {v.kind.value} values, but the "
                       f"example run in {' and '.join(bad)} mode gave it {what}")
                if strict:
                    raise ValueError(f"convert: {msg}; keep it dense (keep_dense=["
                                     f"{ch.conv!r}]) or pass strict=False to run it as a "
                                     "real-input layer")
                report.notes.append(f"{msg}: converted as a real-input layer")
                v = _REAL
            ch.kind = v
    plan: dict = {}
    for ch in chains:
        v = ch.kind
        if v.kind is not InputKind.DROPOUT:
            continue
        if v.dropout not in plan:
            p = _dropout_p(mods[v.dropout])
            takers = ([ch.conv] if rec is None else
                      _dropout_takers(rec, mods, cons, v.dropout))
            ok = p is not None and p < 1 and takers is not None and set(takers) <= fused
            plan[v.dropout] = takers if ok else None
            if not ok:
                report.notes.append(
                    f"dropout {v.dropout}: its output goes elsewhere too, not only to "
                    "converted spiking layers; the layers after it take real input")
    for ch in chains:
        v = ch.kind
        spike = v.kind is InputKind.SPIKE or (
            v.kind is InputKind.DROPOUT and plan.get(v.dropout) is not None)
        ch.layer_input = "spike" if spike else "real"
    return {d: t for d, t in plan.items() if t is not None}


def _freeze(model: nn.Module, train_bn: bool, report: ConversionReport) -> list:
    """Search mode trains the scores only: every other parameter that requires grad is frozen,
    except the affine parameters of BatchNorms with ``train_bn`` (``BiasShift`` stays frozen).
    Returns the names frozen."""
    frozen = []
    bn_params = {id(p) for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, BiasShift)
                 for p in m.parameters(recurse=False)}
    scores = {id(m.scores) for m in model.modules() if isinstance(m, _MaskedSignWeight)}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in scores or (train_bn and id(p) in bn_params):
            continue
        p.requires_grad_(False)
        frozen.append(name)
    n_bn = sum(1 for _, p in model.named_parameters() if id(p) in bn_params)
    report.trainable = "scores" + (f" and BatchNorm affine ({n_bn} tensors; train_bn=True)"
                                   if train_bn and n_bn else
                                   " (BatchNorm affine frozen; train_bn=True trains it)"
                                   if n_bn else "")
    report.frozen = frozen
    return frozen


def _check_args(model, prune_rate, backend: str, keep_dense) -> tuple[float, set, dict]:
    """(prune_rate, the keep_dense paths, the model's modules by path), or a one-line error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    prune_rate = C.check_prune_rate(prune_rate)
    C.check_backend(backend)
    if isinstance(keep_dense, str):
        keep_dense = [keep_dense]
    keep = set(keep_dense)
    mods = dict(model.named_modules())
    unknown = sorted(p for p in keep if p not in mods or _kind(mods[p]) not in ("conv", "linear"))
    if unknown:
        raise ValueError(f"keep_dense names {unknown}, which are not conv/linear modules of the "
                         "model (give paths as in model.named_modules())")
    return float(prune_rate), keep, mods


def _swap_dropouts(model, mods, dropouts, new_of, records, report) -> None:
    """Each dropout after a neuron becomes a ``SpikeDropout`` over the layers that take it."""
    for dpath, takers in dropouts.items():
        _set(model, dpath, SpikeDropout(mods[dpath], [new_of[t] for t in takers]))
        records.append(dict(kind="dropout", path=dpath))
        report.notes.append(f"dropout {dpath} -> SpikeDropout: its mask applies to the spikes "
                            f"and 1/(1-p) to the gain of {', '.join(takers)}")


def convert(model: nn.Module, prune_rate: float = 0.5, *, example_input=None,
            keep_dense=(), inplace: bool = False, backend: str = "auto",
            per_channel_gain: bool = False, strict: bool = True, train_bn: bool = False,
            spike_input: bool = False) -> tuple[nn.Module, ConversionReport]:
    """Replace the conv/linear [+BN] [+residual] + spiking-neuron chains of a SpikingJelly model
    with BinW-SLT search layers, and the other convs/linears with masked sign layers.

    Args:
        model: a SpikingJelly model in step mode 'm' (inputs [T, N, ...]), reset
            (``functional.reset_net``).
        prune_rate: fraction of weights the mask removes, in [0, 1).
        example_input: input (or tuple of inputs) [T, N, ...] for two recorded no-grad runs, in
            eval and in training mode, that tell the graph (see the module docstring). Without
            it only runs inside ``nn.Sequential`` s are found.
        keep_dense: paths (``model.named_modules()`` names) of convs/linears to keep dense; a
            neuron after one stays too.
        inplace: modify ``model`` itself; by default a deep copy is converted.
        backend: ``backend`` of the new layers.
        per_channel_gain: per-output-channel alpha instead of one scalar per layer.
        strict: a failed example run, a model holding state from an earlier run, or an input
            whose values contradict its graph kind raise a ValueError (one line with the fix);
            ``strict=False`` converts as far as it can and says so in the report.
        train_bn: search mode trains the scores only; with ``train_bn`` the BatchNorms' affine
            parameters too. Every other parameter is frozen (``report.frozen``).
        spike_input: the model's inputs are binary spikes (event data): the layers that take
            them keep the packed spike path (the example runs check the values).

    Returns:
        (model, report): the converted model (search mode) and a ``ConversionReport``.

    Example:
        >>> import torch
        >>> import binslt
        >>> from spikingjelly.activation_based import functional, layer, neuron
        >>> sj = torch.nn.Sequential(layer.Conv2d(1, 8, 3, padding=1, bias=False),
        ...                          layer.BatchNorm2d(8), neuron.LIFNode(), layer.Flatten(),
        ...                          layer.Linear(8 * 8 * 8, 10))
        >>> functional.set_step_mode(sj, "m")
        >>> x = torch.rand(2, 4, 1, 8, 8)  # [T, N, C, H, W]
        >>> net, report = binslt.convert(sj, 0.5, example_input=x)
        >>> net(x).shape  # [T, N, classes]
        torch.Size([2, 4, 10])
    """
    prune_rate, keep, mods = _check_args(model, prune_rate, backend, keep_dense)
    if strict:
        _refuse_held_state(model)
    # stateful neurons are judged on the user's model, before the example run resets them
    state_problem = {p: _neuron_problem(m) for p, m in mods.items() if _is_neuron(m)}
    user_type = type(model)
    if not inplace:
        model = _copy(model)
        mods = dict(model.named_modules())
    report = ConversionReport()
    rec, rec_train, inputs = _example_runs(model, example_input, spike_input, strict, report)
    found = _find_chains(model, mods, rec, keep, state_problem, inputs, report)
    dropouts = _decide_kinds(found.chains, rec, rec_train, mods, found.cons, inputs, strict,
                             report)
    build = dict(prune_rate=prune_rate, backend=backend, per_channel_gain=per_channel_gain)
    records, taken, new_of = [], set(), {}
    for ch in found.chains:
        new_of[ch.conv] = _swap_chain(model, mods, ch, build, records, report)
        taken.update(p for p in (ch.conv, ch.bn, ch.neuron) if p)
    _swap_dropouts(model, mods, dropouts, new_of, records, report)
    for path, why in found.plain:
        _swap_plain(model, mods, path, why, rec, found.cons, build, records, report)
        taken.add(path)
    _report_left(mods, taken, keep, state_problem, rec is not None, found.seen_sequential,
                 report)
    frozen = _freeze(model, train_bn, report)
    model.__dict__["_binslt_conversion"] = records
    model.__dict__["_binslt_frozen"] = frozen
    model.__dict__["build_config"] = conversion_config(
        user_type, example_input, prune_rate=prune_rate, keep_dense=sorted(keep),
        backend=backend, per_channel_gain=per_channel_gain, strict=strict, train_bn=train_bn,
        spike_input=spike_input)
    name_layers(model)  # their errors carry the path (BinSpikeConv2d features.3: ...)
    return model, report


# ---------------------------------------------------------------------------------------------
# Back to SpikingJelly
# ---------------------------------------------------------------------------------------------


def _rebuilt(proto: nn.Module, device, dtype) -> nn.Module:
    m = copy.deepcopy(proto).to_empty(device=device)
    if dtype is not None:
        m = m.to(dtype=dtype)
    return m


def _conv_back(r: dict, layer: nn.Module, mlayer: nn.Module) -> nn.Module:
    """The user's conv / linear of record ``r`` again, carrying the binslt layer's effective
    weight and its folded bias (a ``Bias`` module or a ``BiasShift``; else zero)."""
    w = mlayer.effective_weight().detach()
    conv = _rebuilt(r["protos"][r["conv"]], w.device, w.dtype)
    conv.weight.copy_(w.view(conv.weight.shape))
    bias = None
    if isinstance(layer, nn.Sequential):
        bias = layer[1].bias
    elif isinstance(getattr(mlayer, "bn", None), BiasShift):
        bias = mlayer.bn.bias
    if conv.bias is not None:
        conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))
    return conv


@torch.no_grad()
def to_spikingjelly(model: nn.Module) -> nn.Module:
    """The converted model's current ticket as a plain SpikingJelly model.

    Each converted conv / linear is put back (its original type and settings) carrying
    ``alpha * sign(w) * M`` (the layer's effective weight, in whichever mode it is), its BN and
    neuron are put back with the binslt layer's BN state, and ``InputTap`` / ``SpikeStage`` /
    ``nn.Identity`` placeholders give way to the original modules. Folded biases come back as a
    zero conv bias with the BN's running mean shifted (where a BN follows) or as the bias
    itself. The model is a copy; its forward is the user's.

    Args:
        model (torch.nn.Module): a model returned by :func:`convert` (any mode).

    Returns:
        The SpikingJelly model (inputs [T, N, ...] as the user's), whose eval outputs equal the
        converted model's.

    Example (a linear layer with a bias and an IF neuron; ``convert`` shows a conv model):
        >>> import torch, binslt
        >>> from spikingjelly.activation_based import functional, layer, neuron
        >>> sj = torch.nn.Sequential(layer.Linear(16, 10), neuron.IFNode())
        >>> functional.set_step_mode(sj, "m")
        >>> x = torch.rand(3, 2, 16)  # [T, N, features]
        >>> net = binslt.convert(sj, 0.5, example_input=x)[0].eval()
        >>> back = binslt.to_spikingjelly(net).eval()
        >>> with torch.no_grad():
        ...     same = torch.equal(back(x), net(x))
        >>> same, type(back[0]).__name__, back[0].bias is not None
        (True, 'Linear', True)
    """
    records = model.__dict__.get("_binslt_conversion")
    if records is None:
        raise ValueError("to_spikingjelly expects a model returned by binslt.convert (this one "
                         "carries no conversion record)")
    out = copy.deepcopy(model)
    for r in records:
        if r["kind"] == "dropout":  # the user's dropout, with the settings it had
            _set(out, r["path"], _get(out, r["path"]).dropout)
            continue
        layer = _get(out, r["layer"])
        mlayer = layer[0] if isinstance(layer, nn.Sequential) else layer
        conv = _conv_back(r, layer, mlayer)
        dev, dt = conv.weight.device, conv.weight.dtype
        if r["kind"] == "plain":
            if isinstance(mlayer, BinConv2d) and mlayer.bn is not None and not isinstance(
                    mlayer.bn, BiasShift):
                raise ValueError(f"{r['layer']}: a BinConv2d with its own BN has no "
                                 "SpikingJelly counterpart in this model")
            _set(out, r["conv"], conv)
            continue
        bn = None
        if r["bn"]:
            bn = _rebuilt(r["protos"][r["bn"]], dev, dt)
            bn.load_state_dict(mlayer.bn.state_dict())
            bn.train(mlayer.bn.training)
        nrn = copy.deepcopy(r["protos"][r["neuron"]])  # no tensors: settings only
        if hasattr(nrn, "reset"):
            nrn.reset()
        conv.train(mlayer.training)
        nrn.train(mlayer.training)
        if r["staged"]:
            _set(out, r["conv"], conv)
            if bn is not None:
                _set(out, r["bn"], bn)
            _set(out, r["neuron"], nrn)
            continue
        # direct: the units (conv/BN/neuron or their SeqToANNContainers) come back in place
        for u in r["units"]:
            if u in r["unit_protos"]:
                cont = _rebuilt(r["unit_protos"][u], dev, dt)
                _set(out, u, cont)
        for p, m in ((r["conv"], conv), (r["bn"], bn), (r["neuron"], nrn)):
            if p:
                _set(out, p, m)
    return _without_conversion_record(out)


def _without_conversion_record(out: nn.Module) -> nn.Module:
    """``out`` without convert's record and build config; what convert froze trains again."""
    params = dict(out.named_parameters())
    for name in out.__dict__.pop("_binslt_frozen", []):
        if name in params:
            params[name].requires_grad_(True)
    out.__dict__.pop("_binslt_conversion", None)
    out.__dict__.pop("build_config", None)
    return out


from .user_model import (  # noqa: E402 -- it imports convert from this module
    FactoryError,
    SpikingJellyRun,
    build_user_model,
    load_factory,
)
