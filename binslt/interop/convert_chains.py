"""Chains of ``binslt.convert``: conv/linear [-> BN] [-> reshapes] [-> + residual] -> neuron,
followed in the recorded graph, or (without an example run) along the children of each
``nn.Sequential``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .convert_modules import _REAL, _SPIKE, InputKind, _Val
from .sj_graph import _ADDS, _RESHAPES, _Node, _Recorder
from .sj_modules import (
    _dropout_p,
    _is_neuron,
    _is_seq2ann,
    _kind,
    _layer_problem,
    _neuron_problem,
    _passes,
    _spiking,
    _step_mode,
)

# ---------------------------------------------------------------------------------------------
# Chains: conv/linear [-> BN] [-> reshapes] [-> + residual] -> neuron
# ---------------------------------------------------------------------------------------------


@dataclass
class _Chain:
    conv: str
    bn: Optional[str] = None
    neuron: Optional[str] = None
    residual: bool = False
    staged: bool = False
    units: list = field(default_factory=list)  # direct: [first (gets the layer), others]
    kind: _Val = _REAL  # what its input holds
    layer_input: str = "real"  # the new layer's ``input``: 'spike' (packed path) or 'real'
    add_first: bool = True  # the chain's value is the add's first operand
    note: str = ""


def _container_of(model_paths: dict, path: str) -> Optional[str]:
    """The path of the nearest SeqToANNContainer holding ``path``, if any."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        p = ".".join(parts[:i])
        if _is_seq2ann(model_paths[p]):
            return p
    return None


def _follow(rec: _Recorder, mods: dict, cons: dict, path: str):
    """(chain, reason): the chain from the conv/linear at ``path`` to its neuron, or why none."""
    m = mods[path]
    kind = _kind(m)
    bn_kind = "bn2d" if kind == "conv" else "bn1d"
    if rec.calls[path] != 1:
        return None, f"called {rec.calls[path]} times in one forward (a shared module)"
    node = rec.nodes[rec.module_node[path]]
    if len(node.outs) != 1:
        return None, "returns no single tensor"
    cur = node.outs[0]
    ch = _Chain(conv=path)
    ops: list[_Node] = []
    add = None
    while True:
        users = cons.get(cur, [])
        where = "its output" if cur == node.outs[0] else "the value on its way to a neuron"
        if not users:
            return None, f"{where} reaches no spiking neuron (it is the model's output)"
        if len(users) > 1:
            return None, (f"{where} is used {len(users)} times; only a single conv/linear -> [BN] "
                          "-> [+ residual] -> neuron chain fuses")
        c = rec.nodes[users[0]]
        if c.kind == "module":
            cm = mods[c.name]
            ck = _kind(cm)
            if ck == bn_kind and ch.bn is None and add is None and len(c.outs) == 1:
                if rec.calls[c.name] != 1:
                    return None, f"its BatchNorm {c.name} is called {rec.calls[c.name]} times"
                if cm.num_features != (m.out_channels if kind == "conv" else m.out_features):
                    return None, f"BatchNorm {c.name} has {cm.num_features} features"
                ch.bn = c.name
                cur = c.outs[0]
                continue
            if _is_neuron(cm):
                why = _neuron_problem(cm)
                if why:
                    return None, f"its neuron {c.name} is not converted: {why}"
                if rec.calls[c.name] != 1:
                    return None, f"its neuron {c.name} is called {rec.calls[c.name]} times"
                rank = rec.shapes[cur]
                want = 5 if kind == "conv" else 3
                if len(rank) != want:
                    return None, (f"its neuron {c.name} gets shape {rank}; binslt layers need "
                                  + ("[T, N, C, H, W]" if want == 5 else "[T, N, F]"))
                ch.neuron = c.name
                break
            return None, (f"{where} goes to {type(cm).__name__} ({c.name}), not to a BatchNorm "
                          "or a spiking neuron")
        if c.name in _RESHAPES and add is None and len(c.ins) == 1 and c.ins[0] == cur:
            ops.append(c)
            cur = c.outs[0]
            continue
        if c.name in _ADDS and add is None and len(c.ins) == 2 and not c.kwargs \
                and cur in c.ins and c.ins[0] != c.ins[1]:
            other = c.ins[1] if c.ins[0] == cur else c.ins[0]
            if rec.shapes[other] != rec.shapes[c.outs[0]] or rec.shapes[cur] != \
                    rec.shapes[c.outs[0]]:
                return None, "its residual add broadcasts (shapes differ)"
            add = c
            ch.residual = True
            ch.add_first = c.ins[0] == cur
            cur = c.outs[0]
            continue
        return None, f"{where} goes to the operation {c.name!r}"
    _set_units(rec, mods, ch, ops, 5 if kind == "conv" else 3)
    return ch, ""


def _set_units(rec: _Recorder, mods: dict, ch: _Chain, ops: list, rank: int) -> None:
    """Sets the chain's units (the modules, or SeqToANNContainers, replaced in place) and
    whether it is staged: a direct replacement needs no residual, reshapes only inside the
    containers (the SeqToANNContainer idiom) and a first unit taking one [T, N, ...] input."""
    unit_of = {p: (_container_of(mods, p) or p) for p in (ch.conv, ch.bn, ch.neuron) if p}
    units = list(dict.fromkeys(unit_of.values()))
    ok = not ch.residual
    members = set(unit_of)
    for u in units:
        if u not in members:  # a container: all its modules must be part of the chain
            inner = {f"{u}.{n}" for n, _ in mods[u].named_children()}
            ok = ok and inner <= members
    containers = {u for u in units if u not in members}
    ok = ok and all(o.scope in containers for o in ops)
    first_in = rec.io.get(units[0], ([], []))[0]
    ok = ok and len(first_in) == 1 and len(rec.shapes[first_in[0]]) == rank
    ch.staged = not ok
    ch.units = units


