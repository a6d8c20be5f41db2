"""The autograd Functions of the fused layer ops (``ConvLIF``, ``BNLIF``, the training 2x2
spike max-pool ``SpikePool``) and ``keep_counts``."""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from . import reference as ref
from .backend import _FIRST, _backward_op
from .registry import get_op


def max_abs_gain(w_eff: torch.Tensor) -> torch.Tensor:
    """The gain the kernels take, read back from a ternary-times-gain weight: max |W_eff| per
    output channel (``reference.mean_abs_gain`` is how the search computes it)."""
    return w_eff.detach().abs().flatten(1).amax(1).to(torch.float32)


_KEEP = threading.local()


@contextlib.contextmanager
def keep_counts(enabled: bool = True):
    """Whether the fused spike-input conv layers save their int16/int32 conv counts for the
    backward (the default) or, inside ``with keep_counts(False):`` (this thread), recompute them
    there with the forward kernel: 2 bytes less per output neuron and time step (VGG-11, N=32,
    T=4: 44 MiB of saved counts; peak training memory 250 -> 218 MiB) for one more binary
    forward conv per layer (about 7 % more search-step time there). The gradients are identical
    either way (the counts are exact integers)."""
    prev = getattr(_KEEP, "counts", True)
    _KEEP.counts = bool(enabled)
    try:
        yield
    finally:
        _KEEP.counts = prev


class ConvLIF(torch.autograd.Function):
    """Fused binary conv (+BN) (+residual) + LIF on spike input, through a kernel backend.

    Saves packed input bits (1 bit per spike), per-channel statistics and the integer counts;
    under ``keep_counts(False)`` the backward recomputes the counts from the packed bits with the
    forward kernel instead (exact).

    ``pool=2`` (CPU backend) also 2x2 max-pools the spikes, as SpikePool does, saving their bits;
    the backward hands the pooled gradient to ``bconv_lif_bwd_pool2``, whose kernel routes it
    inside the LIF backward: the unpooled gradient is never stored whole (one float per output
    spike less at the backward's peak).

    A residual of spikes (a ResNet block's identity shortcut; CPU backend) is saved as packed
    bits, 1 instead of 32 bits a value, and unpacked (exactly) for the backward; the kept counts
    as int8 where every one fits (CPU backend, whose backward kernel reads them so).
    """

    @staticmethod
    def forward(ctx, x, w_eff, scale, shift, residual, stride, padding, bn_train, bn_eps, tau,
                decay_input, v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha,
                backend, planes=None, pool=1):
        T, n, ci, h, w = x.shape
        x_packed = get_op("pack_spikes", backend)(x.reshape(T * n, ci, h, w).float())
        if planes is None:
            w_mask, w_pos = get_op("pack_weight", backend)(w_eff.detach().float())
            alpha = max_abs_gain(w_eff)
        else:  # W_eff's own (mask bits, positive bits, gain), packed with it
            w_mask, w_pos, alpha = planes
        res = None if residual is None else residual.float().contiguous()
        spikes, counts, mean, var = get_op("bconv_lif", backend)(
            x_packed, w_mask, w_pos, alpha, scale.detach().float(), shift.detach().float(), res,
            T, stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold, v_reset)
        kept = counts if getattr(_KEEP, "counts", True) else None
        ctx.counts_dtype = counts.dtype
        if kept is not None and backend == "cpu" and _fits_int8(kept):
            kept = kept.to(torch.int8)  # exact: every count is in [-128, 127]
        pool_bits = None
        if pool == 2:
            spikes, pool_bits = _pool2_spikes(spikes, backend)
        elif pool != 1:
            raise ValueError(f"ConvLIF: only 2x2 pooling is fused, got pool={pool}")
        res_saved, ctx.res_shape = res, None
        if res is not None and backend == "cpu" and _is_binary(res):
            res_saved = get_op("pack_spikes", backend)(res.flatten(0, 1))
            ctx.res_shape = tuple(res.shape)
        ctx.save_for_backward(x_packed, w_mask, w_pos, alpha, scale, shift, kept, mean, var,
                              res_saved, pool_bits)
        ctx.cfg = (ci, stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold, v_reset,
                   detach_reset, surrogate, surrogate_alpha)
        ctx.T = T
        ctx.backend = backend
        ctx.auto = getattr(_FIRST, "auto", False)  # an auto-chosen backend's first call
        ctx.has_res = residual is not None
        ctx.mark_non_differentiable(mean, var)
        return spikes.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, g_spikes, _g_mean, _g_var):
        (x_packed, w_mask, w_pos, alpha, scale, shift, counts, mean, var, res,
         pool_bits) = ctx.saved_tensors
        if ctx.res_shape is not None:  # a residual of spikes, saved packed
            res = get_op("unpack_spikes", ctx.backend)(res, ctx.res_shape[2]).view(ctx.res_shape)
        need_x = ctx.needs_input_grad[0]
        if counts is None:  # the forward's integer counts, recomputed (bit for bit)
            ci, stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold, v_reset = \
                ctx.cfg[:9]
            counts = get_op("bconv_lif", ctx.backend)(
                x_packed, w_mask, w_pos, alpha, scale.detach().float(), shift.detach().float(),
                res, ctx.T, stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold,
                v_reset)[1]
        if ctx.backend != "cpu":  # (the CPU kernel reads int8 counts as they were saved)
            counts = counts.to(ctx.counts_dtype)
        rest = (counts, x_packed, w_mask, w_pos, alpha, scale.detach().float(),
                shift.detach().float(), mean, var, res, *ctx.cfg, need_x, ctx.has_res)
        g = g_spikes.float().contiguous()
        if pool_bits is None:
            out = _backward_op("bconv_lif_bwd", ctx, g, *rest)
        else:
            out = torch.ops.binslt.bconv_lif_bwd_pool2(g, pool_bits, *rest)
        g_x, g_w, g_cur, g_sc, g_sh = out
        return (g_x if need_x else None, g_w, g_sc.to(scale.dtype), g_sh.to(shift.dtype),
                g_cur if ctx.has_res else None) + (None,) * 14


