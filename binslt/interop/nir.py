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
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn.layers import (
    LIF,
    BinConv2d,
    BinLinear,
    BinSpikeConv2d,
    BinSpikeLinear,
    SpikeMaxPool2d,
    _MaskedSignWeight,
)

__all__ = ["DEFAULT_DT", "FORMAT_NAME", "NIRDependencyError", "NIRError", "NIRNet",
           "eval_nir_file", "export_cli", "from_nir", "read_nir", "to_nir", "write_nir"]

FORMAT_NAME = "binslt-nir"
FORMAT_VERSION = 1
#: The simulation step in seconds written into NIR time constants (tau_nir = tau * dt). It is
#: SpikingJelly's and snnTorch's default, so that their importers read binslt files unchanged.
DEFAULT_DT = 1e-4
MAXPOOL_FORMS = ("threshold", "lif")
EXTRA_HINT = "pip install 'binslt[nir]'"

PathLike = Union[str, os.PathLike[str]]


class NIRError(ValueError):
    """A NIR graph or file binslt cannot write or read: the message names the file (if any) and
    the layer or node."""


class NIRDependencyError(ImportError):
    """The optional ``nir`` package is missing."""


def _nir():
    try:
        import nir
    except ImportError as exc:
        raise NIRDependencyError(
            f"NIR export/import needs the optional 'nir' package ({exc}); install the extra: "
            f"{EXTRA_HINT}") from None
    return nir


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _models():
    from ..nn import models

    return models


def _private(name: str):
    # binslt.models' small glue modules (flatten, global pool, mean-over-T readout).
    return getattr(_models(), name, None) or type(None)


