"""The values a layer call reads: the neuron's parameters (``NeuronParams``), the epilogue
(``Epilogue``), the shape settings (``Geometry``) and the weight (``Weights``). The layer modules
make them once; the op paths (``layer``) take them, never a module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .autograd import max_abs_gain
from .contract import out_hw
from .registry import get_op
from .schemas import SURROGATES

# ---------------------------------------------------------------------------------------------
# The values a layer call reads
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuronParams:
    """The LIF neuron of a layer call (SpikingJelly's ``LIFNode``; an IF neuron is tau = +inf,
    decay_input = False). Made once by the layer; unpacked only where an op schema, the
    reference or an autograd Function takes the scalars."""

    tau: float = 2.0
    decay_input: bool = True
    v_threshold: float = 1.0
    v_reset: Optional[float] = 0.0
    detach_reset: bool = False
    surrogate: str = "atan"
    surrogate_alpha: float = 2.0

    def __post_init__(self):
        if self.surrogate not in (*SURROGATES, *SURROGATES.values()):
            raise ValueError(f"surrogate must be one of {tuple(SURROGATES)}, got "
                             f"{self.surrogate!r}")
        norm = dict(tau=float(self.tau), decay_input=bool(self.decay_input),
                    v_threshold=float(self.v_threshold),
                    v_reset=None if self.v_reset is None else float(self.v_reset),
                    detach_reset=bool(self.detach_reset),
                    surrogate_alpha=float(self.surrogate_alpha))
        for k, v in norm.items():
            object.__setattr__(self, k, v)

    @property
    def surrogate_id(self) -> int:
        return SURROGATES.get(self.surrogate, self.surrogate)

    def forward_args(self) -> tuple:
        """(tau, decay_input, v_threshold, v_reset): the forward kernels' neuron arguments."""
        return self.tau, self.decay_input, self.v_threshold, self.v_reset

    def op_args(self) -> tuple:
        """The seven scalars in schema order, the surrogate as its id."""
        return (*self.forward_args(), self.detach_reset, self.surrogate_id,
                self.surrogate_alpha)

    def kwargs(self) -> dict:
        """The seven settings by name (``reference.lif_multistep``'s keywords)."""
        return dict(zip(("tau", "decay_input", "v_threshold", "v_reset", "detach_reset",
                         "surrogate", "surrogate_alpha"), self.op_args()))


class Epilogue(NamedTuple):
    """What runs between the current and the neuron: (BN or a per-channel affine) and an
    optional residual. ``bn_train``: batch statistics with ``eps``; otherwise z * scale + shift.
    ``residual``: a float current, or (no-grad spike paths of a conv) packed spike words or a
    ``Shortcut``."""

    scale: torch.Tensor
    shift: torch.Tensor
    bn_train: bool = False
    eps: float = 1e-5
    residual: Optional[torch.Tensor] = None

    def with_residual(self, residual: Optional[torch.Tensor]) -> Epilogue:
        return self._replace(residual=residual)


class Geometry(NamedTuple):
    """The layer's shape settings: ``linear`` (x [T, N, F], run as a 1x1 image), the conv's
    stride and padding, the 2x2 max-pool after the neuron (``pool=2``) and packed spike words
    out (``packed_out``, the no-grad conv paths)."""

    linear: bool = False
    stride: int = 1
    padding: int = 0
    pool: int = 1
    packed_out: bool = False


_CONV = Geometry()  # a conv, stride 1, no padding, no pool


class Shortcut(NamedTuple):
    """A masked sign-weight conv's current standing as a spiking conv's residual before it is
    computed (a ResNet block's shortcut in eval: ``BinConv2d``'s ``bconv_affine_infer`` path):
    ``bconv_affine_infer(x, w_mask, w_pos, alpha, scale, shift, stride, padding)`` of the block
    input ``x`` (float 0/1 spikes [T, N, C, H, W] or packed words [T, N, H, W, Cw] int32) as
    [T, N, Co, Ho, Wo]. The no-grad spike path of a backend that fuses it
    (``Capabilities.fused_shortcut``) runs ``binslt::bconv_lif_infer_shortcut``, so that the
    float map is never written whole; any other path computes it first (``current``)."""

    x: torch.Tensor
    w_mask: torch.Tensor
    w_pos: torch.Tensor
    alpha: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    stride: int = 1
    padding: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """[T, N, Co, Ho, Wo], the current's shape."""
        x, packed = self.x, self.x.dtype == torch.int32
        h, w = (x.shape[2], x.shape[3]) if packed else (x.shape[3], x.shape[4])
        co, kh, kw, _ = self.w_mask.shape
        return (x.shape[0], x.shape[1], co, *out_hw(h, w, kh, kw, self.stride, self.padding))

    @property
    def requires_grad(self) -> bool:
        """False: a shortcut is a residual of the no-grad paths only."""
        return False

    def current(self) -> torch.Tensor:
        """The shortcut's current [T, N, Co, Ho, Wo] float32, computed."""
        x = self.x.flatten(0, 1)
        r = torch.ops.binslt.bconv_affine_infer(
            x if x.dtype == torch.int32 else x.float(), self.w_mask, self.w_pos, self.alpha,
            self.scale, self.shift, self.stride, self.padding)
        return r.view(self.shape)


class Weights(NamedTuple):
    """A layer's weight as the paths read it: ``w_eff`` (the differentiable W_eff, [Co, Ci, k,
    k] or [O, F]), ``planes`` (its (mask bits, positive bits, gain); None: packed from W_eff
    where a path needs them) and ``gain``, a constant factor of the input folded into the
    weight (``folded``): conv(gain * x) = conv(x) with gain * W_eff."""

    w_eff: Optional[torch.Tensor] = None
    planes: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    gain: float = 1.0

    def folded(self) -> Weights:
        """The same weight with the gain folded in (W_eff and the kernel gain scaled, the bit
        planes unchanged) and gain 1."""
        if self.gain == 1.0:
            return self
        g = self.gain
        planes = None if self.planes is None else (*self.planes[:2], self.planes[2] * g)
        w = None if self.w_eff is None else self.w_eff * g
        return Weights(w, planes, 1.0)

    def packed(self, be: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask bits, positive bits [Co, kh, kw, Cw] int32, gain [Co] float32): the planes, or
        W_eff packed by backend ``be`` ([O, F] weights as 1x1 kernels)."""
        if self.planes is not None:
            return self.planes
        with torch.no_grad():
            w = self.dense().detach().float()
            w4 = w.view(*w.shape, 1, 1) if w.dim() == 2 else w
            return (*get_op("pack_weight", be)(w4), max_abs_gain(w4))

    def dense(self) -> torch.Tensor:
        """W_eff (ValueError where only the bit planes were given)."""
        if self.w_eff is None:
            raise ValueError("Weights: this path needs W_eff (w_eff), got only bit planes")
        return self.w_eff
