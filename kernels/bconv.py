"""Binary convolution on int8 tensor cores, fused with the LIF epilogue, and its backward.

Forward (``_bconv_fwd_kernel``): implicit im2col. The GEMM is rows = (n, ho, wo), columns = output
channels, K = (kh, kw, input channel). Each K step loads WORDS packed spike words per row and the
matching words of the two weight bit planes, unpacks them to int8 in registers
(x in {0, 1}, w = mask * (2 pos - 1) in {-1, 0, 1}) and runs ``tl.dot`` int8 x int8 -> int32.
This is exact, and zero padding needs no correction (a padded spike is 0). A program owns a
(rows x channels) tile and iterates t = 0..T-1, so with ``FUSE_LIF`` the membrane potential stays
in registers and the epilogue (alpha, affine, residual, LIF) runs on the int32 accumulator:
outputs are float spikes and int16 counts. Training-mode BN needs batch statistics before the
neuron, so there the kernel runs as pass 1: it writes counts and accumulates exact int64 sums of
count and count^2 per channel; pass 2 is ``kernels.lif._bn_lif_fwd_kernel`` over the counts.

Backward: ``_bconv_dgrad_kernel`` (dL/dx = conv_transpose(dL/dZ, W_eff), gathered per input pixel
with ternary weights unpacked from bits) and ``_bconv_wgrad_kernel`` (dL/dW_eff = sum over
positions of dL/dZ times the binary input, unpacked from bits). Both use float ``tl.dot``.

The interpreter runs int8 ``tl.dot`` correctly (numpy), so no float fallback is needed there; no
popcount is used at all (the tensor-core path replaces it, docs/design.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    DOT_PRECISION,
    INTERPRET,
    autotune_configs,
    cdiv,
    check_int32_index,
    launch,
    lif_step,
    no_fp_fusion,
)

# H100/H200: int8 mma wants K >= 32 per step (one packed word) and 64-128 wide tiles.
_FWD_CONFIGS = autotune_configs(
    [
        dict(BLOCK_M=128, BLOCK_N=128, WORDS=2, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, WORDS=2, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, WORDS=2, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, WORDS=4, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, WORDS=4, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, WORDS=1, num_warps=4, num_stages=4),
    ],
    dict(BLOCK_M=32, BLOCK_N=16, WORDS=8),
)

_GRAD_CONFIGS = autotune_configs(
    [
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3),
    ],
    dict(BLOCK_M=32, BLOCK_N=512, BLOCK_K=16),
)


@triton.jit
def _pixel_tile(n_rows, n_cols, height, width, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of a pixel-row GEMM: rows (grid axis 0) enumerate the pixels
    (image, y, x) of images height x width, columns (grid axis 1) channels. -> (cols, image,
    pixel in its image, y, x, row_ok, col_ok)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    hw = height * width
    pix = rows % hw
    return cols, rows // hw, pix, pix // width, pix % width, rows < n_rows, cols < n_cols


@triton.jit
def _ternary(w_mask_ptr, w_pos_ptr, off, ok, WORD_BITS: tl.constexpr, bit):
    """Ternary weights mask * (2 pos - 1) in {-1, 0, 1} (int32) of the packed bit planes at
    ``off``: the bits ``bit`` of each loaded word; with ``WORD_BITS`` every bit of each word
    ([K words, N] words -> [K words, 32, N] with ``bit`` the 32 bit indices)."""
    mask_words = tl.load(w_mask_ptr + off, mask=ok, other=0)
    pos_words = tl.load(w_pos_ptr + off, mask=ok, other=0)
    if WORD_BITS:
        mask_words = mask_words[:, None, :]
        pos_words = pos_words[:, None, :]
        bit = bit[None, :, None]
    mask_bits = (mask_words >> bit) & 1
    pos_bits = (pos_words >> bit) & 1
    return mask_bits * (2 * pos_bits - 1)


@no_fp_fusion
@triton.autotune(configs=_FWD_CONFIGS, key=["M", "Co", "CW", "T", "FUSE_LIF", "STORE_COUNTS"],
                 reset_to_zero=["sum_ptr", "sq_ptr"])
@triton.jit
def _bconv_fwd_kernel(
    x_ptr,  # [T*Nb, H, W, CW] int32 packed spikes
    w_mask_ptr,  # [Co, KH, KW, CW] int32 mask bits (w != 0)
    w_pos_ptr,  # [Co, KH, KW, CW] int32 positive bits (w > 0)
    alpha_ptr,  # [Co] float32
    scale_ptr,  # [Co] float32
    shift_ptr,  # [Co] float32
    res_ptr,  # [T, Nb, Co, Ho, Wo] float32 (HAS_RES)
    spk_ptr,  # [T, Nb, Co, Ho, Wo] float32 out (FUSE_LIF)
    cnt_ptr,  # [T, Nb, Co, Ho, Wo] int16/int32 out (STORE_COUNTS)
    sum_ptr,  # [Co] int64 accumulated sum of counts (not FUSE_LIF)
    sq_ptr,  # [Co] int64 accumulated sum of counts^2 (not FUSE_LIF)
    T,
    M,  # Nb * Ho * Wo
    H,
    W,
    CW,
    Co,
    Ho,
    Wo,
    stride,
    padding,
    tau,
    v_threshold,
    v_reset,
    KH: tl.constexpr,
    KW: tl.constexpr,
    FUSE_LIF: tl.constexpr,
    STORE_COUNTS: tl.constexpr,  # False only with FUSE_LIF (inference: no backward)
    HAS_RES: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    HARD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORDS: tl.constexpr,
):
    """count[t, n, co, ho, wo] = sum_{kh, kw, ci} x[t, n, ci, ho*s-p+kh, wo*s-p+kw] * sign*M."""
    co, n_idx, pix, ho, wo, row_ok, co_ok = _pixel_tile(M, Co, Ho, Wo, BLOCK_M, BLOCK_N)
    hw_o = Ho * Wo
    nb = M // hw_o
    word_ids = tl.arange(0, WORDS)
    bit_ids = tl.arange(0, 32)
    out_ok = row_ok[:, None] & co_ok[None, :]
    # [BLOCK_M, BLOCK_N] offset of (n, co, ho, wo) inside one timestep
    out_off = (n_idx * Co * hw_o + pix)[:, None] + (co * hw_o)[None, :]
    step = nb * Co * hw_o
    if FUSE_LIF:
        alpha = tl.load(alpha_ptr + co, mask=co_ok, other=0.0)[None, :]
        scale = tl.load(scale_ptr + co, mask=co_ok, other=0.0)[None, :]
        shift = tl.load(shift_ptr + co, mask=co_ok, other=0.0)[None, :]
        v = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) + v_reset
    else:
        count_sum = tl.zeros((BLOCK_N,), tl.int64)
        count_sq = tl.zeros((BLOCK_N,), tl.int64)
    for t in range(T):
        b = t * nb + n_idx
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        for kh in tl.static_range(KH):
            hi = ho * stride - padding + kh
            for kw in tl.static_range(KW):
                wi = wo * stride - padding + kw
                ok = row_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                x_base = ((b * H + hi) * W + wi) * CW
                w_base = ((co * KH + kh) * KW + kw) * CW
                for w0 in range(0, CW, WORDS):
                    word = w0 + word_ids
                    word_ok = word < CW
                    x_words = tl.load(x_ptr + x_base[:, None] + word[None, :],
                                      mask=ok[:, None] & word_ok[None, :], other=0)
                    x_bits = ((x_words[:, :, None] >> bit_ids[None, None, :]) & 1).to(tl.int8)
                    x_bits = tl.reshape(x_bits, (BLOCK_M, WORDS * 32))
                    w_ok = co_ok[None, :] & word_ok[:, None]
                    w_off = w_base[None, :] + word[:, None]
                    w_tern = _ternary(w_mask_ptr, w_pos_ptr, w_off, w_ok, True, bit_ids)
                    w_tern = tl.reshape(w_tern.to(tl.int8), (WORDS * 32, BLOCK_N))
                    acc = tl.dot(x_bits, w_tern, acc, out_dtype=tl.int32)
        o = out_off + t * step
        if STORE_COUNTS:
            tl.store(cnt_ptr + o, acc.to(cnt_ptr.dtype.element_ty), mask=out_ok)
        if FUSE_LIF:
            z = acc.to(tl.float32) * alpha
            y = z * scale + shift
            if HAS_RES:
                y = y + tl.load(res_ptr + o, mask=out_ok, other=0.0)
            _, spk, v = lif_step(v, y, tau, v_threshold, v_reset, DECAY_INPUT, HARD)
            tl.store(spk_ptr + o, spk, mask=out_ok)
        else:
            acc64 = tl.where(out_ok, acc, 0).to(tl.int64)
            count_sum += tl.sum(acc64, axis=0)
            count_sq += tl.sum(acc64 * acc64, axis=0)
    if not FUSE_LIF:
        tl.atomic_add(sum_ptr + co, count_sum, mask=co_ok)
        tl.atomic_add(sq_ptr + co, count_sq, mask=co_ok)


@triton.autotune(configs=_GRAD_CONFIGS, key=["B", "Ci", "Co", "H", "W"])
@triton.jit
def _bconv_dgrad_kernel(
    gz_ptr,  # [B, Co, Ho, Wo] float32 dL/dZ
    w_mask_ptr,  # [Co, KH, KW, CW] int32
    w_pos_ptr,  # [Co, KH, KW, CW] int32
    alpha_ptr,  # [Co] float32
    gx_ptr,  # [B, Ci, H, W] float32 out
    B,
    Ci,
    H,
    W,
    CW,
    Co,
    Ho,
    Wo,
    stride,
    padding,
    KH: tl.constexpr,
    KW: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # input pixels (b, h, w)
    BLOCK_N: tl.constexpr,  # input channels
    BLOCK_K: tl.constexpr,  # output channels per step
):
    """gx[b, ci, h, w] = sum_{co, kh, kw} gz[b, co, ho, wo] alpha[co] w[co, ci, kh, kw] over the
    (ho, wo) with ho * stride - padding + kh = h (and the same for w)."""
    hw = H * W
    ci, b, pix, h, w, row_ok, ci_ok = _pixel_tile(B * hw, Ci, H, W, BLOCK_M, BLOCK_N)
    ci_word = ci // 32
    ci_bit = ci % 32
    hw_o = Ho * Wo
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kh in tl.static_range(KH):
        h_num = h + padding - kh
        h_num0 = tl.maximum(h_num, 0)
        ho = h_num0 // stride
        h_ok = (h_num >= 0) & (h_num0 % stride == 0) & (ho < Ho)
        for kw in tl.static_range(KW):
            w_num = w + padding - kw
            w_num0 = tl.maximum(w_num, 0)
            wo = w_num0 // stride
            ok = row_ok & h_ok & (w_num >= 0) & (w_num0 % stride == 0) & (wo < Wo)
            gz_base = b * Co * hw_o + ho * Wo + wo
            for c0 in range(0, Co, BLOCK_K):
                co = c0 + tl.arange(0, BLOCK_K)
                co_ok = co < Co
                alpha = tl.load(alpha_ptr + co, mask=co_ok, other=0.0)
                gz = tl.load(gz_ptr + gz_base[:, None] + (co * hw_o)[None, :],
                             mask=ok[:, None] & co_ok[None, :], other=0.0)
                gz = gz * alpha[None, :]
                w_off = (((co * KH + kh) * KW + kw) * CW)[:, None] + ci_word[None, :]
                w_ok = co_ok[:, None] & ci_ok[None, :]
                w_tern = _ternary(w_mask_ptr, w_pos_ptr, w_off, w_ok, False, ci_bit[None, :])
                w_tern = w_tern.to(tl.float32)
                acc = tl.dot(gz, w_tern, acc, input_precision=PRECISION)
    out = (b * Ci * hw + pix)[:, None] + (ci * hw)[None, :]
    tl.store(gx_ptr + out, acc, mask=row_ok[:, None] & ci_ok[None, :])


@triton.autotune(configs=_GRAD_CONFIGS, key=["B", "Ci", "Co", "Ho", "Wo"])
@triton.jit
def _bconv_wgrad_kernel(
    gz_ptr,  # [B, Co, Ho, Wo] float32 dL/dZ
    x_ptr,  # [B, H, W, CW] int32 packed spikes
    gw_ptr,  # [Co, Ci, KH, KW] float32 out
    B,
    Ci,
    H,
    W,
    CW,
    Co,
    Ho,
    Wo,
    stride,
    padding,
    KH: tl.constexpr,
    KW: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output channels
    BLOCK_N: tl.constexpr,  # input channels
    BLOCK_K: tl.constexpr,  # output positions (b, ho, wo) per step
):
    """gw[co, ci, kh, kw] = sum_{b, ho, wo} gz[b, co, ho, wo] * x[b, ci, ho*s-p+kh, wo*s-p+kw].
    Grid axis 2 enumerates (kh, kw)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    kh = pid_k // KW
    kw = pid_k % KW
    co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Co
    ci_ok = ci < Ci
    ci_word = ci // 32
    ci_bit = ci % 32
    hw_o = Ho * Wo
    P = B * hw_o
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for p0 in range(0, P, BLOCK_K):
        pos = p0 + tl.arange(0, BLOCK_K)
        pos_ok = pos < P
        b = pos // hw_o
        pix = pos % hw_o
        ho = pix // Wo
        wo = pix % Wo
        hi = ho * stride - padding + kh
        wi = wo * stride - padding + kw
        ok = pos_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        gz = tl.load(gz_ptr + (co * hw_o)[:, None] + (b * Co * hw_o + pix)[None, :],
                     mask=co_ok[:, None] & pos_ok[None, :], other=0.0)
        x_words = tl.load(x_ptr + (((b * H + hi) * W + wi) * CW)[:, None] + ci_word[None, :],
                          mask=ok[:, None] & ci_ok[None, :], other=0)
        x_bits = ((x_words >> ci_bit[None, :]) & 1).to(tl.float32)
        acc = tl.dot(gz, x_bits, acc, input_precision=PRECISION)
    out = ((co * Ci)[:, None] + ci[None, :]) * (KH * KW) + kh * KW + kw
    tl.store(gw_ptr + out, acc, mask=co_ok[:, None] & ci_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers (shapes checked by binslt/_triton_ops)
# ----------------------------------------------------------------------------------------------


def out_hw(h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def bconv_counts(x_packed: torch.Tensor, w_mask: torch.Tensor, w_pos: torch.Tensor,
                 alpha: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                 residual: torch.Tensor | None, T: int, stride: int, padding: int,
                 fuse_lif: bool, counts_dtype: torch.dtype, tau: float, decay_input: bool,
                 v_threshold: float, v_reset: float | None, store_counts: bool = True):
    """Run the conv kernel. -> (spikes or None, counts [T, Nb, Co, Ho, Wo], sum, sumsq [Co] int64
    (zeros when ``fuse_lif``)). ``store_counts=False`` (inference, needs ``fuse_lif``): counts is
    an empty tensor and the kernel writes none."""
    if not (store_counts or fuse_lif):
        raise ValueError("bconv_counts: store_counts=False needs fuse_lif=True")
    bt, h, w, cw = x_packed.shape
    co, kh, kw, _ = w_mask.shape
    nb = bt // T
    ho, wo = out_hw(h, w, kh, kw, stride, padding)
    dev = x_packed.device
    shape = (T, nb, co, ho, wo)
    counts = torch.empty(shape if store_counts else (0,), dtype=counts_dtype, device=dev)
    spikes = torch.empty(shape, dtype=torch.float32, device=dev) if fuse_lif else None
    s1 = torch.zeros(co, dtype=torch.int64, device=dev)
    s2 = torch.zeros(co, dtype=torch.int64, device=dev)
    check_int32_index(math.prod(shape), "bconv_lif output")
    check_int32_index(x_packed.numel(), "x_packed")
    m = nb * ho * wo
    if math.prod(shape) == 0:
        return spikes, counts, s1, s2
    spk_arg = spikes if fuse_lif else alpha
    res_arg = residual if residual is not None else spk_arg

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]), cdiv(co, meta["BLOCK_N"]))

    launch(_bconv_fwd_kernel, grid,
        x_packed, w_mask, w_pos, alpha, scale, shift, res_arg, spk_arg,
        counts if store_counts else spk_arg, s1, s2,
        T, m, h, w, cw, co, ho, wo, stride, padding, float(tau), float(v_threshold),
        0.0 if v_reset is None else float(v_reset),
        KH=kh, KW=kw, FUSE_LIF=bool(fuse_lif), STORE_COUNTS=bool(store_counts),
        HAS_RES=residual is not None,
        DECAY_INPUT=bool(decay_input), HARD=v_reset is not None)
    return spikes, counts, s1, s2