def _bn_fold(bn: Optional[nn.Module], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BatchNorm, computed as binslt's fused epilogue
    computes them (scale = w * rsqrt(var + eps), shift = b - mean * scale)."""
    if bn is None:
        return torch.ones(channels), torch.zeros(channels)
    w = bn.weight.detach().float() if bn.affine else torch.ones(channels)
    b = bn.bias.detach().float() if bn.affine else torch.zeros(channels)
    scale = w * torch.rsqrt(bn.running_var.float() + bn.eps)
    return scale, b - bn.running_mean.float() * scale


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

    def affine(self, name: str, m: nn.Module, src: str, features: int, bn) -> tuple[str, int]:
        if isinstance(m, _MaskedSignWeight):
            w = m.effective_weight().detach().float()
            bias = torch.zeros(w.shape[0])
            rec = self.masked_record(name, m, "spike_linear")
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


@torch.no_grad()
def to_nir(model_or_path, example_input: Optional[torch.Tensor] = None, *,
           dt: float = DEFAULT_DT, maxpool: str = "threshold"):
    """Export a binslt network as a ``nir.NIRGraph``.

    Args:
        model_or_path: a :class:`binslt.models.BinSLTNet` (any mode; it is not changed), a packed
            ticket file (``.safetensors``, :func:`binslt.io.tickets.load_ticket`) or a run directory
            / ``ticket.pt`` / ``checkpoint.pt`` of ``binslt search``.
        example_input: optional images ``[N, C, H, W]``; only checked against the model's input
            shape (shapes follow from ``model.build_config``).
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
    if maxpool not in MAXPOOL_FORMS:
        raise NIRError(f"maxpool must be one of {MAXPOOL_FORMS}, got {maxpool!r}")
    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise NIRError(f"dt must be a positive number of seconds, got {dt!r}")
    model = _load_model(model_or_path)
    models = _models()
    if not isinstance(model, models.BinSLTNet) or not model.spiking:
        raise NIRError(f"to_nir exports spiking binslt networks (binslt.models.build(..., "
                       f"variant='binwslt' or 'snn')); got {type(model).__name__}"
                       + ("" if not isinstance(model, models.BinSLTNet)
                          else f" of variant {model.build_config.get('variant')!r}"))
    shape = (model.in_channels, *model.input_hw)
    if example_input is not None and (not isinstance(example_input, torch.Tensor)
                                      or tuple(example_input.shape[1:]) != shape):
        raise NIRError(f"example_input must be images [N, {shape[0]}, {shape[1]}, {shape[2]}], "
                       f"got {getattr(example_input, 'shape', type(example_input).__name__)}")
    for n, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.track_running_stats:
            raise NIRError(f"layer {n!r}: a BatchNorm without running statistics has no "
                           "inference-time scale and shift to fold")
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
    try:
        return nir.NIRGraph(nodes=ex.nodes, edges=ex.edges, metadata=meta)
    except Exception as exc:  # pragma: no cover - nir's own type check
        raise NIRError(f"nir rejected the exported graph: {exc}") from None


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
# Reading
# ---------------------------------------------------------------------------------------------


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


class _Neuron(nn.Module):
    """A NIR LIF / IF node as binslt's multi-step neuron (SpikingJelly semantics, S = H >= thr):
    ``x`` is first scaled by ``gain`` when the node's r does not fold into a binslt form."""

    def __init__(self, tau: float, decay_input: bool, v_threshold: float, gain: float = 1.0,
                 backend: str = "auto"):
        super().__init__()
        self.gain = gain
        self.inf = math.isinf(tau)
        if self.inf:  # IF: H = V + X
            self.lif = LIF(neuron="if", v_threshold=v_threshold, v_reset=0.0, backend=backend)
        else:
            self.lif = LIF(tau=tau, decay_input=decay_input, v_threshold=v_threshold,
                           v_reset=0.0, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gain != 1.0:
            x = x * self.gain
        return self.lif(x)


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


class _Sum(nn.Module):
    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class _PerStep(nn.Module):
    """A per-sample module (conv, pool, flatten, linear) over [T, N, ...]."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        y = self.fn(x.flatten(0, 1))
        return y.view(*x.shape[:2], *y.shape[1:])


class _DenseSpiking(nn.Module):
    """Dense synapse (+bias) then a neuron; extra inputs are added before the neuron."""

    def __init__(self, syn: nn.Module, neuron: nn.Module):
        super().__init__()
        self.syn, self.neuron = _PerStep(syn), neuron

    def forward(self, x, *residual):
        z = self.syn(x)
        for r in residual:
            z = z + r
        return self.neuron(z)


class _Spiking(nn.Module):
    """A binslt layer (BinSpikeConv2d / BinSpikeLinear) taking (x, residual_sum)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, *residual):
        r = None
        for t in residual:
            r = t if r is None else r + t
        return self.layer(x, residual=r)


class _ThresholdOp(nn.Module):
    def __init__(self, thr: torch.Tensor):
        super().__init__()
        self.register_buffer("thr", thr)

    def forward(self, x):  # NIR's Heaviside: 1 where x > threshold
        return (x > self.thr).to(x.dtype)


class _SumPool(nn.Module):
    def __init__(self, k, s, p):
        super().__init__()
        self.k, self.s, self.p = k, s, p

    def forward(self, x):
        return F.avg_pool2d(x, self.k, self.s, self.p, count_include_pad=True,
                            divisor_override=1)


class _GlobalMean(nn.Module):
    def forward(self, x):  # [T, N, C, H, W] -> [T, N, C], as binslt.models' global pool
        return x.mean(dim=(-2, -1))


class _SpikeOr(nn.Module):
    """2x2 max of spikes (Threshold(SumPool(x), 0.5) of a binslt file): binslt's own pool."""

    def __init__(self, k, s, p):
        super().__init__()
        self.pool = SpikeMaxPool2d(k, s, p)

    def forward(self, x):
        return self.pool(x)


class NIRNet(nn.Module):
    """A NIR graph as a torch model.

    ``forward(x)``: images ``[N, *input_shape]`` are repeated over ``timesteps`` (direct
    encoding), or a sequence ``[T, N, *input_shape]`` is given. Graphs written by binslt return
    the logits ``[N, classes]`` (the mean over T of the output node, as ``BinSLTNet``); other
    graphs return the output sequence ``[T, N, ...]``. ``spikes`` (after a forward with
    ``record=True``) maps each neuron's name to its output spikes.
    """

    def __init__(self, units: nn.ModuleDict, plan: list[tuple[str, str, list[str]]],
                 output: str, input_shape: tuple[int, ...], timesteps: Optional[int],
                 readout: str, metadata: dict):
        super().__init__()
        self.units = units
        self.plan = plan
        self.output = output
        self.input_shape = tuple(int(v) for v in input_shape)
        self.timesteps = timesteps
        self.readout = readout
        self.nir_metadata = metadata
        self.spikes: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, record: bool = False) -> torch.Tensor:
        d = len(self.input_shape)
        if x.dim() == d + 1 and tuple(x.shape[1:]) == self.input_shape:
            if self.timesteps is None:
                raise ValueError("this graph has no time steps recorded; give a sequence "
                                 f"[T, N, {', '.join(map(str, self.input_shape))}]")
            x = x.unsqueeze(0).expand(self.timesteps, *x.shape)
        elif not (x.dim() == d + 2 and tuple(x.shape[2:]) == self.input_shape):
            raise ValueError(f"expected [N, {list(self.input_shape)}] images or a "
                             f"[T, N, {list(self.input_shape)}] sequence, got {tuple(x.shape)}")
        vals = {"input": x}
        self.spikes = {}
        for name, key, inputs in self.plan:
            out = self.units[key](*(vals[i] for i in inputs))
            vals[name] = out
            if record and isinstance(self.units[key], (_Spiking, _DenseSpiking, _Neuron)):
                self.spikes[name] = out
        out = vals[self.output]
        return out.mean(0) if self.readout == "mean_over_time" else out


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
    order = _topo(graph, wf)
    preds = {n: [] for n in graph.nodes}
    succs = {n: [] for n in graph.nodes}
    for a, b in graph.edges:
        preds[b].append(a)
        succs[a].append(b)
    inputs = [n for n, v in graph.nodes.items() if isinstance(v, nir.Input)]
    outputs = [n for n, v in graph.nodes.items() if isinstance(v, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise NIRError(f"{wf}: binslt reads graphs with one Input and one Output node (found "
                       f"{len(inputs)} and {len(outputs)})")
    inp, outn = inputs[0], outputs[0]
    in_shape = tuple(int(v) for v in np.asarray(graph.nodes[inp].input_type["input"]).reshape(-1))

    units = nn.ModuleDict()
    plan: list[tuple[str, str, list[str]]] = []
    alias: dict[str, str] = {inp: "input"}  # NIR node -> the value that carries its output
    spike: dict[str, bool] = {"input": False}
    shape: dict[str, tuple] = {"input": in_shape}
    fused: set[str] = set()
    pending: dict[str, str] = {}  # neuron -> the synapse fused into it

    def src(n):
        return alias[n]

    def key(n):
        return f"u{len(units)}"

    def emit(name, module, ins, is_spike, out_shape):
        k = key(name)
        units[k] = module
        plan.append((name, k, ins))
        alias[name] = name
        spike[name] = is_spike
        shape[name] = out_shape

    for n in order:
        node = graph.nodes[n]
        where = f"{wf}, node {n!r} ({type(node).__name__})"
        if n == inp or n in fused:
            continue
        ps = preds[n]
        if isinstance(node, nir.Output):
            if len(ps) != 1:
                raise NIRError(f"{where}: the Output node needs exactly one input")
            alias[n] = src(ps[0])
            continue
        if not ps:
            raise NIRError(f"{where}: the node has no input")
        meta = _meta(node)
        if isinstance(node, (nir.LIF, nir.IF)) and n in pending:
            syn = pending.pop(n)
            snode = graph.nodes[syn]
            _build_synapse(syn, snode, _meta(snode), src(preds[syn][0]), graph, preds, succs,
                           nir, dt, f"{wf}, node {syn!r} ({type(snode).__name__})", backend,
                           spike, shape, emit, fused, src)
            continue
        if isinstance(node, (nir.LIF, nir.IF)):
            neuron = _neuron_from_node(node, nir, dt, where, backend)
            emit(n, neuron, [src(ps[0])] if len(ps) == 1 else [], True, None)
            if len(ps) > 1:
                units[plan[-1][1]] = nn.Sequential(_Sum(), neuron)
                plan[-1] = (n, plan[-1][1], [src(p) for p in ps])
            continue
        if len(ps) != 1:
            raise NIRError(f"{where}: only neurons may sum several inputs")
        if isinstance(node, (nir.Conv2d, nir.Affine, nir.Linear)):
            t = _fusion_target(n, graph, preds, succs, nir)
            if t is not None:
                pending[t] = n  # built with its neuron, once all the neuron's inputs exist
                continue
        x = src(ps[0])
        if isinstance(node, (nir.Conv2d, nir.Affine, nir.Linear)):
            _build_synapse(n, node, meta, x, graph, preds, succs, nir, dt, where, backend,
                                   spike, shape, emit, fused, src)
            continue
        if isinstance(node, nir.SumPool2d):
            k, s, p = (_pair(node.kernel_size, "kernel_size", where),
                       _pair(node.stride, "stride", where), _pair(node.padding, "padding", where))
            nxt = succs[n]
            if (len(nxt) == 1 and isinstance(graph.nodes[nxt[0]], nir.Threshold)
                    and _meta(graph.nodes[nxt[0]]).get("kind") == "spike_maxpool"
                    and spike.get(x) and len(preds[nxt[0]]) == 1):
                th = np.asarray(graph.nodes[nxt[0]].threshold)
                if not np.all(th == 0.5):
                    raise NIRError(f"{where}: a binslt max-pool threshold must be 0.5")
                emit(nxt[0], _SpikeOr(k, s, p), [x], True, None)
                fused.add(nxt[0])
                alias[n] = nxt[0]
                continue
            emit(n, _PerStep(_SumPool(k, s, p)), [x], False, None)
            continue
        if isinstance(node, nir.AvgPool2d):
            k = np.asarray(node.kernel_size).reshape(-1)
            nxt = succs[n]
            # binslt's 'lif' max-pool form: AvgPool2d -> memoryless LIF (kind spike_maxpool)
            if (len(nxt) == 1 and _meta(graph.nodes[nxt[0]]).get("kind") == "spike_maxpool"
                    and isinstance(graph.nodes[nxt[0]], nir.LIF) and spike.get(x)):
                kk = _pair(node.kernel_size, "kernel_size", where)
                emit(nxt[0], _SpikeOr(kk, _pair(node.stride, "stride", where),
                                      _pair(node.padding, "padding", where)), [x], True, None)
                fused.add(nxt[0])
                alias[n] = nxt[0]
                continue
            if (len(nxt) == 1 and isinstance(graph.nodes[nxt[0]], nir.Flatten)
                    and _meta(graph.nodes[nxt[0]]).get("kind") == "global_avgpool"):
                emit(nxt[0], _GlobalMean(), [x], False, None)
                fused.add(nxt[0])
                alias[n] = nxt[0]
                continue
            kk = tuple(int(v) for v in (k if k.size == 2 else [k[0], k[0]]))
            st = np.asarray(node.stride).reshape(-1)
            pd = np.asarray(node.padding).reshape(-1)
            st = tuple(int(v) for v in (st if st.size == 2 else [st[0], st[0]]))
            pd = tuple(int(v) for v in (pd if pd.size == 2 else [pd[0], pd[0]]))
            emit(n, _PerStep(nn.AvgPool2d(kk, st, pd)), [x], False, None)
            continue
        if isinstance(node, nir.Flatten):
            # NIR's dims exclude the batch (and here the time) dimension
            sd = int(node.start_dim)
            ed = int(node.end_dim)
            emit(n, _PerStep(nn.Flatten(sd + 1 if sd >= 0 else sd, ed + 1 if ed >= 0 else ed)),
                 [x], spike.get(x, False), None)
            continue
        if isinstance(node, nir.Threshold):
            thr = torch.from_numpy(np.asarray(node.threshold, dtype=np.float32).copy())
            emit(n, _ThresholdOp(thr), [x], True, None)
            continue
        if isinstance(node, nir.Scale):
            sc = torch.from_numpy(np.asarray(node.scale, dtype=np.float32).copy())
            emit(n, _ScaleOp(sc), [x], False, None)
            continue
        raise NIRError(f"{where}: binslt cannot read this node type (it reads Input, Output, "
                       "Conv2d, Affine, Linear, LIF, IF, SumPool2d, AvgPool2d, Flatten, "
                       "Threshold, Scale)")
    readout = str(gmeta.get("readout", "sequence")) if ours else "sequence"
    net = NIRNet(units, plan, alias[outn], in_shape, timesteps, readout,
                 {k: (v.decode() if isinstance(v, bytes) else v) for k, v in gmeta.items()})
    return net.eval()


class _ScaleOp(nn.Module):
    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x):
        return x * self.scale


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


def _build_synapse(n, node, meta, x, graph, preds, succs, nir, dt, where, backend, spike, shape,
                   emit, fused, src):
    w = torch.from_numpy(np.asarray(node.weight, dtype=np.float32).copy())
    if isinstance(node, nir.Linear):
        b = torch.zeros(w.shape[0])
    else:
        b = torch.from_numpy(np.asarray(node.bias, dtype=np.float32).copy()).reshape(-1)
    conv = isinstance(node, nir.Conv2d)
    if conv:
        if w.dim() != 4:
            raise NIRError(f"{where}: weight of shape {list(w.shape)} is not [O, I, kh, kw]")
        if int(np.asarray(node.groups).reshape(-1)[0]) != 1:
            raise NIRError(f"{where}: grouped convolutions are not read")
        if np.any(np.asarray(node.dilation).reshape(-1) != 1):
            raise NIRError(f"{where}: dilated convolutions are not read")
        if w.shape[2] != w.shape[3]:
            raise NIRError(f"{where}: kernel {list(w.shape[2:])} is not square")
        stride = _pair(node.stride, "stride", where)
        padding = _pair(node.padding, "padding", where)
    elif w.dim() != 2:
        raise NIRError(f"{where}: weight of shape {list(w.shape)} is not [O, F]")
    lname_t = _fusion_target(n, graph, preds, succs, nir)
    neuron_next = is_main = lname_t is not None
    nxt = [lname_t] if neuron_next else []
    nn_node = graph.nodes[lname_t] if neuron_next else None
    dim = 2 if conv else 1
    tern = _gain_and_bn(w, b, meta, dim, where)
    in_spikes = bool(spike.get(x))
    if neuron_next and is_main:
        lname = nxt[0]
        lwhere = f"{where.rsplit(', node', 1)[0]}, node {lname!r} ({type(nn_node).__name__})"
        neuron = _neuron_from_node(nn_node, nir, dt, lwhere, backend)
        others = [src(p) for p in preds[lname] if p != n]
        if tern is not None and neuron.gain == 1.0:
            ternary, alpha, bn = tern
            cfg = neuron.lif.neuron
            leak = (dict(neuron="if") if cfg.neuron == "if"
                    else dict(tau=cfg.tau, decay_input=cfg.decay_input))
            kw = dict(**leak, v_threshold=cfg.v_threshold, v_reset=0.0,
                      input="spike" if in_spikes else "real", backend=backend,
                      bn=bn is not None, bn_affine=True)
            if conv:
                layer = BinSpikeConv2d(w.shape[1], w.shape[0], w.shape[2], stride, padding,
                                       prune_rate=float(meta.get("prune_rate", 0.0)), **kw)
            else:
                layer = BinSpikeLinear(w.shape[1], w.shape[0],
                                       prune_rate=float(meta.get("prune_rate", 0.0)), **kw)
            layer.per_channel_gain = bool(meta.get("per_channel_gain", "alpha" not in meta))
            if bn is not None:
                layer.bn = bn
            _freeze(layer, ternary, alpha)
            unit = _Spiking(layer.eval())
        else:
            syn = _dense(conv, w, b, stride if conv else 1, padding if conv else 0)
            unit = _DenseSpiking(syn, neuron)
        emit(lname, unit, [x] + others, True, None)
        fused.add(lname)
        return lname
    # a synapse without a fused neuron: readout / shortcut / foreign graph
    if tern is not None:
        ternary, alpha, bn = tern
        if conv:
            layer = BinConv2d(w.shape[1], w.shape[0], w.shape[2], stride, padding,
                              prune_rate=float(meta.get("prune_rate", 0.0)),
                              bn=bn is not None, bn_affine=True)
            if bn is not None:
                layer.bn = bn
            _freeze(layer, ternary, alpha)
            emit(n, _BinConvSeq(layer.eval()), [x], False, None)
        else:
            layer = BinLinear(w.shape[1], w.shape[0],
                              prune_rate=float(meta.get("prune_rate", 0.0)))
            _freeze(layer, ternary, alpha)
            mod: nn.Module = layer.eval()
            if bn is not None and (bn.bias.abs().sum() > 0 if bn.affine else True):
                mod = nn.Sequential(layer, _BiasOp(b))
            emit(n, mod, [x], False, None)
        return n
    emit(n, _PerStep(_dense(conv, w, b, stride if conv else 1, padding if conv else 0))
         if conv else _dense(conv, w, b, 1, 0), [x], False, None)
    return n


class _BiasOp(nn.Module):
    def __init__(self, b):
        super().__init__()
        self.register_buffer("b", b)

    def forward(self, x):
        return x + self.b


class _BinConvSeq(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)  # BinConv2d accepts [T, N, C, H, W]


def _dense(conv: bool, w, b, stride, padding) -> nn.Module:
    if conv:
        m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride, padding, bias=True)
    else:
        m = nn.Linear(w.shape[1], w.shape[0], bias=True)
    m.weight.data.copy_(w)
    m.bias.data.copy_(b)
    m.requires_grad_(False)
    return m


# ---------------------------------------------------------------------------------------------
# Command-line entry points (plain functions; they raise, the CLI prints and exits 2)
# ---------------------------------------------------------------------------------------------


def export_cli(src: PathLike, out: Optional[PathLike] = None, *, maxpool: str = "threshold",
               dt: float = DEFAULT_DT) -> str:
    """``binslt export SRC --format nir [-o OUT]``: export a run directory, ``ticket.pt`` /
    ``checkpoint.pt`` or packed ticket to a NIR file (default: next to SRC, ``.nir``).
    Returns the line to print. Raises NIRError (and binslt.io.artifacts.ArtifactError / TicketError for
    an unreadable source)."""
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
