"""The reference's neuron building blocks (differentiable, any float dtype, float64 included):
the surrogate spike function, SpikingJelly's multi-step LIF and ApproxSign. Re-exported by
:mod:`binslt.ops.reference`, the oracle every kernel is checked against."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .function import Function

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


def saves_inputs(*positions: int):
    """The ``setup_context`` (a staticmethod) of an autograd Function whose backward reads its
    inputs at ``positions`` (``ctx.saved_tensors``, in that order) and nothing else."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in positions))

    return staticmethod(setup_context)


class _SpikeFn(Function):
    """Heaviside(x >= 0) forward, surrogate derivative backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, surrogate: int, alpha: float) -> torch.Tensor:
        return (x >= 0).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, surrogate, alpha = inputs
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.alpha = surrogate, alpha

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


class _ApproxSign(Function):
    """sign(x) (with sign(0) = +1, so outputs are +-1) and Bi-Real's ApproxSign backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    setup_context = saves_inputs(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 * (1 - x.clamp(-1, 1).abs())


def sign_activation(x: torch.Tensor) -> torch.Tensor:
    """Binary activation of the BNN-BinAct baseline: sign forward, ApproxSign backward."""
    return _ApproxSign.apply(x)
