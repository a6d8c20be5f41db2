"""The autograd Functions of the fused layer ops (``ConvLIF``, ``BNLIF``, the training 2x2
spike max-pool ``SpikePool``) and ``keep_counts``."""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
import torch.nn.functional as F

from . import reference as ref
from .backend import _FIRST, _backward_op, capabilities
from .function import Function
from .registry import get_op


def _first_auto_call() -> bool:
    """Whether this op call is the first call of a backend auto chose (its backward may then fall
    back); never while torch.compile traces (no guard on the thread-local flag, which eager
    calls set)."""
    return not torch.compiler.is_compiling() and getattr(_FIRST, "auto", False)


def max_abs_gain(w_eff: torch.Tensor) -> torch.Tensor:
    """The gain the kernels take, read back from a ternary-times-gain weight: max |W_eff| per
    output channel (``reference.mean_abs_gain`` is how the search computes it)."""
    return w_eff.detach().abs().flatten(1).amax(1).to(torch.float32)


_KEEP = threading.local()
_KEEP.counts = True  # set here, so that a trace in the main thread guards on a value


@contextlib.contextmanager
def keep_counts(enabled: bool = True):
    """Whether the fused spike-input conv layers save their int16/int32 conv counts for the
    backward (the default) or, inside ``with keep_counts(False):`` (this thread), recompute them
    there with the forward kernel: 2 bytes less per output neuron and time step (VGG-11, N=32,
    T=4: 44 MiB of saved counts; peak training memory 250 -> 218 MiB) for one more binary
    forward conv per layer (about 7 % more search-step time there). A ResNet block with a
    1x1 conv + BN shortcut (``binslt.nn.blocks.ResidualBlock``) then also recomputes the
    shortcut's float output in conv2's backward from its packed input spikes instead of keeping
    it (ResNet-19: 64 MiB less at the peak). The gradients are identical either way (the counts
    are exact integers; the shortcut's conv and BN run again on the same values)."""
    prev = getattr(_KEEP, "counts", True)
    _KEEP.counts = bool(enabled)
    try:
        yield
    finally:
        _KEEP.counts = prev


