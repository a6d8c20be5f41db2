"""The reference's weight side and bit packing: the top-|s| mask and gain, the masked sign
weight with biprop's straight-through score gradient, and the packed spike / weight words, with
the ``binslt::`` schemas of the packing and weight-side ops. Re-exported by
:mod:`binslt.ops.reference`, the oracle every kernel is checked against."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .contract import check_prune_rate
from .function import Function
from .reference_neuron import saves_inputs

# ----------------------------------------------------------------------------------------------
# Mask, gain (mean |w| over the kept weights) and the masked sign weight
# ----------------------------------------------------------------------------------------------


def num_pruned(numel: int, prune_rate: float) -> int:
    """floor(prune_rate * numel) in float64: how many weights biprop's rule removes."""
    return int(math.floor(check_prune_rate(prune_rate) * numel))


def topk_mask(scores: torch.Tensor, prune_rate: float) -> torch.Tensor:
    """Keep the ``numel - floor(prune_rate * numel)`` entries with the largest |s|.

    Ties break deterministically: among equal |s| the lower flat index is kept (stable sort).
    Returns a {0, 1} tensor of the scores' dtype and shape.
    """
    n = scores.numel()
    return topk_mask_reference(scores, n - num_pruned(n, prune_rate))


def raise_non_finite(op: str, what: str, t: torch.Tensor) -> None:
    """The ValueError of a kernel that found NaN or inf in ``t`` (``what``: "scores contain",
    "weight contains"), with how many of each: the message of the CPU kernels' check."""
    n = t.numel()
    nan, inf = (int(c) for c in torch.stack([t.isnan().sum(), t.isinf().sum()]).tolist())
    parts = " and ".join(f"{k} ({c} of {n})" for k, c in (("NaN", nan), ("inf", inf)) if c)
    raise ValueError(f"binslt::{op}: {what} {parts}; the values diverged (a learning rate too "
                     "high, a loss that overflowed) or were loaded so: restore a finite "
                     "checkpoint or re-initialise them")


def topk_mask_reference(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """``binslt::topk_mask``: the {0, 1} mask of the ``keep`` largest |s|, ties to the lower flat
    index. NaN or inf in the scores is a ValueError (``raise_non_finite``), found by the same host
    read that counts the entries above the keep-th largest.
    """
    a = scores.detach().abs().flatten()
    n = a.numel()
    if keep >= n or keep <= 0:
        if n and not bool(torch.isfinite(a).all()):
            raise_non_finite("topk_mask", "scores contain", a)
        return torch.ones_like(scores) if keep >= n else torch.zeros_like(scores)
    # A selection, not a sort (this runs on every search-mode forward): v is the keep-th largest
    # |s|; everything above it is kept, and of the entries equal to v the lowest indices fill the
    # remaining places -- the same set a stable descending sort would keep.
    v = torch.kthvalue(a, n - keep + 1).values
    above = a > v
    tied = a == v
    # One host read: the count above v and the count of non-finite |s| (inf, NaN).
    n_above, n_bad = torch.stack([above.sum(), (~torch.isfinite(a)).sum()]).tolist()
    if n_bad:
        raise_non_finite("topk_mask", "scores contain", scores.detach())
    room = keep - int(n_above)
    mask = above | (tied & (torch.cumsum(tied, 0) <= room))
    return mask.to(scores.dtype).view_as(scores)


def mean_abs_gain(weight: torch.Tensor, mask: torch.Tensor,
                  per_channel: bool = False) -> torch.Tensor:
    """The search's gain, the mean |w| over the kept weights: alpha = sum(|w| * M) / sum(M).

    A 0-d tensor, or [C_out] with ``per_channel``, of the weight's dtype. The sums are taken in
    float64 and the quotient rounded once to that dtype, so a float32 alpha does not follow a
    summation order: the CPU kernel ``binslt::search_sign_pack`` and torch's reductions on any
    device give the same bits, unless the float64 sum lies within ~1e-13 of a float32 rounding
    boundary. (``ops.max_abs_gain`` reads the same alpha back from an effective weight as its
    largest magnitude.)
    """
    w, m = weight.detach().abs().double(), mask.detach().double()
    if per_channel:
        num = (w * m).flatten(1).sum(1)
        den = m.flatten(1).sum(1)
        alpha = torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))
        return alpha.to(weight.dtype)
    # Branchless (torch.compile fullgraph): with no kept weight the numerator is 0, so alpha = 0.
    return ((w * m).sum() / m.sum().clamp_min(1)).to(weight.dtype)


