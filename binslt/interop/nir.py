"""NIR export and import of binslt tickets (the Neuromorphic Intermediate Representation).

:func:`to_nir` turns a binslt network (a :class:`binslt.models.BinSLTNet`, a packed ticket file or
a run directory) into a ``nir.NIRGraph``; :func:`write_nir` saves it (``nir.write``, HDF5).
:func:`from_nir` reads a graph (or a ``.nir`` file, also one written by SpikingJelly's
``export_to_nir``) back into a runnable torch model, :class:`NIRNet`. Weights that are a gain
times {-1, 0, +1} become frozen masked sign layers again (packed kernels); other weights stay
dense. The mapping (dt, tau, r, v_leak, thresholds, resets, max-pooling) is in ``docs/nir.md``.

Only these functions need the ``nir`` package (the ``binslt[nir]`` extra); it is imported on
first use, and its absence raises :class:`NIRDependencyError` naming the extra. Every problem
with a graph or a file raises :class:`NIRError` (a ``ValueError``) naming the file and the node.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import (
    BinConv2d,
    BinLinear,
    BinSpikeConv2d,
    BinSpikeLinear,
    SpikeMaxPool2d,
    _MaskedSignWeight,
)
from .nir_converted import converted_metadata, export_converted, is_converted
from .nir_format import (
    DEFAULT_DT,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAXPOOL_FORMS,
    NIRDependencyError,
    NIRError,
    PathLike,
    _bn_fold,
    _nir,
)
from .nir_read import from_nir, read_nir
from .nir_units import NIRNet

__all__ = ["DEFAULT_DT", "FORMAT_NAME", "NIRDependencyError", "NIRError", "NIRNet",
           "eval_nir_file", "export_cli", "from_nir", "read_nir", "to_nir", "write_nir"]

# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _models():
    from ..nn import models

    return models


def _private(name: str):
    # binslt.models' small glue modules (flatten, global pool, mean-over-T readout).
    return getattr(_models(), name, None) or type(None)


def _bn_record(bn: Optional[nn.Module]) -> Optional[dict]:
    if bn is None:
        return None
    rec = {"eps": float(bn.eps), "running_mean": bn.running_mean.float().tolist(),
           "running_var": bn.running_var.float().tolist(), "affine": bool(bn.affine)}
    if bn.affine:
        rec["weight"] = bn.weight.detach().float().tolist()
        rec["bias"] = bn.bias.detach().float().tolist()
    return rec


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy().astype(np.float32)


class _Exporter:
    def __init__(self, dt: float, maxpool: str):
        self.nir = _nir()
        self.dt = float(dt)
        self.maxpool = maxpool
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []
        self.alphas: dict[str, Any] = {}

    def add(self, name: str, node, inputs: list[str]) -> str:
        if name in self.nodes:
            raise NIRError(f"duplicate NIR node name {name!r}")  # pragma: no cover
        self.nodes[name] = node
        self.edges.extend((src, name) for src in inputs)
        return name

    # -- neurons ----------------------------------------------------------------------------
    def neuron(self, name: str, cfg, shape: tuple[int, ...], inputs: list[str],
               main: str) -> str:
        if cfg.v_reset is None:
            raise NIRError(f"layer {name!r}: soft reset (v_reset=None, subtract the threshold) "
                           "has no NIR node: NIR's LIF resets the membrane to v_reset. Use a "
                           "hard reset (v_reset=0.0)")
        if cfg.v_reset != 0.0:
            raise NIRError(f"layer {name!r}: v_reset={cfg.v_reset} != 0 cannot be exported: "
                           "binslt starts the membrane at V[-1] = v_reset, NIR importers start "
                           "it at 0 and NIR has no initial-state field")
        full = lambda v: np.full(shape, v, dtype=np.float32)  # noqa: E731
        # record(): plain JSON (an IF's has no tau: +inf is not JSON)
        meta = {"binslt": json.dumps({"layer": name, "neuron": cfg.record(), "main_input": main})}
        if cfg.neuron == "if":
            # NIR's IF is dv/dt = R I; forward Euler with step dt gives V += R dt X, so R = 1/dt
            # is SpikingJelly's H = V + X (its own exporter writes the same)
            node = self.nir.IF(r=full(1.0 / self.dt), v_threshold=full(cfg.v_threshold),
                               v_reset=full(0.0), metadata=meta)
        else:
            if not math.isfinite(cfg.tau):
                raise NIRError(f"layer {name!r}: tau={cfg.tau} is not finite")  # pragma: no cover
            node = self.nir.LIF(tau=full(cfg.tau * self.dt),
                                r=full(1.0 if cfg.decay_input else cfg.tau), v_leak=full(0.0),
                                v_threshold=full(cfg.v_threshold), v_reset=full(0.0),
                                metadata=meta)
        return self.add(f"{name}.lif", node, inputs)

    # -- synapses ---------------------------------------------------------------------------
    def conv(self, name: str, m: nn.Module, src: str, shape, kind: str):
        """Conv2d node for BinSpikeConv2d / BinConv2d / dense nn.Conv2d (+ BN folded)."""
        if isinstance(m, _MaskedSignWeight):
            w = m.effective_weight().detach().float()
            stride, padding, k = m.stride, m.padding, m.kernel_size
            bias = torch.zeros(w.shape[0])
            rec = self.masked_record(name, m, kind)
        else:  # nn.Conv2d
            if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros":
                raise NIRError(f"layer {name!r}: only ungrouped, undilated, zero-padded convs "
                               "are exported")
            w = m.weight.detach().float()
            stride, padding, k = m.stride[0], m.padding[0], m.kernel_size[0]
            bias = m.bias.detach().float() if m.bias is not None else torch.zeros(w.shape[0])
            rec = {"layer": name, "type": "Conv2d", "kind": kind}
        bn = getattr(m, "bn", None) if kind != "dense_conv" else None
        return self._emit_conv(name, w, bias, bn, stride, padding, k, src, shape, rec)

    def _emit_conv(self, name, w, bias, bn, stride, padding, k, src, shape, rec,
                   bn_module=None):
        bn = bn if bn is not None else bn_module
        scale, shift = _bn_fold(bn, w.shape[0])
        rec["bn"] = _bn_record(bn)
        weight = w * scale.view(-1, 1, 1, 1)
        b = bias * scale + shift
        c, h, wd = shape
        node = self.nir.Conv2d(input_shape=(h, wd), weight=_np(weight), stride=(stride, stride),
                               padding=(padding, padding), dilation=(1, 1), groups=1,
                               bias=_np(b), metadata={"binslt": json.dumps(rec)})
        out = (w.shape[0], (h + 2 * padding - k) // stride + 1,
               (wd + 2 * padding - k) // stride + 1)
        return self.add(name, node, [src]), out

    def masked_record(self, name: str, m: _MaskedSignWeight, kind: str) -> dict:
        _w_mask, _w_pos, alpha = m.packed_weight()
        alpha = alpha.detach().float().cpu()
        a = alpha.tolist()
        self.alphas[name] = a[0] if not m.per_channel_gain else a
        rec = {"layer": name, "type": type(m).__name__, "kind": kind, "alpha": a,
               "per_channel_gain": m.per_channel_gain, "prune_rate": m.prune_rate}
        if hasattr(m, "input"):
            rec["input"] = m.input
        return rec

    def affine(self, name: str, m: nn.Module, src: str, features: int, bn, *,
               kind: str = "spike_linear", bias=None) -> tuple[str, int]:
        """Affine node (BN folded); ``bias``: a masked layer's folded bias (a ``Bias`` module
        after it), written as the node's bias and as metadata ``bias``."""
        if isinstance(m, _MaskedSignWeight):
            w = m.effective_weight().detach().float()
            rec = self.masked_record(name, m, kind)
            if bias is not None:
                bias = bias.detach().float()
                rec["bias"] = bias.tolist()
            else:
                bias = torch.zeros(w.shape[0])
        else:
            w = m.weight.detach().float()
            bias = m.bias.detach().float() if m.bias is not None else torch.zeros(w.shape[0])
            rec = {"layer": name, "type": "Linear", "kind": "dense_linear"}
        if w.shape[1] != features:
            raise NIRError(f"layer {name!r} takes {w.shape[1]} features, gets {features}")
        scale, shift = _bn_fold(bn, w.shape[0])
        rec["bn"] = _bn_record(bn)
        node = self.nir.Affine(weight=_np(w * scale.view(-1, 1)), bias=_np(bias * scale + shift),
                               metadata={"binslt": json.dumps(rec)})
        return self.add(name, node, [src]), w.shape[0]

    # -- walking the network ----------------------------------------------------------------
    def walk(self, name: str, m: nn.Module, src: str, shape):
        models = _models()
        flatten_t, gap_t = _private("_Flatten"), _private("_GlobalAvgPool")
        if isinstance(m, nn.Sequential):
            children = list(m.named_children())
            for j, (child_name, child) in enumerate(children):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, BinSpikeConv2d) and child.pool > 1:
                    # a fused pool (pool=2) exports as the conv + SpikeMaxPool2d pair it
                    # replaces: the pool node is named as that pair's second child was
                    nxt = str(int(child_name) + 1) if child_name.isdigit() else None
                    free = nxt is not None and j + 1 == len(children)
                    pool_name = (f"{name}.{nxt}" if name else nxt) if free else f"{full}.pool"
                    src, shape = self.pooled_conv(full, child, src, shape, pool_name)
                else:
                    src, shape = self.walk(full, child, src, shape)
            return src, shape
        if isinstance(m, BinSpikeConv2d):
            if m.pool > 1:
                return self.pooled_conv(name, m, src, shape, f"{name}.pool")
            return self.spiking_conv(name, m, m, m.neuron, src, shape, None)
        if isinstance(m, models.SpikingConv):
            return self.spiking_conv(name, m.conv, m, m.lif.neuron, src, shape, None)
        if isinstance(m, models.ResidualBlock):
            h, hshape = self.walk(f"{name}.conv1", m.conv1, src, shape)
            if m.shortcut is None:
                r = src
            elif isinstance(m.shortcut, BinConv2d):
                r, _ = self.conv(f"{name}.shortcut", m.shortcut, src, shape, "shortcut")
            else:
                raise NIRError(f"layer {name + '.shortcut'!r} ({type(m.shortcut).__name__}) has "
                               "no NIR mapping (binslt exports BinConv2d shortcuts)")
            c2 = m.conv2
            if isinstance(c2, BinSpikeConv2d):
                return self.spiking_conv(f"{name}.conv2", c2, c2, c2.neuron, h, hshape, r)
            if isinstance(c2, models.SpikingConv):
                return self.spiking_conv(f"{name}.conv2", c2.conv, c2, c2.lif.neuron, h, hshape, r)
            raise NIRError(f"layer {name + '.conv2'!r} ({type(c2).__name__}) has no NIR mapping")
        if isinstance(m, SpikeMaxPool2d):
            return self.maxpool_unit(name, m, src, shape)
        if isinstance(m, gap_t):
            c, h, w = shape
            pool = self.nir.AvgPool2d(kernel_size=np.array([h, w]), stride=np.array([h, w]),
                                      padding=np.array([0, 0]))
            p = self.add(f"{name}.avgpool", pool, [src])
            fl = self.nir.Flatten(input_type={"input": np.array([c, 1, 1])}, start_dim=0,
                                  end_dim=-1, metadata={"binslt": json.dumps(
                                      {"layer": name, "kind": "global_avgpool"})})
            return self.add(name, fl, [p]), (c,)
        if isinstance(m, flatten_t):
            fl = self.nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0, end_dim=-1,
                                  metadata={"binslt": json.dumps({"layer": name,
                                                                  "kind": "flatten"})})
            return self.add(name, fl, [src]), (int(np.prod(shape)),)
        if isinstance(m, BinSpikeLinear):
            a, o = self.affine(name, m, src, shape[0], m.bn)
            return self.neuron(name, m.neuron, (o,), [a], a), (o,)
        if isinstance(m, models.SpikingLinear):
            a, o = self.affine(name, m.fc, src, shape[0], m.bn)
            return self.neuron(name, m.lif.neuron, (o,), [a], a), (o,)
        raise NIRError(f"layer {name!r} ({type(m).__name__}) has no NIR mapping; binslt exports "
                       "the binwslt variant of binslt.models (BinSpikeConv2d/Linear, BinConv2d "
                       "shortcuts, SpikeMaxPool2d, global average pooling, BinLinear readout)")

    def spiking_conv(self, name, conv, owner, cfg, src, shape, residual):
        kind = "spike_conv" if isinstance(conv, _MaskedSignWeight) else "dense_conv"
        if kind == "spike_conv":
            c, out = self.conv(name, conv, src, shape, kind)
        else:
            c, out = self._emit_conv(name, conv.weight.detach().float(),
                                     conv.bias.detach().float() if conv.bias is not None
                                     else torch.zeros(conv.out_channels), None, conv.stride[0],
                                     conv.padding[0], conv.kernel_size[0], src, shape,
                                     {"layer": name, "type": "Conv2d", "kind": kind},
                                     bn_module=owner.bn)
        inputs = [c] if residual is None else [c, residual]
        return self.neuron(name, cfg, out, inputs, c), out

    def pooled_conv(self, name: str, m: BinSpikeConv2d, src: str, shape, pool_name: str):
        """A BinSpikeConv2d with a fused pool: its conv + neuron, then the max-pool unit."""
        src, shape = self.spiking_conv(name, m, m, m.neuron, src, shape, None)
        return self.maxpool_unit(pool_name, SpikeMaxPool2d(m.pool), src, shape)

    def maxpool_unit(self, name: str, m: SpikeMaxPool2d, src: str, shape):
        k, s, p = m.kernel_size, m.stride, m.padding
        c, h, w = shape
        out = (c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
        kk = np.array([k, k])
        meta = {"binslt": json.dumps({"layer": name, "kind": "spike_maxpool",
                                      "form": self.maxpool})}
        if self.maxpool == "threshold":
            # max of {0,1} spikes == 1 iff their sum > 0.5 (the sum is an integer)
            pool = self.nir.SumPool2d(kernel_size=kk, stride=np.array([s, s]),
                                      padding=np.array([p, p]))
            sp = self.add(f"{name}.sumpool", pool, [src])
            th = self.nir.Threshold(threshold=np.full(out, 0.5, dtype=np.float32), metadata=meta)
            return self.add(name, th, [sp]), out
        # 'lif': AvgPool2d (k*k divides an integer count: exact in float32) into a LIF neuron
        # with tau = dt, which forward Euler makes memoryless (v = input each step).
        pool = self.nir.AvgPool2d(kernel_size=kk, stride=np.array([s, s]), padding=np.array([p, p]))
        ap = self.add(f"{name}.avgpool", pool, [src])
        full = lambda v: np.full(out, v, dtype=np.float32)  # noqa: E731
        lif = self.nir.LIF(tau=full(self.dt), r=full(1.0), v_leak=full(0.0),
                           v_threshold=full(0.5 / (k * k)), v_reset=full(0.0), metadata=meta)
        return self.add(name, lif, [ap]), out

    def head(self, name: str, m: nn.Module, src: str, shape) -> tuple[str, int]:
        inner = getattr(m, "layer", None)
        if not isinstance(m, _private("_MeanOverTime")) or inner is None:
            raise NIRError(f"layer {name!r} ({type(m).__name__}): binslt exports a classifier "
                           "that averages its output over T (binslt.models' readout)")
        if isinstance(inner, BinLinear):
            w = inner.effective_weight().detach().float()
            rec = self.masked_record(f"{name}.layer", inner, "readout")
        elif isinstance(inner, nn.Linear) and inner.bias is None:
            w = inner.weight.detach().float()
            rec = {"layer": f"{name}.layer", "type": "Linear", "kind": "readout"}
        else:
            raise NIRError(f"layer {name + '.layer'!r} ({type(inner).__name__}) has no NIR "
                           "mapping (BinLinear or a bias-free nn.Linear)")
        if w.shape[1] != shape[0]:
            raise NIRError(f"layer {name!r} takes {w.shape[1]} features, gets {shape[0]}")
        node = self.nir.Linear(weight=_np(w), metadata={"binslt": json.dumps(rec)})
        return self.add(f"{name}.layer", node, [src]), w.shape[0]


def _load_model(source) -> nn.Module:
    """A BinSLTNet from a model, a packed ticket file, or a run directory (its
    ticket.safetensors, else its checkpoint) / checkpoint file."""
    if isinstance(source, nn.Module):
        return source
    from ..io.artifacts import RunDir, load_model
    from ..io.tickets import load_ticket

    p = Path(source)
    if p.is_dir() and (p / RunDir.TICKET).is_file():
        p = p / RunDir.TICKET
    if p.is_file() and p.suffix == ".safetensors":
        return load_ticket(p)
    return load_model(p)[0]


def _check_bns(model: nn.Module) -> None:
    for n, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.track_running_stats:
            raise NIRError(f"layer {n!r}: a BatchNorm without running statistics has no "
                           "inference-time scale and shift to fold")


@torch.no_grad()
def _exportable(model_or_path, example_input, dt, maxpool):
    """The model that ``to_nir`` exports (a spiking BinSLTNet or a converted model), after
    checking its arguments."""
    if maxpool not in MAXPOOL_FORMS:
        raise NIRError(f"maxpool must be one of {MAXPOOL_FORMS}, got {maxpool!r}")
    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise NIRError(f"dt must be a positive number of seconds, got {dt!r}")
    model = _load_model(model_or_path)
    models = _models()
    if is_converted(model):
        _check_bns(model)
        return model
    if not isinstance(model, models.BinSLTNet) or not model.spiking:
        raise NIRError(f"to_nir exports spiking binslt networks (binslt.models.build(..., "
                       f"variant='binwslt' or 'snn')) and models of binslt.convert (with "
                       f"example_input); got {type(model).__name__}"
                       + ("" if not isinstance(model, models.BinSLTNet)
                          else f" of variant {model.build_config.get('variant')!r}"))
    shape = (model.in_channels, *model.input_hw)
    if example_input is not None and (not isinstance(example_input, torch.Tensor)
                                      or tuple(example_input.shape[1:]) != shape):
        raise NIRError(f"example_input must be images [N, {shape[0]}, {shape[1]}, {shape[2]}], "
                       f"got {getattr(example_input, 'shape', type(example_input).__name__)}")
    _check_bns(model)
    return model


def _graph(nir, ex: _Exporter, meta: dict):
    try:
        return nir.NIRGraph(nodes=ex.nodes, edges=ex.edges, metadata=meta)
    except Exception as exc:  # pragma: no cover - nir's own type check
        raise NIRError(f"nir rejected the exported graph: {exc}") from None


@torch.no_grad()
def _converted_to_nir(nir, model: nn.Module, example_input, dt: float, maxpool: str):
    """``to_nir`` of a model returned by ``binslt.convert`` (``nir_converted``)."""
    ex = _Exporter(dt, maxpool)
    spike_input = bool((model.__dict__.get("build_config") or {}).get("spike_input"))
    _shape, src, out_shape, readout, T = export_converted(ex, model, example_input, spike_input)
    ex.add("output", nir.Output(output_type={"output": np.array(out_shape)}), [src])
    return _graph(nir, ex, converted_metadata(model, readout, T, dt, maxpool, ex.alphas))


def to_nir(model_or_path, example_input: Optional[torch.Tensor] = None, *,
           dt: float = DEFAULT_DT, maxpool: str = "threshold"):
    """Export a binslt network as a ``nir.NIRGraph``.

    Args:
        model_or_path: a :class:`binslt.models.BinSLTNet` (any mode; it is not changed), a packed
            ticket file (``.safetensors``, :func:`binslt.io.tickets.load_ticket`) or a run directory
            / ``ticket.pt`` / ``checkpoint.pt`` of ``binslt search``; or a model returned by
            :func:`binslt.convert` (or loaded with ``load_ticket(path, model=factory())``).
        example_input: optional images ``[N, C, H, W]``; only checked against the model's input
            shape (shapes follow from ``model.build_config``). A converted model needs it: one
            input ``[T, N, ...]`` as its forward takes, run once (eval, no grad, states reset)
            and recorded; the graph is what that run computes
            (:mod:`binslt.interop.nir_converted`), its output the model's (``[T, N, ...]``, or
            the mean over T where the forward ends in one).
        dt: the simulation step (seconds) the NIR time constants are written for
            (``tau_nir = tau * dt``); the default 1e-4 is SpikingJelly's and snnTorch's.
        maxpool: ``'threshold'`` (default) writes a 2x2 max of spikes exactly as
            ``Threshold(SumPool2d(x), 0.5)``; ``'lif'`` writes ``AvgPool2d`` into a LIF with
            ``tau = dt`` (memoryless under forward Euler), for importers without ``Threshold``.

    Each masked sign-weight conv / linear becomes a ``Conv2d`` / ``Affine`` whose weights are
    ``alpha * sign(w) * M`` times the folded BatchNorm scale, with the BN shift as bias; each
    neuron a ``LIF`` (see ``docs/nir.md``); residual adds are edges into the neuron; global
    average pooling is ``AvgPool2d`` + ``Flatten``; the classifier a ``Linear`` node whose
    output, averaged over T, gives the logits. Node metadata (key ``binslt``, JSON) carries
    each layer's gain alpha, BN statistics and neuron settings; graph metadata carries the
    architecture, prune rate, T, per-layer alphas and the binslt version.

    Raises:
        NIRError: a layer NIR cannot represent (named), or a bad argument.
        NIRDependencyError: the ``nir`` package is missing.

    Example:
        >>> import binslt
        >>> net = binslt.models.build("conv4", "binwslt", num_classes=10, in_channels=1,
        ...                           input_size=8, timesteps=2)
        >>> graph = binslt.to_nir(net)
        >>> type(graph).__name__, "input" in graph.nodes
        ('NIRGraph', True)
    """
    from .. import __version__

    nir = _nir()
    model = _exportable(model_or_path, example_input, dt, maxpool)
    if is_converted(model):
        return _converted_to_nir(nir, model, example_input, dt, maxpool)
    shape = (model.in_channels, *model.input_hw)
    was_training = model.training
    model.eval()
    try:
        ex = _Exporter(dt, maxpool)
        inp = ex.add("input", nir.Input(input_type={"input": np.array(shape)}), [])
        src, feat = ex.walk("features", model.features, inp, shape)
        if len(feat) != 1:
            raise NIRError("the features do not end in a flat vector")  # pragma: no cover
        head, classes = ex.head("classifier", model.classifier, src, feat)
        ex.add("output", nir.Output(output_type={"output": np.array([classes])}), [head])
    finally:
        model.train(was_training)
    cfg = dict(model.build_config)
    meta = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
        "binslt_version": __version__, "arch": str(cfg.get("arch")),
        "variant": str(cfg.get("variant")), "prune_rate": float(cfg.get("prune_rate", 0.0)),
        "timesteps": int(model.timesteps), "dt": float(dt), "maxpool": maxpool,
        "encoding": "direct", "readout": "mean_over_time",
        "build_config": json.dumps(cfg, sort_keys=True), "alpha": json.dumps(ex.alphas),
    }
    return _graph(nir, ex, meta)


