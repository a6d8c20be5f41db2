"""SpikingJelly's analysis tools on binslt models: monitors and operation counters.

**Monitors.** binslt's spiking layers fuse the conv, the BN and the neuron, so a converted model
holds no ``neuron.LIFNode``: monitor the layer classes in :data:`SPIKING_LAYERS` instead::

    from spikingjelly.activation_based import monitor
    mon = monitor.OutputMonitor(net, binslt.interop.sj_tools.SPIKING_LAYERS)   # each layer's spikes
    net(x); rates = {name: s.mean().item() for name, s in zip(mon.monitored_layers, mon.records)}

Each record is the layer's output spikes [T, N, C, H', W'] (after its fused 2x2 pool when
``pool=2``). The membrane potential is not written by the fused kernels; on request a layer
recomputes it through the reference (a slower debug path): ``layer.store_v_seq = True`` (or
:func:`store_v_seq` on a whole model) makes every call keep ``layer.v_seq`` [T, N, C, H', W']
(before any pool) and ``layer.v`` (its last step), SpikingJelly's ``LIFNode(store_v_seq=True)``
attributes, which ``monitor.AttributeMonitor('v_seq', ...)`` / ``('v', ...)`` read.

**Operation counters.** SpikingJelly's op counters (``op_counter.SynOpCounter``, ``ACCounter``,
``MACCounter``, ``FlopCounter``, used with ``DispatchCounterMode``) count aten ops; binslt's
layers call ``binslt::`` ops instead. :func:`spikingjelly_op_rules` gives their ``extra_rules``:
each binary conv op is counted as the counter counts ``aten.convolution`` of the same input
spikes with the same effective weight W_eff = alpha * sign(w) * M (rebuilt from the packed
bits), i.e. exactly what the counter reports for the model under ``binslt.use_backend("torch")``,
where the layers run plain convolutions. The fused epilogue and neuron arithmetic
(``binslt::bn_lif`` and the neuron inside the conv ops) has no rule: SpikingJelly counts the
torch backend's neuron as its elementwise aten ops, which the fused kernels do not run.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch
from torch import nn

from ..nn.layers import LIF, BinSpikeConv2d, BinSpikeLinear, _MaskedSignWeight
from ..ops import reference as ref

__all__ = ["SPIKING_LAYERS", "spikingjelly_op_rules", "store_v_seq"]

#: The binslt modules whose output is spikes (an OutputMonitor's ``instance``).
SPIKING_LAYERS = (BinSpikeConv2d, BinSpikeLinear, LIF)


def store_v_seq(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Set ``store_v_seq`` on every binslt spiking layer of ``model`` (see the module doc);
    returns ``model``."""
    for m in model.modules():
        if isinstance(m, _MaskedSignWeight) and isinstance(m, SPIKING_LAYERS):
            m.store_v_seq = bool(enabled)
            if not enabled:
                m.__dict__.pop("v_seq", None)
    return model


def _spikes(x: torch.Tensor) -> torch.Tensor:
    """Float spikes [B, C, H, W] from an op's input: float [B, C, H, W], float [T, N, C, H, W],
    or packed words [B, H, W, Cw] / [T, N, H, W, Cw] int32 (C = 32 * Cw: the padding channels
    are zero)."""
    if x.dtype == torch.int32:
        words = x.flatten(0, 1) if x.dim() == 5 else x
        return ref.unpack_spikes_reference(words, 32 * words.shape[-1])
    return (x.flatten(0, 1) if x.dim() == 5 else x).float()


def _conv_call(x: torch.Tensor, w_mask: torch.Tensor, w_pos: torch.Tensor, alpha: torch.Tensor,
               stride: int, padding: int):
    """``(args, out)`` of the ``aten.convolution`` the op computes: its input spikes, W_eff from
    the bit planes and gain (over the padded 32 * Cw input channels, zero beyond Ci), and an
    output of the op's conv shape (meta: only its shape is read)."""
    xs = _spikes(x)
    w = ref.unpack_weight_reference(w_mask, w_pos, 32 * w_mask.shape[-1], alpha.float())
    if xs.shape[1] != w.shape[1]:  # float input with C < 32 * Cw: W_eff's real channels
        w = w[:, :xs.shape[1]]
    ho = (xs.shape[2] + 2 * padding - w.shape[2]) // stride + 1
    wo = (xs.shape[3] + 2 * padding - w.shape[3]) // stride + 1
    out = torch.empty((xs.shape[0], w.shape[0], ho, wo), device="meta")
    args = (xs, w, None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], 1)
    return args, out


# Each binslt conv op: the positions of (x, w_mask, w_pos, alpha, stride, padding) in its args,
# one tuple per convolution it computes (bconv_lif_infer_shortcut: the layer's and its
# shortcut's).
_CONV_OPS = {
    "bconv_lif": ((0, 1, 2, 3, 8, 9),),
    "bconv_lif_infer": ((0, 1, 2, 3, 7, 8),),
    "bconv_affine_infer": ((0, 1, 2, 3, 6, 7),),
    "bconv_lif_infer_shortcut": ((0, 1, 2, 3, 14, 15), (6, 7, 8, 9, 12, 13)),
}


def _conv_rule_of(counter: Any) -> Callable:
    aten_conv = torch.ops.aten.convolution.default
    if isinstance(counter, str):
        from spikingjelly.activation_based import op_counter

        classes = {"synop": op_counter.SynOpCounter, "ac": op_counter.ACCounter,
                   "mac": op_counter.MACCounter, "flop": op_counter.FlopCounter}
        if counter not in classes:
            raise ValueError(f"spikingjelly_op_rules: counter must be a SpikingJelly counter "
                             f"(class or instance) or one of {tuple(classes)}, got {counter!r}")
        counter = classes[counter]
    probe = counter() if isinstance(counter, type) else counter
    rule = getattr(probe, "rules", {}).get(aten_conv)
    if rule is None:
        raise ValueError(f"spikingjelly_op_rules: {type(probe).__name__} has no rule for "
                         "aten.convolution, so it counts no conv the binslt ops could map to")
    return rule


def spikingjelly_op_rules(counter: Union[str, type, Any] = "synop") -> dict[Any, Callable]:
    """``extra_rules`` for a SpikingJelly op counter, for the ``binslt::`` binary conv ops
    (``bconv_lif``, ``bconv_lif_infer``, ``bconv_affine_infer``, ``bconv_lif_infer_shortcut``):
    each is counted by the counter's own ``aten.convolution`` rule applied to the op's input
    spikes and effective weight (the fused shortcut op: its two convolutions), so a model
    counts the same as under ``binslt.use_backend("torch")``.

    ``counter``: the counter the rules are for, as its class, an instance, or "synop", "ac",
    "mac", "flop" (SynOpCounter, ACCounter, MACCounter, FlopCounter)::

        from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter
        syn = SynOpCounter(extra_rules=binslt.interop.sj_tools.spikingjelly_op_rules(SynOpCounter))
        with DispatchCounterMode([syn]):
            net(x)
        syn.get_total()
    """
    conv_rule = _conv_rule_of(counter)

    def rule_for(convs):
        def rule(args, kwargs, out):
            del kwargs, out
            total = 0
            for ix, im, ip, ia, istr, ipad in convs:
                conv_args, conv_out = _conv_call(args[ix], args[im], args[ip], args[ia],
                                                 int(args[istr]), int(args[ipad]))
                with torch.no_grad():
                    total = total + conv_rule(conv_args, {}, conv_out)
            return total

        return rule

    return {getattr(torch.ops.binslt, name).default: rule_for(pos)
            for name, pos in _CONV_OPS.items()}
