"""Reading a NIR graph (or a ``.nir`` file) into a :class:`~binslt.interop.nir_units.NIRNet`:
the file check, the neuron mapping, the walk over the graph in topological order, and the
synapses that become frozen binslt layers (a gain times {-1, 0, +1}) or stay dense
(docs/nir.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import ops
from ..nn.layers import (
    BinConv2d,
    BinLinear,
    BinSpikeConv2d,
    BinSpikeLinear,
    _MaskedSignWeight,
)
from .nir_format import DEFAULT_DT, FORMAT_NAME, NIRError, PathLike, _bn_fold, _nir
from .nir_units import (
    NIRNet,
    _BiasOp,
    _BinConvSeq,
    _dense,
    _DenseSpiking,
    _GlobalMean,
    _Neuron,
    _PerStep,
    _ScaleOp,
    _SpikeOr,
    _Spiking,
    _Sum,
    _SumPool,
    _ThresholdOp,
)

__all__ = ["from_nir", "read_nir"]


def read_nir(path: PathLike):
    """``nir.read`` with one clear :class:`NIRError` for a missing, truncated or corrupt file."""
    nir = _nir()
    path = Path(path)
    p = repr(str(path))
    if not path.is_file():
        raise NIRError(f"{p}: no such NIR file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head != b"\x89HDF\r\n\x1a\n":
        raise NIRError(f"{p} is not a NIR file (NIR files are HDF5; this one does not start "
                       "with the HDF5 signature)")
    try:
        graph = nir.read(str(path))
    except Exception as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise NIRError(f"{p} is corrupt or truncated (nir.read failed: {msg[:200]})") from None
    if not isinstance(graph, nir.NIRGraph):
        raise NIRError(f"{p} holds a single {type(graph).__name__} node, not a NIR graph")
    return graph


def _meta(node) -> dict:
    raw = (getattr(node, "metadata", None) or {}).get("binslt")
    if raw is None:
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode("utf8")
    try:
        val = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return {}
    return val if isinstance(val, dict) else {}


def _uniform(a, what: str, where: str) -> float:
    arr = np.asarray(a, dtype=np.float64).reshape(-1)
    if arr.size == 0 or not np.all(arr == arr[0]):
        raise NIRError(f"{where}: {what} differs between neurons; binslt neurons share one value "
                       "per layer")
    v = float(arr[0])
    if not math.isfinite(v):
        raise NIRError(f"{where}: {what} = {v} is not finite")
    return v


def _pair(v, what: str, where: str) -> int:
    arr = np.asarray(v).reshape(-1)
    if arr.size == 1:
        arr = np.array([arr[0], arr[0]])
    if arr.size != 2 or arr[0] != arr[1]:
        raise NIRError(f"{where}: {what} {arr.tolist()} is not square; binslt layers take "
                       "square kernels, strides and padding")
    return int(arr[0])


def _ternary(w: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-output-channel gain g if ``w`` is g[c] times {-1, 0, +1} (exactly), else None."""
    flat = w.reshape(w.shape[0], -1)
    g = flat.abs().amax(dim=1)
    ok = ((flat == 0) | (flat.abs() == g[:, None])).all()
    return g if bool(ok) and bool((g > 0).any()) else None


