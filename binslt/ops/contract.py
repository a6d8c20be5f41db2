"""The op contract, Python side: the one place that decides what the ``binslt::`` ops accept.

Every backend gives the same exception type and message for the same bad argument. The
reference ops (``binslt.reference``, backend ``torch``) and the Triton ops
(``binslt::<op>_triton``) call the checks below at their top; the C++ CPU and CUDA kernels call
the same rules in ``csrc/include/binslt/checks.h``. The layers, models and ``convert`` use the
argument checks at the bottom (backend, prune rate, tau at construction).

Messages start with ``binslt::{op}:``, ``op`` being the schema name without ``_triton``, and
end with ``got {value}``; every check runs before any allocation or launch. Shapes print as lists
(``[2, 3]``), as the C++ side prints ``t.sizes()``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")

# The largest |count| an int16 holds: counts are int16 while 32 * Cw * kh * kw stays below it.
_INT16_MAX = 32767


# ---------------------------------------------------------------------------------------------
# Shared rules (the C++ side has one function for each)
# ---------------------------------------------------------------------------------------------


def channel_words(channels: int) -> int:
    """Packed int32 words per position for ``channels`` channels (32 channels a word)."""
    return (channels + 31) // 32


def counts_dtype(w_mask: torch.Tensor) -> torch.dtype:
    """int16 when the largest possible |count| (32 * Cw * kh * kw) fits, else int32."""
    k = 32 * w_mask.shape[1] * w_mask.shape[2] * w_mask.shape[3]
    return torch.int16 if k <= _INT16_MAX else torch.int32


def out_hw(h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    """Output size of a convolution: ``(H + 2p - kh) // s + 1``, the same for W."""
    return (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


# ---------------------------------------------------------------------------------------------
# Scalar arguments
# ---------------------------------------------------------------------------------------------


def _finite(v: float) -> bool:
    return math.isfinite(float(v))


def check_tau(tau: float, op: str, decay_input: bool) -> None:
    """tau > 0 and finite (LIF), or +inf with decay_input=False: the IF neuron, H = V + X.

    +inf runs through the LIF arithmetic unchanged: (V - V_r) / inf is a signed zero, so
    H = V - 0 + X = V + X exactly, the BPTT carry 1 - 1/inf is 1 and dH/dX is 1. With
    decay_input=True, H = V + (X - (V - V_r)) / inf = V: the input would never reach the neuron.
    """
    tau = float(tau)
    if tau == math.inf:
        if decay_input:
            raise ValueError(f"binslt::{op}: tau=inf (an IF neuron, no leak) needs "
                             f"decay_input=False: with decay_input=True H = V and the input never "
                             f"reaches the neuron, got decay_input={bool(decay_input)}")
        return
    if not (_finite(tau) and tau > 0):
        raise ValueError(f"binslt::{op}: tau must be finite and > 0 (or +inf with "
                         f"decay_input=False: IF), got {tau}")


def check_neuron(op: str, tau: float, decay_input: bool, v_threshold: float,
                 v_reset: Optional[float]) -> None:
    """The forward neuron settings: tau (with decay_input), v_threshold and v_reset."""
    check_tau(tau, op, decay_input)
    if not _finite(v_threshold):
        raise ValueError(f"binslt::{op}: v_threshold must be finite, got {v_threshold}")
    if v_reset is not None and not _finite(v_reset):
        raise ValueError(f"binslt::{op}: v_reset must be None (soft reset) or finite, got "
                         f"{v_reset}")


def check_bn_eps(op: str, bn_eps: float) -> None:
    if not (_finite(bn_eps) and bn_eps > 0):
        raise ValueError(f"binslt::{op}: bn_eps must be finite and > 0, got {bn_eps}")


def check_surrogate(op: str, surrogate: int, surrogate_alpha: float) -> None:
    """The backward's surrogate gradient: its id and its alpha."""
    if surrogate not in (0, 1, 2, 3):
        raise ValueError(f"binslt::{op}: surrogate must be 0 (atan), 1 (sigmoid), 2 (rect) or 3 "
                         f"(piecewise_quadratic), got {surrogate}")
    if not (_finite(surrogate_alpha) and surrogate_alpha > 0):
        raise ValueError(f"binslt::{op}: surrogate_alpha must be finite and > 0, got "
                         f"{surrogate_alpha}")


def check_scalars(op: str, tau: float, decay_input: bool, v_threshold: float,
                  v_reset: Optional[float], bn_eps: Optional[float] = None,
                  surrogate: Optional[int] = None,
                  surrogate_alpha: Optional[float] = None) -> None:
    """Every scalar argument an op has (None: the op has no such argument)."""
    check_neuron(op, tau, decay_input, v_threshold, v_reset)
    if bn_eps is not None:
        check_bn_eps(op, bn_eps)
    if surrogate is not None:
        check_surrogate(op, surrogate, surrogate_alpha)


# ---------------------------------------------------------------------------------------------
# Geometry and tensor arguments
# ---------------------------------------------------------------------------------------------


def check_output_size(op: str, h: int, w: int, kh: int, kw: int, stride: int,
                      padding: int) -> tuple[int, int]:
    """-> (Ho, Wo), both >= 1."""
    ho, wo = out_hw(h, w, kh, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"binslt::{op}: input {h}x{w} is smaller than the kernel {kh}x{kw} "
                         f"with padding {padding}")
    return ho, wo


def check_conv_geometry(op: str, h: int, w: int, kh: int, kw: int, stride: int,
                        padding: int) -> tuple[int, int]:
    """Stride, padding and the output size -> (Ho, Wo)."""
    if stride < 1:
        raise ValueError(f"binslt::{op}: stride must be >= 1, got {stride}")
    if padding < 0:
        raise ValueError(f"binslt::{op}: padding must be >= 0, got {padding}")
    return check_output_size(op, h, w, kh, kw, stride, padding)


def check_timesteps(op: str, T: int, batch: int) -> int:
    """T >= 1 and T divides the packed batch T*N -> N."""
    if T < 1 or batch % T != 0:
        raise ValueError(f"binslt::{op}: T={T} must be >= 1 and divide the packed batch "
                         f"T*N={batch}")
    return batch // T


def check_channel_vec(op: str, name: str, t: torch.Tensor, channels: int) -> torch.Tensor:
    """A per-channel vector [C] of any floating dtype -> float32, contiguous."""
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"binslt::{op}: {name} must have shape [{channels}] (one value per "
                         f"output channel), got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"binslt::{op}: {name} must be a floating tensor, got {t.dtype}")
    return t.to(torch.float32).contiguous()


def check_channel_vecs(op: str, channels: int, **vectors: torch.Tensor) -> list[torch.Tensor]:
    """check_channel_vec for each keyword, in order -> the float32 vectors."""
    return [check_channel_vec(op, name, t, channels) for name, t in vectors.items()]


def check_residual(op: str, residual: Optional[torch.Tensor], shape: Sequence[int]) -> None:
    if residual is not None and list(residual.shape) != list(shape):
        raise ValueError(f"binslt::{op}: residual must have shape {list(shape)}, got "
                         f"{list(residual.shape)}")


def check_weight_planes(op: str, w_mask: torch.Tensor, w_pos: torch.Tensor, x_name: str,
                        x_words: int) -> None:
    """The two weight planes have one shape, with as many channel words as x."""
    if w_mask.shape != w_pos.shape:
        raise ValueError(f"binslt::{op}: w_mask and w_pos must have the same shape, got "
                         f"{list(w_mask.shape)} and {list(w_pos.shape)}")
    if w_mask.dim() == 4 and w_mask.shape[3] != x_words:
        raise ValueError(f"binslt::{op}: the weight has {w_mask.shape[3]} words per position but "
                         f"{x_name} has {x_words} (pack both with the same in_channels)")


def check_packed_input(op: str, x_packed: torch.Tensor) -> tuple[int, int, int, int]:
    """Packed spikes [T*N, H, W, Cw] int32 -> their shape."""
    if x_packed.dim() != 4 or x_packed.dtype != torch.int32:
        raise ValueError(f"binslt::{op}: x_packed must be [T*N, H, W, Cw] int32, got "
                         f"{list(x_packed.shape)} {x_packed.dtype}")
    return tuple(x_packed.shape)


def check_current(op: str, z: torch.Tensor) -> int:
    """A real current z [T, N, C, *] of a floating dtype -> C."""
    if z.dim() < 3:
        raise ValueError(f"binslt::{op}: z must be [T, N, C, *] (time-major), got shape "
                         f"{list(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"binslt::{op}: z must be a float tensor, got {z.dtype}")
    return z.shape[2]


def check_bn_lif(op: str, z: torch.Tensor, residual: Optional[torch.Tensor],
                 **vectors: torch.Tensor) -> list[torch.Tensor]:
    """The tensor rows for a real current z [T, N, C, *]: its per-channel vectors (-> float32)
    and the residual (like z)."""
    vecs = check_channel_vecs(op, check_current(op, z), **vectors)
    check_residual(op, residual, z.shape)
    return vecs


def check_counts(op: str, counts: torch.Tensor) -> None:
    """The integer counts bconv_lif saved for its backward: [T, N, Co, Ho, Wo] int16/int32."""
    if counts.dim() != 5 or counts.dtype not in (torch.int16, torch.int32):
        raise ValueError(f"binslt::{op}: counts must be [T, N, Co, Ho, Wo] int16/int32 "
                         f"(as returned by bconv_lif), got {list(counts.shape)} {counts.dtype}")


def check_infer_input(op: str, x: torch.Tensor) -> tuple[int, int, int, int, int, bool]:
    """The inference input: float spikes [T, N, C, H, W], or packed words [T, N, H, W, Cw] int32
    (a previous layer's packed_out) -> (T, N, H, W, words, packed)."""
    if x.dim() != 5:
        raise ValueError(f"binslt::{op}: x must be spikes [T, N, C, H, W] (or packed words "
                         f"[T, N, H, W, Cw] int32), got shape {list(x.shape)}")
    if x.dtype == torch.int32:
        T, n, h, w, cw = x.shape
        return T, n, h, w, cw, True
    if not x.is_floating_point():
        raise TypeError(f"binslt::{op}: x must be floating-point spikes (0. or 1.) or packed int32 "
                        f"words, got {x.dtype}")
    T, n, c, h, w = x.shape
    return T, n, h, w, channel_words(c), False


POOLS = (1, 2)


def check_pool(op: str, pool: int, ho: int, wo: int) -> tuple[int, int]:
    """Fused max-pooling of a layer's output spikes: pool 1 (none) or 2 (2x2, stride 2), which
    needs an output of at least 2x2 -> the pooled (Ho, Wo)."""
    if isinstance(pool, bool) or pool not in POOLS:
        raise ValueError(f"binslt::{op}: pool must be 1 or 2, got {pool}")
    if ho < pool or wo < pool:
        raise ValueError(f"binslt::{op}: pool={pool} needs a conv output of at least "
                         f"{pool}x{pool}, got {ho}x{wo}")
    return ho // pool, wo // pool


class BconvArgs:
    """The checked arguments of a binary-conv op: geometry and float32 per-channel vectors."""

    __slots__ = ("n", "co", "ho", "wo", "cw", "alpha", "scale", "shift")

    def __init__(self, n, co, ho, wo, cw, alpha, scale, shift):
        self.n, self.co, self.ho, self.wo, self.cw = n, co, ho, wo, cw
        self.alpha, self.scale, self.shift = alpha, scale, shift

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        """[N, Co, Ho, Wo] of one timestep."""
        return self.n, self.co, self.ho, self.wo


def check_bconv(op: str, x_name: str, x_shape: Sequence[int], x_words: int, T: int,
                w_mask: torch.Tensor, w_pos: torch.Tensor, alpha: torch.Tensor,
                scale: torch.Tensor, shift: torch.Tensor, residual: Optional[torch.Tensor],
                stride: int, padding: int) -> BconvArgs:
    """The tensor and geometry rows of the contract for bconv_lif, bconv_lif_infer and
    bconv_lif_bwd. ``x_shape`` is (B, H, W): the packed batch T*N and the input size."""
    for nm, t in (("w_mask", w_mask), ("w_pos", w_pos)):
        if t.dim() != 4 or t.dtype != torch.int32:
            raise ValueError(f"binslt::{op}: {nm} must be [Co, kh, kw, Cw] int32, got "
                             f"{list(t.shape)} {t.dtype}")
    check_weight_planes(op, w_mask, w_pos, x_name, x_words)
    b, h, w = x_shape
    co, kh, kw, _ = w_mask.shape
    n = check_timesteps(op, T, b)
    ho, wo = check_conv_geometry(op, h, w, kh, kw, stride, padding)
    alpha, scale, shift = check_channel_vecs(op, co, alpha=alpha, scale=scale, shift=shift)
    check_residual(op, residual, (T, n, co, ho, wo))
    return BconvArgs(n, co, ho, wo, x_words, alpha, scale, shift)


# ---------------------------------------------------------------------------------------------
# Layer-level arguments (layers, models, convert, ops.use_backend)
# ---------------------------------------------------------------------------------------------


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_prune_rate(prune_rate) -> float:
    """The fraction of weights removed, in [0, 1) -> float. (Biprop's code calls the kept
    fraction ``prune_rate``; binslt does not.)"""
    ok = not isinstance(prune_rate, bool) and isinstance(prune_rate, (int, float))
    if not (ok and 0.0 <= prune_rate < 1.0):
        raise ValueError(f"prune_rate is the fraction of weights removed and must be in [0, 1), "
                         f"got {prune_rate!r}")
    return float(prune_rate)


def resolve_tau(tau: float, decay: Optional[float], op: str) -> float:
    """tau of a LIF layer, from the paper's decay rate lambda = 1 - 1/tau when ``decay`` is given.

    A layer needs tau >= 1 (lambda in [0, 1)), SpikingJelly's LIFNode range, on top of the op
    rule (finite and > 0): below 1 the membrane overshoots its input every step. The op's
    tau = +inf (no leak) is spelt ``neuron="if"`` on a layer, so that a layer has one way of
    saying IF (repr, tickets, NIR).
    """
    if decay is not None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"binslt::{op}: decay (lambda) must be in [0, 1), got {decay}")
        return 1.0 / (1.0 - decay)
    if float(tau) == math.inf:
        raise ValueError(f"binslt::{op}: tau=inf is the IF neuron (no leak); ask for it with "
                         f"neuron='if' instead of a tau, got tau={tau}")
    check_tau(tau, op, False)
    if tau < 1.0:
        raise ValueError(f"binslt::{op}: tau must be >= 1 (lambda = 1 - 1/tau in [0, 1)), got "
                         f"{tau}")
    return float(tau)