# ---------------------------------------------------------------------------------------------
# The fall-back without an example run: consecutive children of each nn.Sequential
# ---------------------------------------------------------------------------------------------


@dataclass
class _Elem:
    """One module of a Sequential's stream; ``owner`` is its child path in the Sequential,
    ``inner`` whether it sits inside a SeqToANNContainer."""

    module: nn.Module
    owner: str
    inner: bool
    path: str


def _stream(seq: nn.Sequential, prefix: str) -> list[_Elem]:
    out = []
    for name, child in seq.named_children():
        p = f"{prefix}.{name}" if prefix else name
        if _is_seq2ann(child):
            for sub_name, sub in child.named_children():
                out.append(_Elem(sub, p, True, f"{p}.{sub_name}"))
        else:
            out.append(_Elem(child, p, False, p))
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
    """(chain or None, reason, neuron_follows) for a conv/linear [+BN] + neuron run at
    stream[i]. ``neuron_follows``: False when the reason is only that no neuron follows."""
    first = stream[i]
    kind = _kind(first.module)
    bn_kind = "bn2d" if kind == "conv" else "bn1d"
    run = [first]
    j = i + 1
    if j < len(stream) and _kind(stream[j].module) == bn_kind:
        run.append(stream[j])
        j += 1
    if j >= len(stream) or not _is_neuron(stream[j].module):
        nxt = "the end of its Sequential" if j >= len(stream) else type(stream[j].module).__name__
        return None, f"not followed by a LIFNode or IFNode (next: {nxt})", False
    run.append(stream[j])
    owners = list(dict.fromkeys(e.owner for e in run))
    for e in stream:  # a SeqToANNContainer is replaced entirely or not at all
        if e.owner in owners and e not in run:
            return None, (f"shares a SeqToANNContainer with {type(e.module).__name__} "
                          f"({e.path}), which is not part of the pattern"), True
    for e in run[:-1]:
        why = _mode_problem(e)
        if why:
            return None, f"{e.path}: {why}", True
    why = _layer_problem(first.module)
    if why:
        return None, why, True
    why = _neuron_problem(run[-1].module)
    if why:
        return None, f"its neuron {run[-1].path}: {why}", True
    if len(run) == 3:
        bn = run[1].module
        c = first.module.out_channels if kind == "conv" else first.module.out_features
        if bn.num_features != c:
            return None, f"BatchNorm has {bn.num_features} features, the layer {c} outputs", True
    ch = _Chain(conv=first.path, bn=run[1].path if len(run) == 3 else None, neuron=run[-1].path,
                units=owners)
    return ch, "", True


def _sequential_chains(model: nn.Module, keep: set, inputs: _Val):
    """Chains (their input kinds set) and no-neuron layers found in nn.Sequentials (module
    order); ``inputs``: the kind of the model's inputs (the model's own Sequential takes them)."""
    chains, plain, seen = [], [], set()
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or _is_seq2ann(seq):
            continue
        stream = _stream(seq, seq_name)
        i = 0
        while i < len(stream):
            e = stream[i]
            if _kind(e.module) in ("conv", "linear") and e.path not in seen:
                seen.add(e.path)
                if e.path in keep:
                    i += 1
                    continue
                ch, why, follows = _match(stream, i)
                if ch is not None:
                    ch.kind = _stream_kind(stream, i, inputs if seq is model else _REAL)
                    chains.append(ch)
                    seen.update(p for p in (ch.bn, ch.neuron) if p)
                    i += 1 + (ch.bn is not None) + 1
                    continue
                plain.append((e.path, why))
            i += 1
    return chains, plain, seen


def _stream_kind(stream: list[_Elem], i: int, inputs: _Val) -> _Val:
    """The kind of stream[i]'s input from the modules before it in its Sequential; ``inputs``:
    the kind of what the Sequential itself takes."""
    def back(j):
        while j >= 0 and _passes(stream[j].module):
            j -= 1
        return j

    j = back(i - 1)
    if j < 0:
        return inputs
    m = stream[j].module
    if _spiking(m):
        return _SPIKE
    if _dropout_p(m) is not None:
        k = back(j - 1)
        if k >= 0 and _spiking(stream[k].module):
            return _Val(InputKind.DROPOUT, stream[j].path)
    return _REAL


def _bn_taking(rec: Optional[_Recorder], mods: dict, cons: dict, path: str):
    """The BN (matching kind, called once) that takes the whole output of the conv at ``path``,
    or None."""
    if rec is None or rec.calls[path] != 1:
        return None
    outs = rec.nodes[rec.module_node[path]].outs
    users = cons.get(outs[0], []) if len(outs) == 1 else []
    if len(users) != 1 or rec.nodes[users[0]].kind != "module":
        return None
    c = rec.nodes[users[0]]
    want = "bn2d" if _kind(mods[path]) == "conv" else "bn1d"
    return mods[c.name] if _kind(mods[c.name]) == want and rec.calls[c.name] == 1 else None
