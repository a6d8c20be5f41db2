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

The building blocks of the neuron are in :mod:`binslt.ops.reference_neuron`, those of the weight
side and the bit packing in :mod:`binslt.ops.reference_weight`; this module re-exports them and
holds the epilogue, the fused conv + LIF ops and the tables of reference ops.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import contract as C
from .reference_neuron import (  # noqa: F401  (re-exported: this module is the one oracle)
    _ApproxSign,
    _SpikeFn,
    lif_multistep,
    sign_activation,
    spike_fn,
    surrogate_grad,
)
from .reference_weight import (  # noqa: F401  (re-exported: this module is the one oracle)
    _SHIFTS,
    _bit_weights,
    _expand_gain,
    _MaskedSignFinetune,
    _MaskedSignSearch,
    _pack_bits_last,
    _to_int32_words,
    _unpack_bits_last,
    masked_sign_weight,
    masked_sign_weight_finetune,
    mean_abs_gain,
    num_pruned,
    pack_spikes_reference,
    pack_weight_reference,
    raise_non_finite,
    search_score_grad,
    topk_mask,
    topk_mask_reference,
    unpack_spikes_reference,
    unpack_weight_reference,
)

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


def _unpacked_residual(op: str, words: torch.Tensor, out_shape) -> torch.Tensor:
    """A residual of spikes given as pack_spikes words [T, N, Ho, Wo, ceil(Co/32)] as the float
    residual [T, N, Co, Ho, Wo] (as the CPU kernel reads them)."""
    T, n, co, ho, wo = out_shape
    want = [T, n, ho, wo, (co + 31) // 32]
    if list(words.shape) != want:
        raise ValueError(f"binslt::{op}: a packed residual must be spike words [T, N, Ho, Wo, "
                         f"ceil(Co/32)] = {want}, got shape {list(words.shape)}")
    return unpack_spikes_reference(words.flatten(0, 1), co).view(T, n, co, ho, wo)


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
    if residual is not None and residual.dtype == torch.int32:  # spike words [T, N, Ho, Wo, Cw]
        residual = _unpacked_residual(op, residual, counts.shape)
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


def bconv_lif_bwd_float64(grad_spikes, x_packed, w_mask, w_pos, alpha, scale, shift, residual,
                          in_channels, stride, padding, bn_train, bn_eps, tau, decay_input,
                          v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha):
    """``binslt::bconv_lif_bwd``'s gradients (grad_x, grad_weight, grad_current, grad_scale,
    grad_shift) in float64 maths from the same operands: the current from the exact counts,
    the BN / LIF backward and both conv products in float64 -- what the kernels' float32
    gradients are measured against."""
    counts = bconv_count_reference(x_packed, w_mask, w_pos, stride, padding)
    T = grad_spikes.shape[0]
    z = counts.double().view(T, -1, *counts.shape[1:]) * alpha.double().view(1, 1, -1, 1, 1)
    g_z, g_cur, g_sc, g_sh = bn_lif_bwd_reference(
        grad_spikes.double(), z, scale.double(), shift.double(), None, None,
        None if residual is None else residual.double(), bn_train, bn_eps, tau, decay_input,
        v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha)
    x = unpack_spikes_reference(x_packed, in_channels).double()
    w_eff = unpack_weight_reference(w_mask, w_pos, in_channels, alpha).double()
    gz = g_z.flatten(0, 1)
    g_w = torch.nn.grad.conv2d_weight(x, tuple(w_eff.shape), gz, stride=stride, padding=padding)
    g_x = torch.nn.grad.conv2d_input(tuple(x.shape), w_eff, gz, stride=stride, padding=padding)
    return g_x.view(T, -1, *x.shape[1:]), g_w, g_cur, g_sc, g_sh


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
    **neuron,
):
    """conv2d(x, W_eff) -> epilogue -> LIF, by plain autograd. x: [T, N, Ci, H, W]; ``neuron``:
    ``lif_multistep``'s keyword arguments (tau, decay_input, v_threshold, v_reset,
    detach_reset, surrogate, surrogate_alpha, return_h), with its defaults."""
    T = x.shape[0]
    z = F.conv2d(x.flatten(0, 1), w_eff, stride=stride, padding=padding)
    z = z.view(T, -1, *z.shape[1:])
    co = z.shape[2]
    if scale is None:
        scale = torch.ones(co, dtype=z.dtype, device=z.device)
    if shift is None:
        shift = torch.zeros(co, dtype=z.dtype, device=z.device)
    xin, _, _ = epilogue(z, scale, shift, residual, bn_train, bn_eps)
    return lif_multistep(xin, **neuron)


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


def search_sign_pack_reference(weight: torch.Tensor, scores: torch.Tensor, keep: int,
                               per_channel: bool):
    """``binslt::search_sign_pack``: the top-|s| mask, biprop's gain and ``sign_gain_pack`` of
    them, NaN or inf in the scores or the weight being that op's ValueError."""
    weight, scores = weight.detach(), scores.detach()
    try:
        mask = topk_mask_reference(scores, keep)
    except ValueError as err:  # the fused op's name in the message
        raise ValueError(str(err).replace("binslt::topk_mask:",
                                          "binslt::search_sign_pack:")) from None
    if weight.numel() and not bool(torch.isfinite(weight).all()):
        raise_non_finite("search_sign_pack", "weight contains", weight)
    return sign_gain_pack_reference(weight, mask, mean_abs_gain(weight, mask, per_channel))


