"""The recorded run of ``binslt.convert``: module calls and tensor operations of the user's
forward, tensors known by identity and version; and the input kind of every value, read from
what produces it in that graph and confirmed by the values."""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..nn.layers import (
    _MaskedSignWeight,
)
from .convert_modules import (
    _REAL,
    _SPIKE,
    _SPIKE_SUM,
    ConversionReport,
    ExampleRunError,
    InputKind,
    _Val,
)
from .sj_modules import _dropout_p, _kind, _passes, _spiking

# ---------------------------------------------------------------------------------------------
# The recorded run: module calls and tensor operations, tensors by identity and version
# ---------------------------------------------------------------------------------------------

_RESHAPES = {"view", "reshape", "flatten", "unflatten", "contiguous", "view_as", "reshape_as"}
_ADDS = {"add", "add_", "__add__", "__radd__", "__iadd__"}
# operations whose output holds the values of their first input (rearranged, selected, maxed)
_PASSING_OPS = _RESHAPES | {
    "permute", "transpose", "t", "movedim", "squeeze", "unsqueeze", "clone", "detach",
    "__getitem__", "expand", "expand_as", "repeat", "narrow", "chunk", "split", "unbind", "float",
    "double", "half", "to", "type_as", "max_pool1d", "max_pool2d", "max_pool3d",
    "_max_pool1d", "_max_pool2d", "_max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d"}
_JOINING_OPS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_MULS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply"}
_RSUBS = {"__rsub__", "rsub"}
_MAX_LEVELS = 8  # distinct values kept per observed input (more: real-valued)


def _levels(x: torch.Tensor) -> Optional[frozenset]:
    """The distinct values of x (at most _MAX_LEVELS of them), or None."""
    u = torch.unique(x.detach())
    return frozenset(u.double().tolist()) if u.numel() <= _MAX_LEVELS else None


def _union(a: Optional[frozenset], b: Optional[frozenset]) -> Optional[frozenset]:
    if a is None or b is None or len(a | b) > _MAX_LEVELS:
        return None
    return a | b


