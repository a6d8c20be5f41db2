"""The layer mapping of ``binslt.convert``: which convs / linears become spiking layers (the
chains found in the recorded graph or in ``nn.Sequential`` s) and which become masked sign
layers without a neuron, their swap into the user's model at their paths, and the report of
what stays as it was."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from .convert_chains import _bn_taking, _Chain, _follow, _sequential_chains
from .convert_modules import (
    ConversionReport,
    InputTap,
    SpikeStage,
    _plain_layer,
    _Slot,
    _spiking_layer,
    _Val,
)
from .sj_graph import _Recorder
from .sj_modules import _kind, _layer_problem, _neuron_settings, _proto, _set


@dataclass
class _Found:
    chains: list
    plain: list  # (path, why no neuron is fused)
    cons: dict  # value key -> the nodes that use it (recorded runs)
    seen_sequential: Optional[set]  # the fall-back's modules (without a recorded run)


def _recorded_chains(mods: dict, rec: _Recorder, cons: dict, keep: set, state_problem: dict,
                     report: ConversionReport) -> tuple[list, list]:
    """(chains, plain) from the recorded run: one chain per neuron (the add's first operand
    where two convs reach one neuron), in module order."""
    plain: list[tuple[str, str]] = []
    by_neuron: dict[str, list[_Chain]] = {}
    for path, m in mods.items():
        if _kind(m) not in ("conv", "linear") or path in keep:
            continue
        if rec.calls[path] == 0:
            report.skipped.append(dict(path=path, type=type(m).__name__, reason=(
                "not called by the model's forward on example_input; left as it is")))
            continue
        why = _layer_problem(m)
        if why:
            report.skipped.append(dict(path=path, type=type(m).__name__, reason=why))
            continue
        ch, why = _follow(rec, mods, cons, path)
        if ch is not None and state_problem.get(ch.neuron):
            ch, why = None, f"its neuron {ch.neuron} is not converted: " \
                            f"{state_problem[ch.neuron]}"
        if ch is None:
            plain.append((path, why))
        else:
            by_neuron.setdefault(ch.neuron, []).append(ch)
    chains = []
    for npath, group in by_neuron.items():
        group.sort(key=lambda c: not c.add_first)
        chains.append(group[0])
        for other in group[1:]:
            plain.append((other.conv, f"its residual add also takes {group[0].conv}, which "
                                      f"fires {npath}"))
    order = list(mods)
    chains.sort(key=lambda c: order.index(c.conv))
    plain.sort(key=lambda pw: order.index(pw[0]))
    return chains, plain


def _find_chains(model: nn.Module, mods: dict, rec: Optional[_Recorder], keep: set,
                 state_problem: dict, inputs: _Val, report: ConversionReport) -> _Found:
    """The chains and the no-neuron layers: from the recorded run, else from the children of
    each ``nn.Sequential`` (layers binslt cannot take are reported as skipped)."""
    if rec is not None:
        cons = rec.consumers()
        chains, plain = _recorded_chains(mods, rec, cons, keep, state_problem, report)
        return _Found(chains, plain, cons, None)
    chains, plain, seen = _sequential_chains(model, keep, inputs)
    kept = []
    for p, why in plain:
        if _layer_problem(mods[p]):
            report.skipped.append(dict(path=p, type=type(mods[p]).__name__, reason=why))
        else:
            kept.append((p, why))
    return _Found(chains, kept, {}, seen)


def _swap_chain(model: nn.Module, mods: dict, ch: _Chain, build: dict, records: list,
                report: ConversionReport) -> nn.Module:
    """Puts the chain's new spiking layer into ``model`` (direct or staged), records it and
    reports it; returns the layer."""
    new, how = _spiking_layer(ch, mods, build["prune_rate"], build["backend"],
                              build["per_channel_gain"])
    entry = dict(kind="spiking", conv=ch.conv, bn=ch.bn, neuron=ch.neuron, staged=ch.staged,
                 units=list(ch.units),
                 protos={p: _proto(mods[p]) for p in (ch.conv, ch.bn, ch.neuron) if p},
                 unit_protos={u: _proto(mods[u]) for u in ch.units
                              if u not in (ch.conv, ch.bn, ch.neuron)})
    if ch.staged:
        slot = _Slot()
        lin = mods[ch.conv]
        if _kind(lin) == "conv":
            tap = InputTap(slot, "conv", lin.out_channels, new.kernel_size, new.stride,
                           new.padding)
        else:
            tap = InputTap(slot, "linear", lin.out_features)
        _set(model, ch.conv, tap)
        if ch.bn:
            _set(model, ch.bn, nn.Identity())
        _set(model, ch.neuron, SpikeStage(new, slot, ch.residual))
        entry["layer"] = f"{ch.neuron}.layer"
    else:
        _set(model, ch.units[0], new)
        for u in ch.units[1:]:
            _set(model, u, nn.Identity())
        entry["layer"] = ch.units[0]
    records.append(entry)
    report.converted.append(dict(
        paths=[p for p in (ch.conv, ch.bn, ch.neuron) if p], new=type(new).__name__,
        input=ch.kind.kind.value, layer_input=ch.layer_input, dropout=ch.kind.dropout,
        bn=ch.bn is not None, bias=how or None, residual=ch.residual, staged=ch.staged,
        **_neuron_settings(mods[ch.neuron])))
    return new


def _swap_plain(model: nn.Module, mods: dict, path: str, why: str, rec: Optional[_Recorder],
                cons: dict, build: dict, records: list, report: ConversionReport) -> None:
    """Puts a masked sign layer without a neuron at ``path`` (its bias into the BN that takes
    its whole output, unless a chain owns that BN), records and reports it."""
    bn_after = _bn_taking(rec, mods, cons, path)
    if bn_after is not None and any(r.get("bn") and mods[r["bn"]] is bn_after for r in records):
        bn_after = None
    new, how = _plain_layer(path, mods, build["prune_rate"], build["per_channel_gain"],
                            bn_after)
    records.append(dict(kind="plain", conv=path, layer=path, protos={path: _proto(mods[path])},
                        bias_in_bn=how == "bn running mean"))
    _set(model, path, new)
    report.converted.append(dict(paths=[path], new=type(new).__name__ if not isinstance(
        new, nn.Sequential) else "BinLinear", input=None, bn=False, bias=how or None,
        neuron=None, note=f"no neuron fused: {why}"))


def _report_left(mods: dict, taken: set, keep: set, state_problem: dict, recorded: bool,
                 seen_sequential: Optional[set], report: ConversionReport) -> None:
    """Reports every conv / linear / neuron left as it was, and why."""
    reported = {s["path"] for s in report.skipped}
    for path, m in mods.items():
        k = _kind(m)
        if path in taken or path in reported or k not in ("conv", "linear", "lif", "if", "node"):
            continue
        if path in keep:
            reason = "kept dense (keep_dense)"
        elif k in ("conv", "linear"):
            reason = ("not inside an nn.Sequential: its execution order is unknown without an "
                      "example_input (give one to convert it)")
        else:
            why = state_problem.get(path) or ""
            if recorded:
                reason = why or "not reached by a convertible conv/linear [+BN] [+residual]"
            elif seen_sequential is not None and path in seen_sequential:
                reason = why or "its conv/linear was not converted"
            else:
                reason = (f"{type(m).__name__} not preceded by a convertible conv/linear [+BN] "
                          "in an nn.Sequential" + (f"; also: {why}" if why else ""))
        report.skipped.append(dict(path=path, type=type(m).__name__, reason=reason))
