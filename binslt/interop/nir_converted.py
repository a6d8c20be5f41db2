"""NIR export of a model converted by :func:`binslt.convert` (the user's SpikingJelly model with
binslt layers in it).

The user's forward is arbitrary code, so the graph comes from one recorded eval run of the
example input (``binslt.interop.sj_graph``: module calls and tensor operations, tensors by
identity and version), read value by value:

* ``BinSpikeConv2d`` / ``BinSpikeLinear`` (in place, or in a ``SpikeStage``) become a ``Conv2d``
  / ``Affine`` node (BN folded) into a ``LIF`` / ``IF`` node; the residual a staged layer gets
  is one more edge into that neuron (the user's ``out += identity`` adds the identity to the
  zeros of the ``InputTap``, so only the identity flows);
* ``BinConv2d`` / ``BinLinear`` (shortcuts, classifiers) become ``Conv2d`` / ``Affine`` nodes,
  with the BatchNorm or ``Bias`` that takes their whole output folded in;
* max pools of spikes become binslt's max-pool unit (``to_nir``'s ``maxpool`` form), average
  pools ``AvgPool2d`` (a global one followed by a flatten: binslt's global pool), flattens
  ``Flatten``; dropouts (eval), identities and reshapes that keep each sample's shape pass;
* a mean over T at the very end is the graph's ``mean_over_time`` readout; without it the graph
  returns the sequence ``[T, N, ...]`` as the model does.

Anything else (a SEW add of two spike trains, a neuron convert left alone, an operation with no
NIR node) raises :class:`NIRError` naming the module or operation and its type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..nn.layers import BinConv2d, BinLinear, BinSpikeConv2d, BinSpikeLinear, SpikeMaxPool2d
from .nir_format import FORMAT_NAME, FORMAT_VERSION, NIRError
from .sj_modules import _pair_square, _sj

_PASS_OPS = {"view", "reshape", "flatten", "contiguous", "view_as", "reshape_as", "clone",
             "detach", "float", "to", "unflatten"}
_ADD_OPS = {"add", "add_", "__add__", "__radd__", "__iadd__"}


@dataclass(frozen=True)
class _V:
    """A value of the recorded run: the NIR node carrying it, each sample's shape, whether it
    holds spikes; ``zero``: the zeros of an ``InputTap`` (nothing flows)."""

    src: str = ""
    shape: tuple = ()
    spike: bool = False
    zero: bool = False
    gpool: bool = False  # a global average pool's [C, 1, 1] (a flatten after it: binslt's)


def _is_type(m: nn.Module, *names: str) -> bool:
    """``m`` is a torch.nn or SpikingJelly ``layer`` module of one of these class names."""
    layer, _, _ = _sj()
    for n in names:
        for ns in (nn, layer):
            cls = getattr(ns, n, None)
            if isinstance(cls, type) and isinstance(m, cls):
                return True
    return False


def _square(v, what: str, where: str) -> int:
    if isinstance(v, (tuple, list)) and len(v) != 2:
        raise NIRError(f"{where}: {what} {tuple(v)} is not a pair")
    n, why = _pair_square(v, what)
    if n is None:
        raise NIRError(f"{where}: {why}; NIR max/avg pools are written square")
    return n


class _Graph:
    """One walk over the recorded run of a converted model, adding nodes to an ``_Exporter``."""

    def __init__(self, ex, rec, mods: dict, T: int, N: int):
        self.ex, self.rec, self.mods, self.T, self.N = ex, rec, mods, T, N
        self.vals: dict = {}
        self.cons = rec.consumers()
        self.folded: set[int] = set()
        self.readout = "sequence"

    # -- values -------------------------------------------------------------------------------
    def sample_shape(self, key) -> tuple:
        s = self.rec.shapes[key]
        if len(s) >= 2 and tuple(s[:2]) == (self.T, self.N):
            return tuple(s[2:])
        if s and s[0] == self.T * self.N:
            return tuple(s[1:])
        raise NIRError(f"a value of shape {list(s)} in the forward is not [T={self.T}, "
                       f"N={self.N}, ...]: NIR graphs carry each sample's values over time")

    def get(self, key, who: str) -> _V:
        if key not in self.vals:
            raise NIRError(f"{who}: its input does not come from the model's input through "
                           "modules and operations binslt writes to NIR")
        return self.vals[key]

    def uniq(self, base: str) -> str:
        name, i = base, 1
        while name in self.ex.nodes:
            i += 1
            name = f"{base}_{i}"
        return name

    def only_consumer(self, key) -> Optional[int]:
        c = self.cons.get(key, [])
        return c[0] if len(c) == 1 else None

    # -- the walk -----------------------------------------------------------------------------
    def run(self, input_key, output_key, input_name: str, spike_input: bool) -> str:
        self.vals[input_key] = _V(input_name, self.sample_shape(input_key), spike_input)
        for i, node in enumerate(self.rec.nodes):
            if i in self.folded:
                continue
            if node.kind == "module":
                self.module(node)
            else:
                self.op(node, output_key)
        out = self.get(output_key, "the model's output")
        if out.zero:
            raise NIRError("the model's output is the zeros of an InputTap")  # pragma: no cover
        return out.src

    def set_out(self, node, v: _V) -> None:
        for k in node.outs:
            self.vals[k] = v

    def op(self, node, output_key) -> None:
        known = [k for k in node.ins if k in self.vals]
        if not known:
            return  # arithmetic on parameters or constants, outside the data path
        where = f"operation {node.name!r} in the forward of {node.scope or 'the model'!r}"
        if node.name in _PASS_OPS and len(known) == 1 and len(node.outs) == 1:
            base = f"{node.scope}.{node.name}" if node.scope else node.name
            self.set_out(node, self.reshape(known[0], node.outs[0], base, where))
        elif node.name in _ADD_OPS and len(node.ins) == 2 and len(known) == 2 and not node.consts:
            a, b = (self.vals[k] for k in node.ins)
            if not (a.zero or b.zero):
                raise NIRError(f"{where}: an add of two values that are not a converted "
                               "layer's residual (a SEW add of spike trains, say) has no NIR "
                               "node binslt writes")
            self.set_out(node, b if a.zero else a)
        elif (node.name == "mean" and node.consts == (0,) and len(known) == 1
              and node.outs == [output_key]):
            self.readout = "mean_over_time"
            self.set_out(node, self.vals[known[0]])
        else:
            raise NIRError(f"{where} has no NIR node binslt writes (it writes convs, linears, "
                           "BN, LIF/IF neurons, max/avg pools, flattens, residual adds into a "
                           "neuron and a final mean over T)")

    def reshape(self, key_in, key_out, name: str, where: str) -> _V:
        """A reshape, flatten, dropout (eval) or identity: the same value where each sample
        keeps its shape, a ``Flatten`` node where it becomes a vector."""
        v = self.vals[key_in]
        if v.zero:
            return v
        shape = self.sample_shape(key_out)
        if shape == v.shape:
            return v
        if len(shape) == 1 and shape[0] == int(np.prod(v.shape)):
            return _V(self.flatten(self.uniq(name), v), shape, v.spike)
        raise NIRError(f"{where}: reshapes each sample from {list(v.shape)} to {list(shape)}; "
                       "NIR writes flattening to a vector only")

    def flatten(self, name: str, v: _V) -> str:
        meta = {"binslt": json.dumps({"layer": name,
                                      "kind": "global_avgpool" if v.gpool else "flatten"})}
        node = self.ex.nir.Flatten(input_type={"input": np.array(v.shape)}, start_dim=0,
                                   end_dim=-1, metadata=meta)
        return self.ex.add(name, node, [v.src])

    def module(self, node) -> None:
        m, path = self.mods[node.name], node.name
        who = f"module {path!r} ({type(m).__name__})"
        if type(m).__name__ == "InputTap":
            self.set_out(node, _V(zero=True))
            return
        ins = [self.get(k, who) for k in node.ins]
        if not ins:
            raise NIRError(f"{who} takes no tensor input")  # pragma: no cover
        if isinstance(m, (BinSpikeConv2d, BinSpikeLinear)):
            self.set_out(node, self.spiking(path, m, ins, who))
        elif isinstance(m, (BinConv2d, BinLinear)):
            self.set_out(node, self.plain(node, m, ins[0], who))
        elif len(ins) != 1:
            raise NIRError(f"{who} takes {len(ins)} tensors; binslt writes one-input modules")
        elif _is_type(m, "Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
                      "AlphaDropout", "Flatten"):
            self.set_out(node, self.reshape(node.ins[0], node.outs[0], path, who))
        elif isinstance(m, SpikeMaxPool2d) or _is_type(m, "MaxPool2d"):
            self.set_out(node, self.maxpool(path, m, ins[0], who))
        elif _is_type(m, "AvgPool2d", "AdaptiveAvgPool2d"):
            self.set_out(node, self.avgpool(path, m, ins[0], node.outs[0], who))
        else:
            raise NIRError(f"{who} has no NIR mapping; binslt writes converted layers "
                           "(BinSpikeConv2d/Linear, BinConv2d/Linear with their BN or bias), "
                           "max pools of spikes, average pools, flattens, dropouts and "
                           "identities")

    # -- modules ------------------------------------------------------------------------------
    def spiking(self, path: str, m, ins: list, who: str) -> _V:
        if float(m.input_gain) != 1.0:  # pragma: no cover - eval runs set it to 1
            raise NIRError(f"{who}: input_gain {m.input_gain} != 1 (a dropout in training)")
        x, rest = ins[0], [v for v in ins[1:] if not v.zero]
        if len(rest) > 1:
            raise NIRError(f"{who} takes {len(rest)} residual inputs")  # pragma: no cover
        residual = rest[0].src if rest else None
        if isinstance(m, BinSpikeLinear):
            if len(x.shape) != 1:
                raise NIRError(f"{who} takes [T, N, features]; got samples {list(x.shape)}")
            a, o = self.ex.affine(path, m, x.src, x.shape[0], m.bn)
            srcs = [a] if residual is None else [a, residual]
            return _V(self.ex.neuron(path, m.neuron, (o,), srcs, a), (o,), True)
        if m.pool > 1:
            if residual is not None:  # pragma: no cover - convert fuses no pool with residuals
                raise NIRError(f"{who}: a fused pool with a residual input")
            src, shape = self.ex.pooled_conv(path, m, x.src, x.shape, f"{path}.pool")
        else:
            src, shape = self.ex.spiking_conv(path, m, m, m.neuron, x.src, x.shape, residual)
        return _V(src, tuple(shape), True)

    def plain(self, node, m, x: _V, who: str) -> _V:
        """BinConv2d / BinLinear, with the BatchNorm (conv) or ``Bias`` (linear) module that
        takes all of its output folded in."""
        j = self.only_consumer(node.outs[0]) if len(node.outs) == 1 else None
        after = self.rec.nodes[j] if j is not None and self.rec.nodes[j].kind == "module" \
            else None
        nxt = self.mods[after.name] if after is not None else None
        if isinstance(m, BinConv2d):
            fold = nxt if isinstance(nxt, nn.modules.batchnorm._BatchNorm) else None
            if fold is not None and m.bn is not None:
                raise NIRError(f"{who} has its own BN and one after it")  # pragma: no cover
            if len(x.shape) != 3:
                raise NIRError(f"{who} takes [T, N, C, H, W]; got samples {list(x.shape)}")
            rec = self.ex.masked_record(node.name, m, "conv")
            src, shape = self.ex._emit_conv(
                node.name, m.effective_weight().detach().float(), torch.zeros(m.out_channels),
                m.bn, m.stride, m.padding, m.kernel_size, x.src, x.shape, rec, bn_module=fold)
        else:
            fold = nxt if type(nxt).__name__ == "Bias" else None
            if len(x.shape) != 1:
                raise NIRError(f"{who} takes [T, N, features]; got samples {list(x.shape)}")
            src, o = self.ex.affine(node.name, m, x.src, x.shape[0], None, kind="linear",
                                    bias=None if fold is None else fold.bias)
            shape = (o,)
        if fold is not None:
            self.folded.add(j)
            self.set_out(after, _V(src, tuple(shape), False))
        return _V(src, tuple(shape), False)

    def maxpool(self, path: str, m, x: _V, who: str) -> _V:
        if not x.spike:
            raise NIRError(f"{who}: a max pool of real values has no NIR node; binslt writes "
                           "max pools of spikes")
        if _is_type(m, "MaxPool2d") and (m.ceil_mode or _square(m.dilation, "dilation", who)
                                         != 1 or getattr(m, "return_indices", False)):
            raise NIRError(f"{who}: ceil_mode, dilation and return_indices are not written")
        k = _square(m.kernel_size, "kernel_size", who)
        s = _square(m.stride if m.stride is not None else k, "stride", who)
        unit = SpikeMaxPool2d(k, s, _square(m.padding, "padding", who))
        src, shape = self.ex.maxpool_unit(path, unit, x.src, x.shape)
        return _V(src, tuple(shape), True)

    def avgpool(self, path: str, m, x: _V, key_out, who: str) -> _V:
        out = self.sample_shape(key_out)
        if len(x.shape) != 3 or len(out) != 3:
            raise NIRError(f"{who} takes [T, N, C, H, W]")  # pragma: no cover
        if _is_type(m, "AdaptiveAvgPool2d"):
            (_, h, w), (_, ho, wo) = x.shape, out
            if h % ho or w % wo:
                raise NIRError(f"{who}: output {ho}x{wo} does not divide the input {h}x{w}")
            k, s, p = (h // ho, w // wo), (h // ho, w // wo), (0, 0)
        else:
            if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
                raise NIRError(f"{who}: ceil_mode, count_include_pad=False and "
                               "divisor_override are not written")
            k = (_square(m.kernel_size, "kernel_size", who),) * 2
            s = (_square(m.stride if m.stride else m.kernel_size, "stride", who),) * 2
            p = (_square(m.padding, "padding", who),) * 2
        pool = self.ex.nir.AvgPool2d(kernel_size=np.array(k), stride=np.array(s),
                                     padding=np.array(p))
        glob = out[1:] == (1, 1) and k == x.shape[1:]
        return _V(self.ex.add(f"{path}.avgpool", pool, [x.src]), out, False, gpool=glob)


def export_converted(ex, model: nn.Module, example_input, spike_input: bool) -> tuple:
    """Add the nodes of converted ``model`` to ``ex`` (an ``_Exporter``) from one recorded eval
    run of ``example_input`` ``[T, N, ...]``. Returns (input shape, output node, output shape,
    readout, T)."""
    from .sj_graph import _record

    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 3:
        raise NIRError("to_nir of a converted model needs example_input: one tensor [T, N, ...] "
                       "as the model takes (the graph comes from a recorded run)")
    T, N = int(example_input.shape[0]), int(example_input.shape[1])
    rec = _record(model, example_input)
    ins, outs = rec.io.get("", ([], []))
    if len(ins) != 1 or len(outs) != 1:
        raise NIRError(f"to_nir writes models of one input and one output tensor (the forward "
                       f"takes {len(ins)} and returns {len(outs)})")
    g = _Graph(ex, rec, dict(model.named_modules()), T, N)
    shape = g.sample_shape(ins[0])
    inp = ex.add("input", ex.nir.Input(input_type={"input": np.array(shape)}), [])
    src = g.run(ins[0], outs[0], inp, spike_input)
    out_shape = rec.shapes[outs[0]][1 if g.readout == "mean_over_time" else 2:]
    return shape, src, tuple(out_shape), g.readout, T


def converted_metadata(model: nn.Module, readout: str, T: int, dt: float, maxpool: str,
                       alphas: dict) -> dict:
    """The graph metadata of a converted model's NIR export."""
    from .. import __version__

    cfg = dict(model.__dict__.get("build_config") or {})
    return {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
        "binslt_version": __version__, "arch": str(cfg.get("arch", "converted")),
        "variant": str(cfg.get("variant", "binwslt")),
        "prune_rate": float(cfg.get("prune_rate", 0.0)), "timesteps": int(T), "dt": float(dt),
        "maxpool": maxpool, "encoding": "sequence", "readout": readout,
        "build_config": json.dumps(cfg, sort_keys=True), "alpha": json.dumps(alphas),
    }


def is_converted(model) -> bool:
    return isinstance(model, nn.Module) and model.__dict__.get("_binslt_conversion") is not None