class ConvLIF(Function):
    """Fused binary conv (+BN) (+residual) + LIF on spike input, through a kernel backend.

    ``ConvLIF.apply(x, w_eff, scale, shift, residual, stride, padding, bn_train, bn_eps, tau,
    decay_input, v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha, backend,
    planes=None, pool=1)`` with spikes x [T, N, Ci, H, W] and W_eff [Co, Ci, kh, kw] returns
    ``(spikes [T, N, Co, Ho, Wo] (Ho, Wo halved when pool=2), mean [Co], var [Co], *saved)``:
    the last seven outputs are what the backward reads (non-differentiable; callers take
    ``[:3]``). The ``setup_context`` form, so that ``torch.func`` transforms compose with it:
    ``torch.func.grad`` works as autograd does; under ``torch.func.vmap`` (``generate_vmap_rule``)
    the ``binslt::`` ops' vmap rules run (``binslt.ops.registry``): a vmapped input batch folds
    into N when the epilogue has no batch statistics and the weights are not vmapped; otherwise
    (batch statistics, vmapped weights, the backward kernels of per-sample gradients) each op
    runs once per vmapped entry.

    Saves packed input bits (1 bit per spike), per-channel statistics and the integer counts;
    under ``keep_counts(False)`` the backward recomputes the counts from the packed bits with the
    forward kernel instead (exact).

    ``pool=2`` (a backend with ``fused_pool2``; ``binslt.ops.CAPABILITIES``) also 2x2
    max-pools the spikes, as SpikePool does, saving their bits; the backward hands the pooled
    gradient to ``bconv_lif_bwd_pool2``, whose kernel routes it inside the LIF backward: the
    unpooled gradient is never stored whole (one float per output spike less at the backward's
    peak).

    A residual of spikes (a ResNet block's identity shortcut; a backend with ``residual_bits``) is
    saved as packed bits, 1 instead of 32 bits a value, which the backward op reads as they are (the
    words [T, N, Ho, Wo, ceil(Co/32)]); the kept counts as int8 where every one fits (a backend with
    ``int8_counts``, whose backward kernel reads them so). Both choices read the data, so traced
    code (torch.compile, torch.export) and vmapped tensors skip them: the counts stay at their dtype
    and the residual is saved as it came.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w_eff, scale, shift, residual, stride, padding, bn_train, bn_eps, tau,
                decay_input, v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha,
                backend, planes=None, pool=1):
        T, n, ci, h, w = x.shape
        x_packed = get_op("pack_spikes", backend)(x.reshape(T * n, ci, h, w).float())
        earlier = None
        if not values_unreadable(x):  # (traced code keeps no state across calls)
            earlier = getattr(_LAST_INPUT, "packed", None)  # (before this input replaces it)
            _LAST_INPUT.packed = (weakref.ref(x), x._version, backend, x_packed)
        if planes is None:
            w_mask, w_pos = get_op("pack_weight", backend)(w_eff.detach().float())
            alpha = max_abs_gain(w_eff)
        else:  # W_eff's own (mask bits, positive bits, gain), packed with it
            w_mask, w_pos, alpha = planes
        res = None if residual is None else residual.float().contiguous()
        spikes, counts, mean, var = get_op("bconv_lif", backend)(
            x_packed, w_mask, w_pos, alpha, scale.detach().float(), shift.detach().float(), res,
            T, stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold, v_reset)
        def none():  # an output slot with nothing saved in it (one tensor per slot)
            return x_packed.new_empty((0,))

        kept = counts if getattr(_KEEP, "counts", True) else none()
        if kept.dim() == 5 and capabilities(backend).int8_counts and _narrows(kept):
            narrowed, fits = get_op("narrow_int8", backend)(kept)
            if bool(fits):  # exact: every count is in [-128, 127]
                kept = narrowed
        pool_bits = none()
        if pool == 2:
            spikes, pool_bits = _pool2_spikes(spikes, backend)
        elif pool != 1:
            raise ValueError(f"ConvLIF: only 2x2 pooling is fused, got pool={pool}")
        res_saved = none()  # a residual of spikes, packed; otherwise the input residual is saved
        if res is not None and capabilities(backend).residual_bits and \
                capabilities(backend).pack_validates and not values_unreadable(res):
            bits = _packed_earlier(earlier, res, backend)  # an identity shortcut's block input
            if bits is None:
                bits = spike_bits(res.flatten(0, 1), get_op("pack_spikes", backend))
            if bits is not None:
                res_saved = bits
        return (spikes.to(x.dtype), mean, var, x_packed, w_mask, w_pos, alpha, kept, res_saved,
                pool_bits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x, _w_eff, scale, shift, residual, stride, padding, bn_train, bn_eps, tau, decay_input,
         v_threshold, v_reset, detach_reset, surrogate, surrogate_alpha, backend, *rest) = inputs
        _s, mean, var, x_packed, w_mask, w_pos, alpha, kept, res_saved, pool_bits = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero-filled gradients of the saved outputs
        # (an empty 1-d placeholder marks an output slot with nothing saved in it)
        ctx.res_packed = res_saved.dim() == 4
        ctx.res_shape = tuple(residual.shape) if ctx.res_packed else None
        ctx.pooled = pool_bits.dim() == 4
        ctx.kept = kept.dim() == 5
        ctx.save_for_backward(x_packed, w_mask, w_pos, alpha, scale, shift, kept, mean, var,
                              res_saved if ctx.res_packed else residual, pool_bits)
        ctx.cfg = (x.shape[2], stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold,
                   v_reset, detach_reset, surrogate, surrogate_alpha)
        ctx.T = x.shape[0]
        ctx.backend = backend
        ctx.auto = _first_auto_call()  # an auto-chosen backend's first call
        ctx.has_res = residual is not None
        ctx.spikes_meta = _meta(output[0])

    @staticmethod
    def backward(ctx, g_spikes, *_g_saved):
        (x_packed, w_mask, w_pos, alpha, scale, shift, counts, mean, var, res,
         pool_bits) = ctx.saved_tensors
        if ctx.res_packed:  # a residual of spikes, saved packed: the backward reads the words
            res = res.view(*ctx.res_shape[:2], *res.shape[1:])
        elif res is not None:
            res = res.float().contiguous()
        need_x = ctx.needs_input_grad[0]
        if not ctx.kept:  # the forward's integer counts, recomputed (bit for bit)
            ci, stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold, v_reset = \
                ctx.cfg[:9]
            res_f = res if not ctx.res_packed else get_op("unpack_spikes", ctx.backend)(
                res.flatten(0, 1), ctx.res_shape[2]).view(ctx.res_shape)
            counts = get_op("bconv_lif", ctx.backend)(
                x_packed, w_mask, w_pos, alpha, scale.detach().float(), shift.detach().float(),
                res_f, ctx.T, stride, padding, bn_train, bn_eps, tau, decay_input, v_threshold,
                v_reset)[1]
        rest = (counts, x_packed, w_mask, w_pos, alpha, scale.detach().float(),
                shift.detach().float(), mean, var, res, *ctx.cfg, need_x, ctx.has_res)
        g = _grad_or_zeros(g_spikes, ctx.spikes_meta).float().contiguous()
        if not ctx.pooled:
            out = _backward_op("bconv_lif_bwd", ctx, g, *rest)
        else:
            out = torch.ops.binslt.bconv_lif_bwd_pool2(g, pool_bits, *rest)
        g_x, g_w, g_cur, g_sc, g_sh = out
        return (g_x if need_x else None, g_w, g_sc.to(scale.dtype), g_sh.to(shift.dtype),
                g_cur if ctx.has_res else None) + (None,) * 14


class BNLIF(Function):
    """Epilogue (+BN) (+residual) + LIF over a real current z: [T, N, C, *].

    ``BNLIF.apply(z, scale, shift, residual, bn_train, bn_eps, tau, decay_input, v_threshold,
    v_reset, detach_reset, surrogate, surrogate_alpha, backend)`` returns ``(spikes like z,
    mean [C], var [C], saved)``: ``saved`` is the float32 copy of the current the backward reads
    (empty where the backward reads z itself; non-differentiable; callers take ``[:3]``). The
    ``setup_context`` form, with ``generate_vmap_rule`` (see ``ConvLIF``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z, scale, shift, residual, bn_train, bn_eps, tau, decay_input, v_threshold,
                v_reset, detach_reset, surrogate, surrogate_alpha, backend):
        steps, in_place, copied = _bn_lif_current(z, backend)
        zf = z.float() if in_place else z.float().contiguous()
        res = None if residual is None else residual.float().contiguous()
        spikes, mean, var = get_op("bn_lif", backend)(
            zf, scale.detach().float(), shift.detach().float(), res, bn_train, bn_eps, tau,
            decay_input, v_threshold, v_reset)
        # A current that is the same at every step (a real-input layer's, expanded over T) is
        # saved once, not T times (step 0 of the T-fold copy; read in place: z itself).
        saved = zf[0].clone() if steps and not in_place else zf if copied else zf.new_empty(0)
        return spikes.to(z.dtype), mean, var, saved

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, scale, shift, residual, *cfg, backend = inputs
        _s, mean, var, saved = output
        ctx.mark_non_differentiable(mean, var, saved)
        ctx.set_materialize_grads(False)  # no zero-filled gradient of the saved current
        ctx.spikes_meta = _meta(output[0])
        ctx.steps, ctx.in_place, copied = _bn_lif_current(z, backend)
        ctx.reads_z = not (copied or (ctx.steps and not ctx.in_place))
        ctx.save_for_backward(z if ctx.reads_z else saved, scale, shift, mean, var, residual)
        ctx.cfg = tuple(cfg)
        ctx.backend = backend
        ctx.auto = _first_auto_call()
        ctx.has_res = residual is not None
        ctx.z_dtype = z.dtype

    @staticmethod
    def backward(ctx, g_spikes, *_g_saved):
        zf, scale, shift, mean, var, res = ctx.saved_tensors
        if ctx.reads_z and ctx.steps:
            zf = zf[0]  # the one current of an expanded z
        if ctx.steps:
            zf = zf.unsqueeze(0).expand(ctx.steps, *zf.shape)
            if not capabilities(ctx.backend).strided_current:
                zf = zf.contiguous()
        res = None if res is None else res.float().contiguous()
        g = _grad_or_zeros(g_spikes, ctx.spikes_meta).float().contiguous()
        g_z, g_cur, g_sc, g_sh = _backward_op(
            "bn_lif_bwd", ctx, g, zf, scale.detach().float(), shift.detach().float(), mean, var,
            res, *ctx.cfg, ctx.has_res)
        return (g_z.to(ctx.z_dtype), g_sc.to(scale.dtype), g_sh.to(shift.dtype),
                g_cur if ctx.has_res else None) + (None,) * 10


