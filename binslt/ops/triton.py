"""The ``triton`` backend: ``binslt::<op>_triton`` for every schema in
``binslt.ops.schemas.SCHEMAS``.

Each op is a ``torch.library.triton_op`` with the same signature and semantics as its
``binslt.reference`` counterpart; the bodies only check arguments (``binslt._contract``, the
same errors as every backend, after the Triton device rule), allocate, launch the kernels of
the top-level ``kernels`` package through ``torch.library.wrap_triton`` and do O(C) host maths,
so ``triton_op`` registers them as their own fake kernels and ``torch.compile`` can trace them
(on a GPU; on the CPU they run eagerly under ``TRITON_INTERPRET=1``).

Imported by ``binslt.ops`` after the ``binslt::`` schemas are defined; an ImportError here (no
triton) marks the backend unusable.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from .. import kernels as K
from ..kernels._common import check_device
from . import contract as C
from . import reference as ref
from .schemas import SCHEMAS


def _schema(name: str) -> str:
    """'name(Tensor x) -> Tensor' -> '(Tensor x) -> Tensor' (triton_op takes the op name apart)."""
    s = SCHEMAS[name]
    return s[len(name):]


def _triton_op(name: str):
    """``triton_op("binslt::<name>_triton", mutates_args=(), schema=<SCHEMAS[name]>)``.

    torch 2.11's ``triton_op`` drops its ``schema`` argument and infers one from the annotations
    (``int`` becomes ``SymInt``, tuple results need an annotation), so while the op registers,
    the ``infer_schema`` that its module calls returns the given schema instead. Later torch uses
    the given schema and never calls it.
    """
    schema = _schema(name)

    def dec(fn):
        import torch._library.triton as triton_lib

        inferred = getattr(triton_lib, "infer_schema", None)
        if inferred is not None:
            triton_lib.infer_schema = lambda *args, **kwargs: schema
        try:
            return triton_op(f"binslt::{name}_triton", mutates_args=(), schema=schema)(fn)
        finally:
            if inferred is not None:
                triton_lib.infer_schema = inferred

    return dec


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


@_triton_op("pack_spikes")
def pack_spikes_triton(x: torch.Tensor) -> torch.Tensor:
    """x: [B, C, H, W] float spikes -> [B, H, W, ceil(C/32)] int32."""
    return K.pack_spikes(x)


@_triton_op("unpack_spikes")
def unpack_spikes_triton(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """packed: [B, H, W, Cw] int32 -> [B, channels, H, W] float32."""
    return K.unpack_spikes(packed, channels)


@_triton_op("pack_weight")
def pack_weight_triton(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [Co, Ci, kh, kw] float -> (mask, pos) [Co, kh, kw, Cw] int32."""
    return K.pack_weight(weight)


def _check_bconv(op, x_name, x_shape, x_words, T, w_mask, w_pos, alpha, scale, shift, residual,
                 stride, padding, *devices) -> C.BconvArgs:
    """The device rule of the Triton backend, then the contract's bconv rows."""
    check_device(w_mask, w_pos, alpha, scale, shift, residual, *devices, op=op)
    return C.check_bconv(op, x_name, x_shape, x_words, T, w_mask, w_pos, alpha, scale, shift,
                         residual, stride, padding)