@dataclass
class _Node:
    kind: str  # 'module' or 'op'
    name: str  # module path or op name
    ins: list
    outs: list = field(default_factory=list)
    scope: str = ""  # innermost non-leaf module running when an op was recorded
    kwargs: tuple = ()
    consts: tuple = ()  # an op's number arguments (``1.0 - y``: (1.0,))


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.nodes: list[_Node] = []
        self.alive: list[torch.Tensor] = []  # keeps ids unique for the run
        self.shapes: dict = {}
        self.depth = 0
        self.quiet = False
        self.calls: Counter = Counter()
        self.stack: list[str] = []
        self.module_node: dict[str, int] = {}  # path -> node index of its (last) call
        self.io: dict[str, tuple] = {}  # any module path -> (in keys, out keys) of its last call
        self.levels: dict[str, Optional[frozenset]] = {}  # conv/linear -> values its input held
        self.handles = []
        self.leaves = {}
        for path, m in model.named_modules():
            leaf = (_kind(m) != "other" or isinstance(m, _MaskedSignWeight)
                    or next(m.children(), None) is None)
            self.leaves[id(m)] = leaf
            self.handles.append(m.register_forward_pre_hook(self._pre(path, m), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post(path, m), with_kwargs=True))

    def _keys(self, obj) -> list:
        out = []
        for t in tree_flatten(obj)[0]:
            if isinstance(t, torch.Tensor):
                self.alive.append(t)
                k = (id(t), t._version)
                self.shapes[k] = tuple(t.shape)
                out.append(k)
        return out

    def _pre(self, path, m):
        leaf = self.leaves[id(m)]

        def hook(mod, args, kwargs):
            self.calls[path] += 1
            if self.depth == 0:
                ins = self._keys((args, kwargs))
                self.io[path] = (ins, [])
                if leaf:
                    self.module_node[path] = len(self.nodes)
                    self.nodes.append(_Node("module", path, ins))
                    if _kind(m) in ("conv", "linear"):
                        self.quiet = True
                        try:
                            xs = [a for a in tree_flatten((args, kwargs))[0]
                                  if isinstance(a, torch.Tensor)]
                            lv = _levels(xs[0]) if len(xs) == 1 else None
                        finally:
                            self.quiet = False
                        self.levels[path] = (_union(self.levels[path], lv)
                                             if path in self.levels else lv)
                else:
                    self.stack.append(path)
            if leaf:
                self.depth += 1

        return hook

    def _post(self, path, m):
        leaf = self.leaves[id(m)]

        def hook(mod, args, kwargs, out):
            if leaf:
                self.depth -= 1
            new = None
            if self.depth == 0:
                if leaf and isinstance(out, torch.Tensor) and any(
                        out is a for a in tree_flatten((args, kwargs))[0]):
                    # a module that returns its input object (a dropout in eval mode) still
                    # makes a value of its own: a view, so that its uses are told apart
                    self.quiet = True
                    try:
                        out = new = out.view_as(out)
                    finally:
                        self.quiet = False
                outs = self._keys(out)
                self.io[path] = (self.io.get(path, ([], []))[0], outs)
                if leaf:
                    self.nodes[self.module_node[path]].outs = outs
                elif self.stack and self.stack[-1] == path:
                    self.stack.pop()
            return new

        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth > 0 or self.quiet:
            return func(*args, **kwargs)
        ins = self._keys(args)
        out = func(*args, **kwargs)
        outs = self._keys(out)
        if outs:
            consts = tuple(a for a in tree_flatten(args)[0]
                           if isinstance(a, (int, float)) and not isinstance(a, bool))
            self.nodes.append(_Node("op", getattr(func, "__name__", str(func)), ins, outs,
                                    self.stack[-1] if self.stack else "",
                                    tuple(sorted(kwargs)), consts))
        return out

    def consumers(self) -> dict:
        cons: dict = {}
        for i, n in enumerate(self.nodes):
            for k in dict.fromkeys(n.ins):
                cons.setdefault(k, []).append(i)
        return cons

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _record(model: nn.Module, example_input, training: bool = False) -> _Recorder:
    """One no-grad run of ``example_input``, recorded, from reset states (reset again after), in
    eval mode or in training mode (active dropouts and every mode-dependent forward; BatchNorms
    stay on their running statistics, so that an example of one image and one step runs and no
    statistics move). The model comes back as it was: its modes, its buffers and the random
    number state (dropout masks draw from it)."""
    from spikingjelly.activation_based import functional

    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers(),
                                                    *_tensors(example_input)] if t.is_cuda})
    rec = _Recorder(model)
    model.train(training)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.training = False
    try:
        with torch.random.fork_rng(devices=devices):
            functional.reset_net(model)
            with rec:
                if isinstance(example_input, (tuple, list)):
                    model(*example_input)
                else:
                    model(example_input)
    finally:
        rec.close()
        functional.reset_net(model)
        for m, t in modes.items():
            m.training = t
        for b, saved in buffers:
            b.copy_(saved)
    return rec


def _tensors(obj) -> list:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------------------------------------
# Input kinds: from what produces each value in the recorded graph, confirmed by the values
# ---------------------------------------------------------------------------------------------


