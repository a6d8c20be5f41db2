"""Epilogue (BN / affine, residual) + multi-step LIF over T, forward and BPTT backward.

All kernels here see the current as ``src: [T, Nb, C, S]`` (S = product of the trailing dims;
S = 1 for linear layers). ``src`` is either a float current ``z`` (``bn_lif``) or the integer
counts of the binary conv (``bconv_lif``), in which case ``Z = alpha[c] * count`` (HAS_ALPHA).
A program owns a ``[BLOCK_R, BLOCK_S]`` tile of neurons (rows = (n, c) pairs, columns = spatial)
and walks t = 0..T-1 with the membrane potential in registers.

Training-mode BN schedule (two passes over the current):
  pass 1: per-channel sums of Z and Z^2 (``_channel_sums_kernel``, float64 atomics; for the binary
          conv the conv kernel itself accumulates exact int64 sums of counts instead);
  host:   mean = S1 / M, var = S2 / M - mean^2 in float64 (M = T * Nb * S);
  pass 2: ``_bn_lif_fwd_kernel`` normalizes (invstd = 1 / sqrt(var + eps) per channel, IEEE
          ``bn_invstd``, as the CPU and CUDA kernels; torch.rsqrt on CUDA is approximate) and runs
          the neuron.

The forward and LIF-backward kernels are launched without FMA contraction (``no_fp_fusion``), so
their float32 maths rounds operation by operation like csrc/include/binslt/lif.h.

Backward: ``_lif_bwd_kernel`` recomputes H[t] with the forward kernel's sweep
(``_lif_forward_sweep``, into the grad_x buffer, which it then overwrites), runs BPTT backward
with the surrogate, and reduces per-channel sums of dL/dX and dL/dX * Zhat (float64 atomics) for
grad_shift / grad_scale. Eval mode writes dL/dZ = dL/dX * scale in the same pass; training mode
needs the sums first, so ``_bn_train_bwd_kernel`` is a second pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    bn_invstd,
    cdiv,
    check_int32_index,
    elementwise_blocks,
    launch,
    lif_backward_step,
    lif_input_grad,
    lif_step,
    no_fp_fusion,
    surrogate_constants,
)


@triton.jit
def _tile(R, C, S, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's [BLOCK_R, BLOCK_S] tile at t = 0: (channel [BLOCK_R], row mask [BLOCK_R],
    element mask and offsets [BLOCK_R, BLOCK_S]). Rows are (n, c) pairs, columns spatial."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = row < R
    ok = row_ok[:, None] & (col < S)[None, :]
    return row % C, row_ok, ok, row[:, None] * S + col[None, :]


@triton.jit
def _load_current(src_ptr, alpha_row, off, ok, HAS_ALPHA: tl.constexpr):
    """Z at offsets ``off``: the float current, or alpha[c] * count."""
    z = tl.load(src_ptr + off, mask=ok, other=0).to(tl.float32)
    if HAS_ALPHA:
        z = z * alpha_row[:, None]
    return z


@triton.jit
def _channel_params(scale_ptr, shift_ptr, alpha_ptr, mean_ptr, var_ptr, bn_eps, c, row_ok,
                    HAS_ALPHA: tl.constexpr, BN_TRAIN: tl.constexpr):
    """Channel parameters of rows with channel ``c``: scale, shift, mean, invstd as [BLOCK_R, 1]
    columns, alpha as [BLOCK_R] (mean/invstd are placeholders without batch statistics);
    invstd = 1 / sqrt(var + eps) (``bn_invstd``)."""
    scale = tl.load(scale_ptr + c, mask=row_ok, other=0.0)[:, None]
    shift = tl.load(shift_ptr + c, mask=row_ok, other=0.0)[:, None]
    alpha = tl.load(alpha_ptr + c, mask=row_ok, other=0.0) if HAS_ALPHA else scale
    if BN_TRAIN:
        mean = tl.load(mean_ptr + c, mask=row_ok, other=0.0)[:, None]
        invstd = bn_invstd(tl.load(var_ptr + c, mask=row_ok, other=1.0), bn_eps)[:, None]
    else:
        mean = 0.0
        invstd = 1.0
    return scale, shift, alpha, mean, invstd


@triton.jit
def _neuron_input(src_ptr, res_ptr, alpha, scale, shift, mean, invstd, off, ok,
                  HAS_ALPHA: tl.constexpr, BN_TRAIN: tl.constexpr, HAS_RES: tl.constexpr):
    """X = [(Z - mean) * invstd] * scale + shift (+ R) at offsets ``off``."""
    z = _load_current(src_ptr, alpha, off, ok, HAS_ALPHA)
    if BN_TRAIN:
        x = (z - mean) * invstd
        x = x * scale + shift
    else:
        x = z * scale + shift
    if HAS_RES:
        x = x + tl.load(res_ptr + off, mask=ok, other=0.0)
    return x


@triton.jit
def _lif_forward_sweep(src_ptr, res_ptr, out_ptr, alpha, scale, shift, mean, invstd, off, ok,
                       T, step, tau, v_threshold, v_reset, HAS_ALPHA: tl.constexpr,
                       BN_TRAIN: tl.constexpr, HAS_RES: tl.constexpr, DECAY_INPUT: tl.constexpr,
                       HARD: tl.constexpr, STORE_CHARGE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_S: tl.constexpr):
    """The neuron over t = 0..T-1 from V[-1] = v_reset; stores S[t] to ``out_ptr``, or H[t] with
    STORE_CHARGE (the backward's recomputation). ``step`` is the offset of one timestep."""
    v = tl.zeros((BLOCK_R, BLOCK_S), tl.float32) + v_reset
    for t in range(T):
        o = off + t * step
        x = _neuron_input(src_ptr, res_ptr, alpha, scale, shift, mean, invstd, o, ok, HAS_ALPHA,
                          BN_TRAIN, HAS_RES)
        h, spk, v = lif_step(v, x, tau, v_threshold, v_reset, DECAY_INPUT, HARD)
        if STORE_CHARGE:
            tl.store(out_ptr + o, h, mask=ok)
        else:
            tl.store(out_ptr + o, spk, mask=ok)


@triton.jit
def _channel_sums_kernel(
    src_ptr,  # [T, Nb, C, S] float32
    sum_ptr,  # [C] float64, accumulated
    sq_ptr,  # [C] float64, accumulated
    T,
    R,  # Nb * C
    C,
    S,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """sum_ptr[c] += sum Z, sq_ptr[c] += sum Z^2 over the tile and all t (float64)."""
    c, row_ok, ok, off = _tile(R, C, S, BLOCK_R, BLOCK_S)
    z_sum = tl.zeros((BLOCK_R, BLOCK_S), tl.float64)
    z_sq = tl.zeros((BLOCK_R, BLOCK_S), tl.float64)
    for t in range(T):
        z = tl.load(src_ptr + off + t * R * S, mask=ok, other=0.0).to(tl.float64)
        z_sum += z
        z_sq += z * z
    tl.atomic_add(sum_ptr + c, tl.sum(z_sum, axis=1), mask=row_ok)
    tl.atomic_add(sq_ptr + c, tl.sum(z_sq, axis=1), mask=row_ok)


@no_fp_fusion
@triton.jit
def _bn_lif_fwd_kernel(
    src_ptr,  # [T, Nb, C, S] float32 current, or int16/int32 counts (HAS_ALPHA)
    alpha_ptr,  # [C] float32 (HAS_ALPHA)
    scale_ptr,  # [C] float32
    shift_ptr,  # [C] float32
    mean_ptr,  # [C] float32 (BN_TRAIN)
    var_ptr,  # [C] float32 (BN_TRAIN)
    res_ptr,  # [T, Nb, C, S] float32 (HAS_RES)
    spk_ptr,  # [T, Nb, C, S] float32 out
    T,
    R,
    C,
    S,
    bn_eps,
    tau,
    v_threshold,
    v_reset,  # 0 for a soft reset
    HAS_ALPHA: tl.constexpr,
    BN_TRAIN: tl.constexpr,
    HAS_RES: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    HARD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """X = [(Z - mean) * invstd] * scale + shift (+ R); S[t] = LIF(X[t]) for t = 0..T-1."""
    c, row_ok, ok, off = _tile(R, C, S, BLOCK_R, BLOCK_S)
    scale, shift, alpha, mean, invstd = _channel_params(scale_ptr, shift_ptr, alpha_ptr, mean_ptr,
                                                        var_ptr, bn_eps, c, row_ok, HAS_ALPHA,
                                                        BN_TRAIN)
    _lif_forward_sweep(src_ptr, res_ptr, spk_ptr, alpha, scale, shift, mean, invstd, off, ok,
                       T, R * S, tau, v_threshold, v_reset, HAS_ALPHA, BN_TRAIN, HAS_RES,
                       DECAY_INPUT, HARD, False, BLOCK_R, BLOCK_S)


@no_fp_fusion
@triton.jit
def _lif_bwd_kernel(
    grad_spk_ptr,  # [T, Nb, C, S] float32 dL/dS
    src_ptr,  # [T, Nb, C, S] float32 current or integer counts (HAS_ALPHA)
    alpha_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    var_ptr,
    res_ptr,
    grad_x_ptr,  # [T, Nb, C, S] float32 out: dL/dX (holds H[t] in between)
    grad_z_ptr,  # [T, Nb, C, S] float32 out: dL/dZ (eval mode only)
    grad_shift_ptr,  # [C] float64 accumulated: sum dL/dX
    grad_scale_ptr,  # [C] float64 accumulated: sum dL/dX * Zhat
    T,
    R,
    C,
    S,
    bn_eps,
    tau,
    v_threshold,
    v_reset,
    surrogate_alpha,
    surrogate_alpha_sq,  # surrogate_constants(SURROGATE, surrogate_alpha)
    surrogate_bound,
    HAS_ALPHA: tl.constexpr,
    BN_TRAIN: tl.constexpr,
    HAS_RES: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    HARD: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """BPTT through the LIF from dL/dV[T-1] = 0, t = T-1..0 (``lif_backward_step``), then
    dL/dX[t] (``lif_input_grad``) and its per-channel sums for grad_shift / grad_scale."""
    c, row_ok, ok, off = _tile(R, C, S, BLOCK_R, BLOCK_S)
    scale, shift, alpha, mean, invstd = _channel_params(scale_ptr, shift_ptr, alpha_ptr, mean_ptr,
                                                        var_ptr, bn_eps, c, row_ok, HAS_ALPHA,
                                                        BN_TRAIN)
    step = R * S
    _lif_forward_sweep(src_ptr, res_ptr, grad_x_ptr, alpha, scale, shift, mean, invstd, off, ok,
                       T, step, tau, v_threshold, v_reset, HAS_ALPHA, BN_TRAIN, HAS_RES,
                       DECAY_INPUT, HARD, True, BLOCK_R, BLOCK_S)
    # Each H[t] is re-read by the thread that stored it (same offsets, same layout); the barrier
    # makes that independent of the layout the compiler picks.
    tl.debug_barrier()
    grad_v = tl.zeros((BLOCK_R, BLOCK_S), tl.float32)
    sum_gx = tl.zeros((BLOCK_R, BLOCK_S), tl.float64)
    sum_gx_zhat = tl.zeros((BLOCK_R, BLOCK_S), tl.float64)
    for i in range(T):
        o = off + (T - 1 - i) * step
        h = tl.load(grad_x_ptr + o, mask=ok, other=0.0)
        grad_spk = tl.load(grad_spk_ptr + o, mask=ok, other=0.0)
        grad_h, grad_v = lif_backward_step(grad_spk, grad_v, h, tau, v_threshold, v_reset,
                                           surrogate_alpha, surrogate_alpha_sq, surrogate_bound,
                                           HARD, DETACH_RESET, SURROGATE)
        gx = tl.where(ok, lif_input_grad(grad_h, tau, DECAY_INPUT), 0.0)
        tl.store(grad_x_ptr + o, gx, mask=ok)
        z = _load_current(src_ptr, alpha, o, ok, HAS_ALPHA)
        if BN_TRAIN:
            zhat = (z - mean) * invstd
        else:
            zhat = z
            tl.store(grad_z_ptr + o, gx * scale, mask=ok)
        sum_gx += gx.to(tl.float64)
        sum_gx_zhat += gx.to(tl.float64) * zhat.to(tl.float64)
    tl.atomic_add(grad_shift_ptr + c, tl.sum(sum_gx, axis=1), mask=row_ok)
    tl.atomic_add(grad_scale_ptr + c, tl.sum(sum_gx_zhat, axis=1), mask=row_ok)


@triton.jit
def _bn_train_bwd_kernel(
    grad_x_ptr,  # [T, Nb, C, S] float32 dL/dX
    src_ptr,
    alpha_ptr,
    scale_ptr,
    mean_ptr,
    var_ptr,
    mean_gx_ptr,  # [C] float32: mean over (T, Nb, S) of dL/dX
    mean_gx_zhat_ptr,  # [C] float32: mean of dL/dX * Zhat
    grad_z_ptr,  # [T, Nb, C, S] float32 out
    T,
    R,
    C,
    S,
    bn_eps,
    HAS_ALPHA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """dL/dZ = scale * invstd * (gX - mean(gX) - Zhat * mean(gX * Zhat))."""
    c, row_ok, ok, off = _tile(R, C, S, BLOCK_R, BLOCK_S)
    scale = tl.load(scale_ptr + c, mask=row_ok, other=0.0)[:, None]
    alpha = tl.load(alpha_ptr + c, mask=row_ok, other=0.0) if HAS_ALPHA else scale
    mean = tl.load(mean_ptr + c, mask=row_ok, other=0.0)[:, None]
    invstd = bn_invstd(tl.load(var_ptr + c, mask=row_ok, other=1.0), bn_eps)[:, None]
    mean_gx = tl.load(mean_gx_ptr + c, mask=row_ok, other=0.0)[:, None]
    mean_gx_zhat = tl.load(mean_gx_zhat_ptr + c, mask=row_ok, other=0.0)[:, None]
    for t in range(T):
        o = off + t * R * S
        z = _load_current(src_ptr, alpha, o, ok, HAS_ALPHA)
        zhat = (z - mean) * invstd
        gx = tl.load(grad_x_ptr + o, mask=ok, other=0.0)
        tl.store(grad_z_ptr + o, (scale * invstd) * (gx - mean_gx - zhat * mean_gx_zhat), mask=ok)


# ----------------------------------------------------------------------------------------------
# Launchers. src: [T, Nb, C, *] contiguous; shapes are checked by the callers (binslt/_triton_ops).
# ----------------------------------------------------------------------------------------------


def _geometry(src: torch.Tensor) -> tuple[int, int, int, int]:
    T, nb, c = src.shape[0], src.shape[1], src.shape[2]
    s = 1
    for d in src.shape[3:]:
        s *= d
    check_int32_index(src.numel(), "the current [T, N, C, *]")
    return T, nb * c, c, s


def _grid(R: int, S: int):
    br, bs, nw = elementwise_blocks(R, S)
    return (cdiv(R, br), cdiv(S, bs)), br, bs, nw


def batch_stats_from_sums(s1: torch.Tensor, s2: torch.Tensor, count: int):
    """(mean, var) float32 from per-channel float64 sums of Z and Z^2 over ``count``.

    The divisor is a tensor: PyTorch on CUDA divides by a Python scalar as a multiplication by
    its reciprocal, which is not the IEEE quotient the CPU kernels compute."""
    m = torch.full_like(s1, float(count))
    mean = s1 / m
    var = (s2 / m - mean * mean).clamp_min(0)
    return mean.to(torch.float32), var.to(torch.float32)


def channel_stats(z: torch.Tensor):
    """Pass 1 of training BN over a float current z: [T, Nb, C, *] -> (mean, var) [C] float32."""
    T, R, C, S = _geometry(z)
    s1 = torch.zeros(C, dtype=torch.float64, device=z.device)
    s2 = torch.zeros(C, dtype=torch.float64, device=z.device)
    if z.numel() > 0:
        grid, br, bs, nw = _grid(R, S)
        launch(_channel_sums_kernel, grid, z, s1, s2, T, R, C, S, BLOCK_R=br, BLOCK_S=bs,
                                                num_warps=nw)
    return batch_stats_from_sums(s1, s2, max(1, z.numel() // C))


def bn_lif_fwd(src: torch.Tensor, alpha: torch.Tensor | None, scale: torch.Tensor,
               shift: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None,
               bn_eps: float, residual: torch.Tensor | None, tau: float, decay_input: bool,
               v_threshold: float, v_reset: float | None) -> torch.Tensor:
    """Pass 2: spikes [T, Nb, C, *] float32 from the current (or counts with ``alpha``); training
    BN with the batch ``mean`` / ``var`` (None: eval affine)."""
    T, R, C, S = _geometry(src)
    spikes = torch.empty(src.shape, dtype=torch.float32, device=src.device)
    if src.numel() == 0:
        return spikes
    bn_train = mean is not None
    grid, br, bs, nw = _grid(R, S)
    launch(_bn_lif_fwd_kernel, grid,
        src, scale if alpha is None else alpha, scale, shift,
        mean if bn_train else scale, var if bn_train else scale,
        spikes if residual is None else residual, spikes,
        T, R, C, S, float(bn_eps), float(tau), float(v_threshold), 0.0 if v_reset is None else float(v_reset),
        HAS_ALPHA=alpha is not None, BN_TRAIN=bn_train, HAS_RES=residual is not None,
        DECAY_INPUT=bool(decay_input), HARD=v_reset is not None, BLOCK_R=br, BLOCK_S=bs,
        num_warps=nw)
    return spikes


def lif_bwd(grad_spikes: torch.Tensor, src: torch.Tensor, alpha: torch.Tensor | None,
            scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
            residual: torch.Tensor | None, bn_train: bool, bn_eps: float, tau: float,
            decay_input: bool, v_threshold: float, v_reset: float | None, detach_reset: bool,
            surrogate: int, surrogate_alpha: float):
    """-> (grad_z, grad_current, grad_scale, grad_shift), all float32; shapes like src / [C]."""
    T, R, C, S = _geometry(src)
    check_int32_index(grad_spikes.numel(), "grad_spikes")
    dev = src.device
    grad_x = torch.empty(src.shape, dtype=torch.float32, device=dev)
    grad_z = torch.empty(src.shape, dtype=torch.float32, device=dev)
    grad_shift = torch.zeros(C, dtype=torch.float64, device=dev)
    grad_scale = torch.zeros(C, dtype=torch.float64, device=dev)
    var = var.to(torch.float32)
    mean = mean.to(torch.float32)
    if src.numel() == 0:
        return grad_z, grad_x, grad_scale.float(), grad_shift.float()
    grid, br, bs, nw = _grid(R, S)
    has_alpha = alpha is not None
    launch(_lif_bwd_kernel, grid,
        grad_spikes, src, alpha if has_alpha else scale, scale, shift, mean, var,
        grad_x if residual is None else residual, grad_x, grad_z, grad_shift, grad_scale,
        T, R, C, S, float(bn_eps), float(tau), float(v_threshold), 0.0 if v_reset is None else float(v_reset),
        float(surrogate_alpha), *surrogate_constants(int(surrogate), surrogate_alpha),
        HAS_ALPHA=has_alpha, BN_TRAIN=bool(bn_train), HAS_RES=residual is not None,
        DECAY_INPUT=bool(decay_input), HARD=v_reset is not None, DETACH_RESET=bool(detach_reset),
        SURROGATE=int(surrogate), BLOCK_R=br, BLOCK_S=bs, num_warps=nw)
    if bn_train:
        count = max(1, src.numel() // C)
        launch(_bn_train_bwd_kernel, grid,
            grad_x, src, alpha if has_alpha else scale, scale, mean, var,
            (grad_shift / count).to(torch.float32), (grad_scale / count).to(torch.float32),
            grad_z,
            T, R, C, S, float(bn_eps), HAS_ALPHA=has_alpha, BLOCK_R=br, BLOCK_S=bs, num_warps=nw)
    return grad_z, grad_x, grad_scale.to(torch.float32), grad_shift.to(torch.float32)