@_triton_op("bconv_lif")
def bconv_lif_triton(x_packed: torch.Tensor, w_mask: torch.Tensor, w_pos: torch.Tensor,
                     alpha: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     residual: torch.Tensor | None, T: int, stride: int, padding: int,
                     bn_train: bool, bn_eps: float, tau: float, decay_input: bool,
                     v_threshold: float, v_reset: float | None):
    """Fused binary conv + epilogue + LIF -> (spikes, counts, mean, var); see binslt._schemas.

    Eval / no BN: one pass, the LIF runs in the conv kernel's epilogue. Training BN: pass 1 = the
    conv kernel writes counts and exact int64 per-channel sums; pass 2 = BN + LIF over counts.
    """
    op = "bconv_lif"
    C.check_scalars(op, tau, decay_input, v_threshold, v_reset, bn_eps)
    check_device(x_packed, op=op)
    b, h, w, cw = C.check_packed_input(op, x_packed)
    a = _check_bconv(op, "x_packed", (b, h, w), cw, T, w_mask, w_pos, alpha, scale, shift,
                     residual, stride, padding)
    co = a.co
    xp, wm, wp = x_packed.contiguous(), w_mask.contiguous(), w_pos.contiguous()
    al, sc, sh, res = a.alpha, a.scale, a.shift, _f32(residual)
    cdt = C.counts_dtype(w_mask)
    spikes, counts, s1, s2 = K.bconv_counts(
        xp, wm, wp, al, sc, sh, res, T, stride, padding, not bn_train, cdt, tau, decay_input,
        v_threshold, v_reset)
    if not bn_train:
        zeros = torch.zeros(co, dtype=torch.float32, device=x_packed.device)
        return spikes, counts, zeros, zeros.clone()
    # Z = alpha * count, so the statistics of Z follow exactly from the integer sums.
    m = max(1, counts.numel() // max(co, 1))
    a64 = al.to(torch.float64)
    mean, var = K.batch_stats_from_sums(s1.to(torch.float64) * a64,
                                        s2.to(torch.float64) * a64 * a64, m)
    spikes = K.bn_lif_fwd(counts, al, sc, sh, mean, var, bn_eps, res, tau, decay_input,
                          v_threshold, v_reset)
    return spikes, counts, mean, var


@_triton_op("bconv_lif_infer")
def bconv_lif_infer_triton(x: torch.Tensor, w_mask: torch.Tensor, w_pos: torch.Tensor,
                           alpha: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                           residual: torch.Tensor | None, stride: int, padding: int,
                           tau: float, decay_input: bool, v_threshold: float,
                           v_reset: float | None, pool: int = 1,
                           packed_out: bool = False) -> torch.Tensor:
    """bconv_lif's spikes of float spikes x [T, N, C, H, W] (or packed words [T, N, H, W, Cw]),
    eval epilogue; the conv kernel writes no counts. Pooling and packing of the output run after
    it (binslt.reference.infer_output with the Triton pack kernel)."""
    op = "bconv_lif_infer"
    C.check_scalars(op, tau, decay_input, v_threshold, v_reset)
    check_device(x, op=op)
    T, n, h, w, cw, packed_in = C.check_infer_input(op, x)
    a = _check_bconv(op, "x", (T * n, h, w), cw, T, w_mask, w_pos, alpha, scale,
                     shift, residual, stride, padding)
    C.check_pool(op, pool, a.ho, a.wo)
    if packed_in:
        xp = x.reshape(T * n, h, w, cw).contiguous()
    else:
        xp = K.pack_spikes(x.flatten(0, 1)).contiguous()
    wm, wp = w_mask.contiguous(), w_pos.contiguous()
    spikes, _, _, _ = K.bconv_counts(xp, wm, wp, a.alpha, a.scale, a.shift, _f32(residual), T,
                                     stride, padding, True, C.counts_dtype(w_mask), tau,
                                     decay_input, v_threshold, v_reset, store_counts=False)
    return ref.infer_output(spikes, pool, packed_out, K.pack_spikes)


@_triton_op("bconv_lif_bwd")
def bconv_lif_bwd_triton(grad_spikes: torch.Tensor, counts: torch.Tensor, x_packed: torch.Tensor,
                         w_mask: torch.Tensor, w_pos: torch.Tensor, alpha: torch.Tensor,
                         scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor, residual: torch.Tensor | None, in_channels: int,
                         stride: int, padding: int, bn_train: bool, bn_eps: float, tau: float,
                         decay_input: bool, v_threshold: float, v_reset: float | None,
                         detach_reset: bool, surrogate: int, surrogate_alpha: float,
                         need_grad_x: bool, need_grad_current: bool = True):
    """-> (grad_x, grad_weight, grad_current, grad_scale, grad_shift); see binslt._schemas."""
    op = "bconv_lif_bwd"
    C.check_scalars(op, tau, decay_input, v_threshold, v_reset, bn_eps, surrogate, surrogate_alpha)
    check_device(x_packed, grad_spikes, counts, mean, var, op=op)
    C.check_counts(op, counts)
    T = counts.shape[0]
    b, h, w, cw = C.check_packed_input(op, x_packed)
    a = _check_bconv(op, "x_packed", (b, h, w), cw, T, w_mask, w_pos, alpha, scale, shift,
                     residual, stride, padding)
    nb, co, ho, wo = a.out_shape
    if tuple(counts.shape) != (T, nb, co, ho, wo):
        raise ValueError(f"binslt::{op}: counts must have shape {[T, nb, co, ho, wo]}, got "
                         f"{list(counts.shape)}")
    if grad_spikes.shape != counts.shape:
        raise ValueError(f"binslt::{op}: grad_spikes {list(grad_spikes.shape)} must match "
                         f"counts {list(counts.shape)}")
    if not 0 < in_channels <= 32 * cw:
        raise ValueError(f"binslt::{op}: in_channels={in_channels} does not fit the {cw} "
                         "packed channel words")
    mean, var = C.check_channel_vecs(op, co, mean=mean, var=var)
    al, sc, sh = a.alpha, a.scale, a.shift
    g_z, g_cur, g_sc, g_sh = K.lif_bwd(
        _f32(grad_spikes), counts.contiguous(), al, sc, sh, mean, var, _f32(residual),
        bn_train, bn_eps, tau, decay_input, v_threshold, v_reset, detach_reset, surrogate,
        surrogate_alpha)
    gz = g_z.view(T * nb, co, ho, wo)
    xp, wm, wp = x_packed.contiguous(), w_mask.contiguous(), w_pos.contiguous()
    g_w = K.bconv_wgrad(gz, xp, in_channels, w_mask.shape[1], w_mask.shape[2], stride, padding)
    if need_grad_x:
        h, w = x_packed.shape[1], x_packed.shape[2]
        g_x = K.bconv_dgrad(gz, wm, wp, al, in_channels, h, w, stride, padding)
        g_x = g_x.view(T, nb, in_channels, h, w)
    else:
        g_x = torch.empty(0, dtype=torch.float32, device=counts.device)
    if not need_grad_current:  # computed (the kernel writes it), not returned
        g_cur = torch.empty(0, dtype=torch.float32, device=counts.device)
    return g_x, g_w, g_cur, g_sc, g_sh


def _check_bn_lif(op, z, residual, *devices, **vectors) -> list[torch.Tensor]:
    """-> the per-channel vectors, float32."""
    check_device(z, residual, *devices, *vectors.values(), op=op)
    return C.check_bn_lif(op, z, residual, **vectors)


@_triton_op("bn_lif")
def bn_lif_triton(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                  residual: torch.Tensor | None, bn_train: bool, bn_eps: float, tau: float,
                  decay_input: bool, v_threshold: float, v_reset: float | None):
    """(BN | affine) (+ residual) + multi-step LIF over z: [T, N, C, *] -> (spikes, mean, var)."""
    op = "bn_lif"
    C.check_scalars(op, tau, decay_input, v_threshold, v_reset, bn_eps)
    scale, shift = _check_bn_lif(op, z, residual, scale=scale, shift=shift)
    c = z.shape[2]
    zf = _f32(z)
    if bn_train:
        mean, var = K.channel_stats(zf)
    else:
        mean = torch.zeros(c, dtype=torch.float32, device=z.device)
        var = torch.zeros(c, dtype=torch.float32, device=z.device)
    spikes = K.bn_lif_fwd(zf, None, scale, shift, mean if bn_train else None,
                          var if bn_train else None, bn_eps,
                          _f32(residual), tau, decay_input, v_threshold, v_reset)
    return spikes.to(z.dtype), mean, var


@_triton_op("bn_lif_bwd")
def bn_lif_bwd_triton(grad_spikes: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
                      shift: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                      residual: torch.Tensor | None, bn_train: bool, bn_eps: float, tau: float,
                      decay_input: bool, v_threshold: float, v_reset: float | None,
                      detach_reset: bool, surrogate: int, surrogate_alpha: float,
                      need_grad_current: bool = True):
    """-> (grad_z, grad_current, grad_scale, grad_shift); see binslt._schemas."""
    op = "bn_lif_bwd"
    C.check_scalars(op, tau, decay_input, v_threshold, v_reset, bn_eps, surrogate, surrogate_alpha)
    scale, shift, mean, var = _check_bn_lif(op, z, residual, grad_spikes, scale=scale,
                                            shift=shift, mean=mean, var=var)
    if grad_spikes.shape != z.shape:
        raise ValueError(f"binslt::{op}: grad_spikes {list(grad_spikes.shape)} must match "
                         f"z {list(z.shape)}")
    g_z, g_cur, g_sc, g_sh = K.lif_bwd(
        _f32(grad_spikes), _f32(z), None, scale, shift, mean, var,
        _f32(residual), bn_train, bn_eps, tau, decay_input, v_threshold, v_reset, detach_reset,
        surrogate, surrogate_alpha)
    if not need_grad_current:  # computed (the kernel writes it), not returned
        g_cur = torch.empty(0, dtype=torch.float32, device=z.device)
    return g_z.to(z.dtype), g_cur.to(z.dtype), g_sc, g_sh


TRITON_OPS = {
    "pack_spikes": pack_spikes_triton,
    "unpack_spikes": unpack_spikes_triton,
    "pack_weight": pack_weight_triton,
    "bconv_lif": bconv_lif_triton,
    "bconv_lif_infer": bconv_lif_infer_triton,
    "bconv_lif_bwd": bconv_lif_bwd_triton,
    "bn_lif": bn_lif_triton,
    "bn_lif_bwd": bn_lif_bwd_triton,
}
assert set(TRITON_OPS) == set(SCHEMAS), "every schema needs a Triton op"