# The weight-side ops (binslt.ops.schemas.WEIGHT_SCHEMAS).
REFERENCE_WEIGHT_OPS = {
    "topk_mask": topk_mask_reference,
    "sign_gain_pack": sign_gain_pack_reference,
    "search_sign_pack": search_sign_pack_reference,
    "search_score_grad": search_score_grad,
}


def pool2_windows(x: torch.Tensor):
    """The four positions of every 2x2 window of [B, C, H, W] (views; odd last rows/columns,
    which no window covers, left out) in row-major order."""
    hq, wq = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    return (x[:, :, 0:hq:2, 0:wq:2], x[:, :, 0:hq:2, 1:wq:2], x[:, :, 1:hq:2, 0:wq:2],
            x[:, :, 1:hq:2, 1:wq:2])


def pool2_max(x: torch.Tensor) -> torch.Tensor:
    """Each 2x2 window's max of [B, C, H, W] (the OR of {0, 1} spikes), in one output-sized
    tensor: the second and third maxima are taken in place."""
    a, b, c, d = pool2_windows(x)
    y = torch.maximum(a, b)
    torch.maximum(y, c, out=y)
    torch.maximum(y, d, out=y)
    return y


def narrow_int8_reference(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``binslt::narrow_int8``: counts (int16 / int32) clamped to [-128, 127] as int8, and a 0-d
    bool tensor saying whether every count was in that range."""
    if counts.dtype not in (torch.int16, torch.int32):
        raise ValueError(f"binslt::narrow_int8: counts must be int16 or int32, got "
                         f"{counts.dtype}")
    fits = True
    if counts.numel():
        lo, hi = torch.aminmax(counts)
        fits = bool(lo >= -128) and bool(hi <= 127)
    return (counts.clamp(-128, 127).to(torch.int8),
            torch.tensor(fits, device=counts.device))


def spike_pool2_reference(spikes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``binslt::spike_pool2``: the 2x2 spike max-pool of [B, C, H, W] (each window's max, the
    OR of {0, 1} spikes) and the unpooled spikes packed (``pack_spikes``)."""
    op = "binslt::spike_pool2"
    if spikes.dim() != 4:
        raise ValueError(f"{op}: spikes must be [B, C, H, W] (flatten T and N into B), got "
                         f"shape {tuple(spikes.shape)}")
    if spikes.dtype != torch.float32:
        raise TypeError(f"{op}: spikes must be float32, got {spikes.dtype}")
    if spikes.shape[2] < 2 or spikes.shape[3] < 2:
        raise ValueError(f"{op}: a 2x2 pool needs maps of at least 2x2, got "
                         f"{spikes.shape[2]}x{spikes.shape[3]}")
    packed = pack_spikes_reference(spikes)
    return pool2_max(spikes), packed


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


def bconv_lif_infer_shortcut_reference(x, w_mask, w_pos, alpha, scale, shift, block_x, sc_mask,
                                       sc_pos, sc_alpha, sc_scale, sc_shift, sc_stride,
                                       sc_padding, stride, padding, tau, decay_input,
                                       v_threshold, v_reset, pool=1, packed_out=False):
    """``binslt::bconv_lif_infer_shortcut``: bconv_lif_infer with the residual the shortcut's
    bconv_affine_infer of the block input block_x ([T, N, C, H, W] float spikes or [T, N, H, W,
    Cw] packed words)."""
    op = "bconv_lif_infer_shortcut"
    if block_x.dim() != 5:
        raise ValueError(f"binslt::{op}: block_x must be float spikes [T, N, C, H, W] or packed "
                         f"words [T, N, H, W, Cw] int32, got shape {list(block_x.shape)}")
    r = bconv_affine_infer_reference(block_x.flatten(0, 1), sc_mask, sc_pos, sc_alpha, sc_scale,
                                     sc_shift, sc_stride, sc_padding)
    r = r.view(*block_x.shape[:2], *r.shape[1:])
    return bconv_lif_infer_reference(x, w_mask, w_pos, alpha, scale, shift, r, stride, padding,
                                     tau, decay_input, v_threshold, v_reset, pool, packed_out)


# Helper ops (binslt.ops.schemas.AUX_SCHEMAS).
REFERENCE_AUX_OPS = {
    "bconv_affine_infer": bconv_affine_infer_reference,
    "bconv_lif_infer_shortcut": bconv_lif_infer_shortcut_reference,
    "spike_pool2": spike_pool2_reference,
    "narrow_int8": narrow_int8_reference,
    "spike_pool2_bwd": spike_pool2_bwd_reference,
    "bconv_lif_bwd_pool2": bconv_lif_bwd_pool2_reference,
    "bn_lif_infer": bn_lif_infer_reference,
}