def _meta(t: torch.Tensor) -> tuple:
    """What ``_grad_or_zeros`` needs to make a zero gradient of t."""
    return tuple(t.shape), t.dtype, t.device


def _grad_or_zeros(g: torch.Tensor | None, meta: tuple) -> torch.Tensor:
    """An output's gradient, zeros where autograd passes none (the Functions turn
    ``materialize_grads`` off, so that their saved, non-differentiable outputs get no
    zero-filled gradients: VGG-11's kept counts alone are 22 MiB a step)."""
    if g is not None:
        return g
    shape, dtype, device = meta
    return torch.zeros(shape, dtype=dtype, device=device)


def _bn_lif_current(z: torch.Tensor, backend: str) -> tuple[int, bool, bool]:
    """How BNLIF reads the current z: (steps: T when z is one current expanded over T (time
    stride 0), else 0; in_place: the CPU kernels read it so, float32 with a contiguous step;
    copied: z.float().contiguous() is a new tensor)."""
    steps = z.shape[0] if z.dim() > 1 and z.stride(0) == 0 else 0
    in_place = bool(steps) and capabilities(backend).strided_current and \
        z.dtype == torch.float32 and z[0].is_contiguous()
    copied = not in_place and (z.dtype != torch.float32 or not z.is_contiguous())
    return steps, in_place, copied


