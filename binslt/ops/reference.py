"""Pure-PyTorch reference: the oracle every kernel is checked against.

Two layers live here:

1. Differentiable building blocks (any float dtype, float64 included) that define the semantics
   of ``docs/design.md``: the top-|s| mask and gain, the masked sign weight with biprop's
   straight-through score gradient, the surrogate spike function, SpikingJelly's multi-step LIF,
   and ApproxSign.
2. ``*_reference`` functions with exactly the ``binslt::`` op schemas (``binslt/_schemas.py``), so
   that the reference is interchangeable with the C++/CUDA/Triton kernels. They check their
   arguments with ``binslt._contract`` (the same errors as every other backend); their backward
   ops are derived by autograd through the building blocks, so they share one definition of the
   maths.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import contract as C
from .contract import check_prune_rate

# ----------------------------------------------------------------------------------------------
# Surrogate spike function and the multi-step LIF neuron
# ----------------------------------------------------------------------------------------------


def surrogate_grad(x: torch.Tensor, surrogate: int, alpha: float) -> torch.Tensor:
    """g'(x), SpikingJelly's surrogate derivative evaluated at ``x = H - v_threshold``.

    surrogate 0 (ATan):    alpha / (2 * (1 + (pi/2 * alpha * x)^2))
    surrogate 1 (Sigmoid): alpha * sig(alpha x) * (1 - sig(alpha x))
    surrogate 2 (Rect):    alpha where |x| < 0.5/alpha (strict), else 0
    surrogate 3 (PiecewiseQuadratic): alpha - alpha^2 |x| where |x| <= 1/alpha (non-strict),
                           else 0
    Rect and PiecewiseQuadratic are SpikingJelly's ``rect_backward`` and
    ``piecewise_quadratic_backward`` expressions (Python-float scalars against ``x``'s dtype), so
    float32 results agree with them bit for bit.
    """
    if surrogate == 0:
        z = x * (math.pi / 2 * alpha)
        return (alpha / 2) / (1 + z * z)
    if surrogate == 1:
        s = torch.sigmoid(alpha * x)
        return (1 - s) * s * alpha
    if surrogate == 2:
        return alpha * (x.abs() < 0.5 / alpha).to(x.dtype)
    if surrogate == 3:
        x_abs = x.abs()
        return (-(alpha**2) * x_abs + alpha).masked_fill(x_abs > 1 / alpha, 0.0)
    raise ValueError(f"surrogate must be 0 (atan), 1 (sigmoid), 2 (rect) or 3 "
                     f"(piecewise_quadratic), got {surrogate}")


class _SpikeFn(torch.autograd.Function):
    """Heaviside(x >= 0) forward, surrogate derivative backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, surrogate: int, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * surrogate_grad(x, ctx.surrogate, ctx.alpha), None, None


def spike_fn(x: torch.Tensor, surrogate: int = 0, alpha: float = 2.0) -> torch.Tensor:
    return _SpikeFn.apply(x, surrogate, alpha)


def lif_multistep(
    x_seq: torch.Tensor,
    *,
    tau: float = 2.0,
    decay_input: bool = True,
    v_threshold: float = 1.0,
    v_reset: Optional[float] = 0.0,
    detach_reset: bool = False,
    surrogate: int = 0,
    surrogate_alpha: float = 2.0,
    return_h: bool = False,
):
    """SpikingJelly's multi-step LIF (``LIFNode``, step mode 'm'), starting from V[-1] = v_reset.

    x_seq: [T, ...]. Returns spikes [T, ...] (and H [T, ...] when ``return_h``). The float
    operations are written in SpikingJelly's order so that float32 results agree bit for bit.
    """
    vr = 0.0 if v_reset is None else v_reset
    v = torch.full_like(x_seq[0], vr)
    spikes, hs = [], []
    for x in x_seq:
        h = v + (x - (v - vr)) / tau if decay_input else v - (v - vr) / tau + x
        s = spike_fn(h - v_threshold, surrogate, surrogate_alpha)
        sr = s.detach() if detach_reset else s
        v = h - sr * v_threshold if v_reset is None else sr * v_reset + (1 - sr) * h
        spikes.append(s)
        hs.append(h)
    out = torch.stack(spikes)
    return (out, torch.stack(hs)) if return_h else out


class _ApproxSign(torch.autograd.Function):
    """sign(x) (with sign(0) = +1, so outputs are +-1) and Bi-Real's ApproxSign backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 * (1 - x.clamp(-1, 1).abs())


def sign_activation(x: torch.Tensor) -> torch.Tensor:
    """Binary activation of the BNN-BinAct baseline: sign forward, ApproxSign backward."""
    return _ApproxSign.apply(x)


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

    A 0-d tensor, or [C_out] with ``per_channel``. (``ops.max_abs_gain`` reads the same alpha back
    from an effective weight as its largest magnitude.)
    """
    w, m = weight.detach().abs(), mask.detach()
    if per_channel:
        num = (w * m).flatten(1).sum(1)
        den = m.flatten(1).sum(1)
        return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))
    # Branchless (torch.compile fullgraph): with no kept weight the numerator is 0, so alpha = 0.
    return (w * m).sum() / m.sum().clamp_min(1)