def _neuron_from_node(node, nir, dt: float, where: str, backend: str) -> nn.Module:
    if not isinstance(node, (nir.LIF, nir.IF)):
        raise NIRError(f"{where}: {type(node).__name__} is not a neuron binslt reads")
    thr = _uniform(node.v_threshold, "v_threshold", where)
    v_reset = _uniform(node.v_reset, "v_reset", where)
    if v_reset != 0.0:
        raise NIRError(f"{where}: v_reset={v_reset} != 0 is not read (the membrane starts at 0)")
    r = _uniform(node.r, "r", where)
    if isinstance(node, nir.IF):
        # V += R dt X (forward Euler): R = 1/dt is H = V + X, up to the rounding of 1/dt
        gain = r * dt
        return _Neuron(math.inf, False, thr, gain=1.0 if math.isclose(gain, 1.0, rel_tol=1e-6)
                       else gain, backend=backend)
    if _uniform(node.v_leak, "v_leak", where) != 0.0:
        raise NIRError(f"{where}: v_leak != v_reset = 0 has no binslt neuron")
    k = _uniform(node.tau, "tau", where) / dt  # binslt tau (in steps)
    if k < 1.0:
        raise NIRError(f"{where}: tau/dt = {k:g} < 1 is unstable under forward Euler with "
                       f"dt = {dt:g} (pass the file's dt to from_nir)")
    if math.isclose(r, 1.0, rel_tol=1e-6):
        return _Neuron(k, True, thr, backend=backend)
    if math.isclose(r, k, rel_tol=1e-6):
        return _Neuron(k, False, thr, backend=backend)
    return _Neuron(k, False, thr, gain=r / k, backend=backend)


def _topo(graph, where: str) -> list[str]:
    preds = {n: [] for n in graph.nodes}
    for a, b in graph.edges:
        if a not in graph.nodes or b not in graph.nodes:
            raise NIRError(f"{where}: edge ({a!r}, {b!r}) names a node the graph does not have")
        preds[b].append(a)
    order, state = [], {}

    def visit(n, stack):
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise NIRError(f"{where}: node {n!r} is on a cycle; binslt reads feed-forward graphs "
                           "(no recurrent connections)")
        state[n] = 1
        for p in preds[n]:
            visit(p, stack)
        state[n] = 2
        order.append(n)

    for n in graph.nodes:
        visit(n, [])
    return order


def from_nir(graph_or_path, *, dt: Optional[float] = None, timesteps: Optional[int] = None,
             backend: str = "auto") -> NIRNet:
    """Read a NIR graph (a ``nir.NIRGraph`` or a ``.nir`` file) into a runnable :class:`NIRNet`.

    Conv2d / Affine nodes whose weights are a gain per output channel times {-1, 0, +1}
    become frozen binslt layers (``BinSpikeConv2d`` / ``BinSpikeLinear`` fused with the LIF
    that follows, ``BinConv2d`` / ``BinLinear`` otherwise) computing from packed bits; other
    weights become dense ``nn.Conv2d`` / ``nn.Linear``. For files written by binslt the layers'
    gains and BatchNorm statistics come from the node metadata (checked against the weights),
    so the model computes exactly what the exported one did. Files of other writers
    (SpikingJelly's ``export_to_nir``) are read from their parameters alone.

    ``dt``: the step the time constants were written for (default: the file's, else 1e-4, as
    SpikingJelly and snnTorch). ``timesteps``: T for image input (default: the file's).

    Args:
        graph_or_path (nir.NIRGraph, str or os.PathLike): the graph, or a ``.nir`` file.
        dt (float or None): see above.
        timesteps (int or None): see above.
        backend (str): the binslt layers' kernel backend.

    Returns:
        A :class:`NIRNet`: images [N, C, H, W] (repeated over T) or spikes [T, N, ...] ->
        the graph's output averaged over T, e.g. logits [N, num_classes].

    Raises:
        NIRError: a missing / corrupt file, or a node binslt cannot read (named).

    Example:
        >>> import torch
        >>> import binslt
        >>> torch.manual_seed(0) and None
        >>> net = binslt.models.build("conv4", "binwslt", num_classes=10, in_channels=1,
        ...                           input_size=8, timesteps=2).eval()
        >>> back = binslt.from_nir(binslt.to_nir(net))
        >>> x = torch.rand(2, 1, 8, 8)  # images [N, C, H, W]
        >>> with torch.no_grad():
        ...     y = back(x)
        >>> y.shape
        torch.Size([2, 10])
    """
    nir = _nir()
    where_file = None
    graph = graph_or_path
    if not isinstance(graph, nir.NIRNode):
        where_file = str(graph_or_path)
        graph = read_nir(graph_or_path)
    if not isinstance(graph, nir.NIRGraph):
        raise NIRError(f"from_nir needs a NIR graph, got {type(graph).__name__}")
    wf = f"{where_file!r}" if where_file else "NIR graph"
    gmeta = dict(graph.metadata or {})
    ours = gmeta.get("format") == FORMAT_NAME
    if dt is None:
        dt = float(gmeta.get("dt", DEFAULT_DT)) if ours else DEFAULT_DT
    if timesteps is None and "timesteps" in gmeta:
        timesteps = int(np.asarray(gmeta["timesteps"]).reshape(-1)[0])
    reader = _GraphReader(graph, nir, wf, dt, backend)
    reader.read()
    readout = str(gmeta.get("readout", "sequence")) if ours else "sequence"
    net = NIRNet(reader.units, reader.plan, reader.alias[reader.output], reader.in_shape,
                 timesteps, readout,
                 {k: (v.decode() if isinstance(v, bytes) else v) for k, v in gmeta.items()})
    return net.eval()


