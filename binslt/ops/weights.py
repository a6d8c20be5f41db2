"""The search step's weight side: top-|s| selection (``topk_mask``), the masked sign weight
with its bit planes and gain (``masked_sign_weight``) and the weight packing (``pack_weight``)."""

from __future__ import annotations

import torch

from . import library as _ext
from . import reference as ref
from .backend import _run_auto
from .function import Function
from .registry import _CPU_SEARCH_SIGN_PACK, get_op

# ---------------------------------------------------------------------------------------------
# The search step's weight side
# ---------------------------------------------------------------------------------------------

_SELECTION_DTYPES = (torch.float32, torch.float64)


def topk_mask(scores: torch.Tensor, prune_rate: float) -> torch.Tensor:
    """biprop's mask: the ``numel - floor(prune_rate * numel)`` largest |s| kept, ties to the lower
    flat index -- ``reference.topk_mask`` bit for bit, as a {0, 1} tensor like ``scores``.

    float32/float64 scores run ``binslt::topk_mask`` (a radix selection on the CPU, the reference
    on other devices); other dtypes run the reference directly.
    """
    if scores.dtype not in _SELECTION_DTYPES:
        return ref.topk_mask(scores, prune_rate)
    n = scores.numel()
    return torch.ops.binslt.topk_mask(scores.detach(), n - ref.num_pruned(n, prune_rate))


class _MaskedSignSearchPacked(Function):
    """Search mode's W_eff (``reference._MaskedSignSearch``'s values and score gradient) with its
    bit planes and kernel gain, from one ``binslt::search_sign_pack`` call (selection, gain and
    packing; the ``setup_context`` form, so that ``torch.func.grad`` over the scores works)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, scores, keep, per_channel):
        w4 = weight.view(*weight.shape, 1, 1) if weight.dim() == 2 else weight
        w_eff, w_mask, w_pos, gain = torch.ops.binslt.search_sign_pack(
            w4, scores.view_as(w4), keep, per_channel)
        return w_eff.view_as(weight), w_mask, w_pos, gain

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, scores, _keep, _per_channel = inputs
        ctx.save_for_backward(weight, scores)
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, grad, _g_mask, _g_pos, _g_gain):
        weight, scores = ctx.saved_tensors
        if grad.dtype != torch.float32:
            return None, ref.search_score_grad(grad, weight, scores), None, None
        return None, torch.ops.binslt.search_score_grad(grad, weight, scores), None, None


def _packs_on_cpu(weight: torch.Tensor, scores: torch.Tensor) -> bool:
    return (_CPU_SEARCH_SIGN_PACK
            and weight.device.type == "cpu" and weight.dtype == torch.float32
            and scores.dtype == torch.float32 and weight.dim() in (2, 4)
            and scores.shape == weight.shape)


def masked_sign_weight(weight: torch.Tensor, scores: torch.Tensor, prune_rate: float,
                       per_channel: bool = False, *, planes: bool = False):
    """Search mode's W_eff = alpha * sign(w) * M (``reference.masked_sign_weight``'s values and
    biprop's score gradient), its mask selected by ``topk_mask``.

    ``planes``: return ``(W_eff, (mask bits, positive bits, gain))``, what ``pack_weight`` and
    ``max_abs_gain`` give for W_eff ([O, F] weights as 1x1 kernels), written by the same op on
    the CPU (``binslt::search_sign_pack``: no float mask); ``(W_eff, None)`` where no CPU kernel
    serves the weight.
    """
    if _packs_on_cpu(weight, scores):
        n = scores.numel()
        keep = n - ref.num_pruned(n, prune_rate)
        w_eff, *packed = _MaskedSignSearchPacked.apply(weight, scores, keep, per_channel)
        return (w_eff, tuple(packed)) if planes else w_eff
    mask = topk_mask(scores, prune_rate)
    w_eff = ref.masked_sign_weight(weight, scores, prune_rate, per_channel, mask=mask)
    return (w_eff, None) if planes else w_eff


def onednn_conv_available() -> bool:
    """Whether the C++ CPU kernels can run oneDNN's int8 convolution here (AMX-INT8)."""
    global _ONEDNN
    if _ONEDNN is None:
        info = _ext.cpu_info()
        _ONEDNN = bool(info and info["features"].get("onednn_int8", False))
    return _ONEDNN


_ONEDNN = None


def pack_weight(weight: torch.Tensor, backend: str = "auto"):
    return _run_auto(backend, weight.device, lambda be: get_op("pack_weight", be)(weight))