def write_nir(graph_or_model, path: PathLike, **to_nir_kwargs) -> Path:
    """Write a NIR graph (or export a model / ticket / run first) to ``path`` with ``nir.write``.
    The file is written next to ``path`` and renamed into place."""
    nir = _nir()
    graph = graph_or_model if isinstance(graph_or_model, nir.NIRGraph) else \
        to_nir(graph_or_model, **to_nir_kwargs)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        nir.write(str(tmp), graph)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ---------------------------------------------------------------------------------------------
# Command-line entry points (plain functions; they raise, the CLI prints and exits 2)
# ---------------------------------------------------------------------------------------------


def export_cli(src: PathLike, out: Optional[PathLike] = None, *, maxpool: str = "threshold",
               dt: float = DEFAULT_DT) -> str:
    """``binslt export SRC --format nir [-o OUT]``: export a run directory, ``ticket.pt`` /
    ``checkpoint.pt`` or packed ticket to a NIR file (default: next to SRC, ``.nir``).
    Returns the line to print. Raises NIRError (and binslt.io.artifacts.ArtifactError /
    TicketError for an unreadable source)."""
    srcp = Path(src)
    if out is None:
        base = srcp / "ticket" if srcp.is_dir() else srcp.with_suffix("")
        out = base.with_name(base.name + ".nir")
    graph = to_nir(srcp, dt=dt, maxpool=maxpool)
    path = write_nir(graph, out)
    n_neurons = sum(1 for v in graph.nodes.values() if type(v).__name__ in ("LIF", "IF"))
    return (f"wrote {path}: NIR graph with {len(graph.nodes)} nodes ({n_neurons} LIF/IF), "
            f"{path.stat().st_size / 1024:.1f} KiB, {graph.metadata['arch']}/"
            f"{graph.metadata['variant']}, T={graph.metadata['timesteps']}, maxpool={maxpool}")