def _value_kinds(rec: _Recorder, mods: dict, inputs: _Val) -> dict:
    """key -> _Val for the values of the recorded run, in execution order: a spiking neuron
    makes spikes; max-pools, flattens, reshapes and the like keep their input's kind; a dropout
    turns spikes into dropout spikes; an add of spikes or spike sums makes a spike sum; a product
    of spikes (SEW AND) or ``1 - spikes`` (SEW IAND) stays spikes. The model's inputs are
    ``inputs``; every other value (images, BN outputs, average pools, ...) is real."""
    kinds: dict = {k: inputs for k in rec.io.get("", ([], []))[0]}

    def of(k) -> _Val:
        return kinds.get(k, _REAL)

    for n in rec.nodes:
        out = _REAL
        ins = [of(k) for k in n.ins]
        if n.kind == "module":
            m = mods[n.name]
            if _spiking(m):
                out = _SPIKE
            elif len(ins) == 1 and _passes(m):
                out = ins[0]
            elif len(ins) == 1 and _dropout_p(m) is not None and ins[0] == _SPIKE:
                out = _Val(InputKind.DROPOUT, n.name)
        elif n.name in _PASSING_OPS and ins:
            out = ins[0]
        elif n.name in _JOINING_OPS and ins:
            out = ins[0]
            for v in ins[1:]:
                out = out.join(v)
        elif n.name in _ADDS and len(ins) == 2 and not n.kwargs and not n.consts and all(
                v.kind in (InputKind.SPIKE, InputKind.SPIKE_SUM) for v in ins):
            out = _SPIKE_SUM
        elif n.name in _MULS and not n.kwargs:
            counts = all(v.kind in (InputKind.SPIKE, InputKind.SPIKE_SUM) for v in ins)
            if len(ins) == 2 and not n.consts and counts:
                out = _SPIKE if ins == [_SPIKE, _SPIKE] else _SPIKE_SUM
            elif len(ins) == 1 and n.consts in ((1,), (1.0,)):
                out = ins[0]
            elif len(ins) == 1 and len(n.consts) == 1 and counts and n.consts[0] >= 0 \
                    and float(n.consts[0]).is_integer():
                out = _SPIKE_SUM
        elif n.name in _RSUBS and ins == [_SPIKE] and n.consts in ((1,), (1.0,)) \
                and not n.kwargs:
            out = _SPIKE  # 1 - s of spikes s (SEW IAND)
        for k in n.outs:
            kinds[k] = out
    return kinds


def _input_of(rec: _Recorder, kinds: dict, path: str) -> _Val:
    """The kind of the conv / linear at ``path``'s input in the recorded run (its last call)."""
    if path not in rec.module_node:
        return _REAL
    ins = rec.nodes[rec.module_node[path]].ins
    return kinds.get(ins[0], _REAL) if len(ins) == 1 else _REAL


def _fits(v: _Val, levels: Optional[frozenset], p: Optional[float]) -> bool:
    """Whether observed input values (``_levels``) agree with kind ``v`` (dropout probability
    ``p`` for DROPOUT)."""
    if v.kind is InputKind.REAL:
        return True
    if levels is None:
        return False
    if v.kind is InputKind.SPIKE:
        return levels <= {0.0, 1.0}
    if v.kind is InputKind.SPIKE_SUM:
        return all(x >= 0 and float(x).is_integer() for x in levels)
    s = 1.0 / (1.0 - p)
    return all(x in (0.0, 1.0) or math.isclose(x, s, rel_tol=1e-6) for x in levels)


def _dropout_takers(rec: _Recorder, mods: dict, cons: dict, path: str) -> Optional[list]:
    """The conv / linear paths that take the output of the dropout at ``path`` (through passing
    modules and operations), or None if anything else takes some of it."""
    if rec.calls[path] != 1 or path not in rec.module_node:
        return None
    todo = list(rec.nodes[rec.module_node[path]].outs)
    takers = []
    while todo:
        k = todo.pop()
        for i in cons.get(k, []):
            c = rec.nodes[i]
            if c.kind == "module" and _passes(mods[c.name]) or (
                    c.kind == "op" and c.name in _PASSING_OPS and c.ins and c.ins[0] == k):
                todo.extend(c.outs)
            elif c.kind == "module" and _kind(mods[c.name]) in ("conv", "linear"):
                takers.append(c.name)
            else:
                return None
    return takers or None


# ---------------------------------------------------------------------------------------------
# The model's state before the runs, and a failed run in one line
# ---------------------------------------------------------------------------------------------