def bconv_dgrad(g_z: torch.Tensor, w_mask: torch.Tensor, w_pos: torch.Tensor, alpha: torch.Tensor,
                in_channels: int, h: int, w: int, stride: int, padding: int) -> torch.Tensor:
    """g_z: [B, Co, Ho, Wo] float32 -> dL/dx [B, Ci, H, W] float32."""
    b, co, ho, wo = g_z.shape
    _, kh, kw, cw = w_mask.shape
    check_int32_index(b * in_channels * h * w, "grad_x")
    check_int32_index(g_z.numel(), "grad_z [B, Co, Ho, Wo]")
    gx = torch.empty((b, in_channels, h, w), dtype=torch.float32, device=g_z.device)
    if gx.numel() == 0:
        return gx
    if co == 0:
        return gx.zero_()

    def grid(meta):
        return (cdiv(b * h * w, meta["BLOCK_M"]), cdiv(in_channels, meta["BLOCK_N"]))

    launch(_bconv_dgrad_kernel, grid,
        g_z, w_mask, w_pos, alpha, gx, b, in_channels, h, w, cw, co, ho, wo, stride, padding,
        KH=kh, KW=kw, PRECISION=DOT_PRECISION)
    return gx


def bconv_wgrad(g_z: torch.Tensor, x_packed: torch.Tensor, in_channels: int, kh: int, kw: int,
                stride: int, padding: int) -> torch.Tensor:
    """g_z: [B, Co, Ho, Wo] float32, x_packed [B, H, W, Cw] -> dL/dW_eff [Co, Ci, kh, kw]."""
    b, co, ho, wo = g_z.shape
    _, h, w, cw = x_packed.shape
    check_int32_index(g_z.numel(), "grad_z [B, Co, Ho, Wo]")
    check_int32_index(x_packed.numel(), "x_packed")
    check_int32_index(co * in_channels * kh * kw, "grad_weight")
    gw = torch.empty((co, in_channels, kh, kw), dtype=torch.float32, device=g_z.device)
    if gw.numel() == 0:
        return gw
    if b * ho * wo == 0:
        return gw.zero_()

    def grid(meta):
        return (cdiv(co, meta["BLOCK_M"]), cdiv(in_channels, meta["BLOCK_N"]), kh * kw)

    launch(_bconv_wgrad_kernel, grid,
        g_z, x_packed, gw, b, in_channels, h, w, cw, co, ho, wo, stride, padding,
        KH=kh, KW=kw, PRECISION=DOT_PRECISION)
    return gw


__all__ = ["INTERPRET", "bconv_counts", "bconv_dgrad", "bconv_wgrad", "out_hw"]