def is_vmapped(t: torch.Tensor) -> bool:
    """Whether t is (or wraps) a batched tensor of ``torch.func.vmap`` (False while tracing:
    torch.compile captures vmap as a whole)."""
    if torch.compiler.is_compiling():
        return False
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t):
        if f.is_batchedtensor(t):
            return True
        t = f.get_unwrapped(t)
    return False


def values_unreadable(t: torch.Tensor) -> bool:
    """Whether the values of t cannot be read on the host here: while tracing (torch.compile,
    torch.export), or under ``torch.func.vmap`` (``is_vmapped``). Data-dependent choices (input
    validation, the compact saves) are skipped then; the kernels stay exact."""
    return torch.compiler.is_compiling() or is_vmapped(t)


def _narrows(counts: torch.Tensor) -> bool:
    """Whether ConvLIF tries the counts as int8 (``binslt::narrow_int8``: one pass, a host read
    of whether they fit). Traced code (torch.compile, torch.export) and vmapped tensors answer
    False without reading: a saved tensor's dtype is fixed when the graph is built, so compiled
    code keeps the counts at their own dtype."""
    return not (values_unreadable(counts) or counts.numel() == 0
                or counts.dtype == torch.int8)


# The last ConvLIF input packed on this thread: (weak reference to it, its version, backend,
# words). A ResNet block's identity shortcut hands conv2 the block input that conv1 packed.
_LAST_INPUT = threading.local()


def _packed_earlier(last, t: torch.Tensor, backend: str) -> torch.Tensor | None:
    """The words of ``last`` (``_LAST_INPUT.packed`` as the previous ConvLIF forward on this
    thread left it) where ``t`` is that very input, unchanged since (the same tensor object and
    version) and packed by this backend; else None."""
    if last is None:
        return None
    ref, version, be, words = last
    if ref() is not t or t._version != version or be != backend:
        return None
    return words


def is_packed_input(t: torch.Tensor, backend: str) -> bool:
    """Whether ``t`` is the last ConvLIF input packed on this thread (by ``backend``), unchanged
    since: its values were found to be spikes then (a pack that validates, or ``check_spikes``
    before one that does not), so they are finite. A ResNet block's identity shortcut hands
    conv2 that input as its residual. False while torch.compile traces (traced code keeps no
    state across calls, and reading it would guard the graph on what eager calls leave)."""
    if torch.compiler.is_compiling():
        return False
    return _packed_earlier(getattr(_LAST_INPUT, "packed", None), t, backend) is not None