class BNLIF(torch.autograd.Function):
    """Epilogue (+BN) (+residual) + LIF over a real current z: [T, N, C, *]."""

    @staticmethod
    def forward(ctx, z, scale, shift, residual, bn_train, bn_eps, tau, decay_input, v_threshold,
                v_reset, detach_reset, surrogate, surrogate_alpha, backend):
        # A current that is the same at every step (a real-input layer's, expanded over T) is
        # saved once, not T times; the C++ kernels also read it in place (time stride 0).
        ctx.steps = z.shape[0] if z.dim() > 1 and z.stride(0) == 0 else 0
        in_place = (ctx.steps and backend == "cpu" and z.dtype == torch.float32
                    and z[0].is_contiguous())
        zf = z.float() if in_place else z.float().contiguous()
        res = None if residual is None else residual.float().contiguous()
        spikes, mean, var = get_op("bn_lif", backend)(
            zf, scale.detach().float(), shift.detach().float(), res, bn_train, bn_eps, tau,
            decay_input, v_threshold, v_reset)
        # (in place: a view of the one current, no copy; otherwise step 0 of the T-fold copy)
        saved = zf[0] if in_place else zf[0].clone() if ctx.steps else zf
        ctx.save_for_backward(saved, scale, shift, mean, var, res)
        ctx.cfg = (bn_train, bn_eps, tau, decay_input, v_threshold, v_reset, detach_reset,
                   surrogate, surrogate_alpha)
        ctx.backend = backend
        ctx.auto = getattr(_FIRST, "auto", False)
        ctx.has_res = residual is not None
        ctx.z_dtype = z.dtype
        ctx.mark_non_differentiable(mean, var)
        return spikes.to(z.dtype), mean, var

    @staticmethod
    def backward(ctx, g_spikes, _g_mean, _g_var):
        zf, scale, shift, mean, var, res = ctx.saved_tensors
        if ctx.steps:
            zf = zf.unsqueeze(0).expand(ctx.steps, *zf.shape)
            if ctx.backend != "cpu":
                zf = zf.contiguous()
        g_z, g_cur, g_sc, g_sh = _backward_op(
            "bn_lif_bwd", ctx, g_spikes.float().contiguous(), zf, scale.detach().float(),
            shift.detach().float(), mean, var, res, *ctx.cfg, ctx.has_res)
        return (g_z.to(ctx.z_dtype), g_sc.to(scale.dtype), g_sh.to(shift.dtype),
                g_cur if ctx.has_res else None) + (None,) * 10