def _expand_gain(alpha: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return alpha.view(-1, *([1] * (like.dim() - 1))) if alpha.dim() == 1 else alpha


class _MaskedSignSearch(Function):
    """W_eff = alpha * sign(w) * M(s); dL/ds = dL/dW_eff * w * sign(s); no grad to w or alpha."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, scores, prune_rate, per_channel, mask):
        mask = topk_mask(scores, prune_rate) if mask is None else mask
        alpha = mean_abs_gain(weight, mask, per_channel)
        return _expand_gain(alpha, weight) * torch.sign(weight) * mask

    setup_context = saves_inputs(0, 1)

    @staticmethod
    def backward(ctx, grad):
        weight, scores = ctx.saved_tensors
        return None, search_score_grad(grad, weight, scores), None, None, None


def search_score_grad(grad: torch.Tensor, weight: torch.Tensor,
                      scores: torch.Tensor) -> torch.Tensor:
    """biprop's straight-through score gradient: dL/ds = dL/dW_eff * w * sign(s)."""
    return grad * weight * torch.sign(scores)


class _MaskedSignFinetune(Function):
    """W_eff = alpha * sign(w) * M with M fixed; straight-through to w: dL/dw = dL/dW_eff * M."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, mask, per_channel):
        alpha = mean_abs_gain(weight, mask, per_channel)
        return _expand_gain(alpha, weight) * torch.sign(weight) * mask

    setup_context = saves_inputs(1)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def masked_sign_weight(
    weight: torch.Tensor, scores: torch.Tensor, prune_rate: float, per_channel: bool = False,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Search mode: the effective weight alpha * sign(w) * M with biprop's score gradient.

    ``mask``: M already selected (``topk_mask(scores, prune_rate)``, e.g. by the kernel of
    ``ops.topk_mask``); None selects it here.
    """
    return _MaskedSignSearch.apply(weight, scores, prune_rate, per_channel, mask)


def masked_sign_weight_finetune(
    weight: torch.Tensor, mask: torch.Tensor, per_channel: bool = False
) -> torch.Tensor:
    """Fine-tune mode: fixed mask, latent weights trained through sign (straight-through)."""
    return _MaskedSignFinetune.apply(weight, mask, per_channel)


# ----------------------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------------------

_SHIFTS = None


def _bit_weights(device) -> torch.Tensor:
    return torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=device),
                                    torch.arange(32, dtype=torch.int64, device=device))


def _to_int32_words(v: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same bit pattern."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _pack_bits_last(bits: torch.Tensor) -> torch.Tensor:
    """bits: [..., C] in {0, 1} -> [..., ceil(C/32)] int32 words, channel c at bit c % 32."""
    c = bits.shape[-1]
    cw = (c + 31) // 32
    b = bits.to(torch.int64)
    if cw * 32 != c:
        b = F.pad(b, (0, cw * 32 - c))
    b = b.view(*b.shape[:-1], cw, 32)
    return _to_int32_words((b * _bit_weights(b.device)).sum(-1))


def _unpack_bits_last(words: torch.Tensor, c: int) -> torch.Tensor:
    """[..., Cw] int32 -> [..., C] float32 bits."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    bits = torch.bitwise_right_shift(w.unsqueeze(-1), torch.arange(32, device=w.device)) & 1
    return bits.flatten(-2)[..., :c].to(torch.float32)


def pack_spikes_reference(x: torch.Tensor) -> torch.Tensor:
    """x: [B, C, H, W] spikes in {0, 1} -> [B, H, W, ceil(C/32)] int32 (ValueError otherwise)."""
    if x.device.type != "meta" and x.numel() and not torch.compiler.is_compiling():
        if not bool(((x == 0) | (x == 1)).all()):
            raise ValueError("binslt::pack_spikes: the input must be binary spikes (every element "
                             "0. or 1.), but it holds other values (or NaN)")
    return _pack_bits_last(x.permute(0, 2, 3, 1) != 0)


def unpack_spikes_reference(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """packed: [B, H, W, Cw] int32 -> [B, channels, H, W] float32."""
    # clone, not .contiguous(): with H = W = 1 the permuted view already counts as contiguous
    # but keeps channels-last strides, which make convolutions choose channels-last outputs.
    return _unpack_bits_last(packed, channels).permute(0, 3, 1, 2).clone(
        memory_format=torch.contiguous_format)


def pack_weight_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [Co, Ci, kh, kw] ternary (times a gain) -> (mask, pos) bits [Co, kh, kw, Cw]."""
    w = weight.permute(0, 2, 3, 1)
    return _pack_bits_last(w != 0), _pack_bits_last(w > 0)


def unpack_weight_reference(
    w_mask: torch.Tensor, w_pos: torch.Tensor, in_channels: int,
    alpha: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Inverse of ``pack_weight``: [Co, Ci, kh, kw] float32 in {-1, 0, 1} (times alpha[Co])."""
    m = _unpack_bits_last(w_mask, in_channels)
    p = _unpack_bits_last(w_pos, in_channels)
    w = (2 * p - 1) * m
    if alpha is not None:
        w = w * alpha.view(-1, 1, 1, 1).to(w.dtype)
    # clone, not .contiguous(): a 1x1 kernel's permuted view counts as contiguous but keeps
    # channels-last strides, and F.conv2d then returns channels-last (non-contiguous) outputs.
    return w.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)
