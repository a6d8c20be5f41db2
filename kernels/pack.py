"""Bit packing: spikes and ternary weights to channel-last int32 words (bit c % 32 of word c // 32).

Ladder: ``_pack_bits_kernel`` / ``_unpack_bits_kernel`` (``@triton.jit``) -> ``pack_spikes`` /
``pack_weight`` / ``unpack_spikes`` (launchers: check, allocate, launch through
``torch.library.wrap_triton`` so that ``triton_op`` can trace them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, check_device, check_int32_index, launch


@triton.jit
def _pack_bits_kernel(
    x_ptr,  # [B, C, S] float, contiguous
    mask_ptr,  # [B, S, CW] int32: bit set where x != 0
    pos_ptr,  # [B, S, CW] int32: bit set where x > 0 (only when WITH_POS)
    P,  # B * S positions
    C,
    S,
    CW,
    WITH_POS: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """word[b, s, w] = sum_{bit < 32} (x[b, 32 w + bit, s] != 0) << bit (bits are disjoint, so the
    int32 sum is an OR even for bit 31)."""
    pid_p = tl.program_id(0)
    w = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    bit = tl.arange(0, 32)
    b = p // S
    s = p % S
    c = w * 32 + bit
    pm = p < P
    m = pm[:, None] & (c < C)[None, :]
    v = tl.load(x_ptr + (b * C * S + s)[:, None] + (c * S)[None, :], mask=m, other=0.0)
    one = tl.full((32,), 1, tl.int32)
    bitval = (one << bit)[None, :]
    word = tl.sum(tl.where(v != 0, bitval, 0), axis=1)
    tl.store(mask_ptr + p * CW + w, word, mask=pm)
    if WITH_POS:
        wpos = tl.sum(tl.where(v > 0, bitval, 0), axis=1)
        tl.store(pos_ptr + p * CW + w, wpos, mask=pm)


@triton.jit
def _unpack_bits_kernel(
    packed_ptr,  # [B, S, CW] int32
    out_ptr,  # [B, C, S] float32
    P,
    C,
    S,
    CW,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """out[b, c, s] = (word[b, s, c // 32] >> (c % 32)) & 1; the tile is wide along s, which is
    contiguous in the output."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    b = p // S
    s = p % S
    m = (c < C)[:, None] & (p < P)[None, :]
    word = tl.load(packed_ptr + (p * CW)[None, :] + (c // 32)[:, None], mask=m, other=0)
    bits = (word >> (c % 32)[:, None]) & 1
    tl.store(out_ptr + (b * C * S + s)[None, :] + (c * S)[:, None], bits.to(tl.float32), mask=m)


def _blocks_p(p: int) -> int:
    return 1024 if INTERPRET else 128


def _pack(x: torch.Tensor, with_pos: bool, op: str):
    # x: [B, C, *spatial] float -> [B, *spatial, ceil(C/32)] int32 (and the pos plane)
    check_device(x, op=op)
    if not x.is_floating_point():
        raise TypeError(f"binslt::{op}_triton expects a float tensor, got {x.dtype}")
    check_int32_index(x.numel(), f"{op} input")
    b, c = x.shape[0], x.shape[1]
    spatial = tuple(x.shape[2:])
    s = 1
    for d in spatial:
        s *= d
    cw = cdiv(c, 32)
    xc = x.contiguous()
    mask = torch.empty((b, *spatial, cw), dtype=torch.int32, device=x.device)
    pos = torch.empty_like(mask) if with_pos else mask
    p = b * s
    if p > 0 and cw > 0:
        bp = _blocks_p(p)
        launch(_pack_bits_kernel, (cdiv(p, bp), cw),
            xc, mask, pos, p, c, s, cw, WITH_POS=with_pos, BLOCK_P=bp,
            num_warps=1 if INTERPRET else 4)
    return mask, pos


def pack_spikes(x: torch.Tensor) -> torch.Tensor:
    """x: [B, C, H, W] float spikes in {0, 1} -> [B, H, W, ceil(C/32)] int32 (bit = x != 0)."""
    if x.dim() != 4:
        raise ValueError(f"pack_spikes expects x of shape [B, C, H, W], got {tuple(x.shape)}")
    return _pack(x, False, "pack_spikes")[0]


def pack_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [Co, Ci, kh, kw] float, signs in {-1, 0, +1} times any positive factor -> (mask,
    pos) [Co, kh, kw, Cw] int32 (bit set where w != 0, and where w > 0)."""
    if weight.dim() != 4:
        raise ValueError(
            f"pack_weight expects a weight of shape [Co, Ci, kh, kw], got {tuple(weight.shape)}")
    return _pack(weight, True, "pack_weight")


def unpack_spikes(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """packed: [B, H, W, Cw] int32 -> [B, channels, H, W] float32."""
    check_device(packed, op="unpack_spikes")
    if packed.dim() != 4 or packed.dtype != torch.int32:
        raise ValueError("unpack_spikes expects packed words of shape [B, H, W, Cw] int32, got "
                         f"{tuple(packed.shape)} {packed.dtype}")
    b, h, w, cw = packed.shape
    if not 0 <= channels <= 32 * cw:
        raise ValueError(f"unpack_spikes: channels={channels} does not fit in {cw} words "
                         f"(at most {32 * cw})")
    out = torch.empty((b, channels, h, w), dtype=torch.float32, device=packed.device)
    check_int32_index(out.numel(), "unpack_spikes output")
    p = b * h * w
    if p > 0 and channels > 0:
        bp = 256 if INTERPRET else 128
        bc = 64 if INTERPRET else 32
        launch(_unpack_bits_kernel, (cdiv(p, bp), cdiv(channels, bc)),
            packed.contiguous(), out, p, channels, h * w, cw, BLOCK_C=bc, BLOCK_P=bp,
            num_warps=1 if INTERPRET else 4)
    return out