def _fits_int8(counts: torch.Tensor) -> bool:
    """Whether every integer count is in int8's range (one aminmax pass, a host read). Traced
    code (torch.compile, torch.export) answers False without reading: a saved tensor's dtype is
    fixed when the graph is built, so compiled code keeps the counts at their own dtype."""
    if torch.compiler.is_compiling() or counts.numel() == 0 or counts.dtype == torch.int8:
        return False
    lo, hi = torch.aminmax(counts)
    return int(lo) >= -128 and int(hi) <= 127


def _is_binary(t: torch.Tensor) -> bool:
    """Whether every value of the float tensor t is 0 or 1 (one pass, a host read). Traced
    code answers False without reading (the residual is then saved as floats)."""
    if torch.compiler.is_compiling():
        return False
    return bool(t.eq(0).logical_or_(t.eq(1)).all())


def _pool2_spikes(s: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 (stride 2) max-pool of spikes [T, N, C, H, W] (a max of {0, 1} is their OR, exact)
    and the unpooled spikes packed [T*N, H, W, ceil(C/32)] (the backend's pack_spikes): what the
    pool's backward routes by."""
    T, n, c = s.shape[:3]
    flat = s.flatten(0, 1)
    a, b, cc, d = ref.pool2_windows(flat)
    y = torch.maximum(torch.maximum(a, b), torch.maximum(cc, d))
    return y.view(T, n, c, *y.shape[2:]), get_op("pack_spikes", backend)(flat.float().contiguous())


class SpikePool(torch.autograd.Function):
    """2x2 (stride 2) max-pooling of spikes [T, N, C, H, W] in training: a max of {0,1} spikes is
    their OR. Saves the layer's spikes packed (one bit per spike, the backend's pack_spikes), not
    float indices, and routes the gradient as torch's max_pool2d backward does on that input:
    to the first maximal element of each window in row-major order, i.e. the first 1, or the
    window's first element when all four are 0. Rows/columns past 2*(H//2), 2*(W//2) get none."""

    @staticmethod
    def forward(ctx, s, pool, backend):
        if pool != 2:
            raise ValueError(f"SpikePool: only 2x2 pooling is fused, got pool={pool}")
        y, packed = _pool2_spikes(s, backend)
        ctx.save_for_backward(packed)
        ctx.cfg = (tuple(s.shape), backend)
        return y

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        (T, n, c, h, w), _backend = ctx.cfg
        gx = torch.ops.binslt.spike_pool2_bwd(packed, g.flatten(0, 1).float().contiguous(), c)
        return gx.to(g.dtype).view(T, n, c, h, w), None, None


def _spike_pool(be: str, s: torch.Tensor, pool: int) -> torch.Tensor:
    """Max-pool a layer's spikes [T, N, C, H, W] by ``pool`` (1: unchanged). The torch backend is
    the reference (max_pool2d, as SpikeMaxPool2d); the kernel backends save one bit per spike."""
    if pool == 1:
        return s
    if be == "torch" or not torch.is_grad_enabled() or not s.requires_grad:
        y = F.max_pool2d(s.flatten(0, 1), pool)
        return y.view(*s.shape[:3], *y.shape[2:])
    return SpikePool.apply(s, pool, be)