_SYNAPSES = ("Conv2d", "Affine", "Linear")


class _GraphReader:
    """One walk over a NIR graph in topological order, emitting the units of a :class:`NIRNet`:
    ``units`` (the modules), ``plan`` ((value name, unit key, input value names) in run order)
    and ``alias`` (a NIR node -> the value that carries its output). A synapse that feeds a
    neuron is built with it, once all of the neuron's inputs exist."""

    def __init__(self, graph, nir, wf: str, dt: float, backend: str):
        self.graph, self.nir, self.wf, self.dt, self.backend = graph, nir, wf, dt, backend
        self.order = _topo(graph, wf)
        self.preds: dict[str, list[str]] = {n: [] for n in graph.nodes}
        self.succs: dict[str, list[str]] = {n: [] for n in graph.nodes}
        for a, b in graph.edges:
            self.preds[b].append(a)
            self.succs[a].append(b)
        inputs = [n for n, v in graph.nodes.items() if isinstance(v, nir.Input)]
        outputs = [n for n, v in graph.nodes.items() if isinstance(v, nir.Output)]
        if len(inputs) != 1 or len(outputs) != 1:
            raise NIRError(f"{wf}: binslt reads graphs with one Input and one Output node "
                           f"(found {len(inputs)} and {len(outputs)})")
        self.input, self.output = inputs[0], outputs[0]
        self.in_shape = tuple(int(v) for v in np.asarray(
            graph.nodes[self.input].input_type["input"]).reshape(-1))
        self.units = nn.ModuleDict()
        self.plan: list[tuple[str, str, list[str]]] = []
        self.alias: dict[str, str] = {self.input: "input"}
        self.spike: dict[str, bool] = {"input": False}
        self.shape: dict[str, Optional[tuple]] = {"input": self.in_shape}
        self.fused: set[str] = set()
        self.pending: dict[str, str] = {}  # neuron -> the synapse fused into it

    def src(self, n: str) -> str:
        return self.alias[n]

    def emit(self, name: str, module: nn.Module, ins: list[str], is_spike: bool,
             out_shape: Optional[tuple]) -> None:
        k = f"u{len(self.units)}"
        self.units[k] = module
        self.plan.append((name, k, ins))
        self.alias[name] = name
        self.spike[name] = is_spike
        self.shape[name] = out_shape

    def _where(self, n: str) -> str:
        return f"{self.wf}, node {n!r} ({type(self.graph.nodes[n]).__name__})"

    def _is(self, node, *names: str) -> bool:
        return isinstance(node, tuple(getattr(self.nir, k) for k in names))

    def read(self) -> None:
        for n in self.order:
            if n != self.input and n not in self.fused:
                self._node(n, self.graph.nodes[n], self._where(n))

    def _node(self, n: str, node, where: str) -> None:
        ps = self.preds[n]
        if self._is(node, "Output"):
            if len(ps) != 1:
                raise NIRError(f"{where}: the Output node needs exactly one input")
            self.alias[n] = self.src(ps[0])
            return
        if not ps:
            raise NIRError(f"{where}: the node has no input")
        if self._is(node, "LIF", "IF"):
            self._neuron(n, node, where)
            return
        if len(ps) != 1:
            raise NIRError(f"{where}: only neurons may sum several inputs")
        if self._is(node, *_SYNAPSES):
            t = _fusion_target(n, self.graph, self.preds, self.succs, self.nir)
            if t is not None:
                self.pending[t] = n  # built with its neuron, once all its inputs exist
            else:
                self._synapse(n, node, self.src(ps[0]), where)
            return
        x = self.src(ps[0])
        if self._is(node, "SumPool2d"):
            self._sum_pool(n, node, x, where)
        elif self._is(node, "AvgPool2d"):
            self._avg_pool(n, node, x, where)
        else:
            self._elementwise(n, node, x, where)

    def _neuron(self, n: str, node, where: str) -> None:
        if n in self.pending:
            syn = self.pending.pop(n)
            self._synapse(syn, self.graph.nodes[syn], self.src(self.preds[syn][0]),
                          self._where(syn))
            return
        ps = self.preds[n]
        neuron = _neuron_from_node(node, self.nir, self.dt, where, self.backend)
        if len(ps) == 1:
            self.emit(n, neuron, [self.src(ps[0])], True, None)
        else:
            self.emit(n, nn.Sequential(_Sum(), neuron), [self.src(p) for p in ps], True, None)

    def _fuse_pool(self, n: str, nxt: str, x: str, k: int, s: int, p: int) -> None:
        """binslt's spike max-pool, written as a pool node and the node after it."""
        self.emit(nxt, _SpikeOr(k, s, p), [x], True, None)
        self.fused.add(nxt)
        self.alias[n] = nxt

    def _sum_pool(self, n: str, node, x: str, where: str) -> None:
        k, s, p = (_pair(node.kernel_size, "kernel_size", where),
                   _pair(node.stride, "stride", where), _pair(node.padding, "padding", where))
        nxt = self.succs[n]
        after = self.graph.nodes[nxt[0]] if len(nxt) == 1 else None
        if (self._is(after, "Threshold") and _meta(after).get("kind") == "spike_maxpool"
                and self.spike.get(x) and len(self.preds[nxt[0]]) == 1):
            if not np.all(np.asarray(after.threshold) == 0.5):
                raise NIRError(f"{where}: a binslt max-pool threshold must be 0.5")
            self._fuse_pool(n, nxt[0], x, k, s, p)
            return
        self.emit(n, _PerStep(_SumPool(k, s, p)), [x], False, None)

    def _avg_pool(self, n: str, node, x: str, where: str) -> None:
        nxt = self.succs[n]
        after = self.graph.nodes[nxt[0]] if len(nxt) == 1 else None
        kind = _meta(after).get("kind") if after is not None else None
        # binslt's 'lif' max-pool form: AvgPool2d -> memoryless LIF (kind spike_maxpool)
        if kind == "spike_maxpool" and self._is(after, "LIF") and self.spike.get(x):
            self._fuse_pool(n, nxt[0], x, _pair(node.kernel_size, "kernel_size", where),
                            _pair(node.stride, "stride", where),
                            _pair(node.padding, "padding", where))
            return
        if self._is(after, "Flatten") and kind == "global_avgpool":
            self.emit(nxt[0], _GlobalMean(), [x], False, None)
            self.fused.add(nxt[0])
            self.alias[n] = nxt[0]
            return
        kk, st, pd = (_two(node.kernel_size), _two(node.stride), _two(node.padding))
        self.emit(n, _PerStep(nn.AvgPool2d(kk, st, pd)), [x], False, None)

    def _elementwise(self, n: str, node, x: str, where: str) -> None:
        """Flatten, Threshold and Scale nodes."""
        if self._is(node, "Flatten"):
            # NIR's dims exclude the batch (and here the time) dimension
            sd, ed = int(node.start_dim), int(node.end_dim)
            flat = nn.Flatten(sd + 1 if sd >= 0 else sd, ed + 1 if ed >= 0 else ed)
            self.emit(n, _PerStep(flat), [x], self.spike.get(x, False), None)
        elif self._is(node, "Threshold"):
            thr = torch.from_numpy(np.asarray(node.threshold, dtype=np.float32).copy())
            self.emit(n, _ThresholdOp(thr), [x], True, None)
        elif self._is(node, "Scale"):
            sc = torch.from_numpy(np.asarray(node.scale, dtype=np.float32).copy())
            self.emit(n, _ScaleOp(sc), [x], False, None)
        else:
            raise NIRError(f"{where}: binslt cannot read this node type (it reads Input, "
                           "Output, Conv2d, Affine, Linear, LIF, IF, SumPool2d, AvgPool2d, "
                           "Flatten, Threshold, Scale)")

    def _synapse(self, n: str, node, x: str, where: str) -> None:
        """A Conv2d / Affine / Linear node: fused with the neuron it feeds (emitted as that
        neuron), or on its own (a readout, a shortcut, a foreign graph's synapse)."""
        syn = _Synapse.of(node, self.nir, where)
        target = _fusion_target(n, self.graph, self.preds, self.succs, self.nir)
        tern = _gain_and_bn(syn.w, syn.b, _meta(node), 2 if syn.conv else 1, where)
        if target is None:
            self.emit(n, syn.unfused(tern, _meta(node)), [x], False, None)
            return
        neuron = _neuron_from_node(self.graph.nodes[target], self.nir, self.dt,
                                   self._where(target), self.backend)
        others = [self.src(p) for p in self.preds[target] if p != n]
        if tern is not None and neuron.gain == 1.0:
            # a binslt file names the layer's input kind (a converted model's spike input)
            spikes = bool(self.spike.get(x)) or _meta(node).get("input") == "spike"
            unit: nn.Module = _Spiking(syn.spiking_layer(tern, _meta(node), neuron, spikes,
                                                         self.backend))
        else:
            unit = _DenseSpiking(syn.dense(), neuron)
        self.emit(target, unit, [x] + others, True, None)
        self.fused.add(target)