def _held_state(model: nn.Module) -> dict:
    """path -> the state a SpikingJelly module holds from an earlier run (a neuron's ``v`` that
    is a tensor, a dropout's mask): memories that differ from their reset values."""
    from spikingjelly.activation_based import base

    held = {}
    for path, m in model.named_modules():
        if not isinstance(m, base.MemoryModule):
            continue
        for name, cur in m._memories.items():
            rv = m._memories_rv.get(name)
            if isinstance(cur, torch.Tensor) or isinstance(rv, torch.Tensor):
                same = (isinstance(cur, torch.Tensor) and isinstance(rv, torch.Tensor)
                        and cur.shape == rv.shape and bool(torch.equal(cur.cpu(), rv.cpu())))
            else:
                try:
                    same = bool(cur == rv)
                except Exception:  # noqa: BLE001 -- e.g. lists of tensors: not the reset value
                    same = False
            if not same:
                held[path or type(m).__name__] = name
                break
    return held


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy; state tensors that autograd produced (a neuron's ``v`` after a training
    call), which deepcopy refuses, are copied detached."""
    memo = {}
    for m in model.modules():
        for t in getattr(m, "_memories", {}).values():
            if isinstance(t, torch.Tensor) and not t.is_leaf:
                memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)


def _run_failure(exc: BaseException, example_input, training: bool) -> str:
    """One line: the example run failed, why, and the fix."""
    msg = (str(exc).strip().splitlines() or [""])[0]
    shapes = [tuple(t.shape) for t in _tensors(example_input)]
    mode = " in training mode" if training else ""
    head = (f"convert: the example run{mode} failed ({type(exc).__name__}: {msg}) on "
            f"example_input of shape {shapes[0] if len(shapes) == 1 else shapes}")
    if len(shapes) == 1 and len(shapes[0]) in (2, 4):
        fix = ("example_input must be multi-step [T, N, ...] ([T, N, C, H, W] for images; "
               "SpikingJelly models in step mode 'm'): add the T axis, e.g. "
               "x.unsqueeze(0).repeat(T, 1, 1, 1, 1)")
    elif training:
        fix = "the model must also run in training mode (model.train())"
    else:
        fix = "give an input that model(example_input) runs on"
    return f"{head}; {fix} (strict=False converts without the run, as far as it can)"


def _refuse_held_state(model: nn.Module) -> None:
    """ExampleRunError when SpikingJelly modules of ``model`` hold state from an earlier run."""
    held = _held_state(model)
    if held:
        first = ", ".join(f"{p} ({n})" for p, n in list(held.items())[:3])
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        raise ExampleRunError(
            f"convert: {len(held)} SpikingJelly module(s) hold state from an earlier run: "
            f"{first}{more}; call spikingjelly.activation_based.functional.reset_net(model) "
            "first (strict=False converts without those neurons)")


def _example_runs(model: nn.Module, example_input, spike_input: bool, strict: bool,
                  report: ConversionReport):
    """(eval run, training run, the kind of the model's inputs): the recorded runs of
    ``example_input`` (None without one, or where a run failed with ``strict=False``)."""
    inputs = _SPIKE if spike_input else _REAL
    if example_input is None:
        report.method = "sequential (no example_input: only nn.Sequential runs are found)"
        return None, None, inputs
    if spike_input and not all(_fits(_SPIKE, _levels(t), None) for t in _tensors(example_input)):
        msg = "spike_input=True, but example_input holds values other than 0 and 1"
        if strict:
            raise ValueError(f"convert: {msg}; drop spike_input for real-valued inputs")
        report.notes.append(f"{msg}: the model's inputs are taken as real")
        inputs = _REAL
    try:
        rec = _record(model, example_input)
    except Exception as exc:  # noqa: BLE001 -- the user's forward: one line, or fall back
        if strict:
            raise ExampleRunError(_run_failure(exc, example_input, False)) from None
        msg = (str(exc).strip().splitlines() or [""])[0]
        report.method = f"sequential (the example run failed: {type(exc).__name__}: {msg})"
        return None, None, inputs
    try:
        rec_train = _record(model, example_input, training=True)
    except Exception as exc:  # noqa: BLE001
        if strict:
            raise ExampleRunError(_run_failure(exc, example_input, True)) from None
        report.notes.append(f"the example run in training mode failed "
                            f"({type(exc).__name__}); kinds from the eval run only")
        rec_train = None
    return rec, rec_train, inputs