@torch.no_grad()
def eval_nir_file(path: PathLike, data: str = "digits", *, split: str = "test", limit: int = 0,
                  batch_size: int = 256, data_dir: str = "data", download: bool = False,
                  backend: str = "auto") -> dict:
    """``binslt eval FILE.nir``: read a NIR file with :func:`from_nir` and report its accuracy
    on a dataset (``binslt.training.data.load`` spec). Returns a dict (``accuracy`` in percent,
    ``correct``, ``examples``, ``loss``, ``file``, ``dataset``, ``split``). Raises NIRError
    (or binslt.training.data.DatasetError)."""
    from torch.utils.data import DataLoader

    from ..training import data as bdata

    net = from_nir(path, backend=backend)
    if net.readout != "mean_over_time" or net.timesteps is None:
        raise NIRError(f"{str(path)!r}: binslt evaluates NIR classifiers it wrote (graph "
                       "metadata with timesteps and a mean-over-time readout); this graph "
                       "has none")
    shape = net.input_shape
    bundle = bdata.load(data, data_dir=data_dir, download=download, image_size=shape[-1])
    ds = bdata.evaluation_split(bundle, split, limit)
    x0, _ = ds[0]
    if tuple(x0.shape) != tuple(shape):
        raise NIRError(f"{str(path)!r} takes images {list(shape)} but dataset {data!r} gives "
                       f"{list(x0.shape)}")
    correct = total = 0
    loss = 0.0
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False):
        logits = net(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
    return {"file": str(path), "dataset": bundle.name, "split": split, "examples": total,
            "correct": correct, "accuracy": 100.0 * correct / total, "loss": loss / total}