def _two(v) -> tuple[int, int]:
    a = np.asarray(v).reshape(-1)
    return tuple(int(u) for u in (a if a.size == 2 else [a[0], a[0]]))


class _Synapse:
    """A Conv2d / Affine / Linear node's weight ``w``, bias ``b`` and geometry, checked, and the
    binslt or dense module each reading of it becomes."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, conv: bool, stride: int, padding: int):
        self.w, self.b, self.conv, self.stride, self.padding = w, b, conv, stride, padding

    @classmethod
    def of(cls, node, nir, where: str) -> _Synapse:
        w = torch.from_numpy(np.asarray(node.weight, dtype=np.float32).copy())
        if isinstance(node, nir.Linear):
            b = torch.zeros(w.shape[0])
        else:
            b = torch.from_numpy(np.asarray(node.bias, dtype=np.float32).copy()).reshape(-1)
        if not isinstance(node, nir.Conv2d):
            if w.dim() != 2:
                raise NIRError(f"{where}: weight of shape {list(w.shape)} is not [O, F]")
            return cls(w, b, False, 1, 0)
        if w.dim() != 4:
            raise NIRError(f"{where}: weight of shape {list(w.shape)} is not [O, I, kh, kw]")
        if int(np.asarray(node.groups).reshape(-1)[0]) != 1:
            raise NIRError(f"{where}: grouped convolutions are not read")
        if np.any(np.asarray(node.dilation).reshape(-1) != 1):
            raise NIRError(f"{where}: dilated convolutions are not read")
        if w.shape[2] != w.shape[3]:
            raise NIRError(f"{where}: kernel {list(w.shape[2:])} is not square")
        return cls(w, b, True, _pair(node.stride, "stride", where),
                   _pair(node.padding, "padding", where))

    def dense(self) -> nn.Module:
        return _dense(self.conv, self.w, self.b, self.stride, self.padding)

    def spiking_layer(self, tern, meta: dict, neuron: _Neuron, in_spikes: bool,
                      backend: str) -> nn.Module:
        """The frozen BinSpikeConv2d / BinSpikeLinear of this synapse and ``neuron``."""
        ternary, alpha, bn = tern
        cfg = neuron.lif.neuron
        leak = (dict(neuron="if") if cfg.neuron == "if"
                else dict(tau=cfg.tau, decay_input=cfg.decay_input))
        kw = dict(**leak, v_threshold=cfg.v_threshold, v_reset=0.0,
                  input="spike" if in_spikes else "real", backend=backend,
                  bn=bn is not None, bn_affine=True,
                  prune_rate=float(meta.get("prune_rate", 0.0)))
        w = self.w
        if self.conv:
            layer = BinSpikeConv2d(w.shape[1], w.shape[0], w.shape[2], self.stride,
                                   self.padding, **kw)
        else:
            layer = BinSpikeLinear(w.shape[1], w.shape[0], **kw)
        layer.per_channel_gain = bool(meta.get("per_channel_gain", "alpha" not in meta))
        if bn is not None:
            layer.bn = bn
        _freeze(layer, ternary, alpha)
        return layer.eval()

    def unfused(self, tern, meta: dict) -> nn.Module:
        """The synapse without a neuron: a frozen BinConv2d / BinLinear where the weights are
        a gain times {-1, 0, +1}, else a dense layer."""
        w = self.w
        if tern is None:
            return _PerStep(self.dense()) if self.conv else _dense(False, w, self.b, 1, 0)
        ternary, alpha, bn = tern
        prune_rate = float(meta.get("prune_rate", 0.0))
        if self.conv:
            layer = BinConv2d(w.shape[1], w.shape[0], w.shape[2], self.stride, self.padding,
                              prune_rate=prune_rate, bn=bn is not None, bn_affine=True)
            if bn is not None:
                layer.bn = bn
            _freeze(layer, ternary, alpha)
            return _BinConvSeq(layer.eval())
        layer = BinLinear(w.shape[1], w.shape[0], prune_rate=prune_rate)
        _freeze(layer, ternary, alpha)
        if meta.get("bias") is not None or (
                bn is not None and (bn.bias.abs().sum() > 0 if bn.affine else True)):
            return nn.Sequential(layer.eval(), _BiasOp(self.b))
        return layer.eval()


def _bn_module(rec: Optional[dict], channels: int, dim: int, where: str):
    if rec is None:
        return None
    try:
        cls = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        bn = cls(channels, eps=float(rec["eps"]), affine=bool(rec["affine"]))
        bn.running_mean.copy_(torch.tensor(rec["running_mean"], dtype=torch.float32))
        bn.running_var.copy_(torch.tensor(rec["running_var"], dtype=torch.float32))
        if rec["affine"]:
            bn.weight.data.copy_(torch.tensor(rec["weight"], dtype=torch.float32))
            bn.bias.data.copy_(torch.tensor(rec["bias"], dtype=torch.float32))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise NIRError(f"{where}: bad binslt BatchNorm metadata ({exc})") from None
    return bn.eval()


def _plain_bn(scale_shift: tuple[torch.Tensor, torch.Tensor], dim: int):
    """A BatchNorm whose eval-mode (scale, shift) in binslt's epilogue are exactly these:
    eps 0, mean 0, var 1, affine weight = scale, bias = shift."""
    scale, shift = scale_shift
    cls = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
    bn = cls(scale.numel(), eps=0.0, affine=True)
    bn.weight.data.copy_(scale)
    bn.bias.data.copy_(shift)
    return bn.eval()


def _freeze(layer: _MaskedSignWeight, ternary: torch.Tensor, alpha: torch.Tensor) -> None:
    """Load packed planes of ``ternary`` ({-1,0,1}, [O, I, kh, kw] or [O, F]) and ``alpha`` [O]
    into ``layer``: it switches to frozen mode and keeps no latent weights."""
    w4 = ternary.reshape(ternary.shape[0], ternary.shape[1], *ternary.shape[2:],
                         *([1] * (4 - ternary.dim()))).contiguous()
    mask, pos = ops.pack_weight(w4)
    sd = {"w_mask_bits": mask, "w_pos_bits": pos, "alpha": alpha.float().contiguous()}
    for name in ("w_mask_bits", "w_pos_bits", "alpha"):
        setattr(layer, name, torch.empty_like(sd[name]))
    layer.load_state_dict({**{k: v for k, v in layer.state_dict().items()
                              if k not in ("weight", "scores", "mask")}, **sd,
                           "weight": layer.weight.detach(), "scores": layer.scores.detach()},
                          strict=False)
    layer._mode = "frozen"  # the packed buffers define the layer (as load_ticket does)
    for pname in ("weight", "scores"):
        p = getattr(layer, pname)
        setattr(layer, pname, nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape),
                                           requires_grad=False))


def _gain_and_bn(w: torch.Tensor, b: torch.Tensor, meta: dict, dim: int, where: str):
    """(ternary, alpha [O], bn module or None) for a synapse with weight w (BN scale folded in)
    and bias b, or None when w is not a gain times {-1, 0, +1}."""
    g = _ternary(w)
    if g is None:
        return None
    ternary = torch.sign(w)
    rec_bn = meta.get("bn")
    if "alpha" in meta:
        alpha = torch.tensor(meta["alpha"], dtype=torch.float32).reshape(-1)
        if alpha.numel() != w.shape[0]:
            raise NIRError(f"{where}: metadata alpha has {alpha.numel()} values for "
                           f"{w.shape[0]} output channels")
        bn = _bn_module(rec_bn, w.shape[0], dim, where)
        scale, shift = _bn_fold(bn, w.shape[0])
        if meta.get("bias") is not None:  # a folded bias after the layer (no BN)
            shift = shift + torch.tensor(meta["bias"], dtype=torch.float32).reshape(-1)
        # the metadata must describe these weights (alpha * scale), not some other layer's
        want = alpha * scale
        nz = g > 0
        if not torch.allclose(g[nz], want[nz].abs(), rtol=1e-5, atol=0) or not torch.allclose(
                b, shift, rtol=1e-5, atol=1e-6) or bool((torch.sign(want[nz]) < 0).any()):
            raise NIRError(f"{where}: the binslt metadata (alpha, BatchNorm) does not match the "
                           "node's weights and bias")
        return ternary, alpha, bn
    return ternary, g, _plain_bn((torch.ones(w.shape[0]), b.float()), dim)


def _fusion_target(n, graph, preds, succs, nir) -> Optional[str]:
    """The neuron a synapse node fuses into (its only successor, of which it is the main
    input), or None."""
    nxt = succs[n]
    if len(nxt) != 1:
        return None
    nn_node = graph.nodes[nxt[0]]
    if not isinstance(nn_node, (nir.LIF, nir.IF)) or _meta(nn_node).get("kind") == "spike_maxpool":
        return None
    m = _meta(nn_node)
    if "main_input" in m:
        return nxt[0] if m["main_input"] == n else None
    # a foreign graph: the first Conv2d/Affine/Linear input feeding only this neuron
    cands = [p for p in preds[nxt[0]]
             if isinstance(graph.nodes[p], (nir.Conv2d, nir.Affine, nir.Linear))
             and len(succs[p]) == 1]
    return nxt[0] if cands and cands[0] == n else None