def spike_bits(t: torch.Tensor, pack) -> torch.Tensor | None:
    """``pack(t)``, the packed words of t [B, C, H, W], where every value is 0 or 1, else None:
    ``pack`` is a ``pack_spikes`` that refuses a non-binary input with ValueError: a backend's
    with ``pack_validates`` (the CPU kernel stops at the first word that holds one) or the
    reference's, not the GPU kernels' (callers use this on CPU tensors only). Where a caller
    would pack a tensor after asking whether it is spikes, this asks and packs in one pass."""
    try:
        return pack(t)
    except ValueError:
        return None


def _is_binary(t: torch.Tensor) -> bool:
    """Whether every value of the float tensor t is 0 or 1 (one pass, a host read). Traced
    code and vmapped tensors answer False without reading (the residual is then
    saved as it came)."""
    if values_unreadable(t):
        return False
    return bool(t.eq(0).logical_or_(t.eq(1)).all())


def _pool2_spikes(s: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 (stride 2) max-pool of spikes [T, N, C, H, W] (a max of {0, 1} is their OR, exact)
    and the unpooled spikes packed [T*N, H, W, ceil(C/32)] (the backend's pack_spikes): what the
    pool's backward routes by."""
    T, n, c = s.shape[:3]
    flat = s.flatten(0, 1).float().contiguous()
    if capabilities(backend).pool2_op:  # one pass: binslt::spike_pool2
        y, packed = torch.ops.binslt.spike_pool2(flat)
    else:
        y, packed = ref.pool2_max(flat), get_op("pack_spikes", backend)(flat)
    return y.to(s.dtype).view(T, n, c, *y.shape[2:]), packed


class SpikePool(Function):
    """2x2 (stride 2) max-pooling of spikes [T, N, C, H, W] in training: a max of {0,1} spikes is
    their OR. Saves the layer's spikes packed (one bit per spike, the backend's pack_spikes), not
    float indices, and routes the gradient as torch's max_pool2d backward does on that input:
    to the first maximal element of each window in row-major order, i.e. the first 1, or the
    window's first element when all four are 0. Rows/columns past 2*(H//2), 2*(W//2) get none.

    ``SpikePool.apply(s, pool, backend)`` returns ``(pooled [T, N, C, H//2, W//2], packed)``
    (``packed``: the saved bits, non-differentiable); the ``setup_context`` form, with
    ``generate_vmap_rule``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(s, pool, backend):
        if pool != 2:
            raise ValueError(f"SpikePool: only 2x2 pooling is fused, got pool={pool}")
        return _pool2_spikes(s, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, _pool, backend = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero-filled gradient of the saved bits
        ctx.spikes_meta = _meta(output[0])
        ctx.save_for_backward(output[1])
        ctx.cfg = (tuple(s.shape), backend)

    @staticmethod
    def backward(ctx, g, _g_packed):
        (packed,) = ctx.saved_tensors
        (T, n, c, h, w), _backend = ctx.cfg
        g = _grad_or_zeros(g, ctx.spikes_meta)
        gx = torch.ops.binslt.spike_pool2_bwd(packed, g.flatten(0, 1).float().contiguous(), c)
        return gx.to(g.dtype).view(T, n, c, h, w), None, None


def _spike_pool(be: str, s: torch.Tensor, pool: int) -> torch.Tensor:
    """Max-pool a layer's spikes [T, N, C, H, W] by ``pool`` (1: unchanged). The torch backend is
    the reference (max_pool2d, as SpikeMaxPool2d); the kernel backends save one bit per spike."""
    if pool == 1:
        return s
    if capabilities(be).autograd_reference or not torch.is_grad_enabled() or not s.requires_grad:
        y = F.max_pool2d(s.flatten(0, 1), pool)
        return y.view(*s.shape[:3], *y.shape[2:])
    return SpikePool.apply(s, pool, be)[0]