def _expand_gain(alpha: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return alpha.view(-1, *([1] * (like.dim() - 1))) if alpha.dim() == 1 else alpha


class _MaskedSignSearch(torch.autograd.Function):
    """W_eff = alpha * sign(w) * M(s); dL/ds = dL/dW_eff * w * sign(s); no grad to w or alpha."""

    @staticmethod
    def forward(ctx, weight, scores, prune_rate, per_channel, mask):
        mask = topk_mask(scores, prune_rate) if mask is None else mask
        alpha = mean_abs_gain(weight, mask, per_channel)
        ctx.save_for_backward(weight, scores)
        return _expand_gain(alpha, weight) * torch.sign(weight) * mask

    @staticmethod
    def backward(ctx, grad):
        weight, scores = ctx.saved_tensors
        return None, search_score_grad(grad, weight, scores), None, None, None


def search_score_grad(grad: torch.Tensor, weight: torch.Tensor,
                      scores: torch.Tensor) -> torch.Tensor:
    """biprop's straight-through score gradient: dL/ds = dL/dW_eff * w * sign(s)."""
    return grad * weight * torch.sign(scores)


class _MaskedSignFinetune(torch.autograd.Function):
    """W_eff = alpha * sign(w) * M with M fixed; straight-through to w: dL/dw = dL/dW_eff * M."""

    @staticmethod
    def forward(ctx, weight, mask, per_channel):
        alpha = mean_abs_gain(weight, mask, per_channel)
        ctx.save_for_backward(mask)
        return _expand_gain(alpha, weight) * torch.sign(weight) * mask

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
    w_mask: torch.Tensor, w_pos: torch.Tensor, in_channels: int, alpha: Optional[torch.Tensor] = None
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


# ----------------------------------------------------------------------------------------------
# The epilogue: (BN) (+ residual) + multi-step LIF
# ----------------------------------------------------------------------------------------------


def _channel_view(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return v.view(1, 1, -1, *([1] * (z.dim() - 3))).to(z.dtype)


def epilogue(
    z: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: Optional[torch.Tensor],
    bn_train: bool,
    bn_eps: float,
):
    """Y = BN(z) or z*scale+shift, plus residual. z: [T, N, C, *]. Returns (X, mean, var).

    Differentiable with respect to z, scale, shift and residual.
    """
    c = z.shape[2]
    if bn_train:
        dims = [0, 1] + list(range(3, z.dim()))
        mean = z.mean(dim=dims)
        var = z.var(dim=dims, unbiased=False)
        invstd = torch.rsqrt(var + bn_eps)
        y = (z - _channel_view(mean, z)) * _channel_view(invstd, z)
        y = y * _channel_view(scale, z) + _channel_view(shift, z)
    else:
        mean = torch.zeros(c, dtype=torch.float32, device=z.device)
        var = torch.zeros(c, dtype=torch.float32, device=z.device)
        y = z * _channel_view(scale, z) + _channel_view(shift, z)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y, mean.detach().float(), var.detach().float()


def _neuron_kwargs(tau, decay_input, v_threshold, v_reset, detach_reset=False, surrogate=0,
                   surrogate_alpha=2.0):
    return dict(tau=tau, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                detach_reset=detach_reset, surrogate=surrogate, surrogate_alpha=surrogate_alpha)


def bn_lif_reference(z, scale, shift, residual, bn_train, bn_eps, tau, decay_input, v_threshold,
                     v_reset):
    """Schema ``binslt::bn_lif``. z: [T, N, C, *] -> (spikes like z, mean [C], var [C])."""
    C.check_scalars("bn_lif", tau, decay_input, v_threshold, v_reset, bn_eps)
    # The vectors are checked, then follow z's dtype: float32 (as every kernel computes) for
    # schema calls, float64 where the reference serves as the oracle.
    C.check_bn_lif("bn_lif", z, residual, scale=scale, shift=shift)
    x, mean, var = epilogue(z, scale, shift, residual, bn_train, bn_eps)
    s = lif_multistep(x, **_neuron_kwargs(tau, decay_input, v_threshold, v_reset))
    return s, mean, var


def _bn_lif_bwd(grad_spikes, z, scale, shift, residual, bn_train, bn_eps, tau, decay_input,
                v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha):
    """(grad_z, grad_current, grad_scale, grad_shift) by autograd through the building blocks."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        sc = scale.detach().requires_grad_(True)
        sh = shift.detach().requires_grad_(True)
        x, _, _ = epilogue(zz, sc, sh, residual, bn_train, bn_eps)
        xx = x.detach().requires_grad_(True)
        s = lif_multistep(xx, **_neuron_kwargs(tau, decay_input, v_threshold, v_reset, detach_reset,
                                               surrogate, surrogate_alpha))
        (g_cur,) = torch.autograd.grad(s, xx, grad_spikes)
        g_z, g_sc, g_sh = torch.autograd.grad(x, (zz, sc, sh), g_cur)
    return g_z, g_cur, g_sc, g_sh


def bn_lif_bwd_reference(grad_spikes, z, scale, shift, mean, var, residual, bn_train, bn_eps, tau,
                         decay_input, v_threshold, v_reset, detach_reset, surrogate,
                         surrogate_alpha, need_grad_current=True):
    """Schema ``binslt::bn_lif_bwd``: (grad_z, grad_current, grad_scale, grad_shift)."""
    op = "bn_lif_bwd"
    C.check_scalars(op, tau, decay_input, v_threshold, v_reset, bn_eps, surrogate, surrogate_alpha)
    # The reference recomputes the batch statistics from z, so as the float64 oracle it also
    # takes mean = var = None; given ones are checked like on every backend.
    stats = {k: v for k, v in (("mean", mean), ("var", var)) if v is not None}
    C.check_bn_lif(op, z, residual, scale=scale, shift=shift, **stats)
    g_z, g_cur, g_sc, g_sh = _bn_lif_bwd(grad_spikes, z, scale, shift, residual, bn_train, bn_eps,
                                         tau, decay_input, v_threshold, v_reset, detach_reset,
                                         surrogate, surrogate_alpha)
    if not need_grad_current:
        g_cur = g_cur.new_empty(0)
    return g_z, g_cur, g_sc, g_sh


# ----------------------------------------------------------------------------------------------
# The fused binary conv + LIF, schema level
# ----------------------------------------------------------------------------------------------


def bconv_count_reference(x_packed, w_mask, w_pos, stride, padding, in_channels=None):
    """Integer counts sum(x * sign * M) as float32, [B, Co, Ho, Wo] (exact for K < 2^24)."""
    cin = x_packed.shape[-1] * 32 if in_channels is None else in_channels
    x = unpack_spikes_reference(x_packed, cin)
    w = unpack_weight_reference(w_mask, w_pos, cin)
    return F.conv2d(x, w, stride=stride, padding=padding)


def _check_packed_bconv(op, x_packed, T, w_mask, w_pos, alpha, scale, shift, residual, stride,
                        padding):
    b, h, w, cw = C.check_packed_input(op, x_packed)
    return C.check_bconv(op, "x_packed", (b, h, w), cw, T, w_mask, w_pos, alpha, scale, shift,
                         residual, stride, padding)


def _bconv_lif(x_packed, w_mask, w_pos, a, residual, T, stride, padding, bn_train, bn_eps, tau,
               decay_input, v_threshold, v_reset):
    """bconv_lif on checked arguments ``a`` (float32 per-channel vectors)."""
    counts = bconv_count_reference(x_packed, w_mask, w_pos, stride, padding)
    counts = counts.view(T, a.n, a.co, a.ho, a.wo)
    z = counts * a.alpha.view(1, 1, -1, 1, 1)
    x, mean, var = epilogue(z, a.scale, a.shift, residual, bn_train, bn_eps)
    s = lif_multistep(x, **_neuron_kwargs(tau, decay_input, v_threshold, v_reset))
    return s, counts.round().to(C.counts_dtype(w_mask)), mean, var


def bconv_lif_reference(x_packed, w_mask, w_pos, alpha, scale, shift, residual, T, stride, padding,
                        bn_train, bn_eps, tau, decay_input, v_threshold, v_reset):
    """Schema ``binslt::bconv_lif`` -> (spikes, counts, mean, var)."""
    op = "bconv_lif"
    C.check_scalars(op, tau, decay_input, v_threshold, v_reset, bn_eps)
    a = _check_packed_bconv(op, x_packed, T, w_mask, w_pos, alpha, scale, shift, residual,
                            stride, padding)
    return _bconv_lif(x_packed, w_mask, w_pos, a, residual, T, stride, padding, bn_train, bn_eps,
                      tau, decay_input, v_threshold, v_reset)


def infer_output(spikes: torch.Tensor, pool: int, packed_out: bool, pack) -> torch.Tensor:
    """bconv_lif_infer's output from the unpooled spikes [T, N, Co, Ho, Wo]: 2x2 max-pooled
    (an OR of spikes) when pool=2, packed to words [T, N, Ho', Wo', Cw] by ``pack`` (a
    pack_spikes implementation) when packed_out. For the backends that pool after the conv."""
    T, n = spikes.shape[:2]
    if pool > 1:
        spikes = F.max_pool2d(spikes.flatten(0, 1), pool).view(T, n, spikes.shape[2],
                                                                spikes.shape[3] // pool,
                                                                spikes.shape[4] // pool)
    if not packed_out:
        return spikes
    words = pack(spikes.flatten(0, 1).contiguous())
    return words.view(T, n, *words.shape[1:])


def bconv_lif_infer_reference(x, w_mask, w_pos, alpha, scale, shift, residual, stride, padding,
                              tau, decay_input, v_threshold, v_reset, pool=1, packed_out=False):
    """Schema ``binslt::bconv_lif_infer`` -> spikes (bconv_lif's, eval epilogue; pooled and
    packed as asked)."""
    op = "bconv_lif_infer"
    C.check_scalars(op, tau, decay_input, v_threshold, v_reset)
    T, n, h, w, cw, packed_in = C.check_infer_input(op, x)
    a = C.check_bconv(op, "x", (T * n, h, w), cw, T, w_mask, w_pos, alpha, scale,
                      shift, residual, stride, padding)
    C.check_pool(op, pool, a.ho, a.wo)
    xp = x.reshape(T * n, h, w, cw) if packed_in else pack_spikes_reference(x.flatten(0, 1))
    s = _bconv_lif(xp, w_mask, w_pos, a, residual, T, stride, padding, False, 1e-5, tau,
                   decay_input, v_threshold, v_reset)[0]
    return infer_output(s, pool, packed_out, pack_spikes_reference)


def bconv_lif_bwd_reference(grad_spikes, counts, x_packed, w_mask, w_pos, alpha, scale, shift,
                            mean, var, residual, in_channels, stride, padding, bn_train, bn_eps,
                            tau, decay_input, v_threshold, v_reset, detach_reset, surrogate,
                            surrogate_alpha, need_grad_x, need_grad_current=True):
    """Schema ``binslt::bconv_lif_bwd`` -> (grad_x, grad_weight, grad_current, grad_scale,
    grad_shift)."""
    op = "bconv_lif_bwd"
    C.check_scalars(op, tau, decay_input, v_threshold, v_reset, bn_eps, surrogate, surrogate_alpha)
    C.check_counts(op, counts)
    T = counts.shape[0]
    a = _check_packed_bconv(op, x_packed, T, w_mask, w_pos, alpha, scale, shift, residual,
                            stride, padding)
    C.check_channel_vecs(op, a.co, mean=mean, var=var)
    z = counts.to(torch.float32) * a.alpha.view(1, 1, -1, 1, 1)
    g_z, g_cur, g_sc, g_sh = _bn_lif_bwd(
        grad_spikes, z, a.scale, a.shift, residual, bn_train, bn_eps, tau, decay_input,
        v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha)
    gz = g_z.flatten(0, 1)  # [B, Co, Ho, Wo]
    x = unpack_spikes_reference(x_packed, in_channels)
    w_eff = unpack_weight_reference(w_mask, w_pos, in_channels, a.alpha)
    kh, kw = w_mask.shape[1], w_mask.shape[2]
    g_w = torch.nn.grad.conv2d_weight(x, (w_eff.shape[0], in_channels, kh, kw), gz,
                                      stride=stride, padding=padding)
    if need_grad_x:
        g_x = torch.nn.grad.conv2d_input(x.shape, w_eff, gz, stride=stride, padding=padding)
        g_x = g_x.view(T, -1, *g_x.shape[1:])
    else:
        g_x = torch.empty(0, dtype=torch.float32, device=counts.device)
    if not need_grad_current:
        g_cur = torch.empty(0, dtype=torch.float32, device=counts.device)
    return g_x, g_w, g_cur, g_sc, g_sh


# ----------------------------------------------------------------------------------------------
# The whole layer, differentiable end to end (the autograd oracle)
# ----------------------------------------------------------------------------------------------


def conv_lif_reference(
    x: torch.Tensor,
    w_eff: torch.Tensor,
    *,
    stride: int = 1,
    padding: int = 0,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    bn_train: bool = False,
    bn_eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    tau: float = 2.0,
    decay_input: bool = True,
    v_threshold: float = 1.0,
    v_reset: Optional[float] = 0.0,
    detach_reset: bool = False,
    surrogate: int = 0,
    surrogate_alpha: float = 2.0,
    return_h: bool = False,
):
    """conv2d(x, W_eff) -> epilogue -> LIF, by plain autograd. x: [T, N, Ci, H, W]."""
    T = x.shape[0]
    z = F.conv2d(x.flatten(0, 1), w_eff, stride=stride, padding=padding)
    z = z.view(T, -1, *z.shape[1:])
    co = z.shape[2]
    if scale is None:
        scale = torch.ones(co, dtype=z.dtype, device=z.device)
    if shift is None:
        shift = torch.zeros(co, dtype=z.dtype, device=z.device)
    xin, _, _ = epilogue(z, scale, shift, residual, bn_train, bn_eps)
    return lif_multistep(xin, **_neuron_kwargs(tau, decay_input, v_threshold, v_reset, detach_reset,
                                               surrogate, surrogate_alpha), return_h=return_h)


REFERENCE_OPS = {
    "pack_spikes": pack_spikes_reference,
    "unpack_spikes": unpack_spikes_reference,
    "pack_weight": pack_weight_reference,
    "bconv_lif": bconv_lif_reference,
    "bconv_lif_infer": bconv_lif_infer_reference,
    "bconv_lif_bwd": bconv_lif_bwd_reference,
    "bn_lif": bn_lif_reference,
    "bn_lif_bwd": bn_lif_bwd_reference,
}

def sign_gain_pack_reference(weight: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor):
    """``binslt::sign_gain_pack``: W_eff = alpha * sign(w) * M with its bit planes and the
    kernels' gain (max |W_eff| per output channel). NaN or inf in the weight is a ValueError."""
    if weight.numel() and not bool(torch.isfinite(weight).all()):
        raise_non_finite("sign_gain_pack", "weight contains", weight.detach())
    w_eff = _expand_gain(alpha, weight) * torch.sign(weight) * mask
    w_mask, w_pos = pack_weight_reference(w_eff)
    return w_eff, w_mask, w_pos, w_eff.abs().flatten(1).amax(1).to(torch.float32)


# The weight-side ops (binslt.ops.schemas.WEIGHT_SCHEMAS).
REFERENCE_WEIGHT_OPS = {
    "topk_mask": topk_mask_reference,
    "sign_gain_pack": sign_gain_pack_reference,
    "search_score_grad": search_score_grad,
}


def pool2_windows(x: torch.Tensor):
    """The four positions of every 2x2 window of [B, C, H, W] (views; odd last rows/columns,
    which no window covers, left out) in row-major order."""
    hq, wq = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    return (x[:, :, 0:hq:2, 0:wq:2], x[:, :, 0:hq:2, 1:wq:2], x[:, :, 1:hq:2, 0:wq:2],
            x[:, :, 1:hq:2, 1:wq:2])


def spike_pool2_bwd_reference(packed: torch.Tensor, grad: torch.Tensor,
                              channels: int) -> torch.Tensor:
    """``binslt::spike_pool2_bwd``: the 2x2 spike max-pool's gradient, routed to each window's
    first 1 in row-major order (its first position when all four are 0), as max_pool2d's."""
    s = unpack_spikes_reference(packed, channels).to(torch.bool)
    a, b, c, d = pool2_windows(s)
    pick_b = ~a & b
    pick_c = ~a & ~b & c
    pick_d = ~a & ~b & ~c & d
    pick_a = ~(pick_b | pick_c | pick_d)
    gx = grad.new_zeros(s.shape)
    zero = grad.new_zeros(())
    for dst, m in zip(pool2_windows(gx), (pick_a, pick_b, pick_c, pick_d)):
        dst.copy_(torch.where(m, grad, zero))
    return gx


def bconv_lif_bwd_pool2_reference(grad_pooled, pool_packed, counts, *args, **kwargs):
    """``binslt::bconv_lif_bwd_pool2``: ``bconv_lif_bwd`` of the unpooled gradient that
    ``spike_pool2_bwd`` routes from the 2x2-pooled one."""
    op = "bconv_lif_bwd_pool2"
    if counts.dim() != 5:
        raise ValueError(f"binslt::{op}: counts must be [T, N, Co, Ho, Wo] (from bconv_lif), got "
                         f"shape {list(counts.shape)}")
    T, n, co, ho, wo = counts.shape
    want = [T, n, co, ho // 2, wo // 2]
    if list(grad_pooled.shape) != want:
        raise ValueError(f"binslt::{op}: grad_pooled must be [T, N, Co, Ho // 2, Wo // 2] = "
                         f"{want}, got {list(grad_pooled.shape)}")
    want = [T * n, ho, wo, C.channel_words(co)]
    if pool_packed.dtype != torch.int32 or list(pool_packed.shape) != want:
        raise ValueError(f"binslt::{op}: pool_packed must be the unpooled spikes packed, "
                         f"[T*N, Ho, Wo, ceil(Co/32)] = {want} int32, got {pool_packed.dtype} of "
                         f"shape {list(pool_packed.shape)}")
    g = spike_pool2_bwd_reference(pool_packed, grad_pooled.flatten(0, 1).float(), co)
    return bconv_lif_bwd_reference(g.view(T, n, co, ho, wo), counts, *args, **kwargs)


def bn_lif_infer_reference(z, scale, shift, tau, decay_input, v_threshold, v_reset, pool=1,
                           packed_out=False):
    """``binslt::bn_lif_infer``: bn_lif's spikes of a real current z [T, N, C, H, W] (eval
    epilogue, no residual), max-pooled 2x2 when pool=2, as pack_spikes words when packed_out."""
    op = "bn_lif_infer"
    if z.dim() != 5:
        raise ValueError(f"binslt::{op}: z must be [T, N, C, H, W] (time-major conv currents), "
                         f"got shape {list(z.shape)}")
    C.check_pool(op, pool, z.shape[3], z.shape[4])
    s = bn_lif_reference(z, scale, shift, None, False, 1e-5, tau, decay_input, v_threshold,
                         v_reset)[0]
    return infer_output(s, pool, packed_out, pack_spikes_reference)


def bconv_affine_infer_reference(x, w_mask, w_pos, alpha, scale, shift, stride, padding):
    """``binslt::bconv_affine_infer``: (count * alpha) * scale + shift per output channel, the
    integer counts of spikes x (float 0/1 [B, C, H, W] or packed words [B, H, W, Cw])."""
    op = "bconv_affine_infer"
    if x.dim() != 4:
        raise ValueError(f"binslt::{op}: x must be float spikes [B, C, H, W] or packed words "
                         f"[B, H, W, Cw] int32, got shape {list(x.shape)}")
    if x.dtype == torch.int32:
        xp, cin = x, None
    else:
        if not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(f"binslt::{op}: the input must be binary spikes (every element 0. "
                             f"or 1.)")
        xp, cin = pack_spikes_reference(x), x.shape[1]
    counts = bconv_count_reference(xp, w_mask, w_pos, stride, padding, cin)
    v = (-1, 1, 1)
    return (counts * alpha.float().view(v)) * scale.float().view(v) + shift.float().view(v)


# Helper ops (binslt.ops.schemas.AUX_SCHEMAS).
REFERENCE_AUX_OPS = {
    "bconv_affine_infer": bconv_affine_infer_reference,
    "spike_pool2_bwd": spike_pool2_bwd_reference,
    "bconv_lif_bwd_pool2": bconv_lif_bwd_pool2_reference,
    "bn_lif_infer": bn_lif_infer_reference,
}
